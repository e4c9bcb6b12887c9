"""Attribution patching from attention heads to an SAE feature (METHOD.md §5, seed 001 §8).

Objective for feature f at layer L: m = sum over positions of the layer-L residual projected on the
unit decoder direction d_f / ||d_f|| (objective="projection"), or of the SAE activation h_f
(objective="activation"). Positions are the non-special, non-padding tokens ("all"), or only the
text or image tokens.

Clean run = image + question. Corrupt run = the same inputs with the hidden states entering decoder
layer 0 at image-token positions replaced by the per-position mean over a calibration set
(`visual_embedding_mean`): the k-th image token gets the mean of the k-th image tokens, so every
position stays where it was. Per-head activation o_h = head h's slice of the input of o_proj, at
every layer <= L.

- Method A = sum over positions of (o_corr - o_clean) . dm/do at the clean run;
- Method B = sum over positions of (o_clean - o_corr) . dm/do at the corrupt run.

Both come from two forward passes and one backward pass per method for all heads at once (the
forward stops after layer L). A estimates noising, m(clean with the head from corrupt) - m(clean);
B estimates denoising, m(corrupt with the head from clean) - m(corrupt): `exact_patching` computes
both exactly, one pass per head, to validate. Scores are averaged over the samples (the feature's
top-k activating records). A layer's score is the sum of its heads' scores (the linear estimate of
patching the layer's whole attention output); the exact layer value patches all its heads at once.

`attribute_features` is the pipeline stage: it writes heads.parquet, layers.parquet, summary.json
and attention-overlay PNGs of the top and bottom heads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from mmdiff.data.records import Record
from mmdiff.errors import ConfigError, DataError, ModelError, SAEError
from mmdiff.interp.examples import feature_keys, feature_maxima
from mmdiff.models.base import Backbone, TokenType, VLMAdapter

Objective = Literal["projection", "activation"]
Positions = Literal["all", "text", "image"]
Method = Literal["a", "b"]
Direction = Literal["noising", "denoising"]


class _Stop(Exception):
    """Raised after the layer that the objective reads, to skip the rest of the model."""


def _batches(records: Sequence[Record], batch_size: int) -> Iterator[list[Record]]:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(records), batch_size):
        yield list(records[start : start + batch_size])


def _progress(enabled: bool) -> Any:
    """A transient rich progress bar (disabled when `enabled` is False)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not enabled, transient=True,
    )


def _iterate(items: Iterator[Any] | Sequence[Any], description: str, enabled: bool) -> Iterator[Any]:
    """The items, with a progress bar when `enabled`."""
    items = list(items)
    with _progress(enabled) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# ------------------------------------------------------------------------------------------------
# The corrupt run: mean layer-0 visual embeddings
# ------------------------------------------------------------------------------------------------


@dataclass
class VisualMean:
    """Mean hidden state entering decoder layer 0 at image-token positions, per image-token index."""

    per_position: torch.Tensor  # [K, d_model] mean of the k-th image token over the records that have one
    counts: torch.Tensor  # [K] int64 records that contributed to each index
    overall: torch.Tensor  # [d_model] mean over all image tokens (for indices past K)

    def for_count(self, n: int) -> torch.Tensor:
        """[n, d_model] replacement for a row with n image tokens: per-index means, the overall
        mean where no calibration record had that many image tokens."""
        out = self.overall.expand(n, -1).clone()
        k = min(n, self.per_position.shape[0])
        have = self.counts[:k] > 0
        out[:k][have] = self.per_position[:k][have]
        return out


