"""Attribution patching: Methods A and B for every head at once, two forwards and a backward per method.

Method A = sum over positions of (o_corr - o_clean) . dm/do at the clean run; Method B = sum over
positions of (o_clean - o_corr) . dm/do at the corrupt run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmdiff.attribution._common import batches
from mmdiff.progress import iterate
from mmdiff.attribution.corrupt import VisualMean
from mmdiff.attribution.objective import Objective, Positions
from mmdiff.attribution.runs import Run, check_inputs, hooked_forward, prepare_batch
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError
from mmdiff.models.base import VLMAdapter

Method = Literal["a", "b"]


def _per_head(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, seq, H * head_dim] -> [batch, H]: summed over positions and the head's dimensions."""
    b, t, width = x.shape
    return x.reshape(b, t, num_heads, width // num_heads).sum(dim=(1, 3))


def _head_scores(start: Run, end: Run, grads: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """[batch, L + 1, H]: sum over positions of (end.o - start.o) . grad, per layer and head (fp32)."""
    per_layer = [
        _per_head((end.o[lyr].detach().float() - start.o[lyr].detach().float()) * g.float(), num_heads)
        for lyr, g in enumerate(grads)
    ]
    return torch.stack(per_layer, dim=1).cpu()


def _grads(run: Run, layers: Sequence[int]) -> list[torch.Tensor]:
    tensors = [run.o[lyr] for lyr in layers]
    grads = torch.autograd.grad(run.m.sum(), tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


@dataclass
class HeadAttribution:
    """Attribution-patching scores of every head at layers 0..L for one feature, averaged over samples."""

    feature_layer: int
    feature: int
    record_ids: list[str]
    score_a: torch.Tensor | None  # [L + 1, H] Method A, mean over samples; None when not computed
    score_b: torch.Tensor | None  # [L + 1, H] Method B
    per_sample_a: torch.Tensor | None  # [n, L + 1, H]
    per_sample_b: torch.Tensor | None  # [n, L + 1, H]
    m_clean: torch.Tensor  # [n] objective on the clean runs
    m_corrupt: torch.Tensor  # [n] objective on the corrupt runs
    seconds: float
    forward_passes: int
    backward_passes: int

    @property
    def layer_a(self) -> torch.Tensor | None:
        """[L + 1] Method A per layer: the sum of the layer's head scores."""
        return None if self.score_a is None else self.score_a.sum(1)

    @property
    def layer_b(self) -> torch.Tensor | None:
        return None if self.score_b is None else self.score_b.sum(1)


def attribution_patching(
    adapter: VLMAdapter,
    sae: Any,
    layer: int,
    feature: int,
    records: Sequence[Record],
    visual_mean: VisualMean,
    *,
    objective: Objective = "projection",
    positions: Positions = "all",
    methods: Sequence[Method] = ("a", "b"),
    batch_size: int = 8,
    progress: bool = True,
) -> HeadAttribution:
    """Methods A and B for every head at layers 0..layer, averaged over `records`.

    Per batch: a clean and a corrupt forward (each stopped after `layer`) and one backward per
    method. Method A alone needs no graph on the corrupt run, Method B none on the clean run.
    """
    records = check_inputs(adapter, sae, layer, records)
    methods = tuple(dict.fromkeys(methods))
    if not methods or any(m not in ("a", "b") for m in methods):
        raise ConfigError(f"methods must be a non-empty subset of ('a', 'b'), got {methods!r}")
    backbone = adapter.vlm
    heads_layers = list(range(layer + 1))
    H = backbone.num_heads
    per_a: list[torch.Tensor] = []
    per_b: list[torch.Tensor] = []
    m_clean: list[torch.Tensor] = []
    m_corr: list[torch.Tensor] = []
    forwards = backwards = 0
    start = time.perf_counter()
    for chunk in iterate(list(batches(records, batch_size)), f"attribution patching L{layer}F{feature}", progress):
        batch = prepare_batch(adapter, sae, layer, feature, chunk, visual_mean, objective, positions)
        clean = hooked_forward(backbone, batch.inputs, layer=layer, objective=batch.objective, track="a" in methods)
        corr = hooked_forward(
            backbone, batch.inputs, layer=layer, objective=batch.objective, corrupt=batch.corrupt, track="b" in methods
        )
        forwards += 2
        if "a" in methods:
            per_a.append(_head_scores(clean, corr, _grads(clean, heads_layers), H))  # (corr - clean) . grad_clean
            backwards += 1
        if "b" in methods:
            per_b.append(_head_scores(corr, clean, _grads(corr, heads_layers), H))  # (clean - corr) . grad_corr
            backwards += 1
        m_clean.append(clean.m.detach().float().cpu())
        m_corr.append(corr.m.detach().float().cpu())
    seconds = time.perf_counter() - start
    sample_a = torch.cat(per_a) if per_a else None
    sample_b = torch.cat(per_b) if per_b else None
    return HeadAttribution(
        feature_layer=layer,
        feature=feature,
        record_ids=[r.id for r in records],
        score_a=None if sample_a is None else sample_a.mean(0),
        score_b=None if sample_b is None else sample_b.mean(0),
        per_sample_a=sample_a,
        per_sample_b=sample_b,
        m_clean=torch.cat(m_clean),
        m_corrupt=torch.cat(m_corr),
        seconds=seconds,
        forward_passes=forwards,
        backward_passes=backwards,
    )
