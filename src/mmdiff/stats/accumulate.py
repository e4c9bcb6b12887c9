"""Filling `FeatureStats` from SAE codes: one streaming pass over activations.

`accumulate_batch(stats, batch, saes)` encodes one `ActivationBatch` with the SAE of every layer
and adds to the running sums; `accumulate_splits` fills several splits from one encoding, and
`collect_feature_stats(_by_split)` runs the whole pass. Codes must be non-negative (ReLU, TopK,
BatchTopK, JumpReLU SAEs); only the positive entries are touched, so an update costs
O(nonzero codes), not O(tokens * d_sae).

Special tokens (TokenType.SPECIAL: BOS, attention sinks) and padding (attention_mask == 0) never
enter any statistic. Positions are indices into the record's unpadded token sequence
(attention_mask.cumsum - 1), so they do not depend on the padding side or on the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmdiff.activations import ActivationBatch
from mmdiff.errors import ConfigError, DataError, SAEError
from mmdiff.models.base import TokenType
from mmdiff.stats.histogram import LogHistogram
from mmdiff.stats.state import COUNTED_TYPES, FeatureStats, SAELike, chunk_of


@torch.no_grad()
def accumulate_codes(
    stats: FeatureStats,
    layer: int,
    h: torch.Tensor,
    *,
    record: torch.Tensor,
    position: torch.Tensor,
    token_type: torch.Tensor,
    group: torch.Tensor | None = None,
    record_ids: Sequence[str] | None = None,
) -> None:
    """Accumulate SAE codes `h` [n_tokens, d_sae] of non-special tokens of one layer.

    `record` holds indices into `stats.record_ids` (or into `record_ids`, which are then
    registered), `position` and `token_type` ([n_tokens] each) the token's position and type
    (TEXT or IMAGE only). `group` = chunk * 2 + type is derived when not given.
    """
    state = stats.layer_state(layer)
    if h.ndim != 2 or h.shape[1] != state.d_sae:
        raise SAEError(f"codes of layer {layer} must be [n_tokens, {state.d_sae}], found {tuple(h.shape)}")
    n = h.shape[0]
    if n == 0:
        return
    if not (record.shape == position.shape == token_type.shape == (n,)):
        raise DataError(
            f"record, position and token_type must each be [{n}], found {tuple(record.shape)}, "
            f"{tuple(position.shape)}, {tuple(token_type.shape)}"
        )
    if record_ids is not None:
        mapping = torch.tensor(stats.index_records(record_ids), dtype=torch.long)
        record = mapping[record.long().cpu()]
    token_type = token_type.long()
    if ((token_type != COUNTED_TYPES[0]) & (token_type != COUNTED_TYPES[1])).any():
        raise DataError("accumulate_codes takes TEXT or IMAGE tokens only; drop special tokens and padding first")
    if group is None:
        ids = [stats.record_ids[i] for i in record.tolist()]
        chunks = torch.tensor([chunk_of(r, stats.n_chunks) for r in ids], dtype=torch.long)
        group = chunks * 2 + token_type.cpu()
    dev = state.hist.device
    h = h.to(device=dev, dtype=torch.float32)
    group = group.to(dev)
    record, position, token_type = record.to(dev), position.to(dev), token_type.to(dev)
    n_groups = stats.n_chunks * 2
    F = state.d_sae
    if bool((h < 0).any()):
        raise SAEError(
            f"SAE codes of layer {layer} hold negative values (min {float(h.min()):.3g}); the statistics "
            "assume non-negative activations (ReLU, TopK, BatchTopK, JumpReLU SAEs)"
        )
    state.chunk_tokens += torch.bincount(group, minlength=n_groups).view(stats.n_chunks, 2)
    # Everything below touches only the positive entries (k per token for TopK SAEs), so the
    # cost is O(nnz), not O(tokens * d_sae). Zeros add nothing to any statistic.
    fired = h > 0  # [n, F]
    nz = fired.nonzero()  # [nnz, 2] (token, feature), row-major like h[fired]
    if nz.shape[0] == 0:
        return
    tok, feat = nz[:, 0], nz[:, 1]
    values = h[fired]  # [nnz] float32
    v64 = values.double()  # float64 sums: independent of how the stream is split (merge == single pass)
    cell = group[tok] * F + feat  # [nnz] flat index into the [C * 2, F] chunk arrays
    state.sum_h.view(-1).index_add_(0, token_type[tok] * F + feat, v64)  # type index == TokenType value
    state.chunk_sum_h2.view(-1).index_add_(0, cell, v64 * v64)
    state.chunk_fires.view(-1).index_add_(0, cell, torch.ones_like(cell, dtype=torch.int32))

    # Histogram of positive values, and the smallest positive value.
    bins = torch.bucketize(values, stats.histogram.edges(dev).float(), right=True)  # 0 = underflow, n+1 = overflow
    state.hist.view(-1).index_add_(0, feat * stats.histogram.n_bins + bins, torch.ones_like(bins))
    state.min_pos.scatter_reduce_(0, feat, values, reduce="amin")

    # Top-k tokens per feature among this block's positive entries.
    by_value = torch.argsort(values, descending=True, stable=True)
    t = tok[by_value]
    state.merge_top(*_top_candidates(feat[by_value], stats.top_k, F,
                                     values[by_value], record[t], position[t], token_type[t]))
    # Top-k records per feature: first each (record, feature)'s max over this block (the first
    # entry of its run once sorted by value, then stably by record and feature), then the top k.
    rec = record[tok].long()
    pair = rec[by_value] * F + feat[by_value]
    grouped = torch.argsort(pair, stable=True)
    order, pair = by_value[grouped], pair[grouped]
    first = torch.ones_like(pair, dtype=torch.bool)
    first[1:] = pair[1:] != pair[:-1]
    best = order[first]
    best = best[torch.argsort(values[best], descending=True, stable=True)]
    t = tok[best]
    state.merge_top(*_top_candidates(feat[best], stats.top_k, F, values[best], rec[best], position[t], token_type[t]),
                    which="rec")


def _top_candidates(feat: torch.Tensor, top_k: int, n_features: int, value: torch.Tensor,
                    *columns: torch.Tensor) -> list[torch.Tensor]:
    """[k, F] candidate lists from entries already sorted by value (descending): each feature's first
    `top_k` entries in that order, rank 0 the largest. `columns` (record, position, token type) ride
    along; empty slots are -inf / -1."""
    order = torch.argsort(feat, stable=True)  # entries grouped by feature, by value within
    f_sorted = feat[order]
    counts = torch.bincount(f_sorted, minlength=n_features)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order), device=feat.device) - starts[f_sorted]
    keep = rank < top_k
    order, f_sorted, rank = order[keep], f_sorted[keep], rank[keep]
    k = int(min(top_k, int(counts.max())))
    out = [torch.full((k, n_features), -math.inf, dtype=torch.float32, device=feat.device)]
    out[0][rank, f_sorted] = value[order].float()
    for col in columns:
        c = torch.full((k, n_features), -1, dtype=torch.long, device=feat.device)
        c[rank, f_sorted] = col[order].long()
        out.append(c)
    return out


def accumulate_batch(
    stats: FeatureStats, batch: ActivationBatch, saes: Mapping[int, SAELike], *, token_block: int = 2048
) -> None:
    """Encode `batch` with `saes[layer]` for every layer of `stats` and accumulate.

    Activations are cast to the SAE decoder's dtype and device; `token_block` bounds the
    [tokens, d_sae] code matrix held at once.
    """
    accumulate_splits([(stats, None)], batch, saes, token_block=token_block)


@dataclass
class _KeptTokens:
    """The non-special, non-padding tokens of a batch, flattened in row-major order."""

    keep: torch.Tensor  # [batch, seq] bool
    row: torch.Tensor  # [n_tokens] batch row of each token (CPU)
    position: torch.Tensor  # [n_tokens] index in the record's unpadded sequence (CPU)
    token_type: torch.Tensor  # [n_tokens] TEXT or IMAGE (CPU)


def _kept_tokens(batch: ActivationBatch) -> _KeptTokens | None:
    tt = batch.token_types
    if tt.ndim != 2 or batch.attention_mask.shape != tt.shape:
        raise DataError(
            f"token_types {tuple(tt.shape)} and attention_mask {tuple(batch.attention_mask.shape)} must "
            "both be [batch, seq]"
        )
    if len(batch.record_ids) != tt.shape[0]:
        raise DataError(f"batch has {tt.shape[0]} rows but {len(batch.record_ids)} record_ids")
    bad = ~torch.isin(tt.long(), torch.tensor([int(t) for t in TokenType], device=tt.device))
    if bad.any():
        raise DataError(
            f"token_types holds values {sorted(set(tt[bad].tolist()))}; expected TokenType values "
            f"{[int(t) for t in TokenType]}"
        )
    mask = batch.attention_mask.bool()
    keep = mask & (tt.long() != int(TokenType.SPECIAL))  # [batch, seq]
    if not keep.any():
        return None
    keep_cpu = keep.cpu()
    positions = mask.long().cumsum(1).cpu() - 1  # [batch, seq]
    return _KeptTokens(
        keep=keep,
        row=keep_cpu.nonzero()[:, 0],
        position=positions[keep_cpu],
        token_type=tt.long().cpu()[keep_cpu],
    )


@torch.no_grad()
def accumulate_splits(
    targets: Sequence[tuple[FeatureStats, Collection[str] | None]],
    batch: ActivationBatch,
    saes: Mapping[int, SAELike],
    *,
    token_block: int = 2048,
) -> None:
    """Encode `batch` once per layer and accumulate it into several statistics.

    Each target is (stats, members): the stats take the batch rows whose record id is in
    `members` (None = every row). One forward pass over all records can so fill a base split and
    its task splits (spatial, OCR, ...) at once, each SAE encoding done once.
    """
    layers = sorted({layer for st, _ in targets for layer in st.layers})
    missing = [layer for layer in layers if layer not in saes]
    if missing:
        raise SAEError(f"statistics need an SAE for layers {missing}; got SAEs for {sorted(saes)}")
    absent = [layer for layer in layers if layer not in batch.acts]
    if absent:
        raise DataError(
            f"activation batch has layers {sorted(batch.acts)}, the statistics need {layers}: capture those hook points"
        )
    tokens = _kept_tokens(batch)
    if tokens is None:
        return
    plans = []
    for stats, members in targets:
        in_split = [members is None or rid in members for rid in batch.record_ids]
        if not any(in_split):
            continue
        ids = [rid for rid, ok in zip(batch.record_ids, in_split) if ok]
        row_record = torch.full((len(in_split),), -1, dtype=torch.long)  # [batch]
        row_record[torch.tensor(in_split)] = torch.tensor(stats.index_records(ids), dtype=torch.long)
        row_chunk = torch.tensor([chunk_of(r, stats.n_chunks) for r in batch.record_ids], dtype=torch.long)
        record = row_record[tokens.row]  # [n_tokens], -1 outside the split
        group = row_chunk[tokens.row] * 2 + tokens.token_type  # [n_tokens]: row of the [C * 2, F] arrays
        plans.append((stats, record >= 0, record, group))
    if not plans:
        return
    for layer in layers:
        acts = batch.acts[layer]
        if acts.shape[:2] != tokens.keep.shape:
            raise DataError(
                f"layer {layer} activations have shape {tuple(acts.shape)}, expected [batch, seq, d] with "
                f"[batch, seq] = {tuple(tokens.keep.shape)} as in token_types"
            )
        users = [p for p in plans if layer in p[0].layers]
        if not users:
            continue
        sae = saes[layer]
        w = sae.W_dec
        x = acts[tokens.keep].to(device=w.device, dtype=w.dtype)  # [n_tokens, d_model]
        for start in range(0, x.shape[0], token_block):
            sl = slice(start, start + token_block)
            h = sae.encode(x[sl])  # [n_block, d_sae]
            for stats, member, record, group in users:
                if h.ndim != 2 or h.shape[1] != stats.d_sae(layer):
                    raise SAEError(
                        f"SAE of layer {layer} returned codes of shape {tuple(h.shape)}, expected "
                        f"[{x[sl].shape[0]}, {stats.d_sae(layer)}]: is it the SAE these statistics were made for?"
                    )
                m = member[sl]
                if bool(m.all()):
                    sel_h, sel = h, slice(None)
                else:
                    sel = m.nonzero().squeeze(1)
                    if sel.numel() == 0:
                        continue
                    sel_h = h[sel.to(h.device)]
                accumulate_codes(
                    stats, layer, sel_h, record=record[sl][sel], position=tokens.position[sl][sel],
                    token_type=tokens.token_type[sl][sel], group=group[sl][sel],
                )


def _d_sae_of(saes: Mapping[int, SAELike]) -> dict[int, int]:
    if not saes:
        raise SAEError("statistics need at least one SAE: pass saes={layer: sae}")
    d_sae = {}
    for layer, sae in saes.items():
        w = getattr(sae, "W_dec", None)
        if w is None or w.ndim != 2:
            raise SAEError(f"SAE of layer {layer} has no 2-D W_dec [d_sae, d_in]; is it an SAE object?")
        d_sae[int(layer)] = int(w.shape[0])
    return d_sae


def collect_feature_stats_by_split(
    batches: Iterable[ActivationBatch],
    saes: Mapping[int, SAELike],
    splits: Mapping[str, Collection[str] | None],
    *,
    top_k: int = 20,
    n_chunks: int = 32,
    histogram: LogHistogram = LogHistogram(),
    token_block: int = 2048,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, FeatureStats]:
    """One pass over `batches`, several splits: split name -> record ids in it (None = all records).

    A record may belong to several splits (e.g. "vqa" = all records, "spatial" = those with spatial
    cue words); each SAE encoding is computed once. The state lives on `device` (default: the
    first SAE's device).
    """
    if not splits:
        raise ConfigError("pass at least one split: splits={name: record_ids or None}")
    d_sae = _d_sae_of(saes)
    if device is None:
        device = next(iter(saes.values())).W_dec.device
    stats = {
        name: FeatureStats(d_sae, name, top_k=top_k, n_chunks=n_chunks, histogram=histogram, device=device)
        for name in splits
    }
    targets = [(stats[name], None if members is None else set(members)) for name, members in splits.items()]
    with Progress(
        TextColumn(f"statistics [{', '.join(splits)}]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("batches", total=len(batches) if hasattr(batches, "__len__") else None)
        for batch in batches:
            accumulate_splits(targets, batch, saes, token_block=token_block)
            bar.advance(task)
    return stats


def collect_feature_stats(
    batches: Iterable[ActivationBatch],
    saes: Mapping[int, SAELike],
    split: str,
    *,
    top_k: int = 20,
    n_chunks: int = 32,
    histogram: LogHistogram = LogHistogram(),
    token_block: int = 2048,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> FeatureStats:
    """One pass over `batches`: the per-feature statistics of every layer in `saes` on `split`.

    The state lives on `device` (default: the first SAE's device).
    """
    return collect_feature_stats_by_split(
        batches, saes, {split: None}, top_k=top_k, n_chunks=n_chunks, histogram=histogram,
        token_block=token_block, device=device, progress=progress,
    )[split]