@contextmanager
def _layer0_input(backbone: Backbone, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Rewrite the hidden states entering decoder layer 0 ([batch, seq, d_model] -> same)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise ModelError(
                f"{type(module).__name__} was called without hidden_states; this architecture needs its own "
                "layer-0 hook"
            )
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    handle = backbone.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def visual_embedding_mean(
    adapter: VLMAdapter, records: Sequence[Record], *, batch_size: int = 8, progress: bool = True
) -> VisualMean:
    """The corrupt run's replacement: per image-token index, the mean layer-0 input over `records`.

    One forward per batch, stopped at decoder layer 0. Records with different image-token counts
    (LLaVA-NeXT anyres, Qwen2-VL) contribute to the indices they have.
    """
    records = list(records)
    if not records:
        raise DataError("visual_embedding_mean needs calibration records with images; got none")
    backbone = adapter.vlm
    sums = torch.zeros(0, backbone.d_model, dtype=torch.float64)
    counts = torch.zeros(0, dtype=torch.long)
    seen: dict[str, torch.Tensor] = {}

    def grab(h: torch.Tensor) -> torch.Tensor:
        seen["h"] = h.detach()
        raise _Stop

    with _progress(progress) as bar, _layer0_input(backbone, grab), torch.no_grad():
        task = bar.add_task("visual embedding mean", total=len(records))
        for chunk in _batches(records, batch_size):
            inputs = adapter.vlm_inputs(chunk)
            try:
                backbone.model(**inputs, use_cache=False)
            except _Stop:
                pass
            h = seen.pop("h")  # [batch, seq, d_model]
            mask = adapter.image_token_mask(inputs["input_ids"]).to(h.device)  # [batch, seq]
            for row in range(h.shape[0]):
                x = h[row][mask[row]].double().cpu()  # [n_image, d_model]
                n = x.shape[0]
                if n > sums.shape[0]:
                    grow = n - sums.shape[0]
                    sums = torch.cat([sums, torch.zeros(grow, sums.shape[1], dtype=sums.dtype)])
                    counts = torch.cat([counts, torch.zeros(grow, dtype=counts.dtype)])
                sums[:n] += x
                counts[:n] += 1
            bar.advance(task, len(chunk))
    if int(counts.sum()) == 0:
        raise DataError(
            "the calibration records produced no image tokens: visual_embedding_mean needs records with images"
        )
    per_position = sums / counts.clamp_min(1)[:, None]
    overall = (sums.sum(0) / counts.sum()).float()
    dtype = backbone.dtype
    return VisualMean(per_position.to(dtype), counts, overall.to(dtype))


def _replacement(
    visual_mean: VisualMean, image_mask: torch.Tensor, d_model: int, dtype: torch.dtype
) -> torch.Tensor:
    """[batch, seq, d_model]: each row's image positions filled with the per-index means (0 elsewhere)."""
    if visual_mean.overall.shape[-1] != d_model:
        raise DataError(
            f"the visual mean has d_model {visual_mean.overall.shape[-1]}, the model {d_model}: was it "
            "computed with another model?"
        )
    out = torch.zeros(*image_mask.shape, d_model, dtype=dtype, device=image_mask.device)
    for row in range(image_mask.shape[0]):
        n = int(image_mask[row].sum())
        if n:
            out[row, image_mask[row]] = visual_mean.for_count(n).to(device=out.device, dtype=dtype)
    return out


# ------------------------------------------------------------------------------------------------
# The objective and one hooked forward pass
# ------------------------------------------------------------------------------------------------


def _feature_direction(sae: Any, feature: int) -> torch.Tensor:
    w = getattr(sae, "W_dec", None)
    if w is None or w.ndim != 2:
        raise SAEError("the SAE has no 2-D W_dec [d_sae, d_in]; pass an mmdiff SAE")
    if not 0 <= feature < w.shape[0]:
        raise SAEError(f"feature {feature} does not exist: the SAE has {w.shape[0]} latents")
    d = w[feature].detach().float()
    norm = d.norm()
    if norm == 0:
        raise SAEError(f"feature {feature} has a zero decoder row; its direction is undefined")
    return d / norm  # [d_model]


def objective_positions(adapter: VLMAdapter, inputs: dict[str, torch.Tensor], positions: Positions) -> torch.Tensor:
    """[batch, seq] bool: the positions the objective sums over (never padding or special tokens)."""
    types = adapter.token_types(inputs).long()  # [batch, seq]
    valid = inputs["attention_mask"].bool() & (types != int(TokenType.SPECIAL))
    if positions == "all":
        return valid
    if positions == "text":
        return valid & (types == int(TokenType.TEXT))
    if positions == "image":
        return valid & (types == int(TokenType.IMAGE))
    raise ConfigError(f"positions must be 'all', 'text' or 'image', got {positions!r}")


def feature_values(resid: torch.Tensor, sae: Any, feature: int, objective: Objective) -> torch.Tensor:
    """[batch, seq] per-position value of the objective: resid . d_f/||d_f||, or h_f = SAE activation."""
    if objective == "projection":
        return resid.float() @ _feature_direction(sae, feature).to(resid.device)
    if objective == "activation":
        w = sae.W_dec
        return sae.encode(resid.to(device=w.device))[..., feature].float().to(resid.device)
    raise ConfigError(f"objective must be 'projection' or 'activation', got {objective!r}")


@dataclass
class _Run:
    m: torch.Tensor  # [batch] objective per sample (with a graph when tracked)
    o: dict[int, torch.Tensor]  # layer -> [batch, seq, H * head_dim] input of o_proj


def _forward(
    backbone: Backbone,
    inputs: dict[str, torch.Tensor],
    *,
    layer: int,
    objective: Callable[[torch.Tensor], torch.Tensor],
    corrupt: tuple[torch.Tensor, torch.Tensor] | None = None,
    track: bool = False,
    patch: Mapping[int, tuple[Sequence[int], torch.Tensor]] | None = None,
) -> _Run:
    """One forward pass up to layer `layer`, reading o_proj inputs of layers 0..layer.

    corrupt = (image mask [batch, seq], replacement [batch, seq, d_model]) edits the layer-0 input.
    track = build the graph from the layer-0 input (for dm/do). patch = {l: (heads, values
    [batch, seq, H * head_dim])} puts those heads' slices of `values` into o_proj's input at layer l.
    """
    hd = backbone.head_dim
    captured: dict[int, torch.Tensor] = {}
    result: dict[str, torch.Tensor] = {}

    def edit0(h: torch.Tensor) -> torch.Tensor:
        if corrupt is not None:
            mask, replacement = corrupt
            h = torch.where(mask[..., None].to(h.device), replacement.to(h.device, h.dtype), h)
        return h.detach().requires_grad_(True) if track else h

    def o_hook(lyr: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            x = args[0] if args else kwargs["input"]  # [batch, seq, H * head_dim]
            if patch is not None and lyr in patch:
                heads, values = patch[lyr]
                x = x.clone()
                for h in heads:
                    x[..., h * hd : (h + 1) * hd] = values[..., h * hd : (h + 1) * hd].to(x.device, x.dtype)
            captured[lyr] = x
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "input": x}

        return hook

    def out_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        result["m"] = objective(_first_tensor(output))
        raise _Stop

    handles = [backbone.o_proj(lyr).register_forward_pre_hook(o_hook(lyr), with_kwargs=True) for lyr in range(layer + 1)]
    handles.append(backbone.layers[layer].register_forward_hook(out_hook))
    grad = torch.enable_grad() if track else torch.no_grad()
    try:
        with grad, _layer0_input(backbone, edit0):
            backbone.model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "m" not in result:
        raise ModelError(f"the hook at decoder layer {layer} never fired: is this Backbone the model's decoder?")
    return _Run(result["m"], captured)


def _per_head(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, seq, H * head_dim] -> [batch, H]: summed over positions and the head's dimensions."""
    b, t, width = x.shape
    return x.reshape(b, t, num_heads, width // num_heads).sum(dim=(1, 3))


def _head_scores(start: _Run, end: _Run, grads: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """[batch, L + 1, H]: sum over positions of (end.o - start.o) . grad, per layer and head (fp32)."""
    per_layer = [
        _per_head((end.o[lyr].detach().float() - start.o[lyr].detach().float()) * g.float(), num_heads)
        for lyr, g in enumerate(grads)
    ]
    return torch.stack(per_layer, dim=1).cpu()


def _grads(run: _Run, layers: Sequence[int]) -> list[torch.Tensor]:
    tensors = [run.o[lyr] for lyr in layers]
    grads = torch.autograd.grad(run.m.sum(), tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


# ------------------------------------------------------------------------------------------------
# Attribution patching and exact activation patching
# ------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    inputs: dict[str, torch.Tensor]
    objective: Callable[[torch.Tensor], torch.Tensor]
    corrupt: tuple[torch.Tensor, torch.Tensor]
    record_ids: list[str]


def _prepare(
    adapter: VLMAdapter,
    sae: Any,
    layer: int,
    feature: int,
    chunk: Sequence[Record],
    visual_mean: VisualMean,
    objective: Objective,
    positions: Positions,
) -> _Batch:
    backbone = adapter.vlm
    inputs = adapter.vlm_inputs(chunk)
    image_mask = adapter.image_token_mask(inputs["input_ids"])  # [batch, seq]
    if not bool(image_mask.any(1).all()):
        missing = [r.id for r, ok in zip(chunk, image_mask.any(1).tolist()) if not ok]
        raise DataError(f"records {missing} have no image tokens; attribution patching corrupts the image")
    keep = objective_positions(adapter, inputs, positions).to(backbone.device)  # [batch, seq]

    def m(resid: torch.Tensor) -> torch.Tensor:  # [batch, seq, d_model] -> [batch]
        return (feature_values(resid, sae, feature, objective) * keep).sum(1)

    replacement = _replacement(visual_mean, image_mask, backbone.d_model, backbone.dtype)
    return _Batch(inputs, m, (image_mask, replacement), [r.id for r in chunk])


def _check(adapter: VLMAdapter, sae: Any, layer: int, records: Sequence[Record]) -> list[Record]:
    adapter.vlm.check_layers([layer])
    d_in = getattr(getattr(sae, "cfg", None), "d_in", None) or sae.W_dec.shape[1]
    if int(d_in) != adapter.vlm.d_model:
        raise SAEError(
            f"the SAE reads d_in={d_in} but the VLM's hidden size is {adapter.vlm.d_model}: is it for another model?"
        )
    records = list(records)
    if not records:
        raise DataError("no records given: attribution needs the feature's top-activating samples")
    return records


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


@dataclass
class ExactPatching:
    """Exact activation patching of every head at layers 0..L, one forward pass per head."""

    noising: torch.Tensor | None  # [L + 1, H] mean m(clean, head from corrupt) - m(clean)
    denoising: torch.Tensor | None  # [L + 1, H] mean m(corrupt, head from clean) - m(corrupt)
    layer_noising: torch.Tensor | None  # [L + 1] all heads of the layer patched at once
    layer_denoising: torch.Tensor | None
    seconds: float
    forward_passes: int


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
    records = _check(adapter, sae, layer, records)
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
    for chunk in _iterate(_batches(records, batch_size), f"attribution patching L{layer}F{feature}", progress):
        batch = _prepare(adapter, sae, layer, feature, chunk, visual_mean, objective, positions)
        clean = _forward(backbone, batch.inputs, layer=layer, objective=batch.objective, track="a" in methods)
        corr = _forward(
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
    records = _check(adapter, sae, layer, records)
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
    with _progress(progress) as bar:
        task = bar.add_task(f"exact patching L{layer}F{feature}", total=n_batches * passes_per_batch)
        for chunk in _batches(records, batch_size):
            batch = _prepare(adapter, sae, layer, feature, chunk, visual_mean, objective, positions)
            clean = _forward(backbone, batch.inputs, layer=layer, objective=batch.objective)
            corr = _forward(backbone, batch.inputs, layer=layer, objective=batch.objective, corrupt=batch.corrupt)
            forwards += 2
            for direction in directions:
                # noising: corrupt slices into the clean run; denoising: clean slices into the corrupt run
                base, source, corrupt = (
                    (clean, corr, None) if direction == "noising" else (corr, clean, batch.corrupt)
                )
                for lyr in range(n_layers):
                    groups = [[h] for h in range(H)] + ([list(range(H))] if per_layer else [])
                    for heads in groups:
                        run = _forward(
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


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


HEAD_COLUMNS = [
    "feature_layer", "feature", "layer", "head", "score_a", "score_b", "exact", "exact_denoising", "n_samples",
]
LAYER_COLUMNS = ["feature_layer", "feature", "layer", "score_a", "score_b", "exact", "exact_denoising", "n_samples"]


def heads_frame(attribution: HeadAttribution, exact: ExactPatching | None = None) -> pd.DataFrame:
    """One row per head: feature_layer, feature, layer, head, score_a, score_b, exact, exact_denoising, n_samples."""
    n_layers = attribution.feature_layer + 1
    ref = attribution.score_a if attribution.score_a is not None else attribution.score_b
    assert ref is not None
    H = ref.shape[1]
    layer_idx, head_idx = np.meshgrid(np.arange(n_layers), np.arange(H), indexing="ij")

    def column(t: torch.Tensor | None) -> np.ndarray:
        return np.full(n_layers * H, np.nan) if t is None else t.double().flatten().numpy()

    return pd.DataFrame(
        {
            "feature_layer": np.full(n_layers * H, attribution.feature_layer, dtype=np.int64),
            "feature": np.full(n_layers * H, attribution.feature, dtype=np.int64),
            "layer": layer_idx.flatten().astype(np.int64),
            "head": head_idx.flatten().astype(np.int64),
            "score_a": column(attribution.score_a),
            "score_b": column(attribution.score_b),
            "exact": column(None if exact is None else exact.noising),
            "exact_denoising": column(None if exact is None else exact.denoising),
            "n_samples": np.full(n_layers * H, len(attribution.record_ids), dtype=np.int64),
        }
    )


def layers_frame(attribution: HeadAttribution, exact: ExactPatching | None = None) -> pd.DataFrame:
    """One row per layer <= L: score_a / score_b (sums of head scores), exact (all heads patched)."""
    n_layers = attribution.feature_layer + 1

    def column(t: torch.Tensor | None) -> np.ndarray:
        return np.full(n_layers, np.nan) if t is None else t.double().flatten().numpy()

    return pd.DataFrame(
        {
            "feature_layer": np.full(n_layers, attribution.feature_layer, dtype=np.int64),
            "feature": np.full(n_layers, attribution.feature, dtype=np.int64),
            "layer": np.arange(n_layers, dtype=np.int64),
            "score_a": column(attribution.layer_a),
            "score_b": column(attribution.layer_b),
            "exact": column(None if exact is None else exact.layer_noising),
            "exact_denoising": column(None if exact is None else exact.layer_denoising),
            "n_samples": np.full(n_layers, len(attribution.record_ids), dtype=np.int64),
        }
    )


def ranked_heads(scores: torch.Tensor, n: int, *, bottom: bool = False) -> list[tuple[int, int, float]]:
    """The n heads with the largest |score| (or the smallest with bottom=True): (layer, head, score)."""
    flat = scores.flatten()
    order = torch.argsort(flat.abs(), descending=not bottom, stable=True)[:n]
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H, float(flat[i])) for i in order]


# ------------------------------------------------------------------------------------------------
# Attention overlays
# ------------------------------------------------------------------------------------------------


@contextmanager
def _eager_attention(backbone: Backbone) -> Iterator[None]:
    """Eager attention in the language model for the duration (SDPA returns no attention weights)."""
    decoder = backbone.model.get_decoder()
    configs = {id(c): c for c in [decoder.config] + [backbone.attention(l).config for l in range(backbone.num_layers)]}
    before = {key: cfg._attn_implementation for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            cfg._attn_implementation = "eager"
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = before[key]


def attention_weights(backbone: Backbone, inputs: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """[batch, heads, seq, seq] attention probabilities of decoder layer `layer` on `inputs`."""
    backbone.check_layers([layer])
    seen: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, (tuple, list)) or len(output) < 2 or output[1] is None:
            raise ModelError(
                f"{type(module).__name__} returned no attention weights even under eager attention; "
                "this architecture needs its own attention read-out"
            )
        seen["w"] = output[1].detach()
        raise _Stop

    handle = backbone.attention(layer).register_forward_hook(hook)
    try:
        with torch.no_grad(), _eager_attention(backbone):
            backbone.model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "w" not in seen:
        raise ModelError(f"the attention of layer {layer} never ran")
    return seen["w"]


def head_image_attention(
    adapter: VLMAdapter,
    inputs: dict[str, torch.Tensor],
    row: int,
    layer: int,
    head: int,
    queries: torch.Tensor,
) -> torch.Tensor:
    """[n_image] head `head`'s attention at `layer` from the `queries` positions ([seq] bool, mean
    over them) of batch row `row` onto that row's image tokens, in token order."""
    weights = attention_weights(adapter.vlm, inputs, layer)  # [batch, H, seq, seq]
    if not 0 <= head < weights.shape[1]:
        raise ModelError(f"head {head} does not exist: layer {layer} has {weights.shape[1]} heads")
    queries = queries.to(weights.device)
    if not bool(queries.any()):
        raise DataError(f"row {row}: no query positions to read the attention from")
    image = adapter.image_token_mask(inputs["input_ids"])[row].to(weights.device)  # [seq]
    return weights[row, head][queries].float().mean(0)[image].cpu()  # [n_image]


def attention_overlays(
    adapter: VLMAdapter,
    sae: Any,
    attribution: HeadAttribution,
    record: Record,
    *,
    n_heads: int = 3,
    method: Method = "a",
    query: Literal["text", "max"] = "text",
    objective: Objective = "projection",
) -> dict[str, bytes]:
    """PNG overlays of the top and bottom heads' attention onto the image, for one sample.

    Heads are ranked by |score| of `method`. The attention is read from the text positions (mean)
    or from the feature's max position ("max"). Keys: "top1_L3H1", ..., "bottom1_L0H2", ...
    """
    from mmdiff.interp.heatmap import overlay_png, patch_grid

    scores = attribution.score_a if method == "a" else attribution.score_b
    if scores is None:
        raise ConfigError(f"method {method!r} was not computed for this attribution")
    inputs = adapter.vlm_inputs([record])
    types = adapter.token_types(inputs)[0].long()
    valid = inputs["attention_mask"][0].bool().to(types.device) & (types != int(TokenType.SPECIAL))
    if query == "text":
        queries = valid & (types == int(TokenType.TEXT))
    elif query == "max":
        from mmdiff.capture import capture_residuals

        resid = capture_residuals(adapter.vlm, inputs, [attribution.feature_layer])[attribution.feature_layer]
        with torch.no_grad():
            values = feature_values(resid, sae, attribution.feature, objective)[0].cpu()  # [seq]
        values[~valid.cpu()] = -torch.inf
        queries = torch.zeros_like(valid)
        queries[int(values.argmax())] = True
    else:
        raise ConfigError(f"query must be 'text' or 'max', got {query!r}")
    tiles = patch_grid(adapter, inputs, 0)
    image = record.load_image()
    out: dict[str, bytes] = {}
    for label, chosen in (("top", ranked_heads(scores, n_heads)), ("bottom", ranked_heads(scores, n_heads, bottom=True))):
        for rank, (lyr, head, score) in enumerate(chosen, start=1):
            att = head_image_attention(adapter, inputs, 0, lyr, head, queries)
            title = f"{label} {rank}: L{lyr}H{head} (score {score:+.3g})"
            out[f"{label}{rank}_L{lyr}H{head}"] = overlay_png(image, att, tiles, title=title)
    return out


# ------------------------------------------------------------------------------------------------
# The pipeline stage
# ------------------------------------------------------------------------------------------------


@dataclass
class FeatureAttribution:
    """Everything the stage computes for one feature."""

    attribution: HeadAttribution
    exact: ExactPatching | None = None
    overlays: dict[str, bytes] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        a, e = self.attribution, self.exact
        out: dict[str, Any] = {
            "feature_layer": a.feature_layer,
            "feature": a.feature,
            "record_ids": a.record_ids,
            "n_samples": len(a.record_ids),
            "mean_m_clean": float(a.m_clean.mean()),
            "mean_m_corrupt": float(a.m_corrupt.mean()),
            "attribution_seconds": a.seconds,
            "attribution_forward_passes": a.forward_passes,
            "attribution_backward_passes": a.backward_passes,
        }
        if e is not None:
            out.update(
                exact_seconds=e.seconds,
                exact_forward_passes=e.forward_passes,
                speed_ratio=e.seconds / a.seconds if a.seconds > 0 else float("nan"),
            )
            if a.score_a is not None and e.noising is not None:
                out["spearman_a_vs_exact"] = spearman(a.score_a, e.noising)
            if a.score_b is not None and e.denoising is not None:
                out["spearman_b_vs_exact_denoising"] = spearman(a.score_b, e.denoising)
        return out


def select_samples(
    features: pd.DataFrame,
    records: Sequence[Record],
    top_k: int,
    *,
    top_examples: pd.DataFrame | None = None,
    saes: Mapping[int, Any] | None = None,
    adapter: VLMAdapter | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[tuple[int, int], list[Record]]:
    """Each feature's top-k activating records among `records`.

    From a statistics top-k table (columns layer, feature, record_id, value) when given, else from
    one pass of the VLM and the SAEs over `records` (`mmdiff.interp.examples.feature_maxima`).
    """
    by_id = {r.id: r for r in records}
    keys = feature_keys(features)
    if top_examples is None:
        if saes is None or adapter is None:
            raise ConfigError("select_samples needs top_examples, or saes and an adapter to find them")
        top_examples = feature_maxima(adapter, saes, records, keys, batch_size=batch_size, progress=progress)
        top_examples = top_examples.rename(columns={"max_activation": "value"})
    missing = [c for c in ("layer", "feature", "record_id", "value") if c not in top_examples.columns]
    if missing:
        raise DataError(f"the top-examples table lacks columns {missing}; it has {list(top_examples.columns)}")
    out: dict[tuple[int, int], list[Record]] = {}
    table = top_examples[top_examples["value"] > 0].sort_values("value", ascending=False, kind="stable")
    for key, group in table.groupby(["layer", "feature"], sort=False):
        key = (int(key[0]), int(key[1]))
        if key not in keys:
            continue
        ids = [rid for rid in dict.fromkeys(group["record_id"]) if rid in by_id][:top_k]
        out[key] = [by_id[rid] for rid in ids]
    return out


def attribute_features(
    adapter: VLMAdapter,
    saes: Mapping[int, Any],
    features: pd.DataFrame,
    records: Sequence[Record],
    out_dir: str | Path,
    *,
    top_k: int = 8,
    top_examples: pd.DataFrame | None = None,
    calibration: Sequence[Record] | None = None,
    n_calibration: int | None = 256,
    objective: Objective = "projection",
    positions: Positions = "all",
    exact: bool = False,
    overlay_heads: int = 3,
    overlay_query: Literal["text", "max"] = "text",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Path]:
    """Pipeline stage: attribution patching of every feature in `features` (columns layer, feature).

    Samples are each feature's top-k activating records among `records` (from `top_examples`, a
    statistics top-k table, or found with the SAEs); the corrupt run's mean visual embedding comes
    from the first `n_calibration` records of `calibration` (default: `records`; None = all). Writes under out_dir (the run's attribution/):
    heads.parquet, layers.parquet, summary.json (per feature: timings, and with `exact` the exact
    patching columns, Spearman correlations and the exact/attribution speed ratio) and
    overlays/L{L}F{f}_{top|bottom}{rank}_L{l}H{h}.png (the attention of the `overlay_heads` top
    and bottom heads by |score_a| on the feature's best sample, read from the text positions or the
    feature's max position). Returns the paths.
    """
    from mmdiff.atomic import write_bytes, write_json, write_parquet

    out = Path(out_dir)
    keys = feature_keys(features)
    missing = sorted({layer for layer, _ in keys} - set(saes))
    if missing:
        raise SAEError(f"features at layers {missing} have no SAE; got SAEs for layers {sorted(saes)}")
    samples = select_samples(
        features, records, top_k, top_examples=top_examples, saes=saes, adapter=adapter,
        batch_size=batch_size, progress=progress,
    )
    calibration = list(calibration or records)[:n_calibration]
    visual_mean = visual_embedding_mean(adapter, calibration, batch_size=batch_size, progress=progress)
    results: list[FeatureAttribution] = []
    skipped: list[str] = []
    with _progress(progress) as bar:
        task = bar.add_task("attribution patching", total=len(keys))
        for layer, feature in keys:
            chosen = samples.get((layer, feature), [])
            if not chosen:
                skipped.append(f"L{layer}F{feature}")
                bar.advance(task)
                continue
            sae = saes[layer]
            attr = attribution_patching(
                adapter, sae, layer, feature, chosen, visual_mean,
                objective=objective, positions=positions, batch_size=batch_size, progress=False,
            )
            ex = None
            if exact:
                ex = exact_patching(
                    adapter, sae, layer, feature, chosen, visual_mean, objective=objective, positions=positions,
                    directions=("noising", "denoising"), batch_size=batch_size, progress=False,
                )
            overlays = {}
            if overlay_heads > 0:
                overlays = attention_overlays(
                    adapter, sae, attr, chosen[0], n_heads=overlay_heads, query=overlay_query, objective=objective
                )
            results.append(FeatureAttribution(attr, ex, overlays))
            bar.advance(task)
    paths = {
        "heads": out / "heads.parquet",
        "layers": out / "layers.parquet",
        "summary": out / "summary.json",
    }
    # features that fired on none of the records get no rows; they are listed in the summary
    heads = [heads_frame(r.attribution, r.exact) for r in results] or [pd.DataFrame(columns=HEAD_COLUMNS)]
    layers = [layers_frame(r.attribution, r.exact) for r in results] or [pd.DataFrame(columns=LAYER_COLUMNS)]
    write_parquet(paths["heads"], pd.concat(heads, ignore_index=True))
    write_parquet(paths["layers"], pd.concat(layers, ignore_index=True))
    write_json(
        paths["summary"],
        {
            "objective": objective,
            "positions": positions,
            "top_k": top_k,
            "features": [r.summary() for r in results],
            "skipped_no_activation": skipped,
        },
    )
    for r in results:
        tag = f"L{r.attribution.feature_layer}F{r.attribution.feature}"
        for name, png in r.overlays.items():
            path = out / "overlays" / f"{tag}_{name}.png"
            write_bytes(path, png)
            paths[f"overlay:{tag}_{name}"] = path
    return paths
