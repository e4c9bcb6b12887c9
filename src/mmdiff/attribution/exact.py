"""Exact activation patching, one forward pass per head, to validate attribution patching."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mmdiff.attribution._common import batches
from mmdiff.progress import progress_bar
from mmdiff.attribution.corrupt import VisualMean
from mmdiff.attribution.objective import Objective, Positions
from mmdiff.attribution.runs import check_inputs, hooked_forward, prepare_batch
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError, DataError
from mmdiff.models.base import VLMAdapter

Direction = Literal["noising", "denoising"]


@dataclass
class ExactPatching:
    """Exact activation patching of every head at layers 0..L, one forward pass per head."""

    noising: torch.Tensor | None  # [L + 1, H] mean m(clean, head from corrupt) - m(clean)
    denoising: torch.Tensor | None  # [L + 1, H] mean m(corrupt, head from clean) - m(corrupt)
    layer_noising: torch.Tensor | None  # [L + 1] all heads of the layer patched at once
    layer_denoising: torch.Tensor | None
    seconds: float
    forward_passes: int


def exact_patching(
    adapter: VLMAdapter,
    sae: Any,
    layer: int,
    feature: int,
    records: Sequence[Record],
    visual_mean: VisualMean,
    *,
    objective: Objective = "projection",
    positions: Positions = "all",
    directions: Sequence[Direction] = ("noising",),
    per_layer: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> ExactPatching:
    """Exact activation patching of each head at layers 0..layer, one forward pass per head.

    noising: the head's o_proj-input slice from the corrupt run put into the clean run, change in
    m (what Method A estimates); denoising: the clean slice put into the corrupt run (Method B).
    With `per_layer`, also every layer's heads patched together.
    """
    records = check_inputs(adapter, sae, layer, records)
    directions = tuple(dict.fromkeys(directions))
    if not directions or any(d not in ("noising", "denoising") for d in directions):
        raise ConfigError(f"directions must be a non-empty subset of ('noising', 'denoising'), got {directions!r}")
    backbone = adapter.vlm
    H = backbone.num_heads
    n_layers = layer + 1
    sums = {d: torch.zeros(n_layers, H, dtype=torch.float64) for d in directions}
    layer_sums = {d: torch.zeros(n_layers, dtype=torch.float64) for d in directions}
    forwards = 0
    start = time.perf_counter()
    passes_per_batch = len(directions) * n_layers * (H + int(per_layer))
    n_batches = (len(records) + batch_size - 1) // batch_size
    with progress_bar(progress) as bar:
        task = bar.add_task(f"exact patching L{layer}F{feature}", total=n_batches * passes_per_batch)
        for chunk in batches(records, batch_size):
            batch = prepare_batch(adapter, sae, layer, feature, chunk, visual_mean, objective, positions)
            clean = hooked_forward(backbone, batch.inputs, layer=layer, objective=batch.objective)
            corr = hooked_forward(backbone, batch.inputs, layer=layer, objective=batch.objective, corrupt=batch.corrupt)
            forwards += 2
            for direction in directions:
                # noising: corrupt slices into the clean run; denoising: clean slices into the corrupt run
                base, source, corrupt = (
                    (clean, corr, None) if direction == "noising" else (corr, clean, batch.corrupt)
                )
                for lyr in range(n_layers):
                    groups = [[h] for h in range(H)] + ([list(range(H))] if per_layer else [])
                    for heads in groups:
                        run = hooked_forward(
                            backbone, batch.inputs, layer=layer, objective=batch.objective, corrupt=corrupt,
                            patch={lyr: (heads, source.o[lyr])},
                        )
                        delta = (run.m - base.m).double().sum().cpu()
                        if len(groups) > H and heads is groups[-1]:
                            layer_sums[direction][lyr] += delta
                        else:
                            sums[direction][lyr, heads[0]] += delta
                        forwards += 1
                        bar.advance(task)
    n = len(records)
    seconds = time.perf_counter() - start

    def mean(d: str, table: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return (table[d] / n).float() if d in table else None

    return ExactPatching(
        noising=mean("noising", sums),
        denoising=mean("denoising", sums),
        layer_noising=mean("noising", layer_sums) if per_layer else None,
        layer_denoising=mean("denoising", layer_sums) if per_layer else None,
        seconds=seconds,
        forward_passes=forwards,
    )


def spearman(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Spearman rank correlation of two score tables (flattened); NaN when either is constant."""
    from scipy.stats import spearmanr

    x = np.asarray(torch.as_tensor(a).flatten().double())
    y = np.asarray(torch.as_tensor(b).flatten().double())
    if x.shape != y.shape:
        raise DataError(f"cannot correlate {x.shape[0]} scores with {y.shape[0]}")
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)
