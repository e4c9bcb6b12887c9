"""Per-feature SAE statistics from one streaming pass over activations (METHOD.md §2, §3).

`FeatureStats` is an accumulator: `update(batch, saes)` encodes one `ActivationBatch` with the SAE of
every layer and adds to running sums; `merge(other)` adds another accumulator's state, so shards of a
dataset (or ranks of a distributed run) can be reduced, and `merge` of two accumulators equals one
accumulator over both streams. Nothing it keeps grows with the number of tokens: per layer it holds

- per chunk c, token type t (TEXT, IMAGE) and feature f: sum h_f^2 and the firing count
  #{h_f > 0}, plus the token count per (c, t); totals are sums over chunks. Per (t, f): sum h_f
  (the activation mass, for the image-token share). A record's chunk is
  crc32(record_id) mod n_chunks, so the same record lands in the same chunk in every run (the vision
  and the text run of the diff are resampled in pairs by the bootstrap in `mmdiff.diff`);
- a fixed log-spaced histogram of the strictly positive activations of each feature (see
  `LogHistogram`), with the exact smallest positive value and the largest value, for quantiles;
- the top-k activating tokens of each feature: value, record, position, token type.

Memory per layer is about d_sae * (24 * n_chunks + 8 * n_bins + 13 * top_k + 20) bytes: 99 MB for
d_sae = 65536 with the defaults (32 chunks, 58 bins, top 20).

Besides, the list of record ids seen (one string per record). Codes must be non-negative (ReLU,
TopK, BatchTopK, JumpReLU SAEs); only the positive entries are touched, so an update costs
O(nonzero codes), not O(tokens * d_sae).

Special tokens (TokenType.SPECIAL: BOS, attention sinks) and padding (attention_mask == 0) never
enter any statistic. Positions are indices into the record's unpadded token sequence
(attention_mask.cumsum - 1), so they do not depend on the padding side or on the batch.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from mmdiff.activations import ActivationBatch
from mmdiff.atomic import save_safetensors, write_parquet
from mmdiff.errors import ConfigError, DataError, SAEError, StoreError
from mmdiff.models.base import TokenType

STATS_FORMAT_VERSION = 1
COUNTED_TYPES: tuple[int, int] = (int(TokenType.TEXT), int(TokenType.IMAGE))  # axis 1 of chunk arrays
_TYPE_NAMES = {int(TokenType.TEXT): "text", int(TokenType.IMAGE): "image"}


class SAELike(Protocol):
    """The duck type the statistics need: a dense encoder and a decoder matrix."""

    W_dec: torch.Tensor  # [d_sae, d_in]

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...  # [..., d_in] -> [..., d_sae]


@dataclass(frozen=True)
class LogHistogram:
    """Fixed log-spaced bins for the positive activations of every feature.

    Bin 0 holds (0, low), bins 1..n hold [edge_i, edge_{i+1}) with n = decades * bins_per_decade
    log-spaced edges between `low` and `high`, bin n+1 holds [high, inf). A quantile is found by
    locating the bin holding the requested rank in the cumulative counts and interpolating
    geometrically inside it; the open ends use the feature's exact smallest positive value and
    largest value. The estimate therefore lies in the same bin as the exact order statistic
    (numpy's "inverted_cdf" quantile): its relative error is below the bin ratio
    10 ** (1 / bins_per_decade) (1.33 for the default 8 bins per decade) inside [low, high].
    """

    low: float = 1e-3
    """Lower edge of the first log-spaced bin; positive values below it share the underflow bin."""
    high: float = 1e4
    """Upper edge of the last log-spaced bin; values above it share the overflow bin."""
    bins_per_decade: int = 8
    """Resolution: bins per factor of 10."""

    def __post_init__(self) -> None:
        if not (0 < self.low < self.high) or self.bins_per_decade < 1:
            raise ConfigError(
                f"LogHistogram needs 0 < low < high and bins_per_decade >= 1, found low={self.low}, "
                f"high={self.high}, bins_per_decade={self.bins_per_decade}"
            )

    @property
    def n_log_bins(self) -> int:
        return max(1, round(math.log10(self.high / self.low) * self.bins_per_decade))

    @property
    def n_bins(self) -> int:
        """Total bins including underflow and overflow."""
        return self.n_log_bins + 2

    def edges(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[n_log_bins + 1] float64 bin edges from low to high."""
        return torch.logspace(
            math.log10(self.low), math.log10(self.high), self.n_log_bins + 1, dtype=torch.float64, device=device
        )


def chunk_of(record_id: str, n_chunks: int) -> int:
    """The bootstrap chunk of a record: stable across runs, processes and machines."""
    return zlib.crc32(record_id.encode("utf-8")) % n_chunks


class _LayerState:
    """The running sums of one layer. All tensors live on one device."""

    def __init__(self, d_sae: int, n_chunks: int, top_k: int, n_bins: int, device: torch.device) -> None:
        f64, i64 = torch.float64, torch.int64
        self.d_sae = d_sae
        self.sum_h = torch.zeros(2, d_sae, dtype=f64, device=device)  # [type, F]
        self.chunk_sum_h2 = torch.zeros(n_chunks, 2, d_sae, dtype=f64, device=device)  # [C, type, F]
        self.chunk_fires = torch.zeros(n_chunks, 2, d_sae, dtype=torch.int32, device=device)  # [C, type, F]
        self.chunk_tokens = torch.zeros(n_chunks, 2, dtype=i64, device=device)  # [C, type]
        self.hist = torch.zeros(d_sae, n_bins, dtype=i64, device=device)  # [F, bins]
        self.min_pos = torch.full((d_sae,), math.inf, dtype=torch.float32, device=device)  # [F]
        self.top_value = torch.full((top_k, d_sae), -math.inf, dtype=torch.float32, device=device)  # [k, F]
        self.top_record = torch.full((top_k, d_sae), -1, dtype=torch.int32, device=device)  # [k, F]
        self.top_position = torch.full((top_k, d_sae), -1, dtype=torch.int32, device=device)  # [k, F]
        self.top_type = torch.full((top_k, d_sae), -1, dtype=torch.int8, device=device)  # [k, F]

    TENSORS = (
        "sum_h", "chunk_sum_h2", "chunk_fires", "chunk_tokens", "hist", "min_pos",
        "top_value", "top_record", "top_position", "top_type",
    )

    ADDITIVE = ("sum_h", "chunk_sum_h2", "chunk_fires", "chunk_tokens", "hist")

    def merge_top(
        self, value: torch.Tensor, record: torch.Tensor, position: torch.Tensor, ttype: torch.Tensor
    ) -> None:
        """Keep the k largest of the current top-k and the candidates ([k', F] each)."""
        k = self.top_value.shape[0]
        all_value = torch.cat([self.top_value, value], dim=0)  # [k + k', F]
        best_value, best = all_value.topk(k, dim=0)  # [k, F]
        self.top_value = best_value
        self.top_record = torch.cat([self.top_record, record.to(self.top_record.dtype)], 0).gather(0, best)
        self.top_position = torch.cat([self.top_position, position.to(self.top_position.dtype)], 0).gather(0, best)
        self.top_type = torch.cat([self.top_type, ttype.to(self.top_type.dtype)], 0).gather(0, best)


class FeatureStats:
    """Streaming per-(layer, feature) statistics of SAE activations on one split of one run.

    Build with `collect_feature_stats`, or by hand: `FeatureStats(d_sae={12: 16384}, split="vqa")`,
    then `update(batch, saes)` per batch, `merge(other)` to reduce shards, `summary()` for the
    per-feature table, `top_examples()` for the top-k table, `save()` / `FeatureStats.load()`.
    """

    def __init__(
        self,
        d_sae: Mapping[int, int],
        split: str,
        *,
        top_k: int = 20,
        n_chunks: int = 32,
        histogram: LogHistogram = LogHistogram(),
        device: torch.device | str | None = None,
    ) -> None:
        if not d_sae:
            raise ConfigError("FeatureStats needs at least one layer: pass d_sae={layer: n_latents}")
        if top_k < 1 or n_chunks < 1:
            raise ConfigError(f"top_k and n_chunks must be >= 1, found top_k={top_k}, n_chunks={n_chunks}")
        self.split = split
        self.top_k = int(top_k)
        self.n_chunks = int(n_chunks)
        self.histogram = histogram
        self.layers: list[int] = sorted(int(layer) for layer in d_sae)
        self._d_sae = {int(k): int(v) for k, v in d_sae.items()}
        self.record_ids: list[str] = []
        self._record_index: dict[str, int] = {}
        self._device = torch.device(device) if device is not None else None
        self._state: dict[int, _LayerState] = {}
        if self._device is not None:
            self._init_state(self._device)

    # ----------------------------------------------------------------------------- bookkeeping
    def _init_state(self, device: torch.device) -> None:
        self._device = device
        self._edges = self.histogram.edges(device).float()
        for layer in self.layers:
            self._state[layer] = _LayerState(
                self._d_sae[layer], self.n_chunks, self.top_k, self.histogram.n_bins, device
            )

    def d_sae(self, layer: int) -> int:
        return self._d_sae[self._check_layer(layer)]

    def _check_layer(self, layer: int) -> int:
        if layer not in self._d_sae:
            raise ConfigError(
                f"split {self.split!r} has statistics for layers {self.layers}, not layer {layer}; "
                "collect it with an SAE for that layer"
            )
        return layer

    def _layer(self, layer: int) -> _LayerState:
        self._check_layer(layer)
        if not self._state:
            self._init_state(torch.device("cpu"))
        return self._state[layer]

    def _record_indices(self, record_ids: Sequence[str]) -> list[int]:
        out = []
        for rid in record_ids:
            idx = self._record_index.get(rid)
            if idx is None:
                idx = len(self.record_ids)
                self._record_index[rid] = idx
                self.record_ids.append(rid)
            out.append(idx)
        return out

    @property
    def n_records(self) -> int:
        return len(self.record_ids)

    # ----------------------------------------------------------------------------- updates
    def update(self, batch: ActivationBatch, saes: Mapping[int, SAELike], *, token_block: int = 2048) -> None:
        """Encode `batch` with `saes[layer]` for every layer of these statistics and accumulate.

        Activations are cast to the SAE decoder's dtype and device; `token_block` bounds the
        [tokens, d_sae] code matrix held at once.
        """
        update_splits([(self, None)], batch, saes, token_block=token_block)

    @torch.no_grad()
    def update_codes(
        self,
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

        `record` holds indices into `self.record_ids` (or into `record_ids`, which are then
        registered), `position` and `token_type` ([n_tokens] each) the token's position and type
        (TEXT or IMAGE only). `group` = chunk * 2 + type is derived when not given.
        """
        state = self._layer(layer)
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
            mapping = torch.tensor(self._record_indices(record_ids), dtype=torch.long)
            record = mapping[record.long().cpu()]
        token_type = token_type.long()
        if ((token_type != COUNTED_TYPES[0]) & (token_type != COUNTED_TYPES[1])).any():
            raise DataError("update_codes takes TEXT or IMAGE tokens only; drop special tokens and padding first")
        if group is None:
            ids = [self.record_ids[i] for i in record.tolist()]
            chunks = torch.tensor([chunk_of(r, self.n_chunks) for r in ids], dtype=torch.long)
            group = chunks * 2 + token_type.cpu()
        dev = state.hist.device
        h = h.to(device=dev, dtype=torch.float32)
        group = group.to(dev)
        record, position, token_type = record.to(dev), position.to(dev), token_type.to(dev)
        n_groups = self.n_chunks * 2
        F = state.d_sae
        if bool((h < 0).any()):
            raise SAEError(
                f"SAE codes of layer {layer} hold negative values (min {float(h.min()):.3g}); the statistics "
                "assume non-negative activations (ReLU, TopK, BatchTopK, JumpReLU SAEs)"
            )
        state.chunk_tokens += torch.bincount(group, minlength=n_groups).view(self.n_chunks, 2)
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
        bins = torch.bucketize(values, self._edges, right=True)  # 0 = underflow, n+1 = overflow
        state.hist.view(-1).index_add_(0, feat * self.histogram.n_bins + bins, torch.ones_like(bins))
        state.min_pos.scatter_reduce_(0, feat, values, reduce="amin")

        # Top-k per feature among this block's positive entries: sort by value (descending), then
        # stably by feature, and keep the first k of each feature's run.
        by_value = torch.argsort(values, descending=True, stable=True)
        order = by_value[torch.argsort(feat[by_value], stable=True)]  # [nnz]
        f_sorted = feat[order]
        counts = torch.bincount(f_sorted, minlength=F)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(len(order), device=dev) - starts[f_sorted]
        keep = rank < self.top_k
        order, f_sorted, rank = order[keep], f_sorted[keep], rank[keep]
        k = int(min(self.top_k, int(counts.max())))
        cand_value = torch.full((k, F), -math.inf, dtype=torch.float32, device=dev)  # [k, F]
        cand_record = torch.full((k, F), -1, dtype=torch.long, device=dev)
        cand_position = torch.full((k, F), -1, dtype=torch.long, device=dev)
        cand_type = torch.full((k, F), -1, dtype=torch.long, device=dev)
        t = tok[order]
        cand_value[rank, f_sorted] = values[order]
        cand_record[rank, f_sorted] = record[t].long()
        cand_position[rank, f_sorted] = position[t].long()
        cand_type[rank, f_sorted] = token_type[t]
        state.merge_top(cand_value, cand_record, cand_position, cand_type)

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add `other`'s statistics into these (in place) and return self.

        Equals one accumulator that saw both streams: sums, counts and histograms add, minima take
        the minimum, top-k examples are the k largest of both.
        """
        if not isinstance(other, FeatureStats):
            raise TypeError(f"can only merge FeatureStats, got {type(other).__name__}")
        mine = (self.split, self._d_sae, self.top_k, self.n_chunks, self.histogram)
        theirs = (other.split, other._d_sae, other.top_k, other.n_chunks, other.histogram)
        if mine != theirs:
            raise ConfigError(
                "cannot merge statistics collected with different settings: (split, d_sae, top_k, n_chunks, "
                f"histogram) = {mine} vs {theirs}; collect both with the same settings"
            )
        if not other._state:
            return self
        if not self._state:
            self._init_state(other._device)
        remap = torch.tensor(self._record_indices(other.record_ids) + [-1], dtype=torch.long)
        for layer in self.layers:
            a, b = self._state[layer], other._state[layer]
            dev = a.hist.device

            def theirs(name: str) -> torch.Tensor:
                return getattr(b, name).to(dev)

            for name in _LayerState.ADDITIVE:
                setattr(a, name, getattr(a, name) + theirs(name))
            a.min_pos = torch.minimum(a.min_pos, theirs("min_pos"))
            # index -1 (an empty top-k slot) maps to -1 through the appended last entry of remap
            rec = remap.to(dev)[theirs("top_record").long()]
            a.merge_top(theirs("top_value"), rec, theirs("top_position"), theirs("top_type"))
        return self

    @torch.no_grad()
    def all_reduce(self, group: Any = None) -> "FeatureStats":
        """Reduce over the ranks of torch.distributed (in place): afterwards every rank holds the
        statistics of all ranks' streams, as `merge` would give. Sums, counts and histograms are
        all-reduced, minima with MIN, the top-k lists and record ids are gathered and merged.
        Works with gloo (CPU) and NCCL (state on the rank's GPU)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("all_reduce needs an initialised torch.distributed process group (torchrun)")
        world = dist.get_world_size(group)
        if not self._state:
            nccl = dist.get_backend(group) == "nccl"
            self._init_state(torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
        settings = (self.split, sorted(self._d_sae.items()), self.top_k, self.n_chunks, asdict(self.histogram))
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, (settings, self.record_ids), group=group)
        if any(s != settings for s, _ in everyone):
            raise ConfigError(
                f"ranks collected statistics with different settings: {[s for s, _ in everyone]}; "
                "use the same split, SAEs, top_k, n_chunks and histogram on every rank"
            )
        me = dist.get_rank(group)
        remaps = [torch.tensor(self._record_indices(ids) + [-1], dtype=torch.long) for _, ids in everyone]
        for layer in self.layers:
            st = self._state[layer]
            for name in _LayerState.ADDITIVE:
                dist.all_reduce(getattr(st, name), op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(st.min_pos, op=dist.ReduceOp.MIN, group=group)
            gathered = {}
            for name in ("top_value", "top_record", "top_position", "top_type"):
                parts = [torch.empty_like(getattr(st, name)) for _ in range(world)]
                dist.all_gather(parts, getattr(st, name).contiguous(), group=group)
                gathered[name] = parts
            for rank in range(world):
                if rank == me:
                    continue
                rec = remaps[rank].to(st.hist.device)[gathered["top_record"][rank].long()]
                st.merge_top(gathered["top_value"][rank], rec, gathered["top_position"][rank], gathered["top_type"][rank])
        return self

    # ----------------------------------------------------------------------------- read-outs
    def _types(self, token_types: Sequence[int] | None) -> list[int]:
        types = list(COUNTED_TYPES) if token_types is None else [int(t) for t in token_types]
        bad = [t for t in types if t not in COUNTED_TYPES]
        if bad or not types:
            raise ConfigError(
                f"token_types must be a non-empty subset of TEXT={int(TokenType.TEXT)}, IMAGE={int(TokenType.IMAGE)} "
                f"(special tokens are never counted); found {list(token_types or [])}"
            )
        return [COUNTED_TYPES.index(t) for t in types]

    def chunk_sums(self, layer: int, name: str, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """[n_chunks, d_sae] per-chunk sums of `name` ("sum_h2" float64 or "fires" int64) over token_types."""
        st = self._layer(layer)
        if name not in ("sum_h2", "fires"):
            raise ConfigError(f"per-chunk sums exist for 'sum_h2' and 'fires', not {name!r}")
        arr = st.chunk_sum_h2 if name == "sum_h2" else st.chunk_fires
        return arr[:, self._types(token_types)].sum(1, dtype=arr.dtype if name == "sum_h2" else torch.int64).cpu()

    def chunk_tokens(self, layer: int, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """[n_chunks] token counts per chunk over token_types."""
        return self._layer(layer).chunk_tokens[:, self._types(token_types)].sum(1).cpu()

    def n_tokens(self, layer: int, token_types: Sequence[int] | None = None) -> int:
        return int(self.chunk_tokens(layer, token_types).sum())

    def sum_h(self, layer: int, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """[d_sae] float64 sum of activations (activation mass) over token_types."""
        return self._layer(layer).sum_h[self._types(token_types)].sum(0).cpu()

    def sum_h2(self, layer: int, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """[d_sae] float64 sum of squared activations over token_types."""
        return self.chunk_sums(layer, "sum_h2", token_types).sum(0)

    def firing_counts(self, layer: int, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """[d_sae] int64 number of tokens with h_f > 0 over token_types."""
        return self.chunk_sums(layer, "fires", token_types).sum(0)

    def mean_sq(self, layer: int, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """[d_sae] E[h_f^2] over tokens of token_types (default: all non-special tokens)."""
        n = self.n_tokens(layer, token_types)
        if n == 0:
            raise DataError(
                f"split {self.split!r}, layer {layer}: no tokens of types {token_types} were seen; "
                "E[h^2] is undefined. Check the token types captured for this run"
            )
        return self.sum_h2(layer, token_types) / n

    def firing_frequency(self, layer: int, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """[d_sae] p_f = (1/n) sum_x sum_t 1{h_f(x_t) > 0} over tokens of token_types."""
        n = self.n_tokens(layer, token_types)
        if n == 0:
            raise DataError(
                f"split {self.split!r}, layer {layer}: no tokens of types {token_types} were seen; "
                "the firing frequency is undefined"
            )
        return self.firing_counts(layer, token_types).double() / n

    def image_share(self, layer: int) -> torch.Tensor:
        """[d_sae] share of activation mass sum h_f on image tokens (NaN where the feature never fired)."""
        img = self.sum_h(layer, (int(TokenType.IMAGE),))
        tot = self.sum_h(layer, None)
        return torch.where(tot > 0, img / tot.clamp_min(1e-300), torch.full_like(tot, math.nan))

    def max_activation(self, layer: int) -> torch.Tensor:
        """[d_sae] largest activation seen (0 where the feature never fired)."""
        return self._layer(layer).top_value[0].clamp_min(0).double().cpu()

    def quantiles(self, layer: int, qs: Sequence[float]) -> torch.Tensor:
        """[len(qs), d_sae] quantiles of the positive activations of each feature (NaN if it never fired).

        Estimated from the log histogram (see `LogHistogram` for the method and its resolution).
        """
        st = self._layer(layer)
        hist = st.hist.cpu().double()  # [F, bins]
        total = hist.sum(1)  # [F]
        cum = hist.cumsum(1)
        edges = self.histogram.edges().double()
        lo_edges = torch.cat([torch.zeros(1, dtype=torch.float64), edges])  # [bins] lower edge per bin
        hi_edges = torch.cat([edges, torch.full((1,), math.inf, dtype=torch.float64)])
        mn = st.min_pos.cpu().double()
        mx = st.top_value[0].cpu().double()
        out = torch.full((len(qs), hist.shape[0]), math.nan, dtype=torch.float64)
        fired = total > 0
        for i, q in enumerate(qs):
            if not 0.0 <= q <= 1.0:
                raise ConfigError(f"quantile levels must be in [0, 1], found {q}")
            target = (q * total).clamp_min(1e-12).unsqueeze(1)  # rank of the order statistic
            j = torch.searchsorted(cum, target).clamp_max(hist.shape[1] - 1).squeeze(1)  # [F]
            below = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0).unsqueeze(1)).squeeze(1), torch.zeros_like(total))
            in_bin = hist.gather(1, j.unsqueeze(1)).squeeze(1)
            frac = ((target.squeeze(1) - below) / in_bin.clamp_min(1)).clamp(0, 1)
            lo = torch.maximum(lo_edges[j], mn)
            hi = torch.minimum(hi_edges[j], mx)
            lo = torch.minimum(lo, hi)
            est = lo * (hi / lo) ** frac
            out[i] = torch.where(fired, est, out[i])
        return out

    def summary(self, quantile_levels: Sequence[float] = (0.5, 0.9, 0.99)) -> pd.DataFrame:
        """One row per (layer, feature): counts, sums, E[h^2], p_f, image share, max, quantiles."""
        frames = []
        for layer in self.layers:
            F = self._d_sae[layer]
            cols: dict[str, Any] = {
                "split": self.split,
                "layer": np.full(F, layer, dtype=np.int64),
                "feature": np.arange(F, dtype=np.int64),
            }
            for t in COUNTED_TYPES:
                name = _TYPE_NAMES[t]
                cols[f"tokens_{name}"] = np.full(F, self.n_tokens(layer, (t,)), dtype=np.int64)
                cols[f"fires_{name}"] = self.firing_counts(layer, (t,)).numpy()
                cols[f"sum_h_{name}"] = self.sum_h(layer, (t,)).numpy()
                cols[f"sum_h2_{name}"] = self.sum_h2(layer, (t,)).numpy()
            n = self.n_tokens(layer)
            with np.errstate(invalid="ignore", divide="ignore"):
                cols["mean_sq"] = self.sum_h2(layer).numpy() / n if n else np.full(F, np.nan)
                cols["firing_frequency"] = self.firing_counts(layer).numpy() / n if n else np.full(F, np.nan)
            cols["image_share"] = self.image_share(layer).numpy()
            cols["max_activation"] = self.max_activation(layer).numpy()
            qv = self.quantiles(layer, quantile_levels).numpy()
            for q, row in zip(quantile_levels, qv):
                cols[f"q{q * 100:g}"] = row
            frames.append(pd.DataFrame(cols))
        return pd.concat(frames, ignore_index=True)

    def top_examples(self, layer: int | None = None) -> pd.DataFrame:
        """Top-k activating tokens per feature: layer, feature, rank, record_id, position, token_type, value.

        Only tokens with a positive activation are listed.
        """
        frames = []
        for lyr in self.layers if layer is None else [self._check_layer(layer)]:
            st = self._layer(lyr)
            value = st.top_value.cpu()
            ok = value > 0  # [k, F]
            rank, feat = ok.nonzero(as_tuple=True)
            rec = st.top_record.cpu()[rank, feat]
            frames.append(
                pd.DataFrame(
                    {
                        "layer": np.full(len(rank), lyr, dtype=np.int64),
                        "feature": feat.numpy(),
                        "rank": rank.numpy(),
                        "record_id": [self.record_ids[i] for i in rec.tolist()],
                        "position": st.top_position.cpu()[rank, feat].numpy().astype(np.int64),
                        "token_type": st.top_type.cpu()[rank, feat].numpy().astype(np.int64),
                        "value": value[rank, feat].numpy(),
                    }
                ).sort_values(["feature", "rank"], kind="stable")
            )
        return pd.concat(frames, ignore_index=True)

    # ----------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write `{split}.parquet` (summary), `{split}.topk.parquet` and `{split}.state.safetensors`.

        The safetensors file holds the complete state (`FeatureStats.load` restores it exactly, so
        saved statistics can be merged and bootstrapped later); the Parquet tables are for reading.
        """
        directory = Path(directory)
        paths = {
            "summary": directory / f"{self.split}.parquet",
            "topk": directory / f"{self.split}.topk.parquet",
            "state": directory / f"{self.split}.state.safetensors",
        }
        if not self._state:
            self._init_state(torch.device("cpu"))
        # Keep only the records the top-k tables point to, renumbered.
        used = sorted({i for st in self._state.values() for i in st.top_record.unique().tolist() if i >= 0})
        renum = torch.full((len(self.record_ids) + 1,), -1, dtype=torch.long)
        renum[torch.tensor(used, dtype=torch.long)] = torch.arange(len(used))
        tensors: dict[str, torch.Tensor] = {}
        for layer, st in self._state.items():
            for name in _LayerState.TENSORS:
                t = getattr(st, name).cpu()
                if name == "top_record":
                    t = renum[t.long()].to(torch.int32)
                tensors[f"layer{layer}.{name}"] = t
        meta = {
            "format": "mmdiff.feature_stats",
            "version": STATS_FORMAT_VERSION,
            "split": self.split,
            "top_k": self.top_k,
            "n_chunks": self.n_chunks,
            "histogram": asdict(self.histogram),
            "d_sae": {str(k): v for k, v in self._d_sae.items()},
            "n_records": self.n_records,
            "records": [self.record_ids[i] for i in used],
        }
        write_parquet(paths["summary"], self.summary())
        write_parquet(paths["topk"], self.top_examples())
        save_safetensors(paths["state"], tensors, metadata={"mmdiff": json.dumps(meta)})
        return paths

    @classmethod
    def load(cls, path: str | Path, split: str | None = None) -> "FeatureStats":
        """Load statistics saved by `save`: a `.state.safetensors` file, or a directory and a split.

        Only the records that the top-k tables point to are stored, so after loading `record_ids`
        lists those (the file's metadata keeps the original count as "n_records").
        """
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            if split is None:
                raise ConfigError(f"{path} is a directory: pass split= to pick {{split}}.state.safetensors in it")
            path = path / f"{split}.state.safetensors"
        if not path.is_file():
            raise StoreError(f"no feature statistics at {path}; run the statistics stage first")
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("mmdiff")
            if raw is None:
                raise StoreError(f"{path} is not an mmdiff feature-statistics file (no 'mmdiff' metadata)")
            meta = json.loads(raw)
            if meta.get("format") != "mmdiff.feature_stats" or meta.get("version") != STATS_FORMAT_VERSION:
                raise StoreError(
                    f"{path}: format {meta.get('format')} v{meta.get('version')}, expected "
                    f"mmdiff.feature_stats v{STATS_FORMAT_VERSION}; recompute the statistics"
                )
            stats = cls(
                {int(k): v for k, v in meta["d_sae"].items()},
                meta["split"],
                top_k=meta["top_k"],
                n_chunks=meta["n_chunks"],
                histogram=LogHistogram(**meta["histogram"]),
                device="cpu",
            )
            stats._record_indices(meta["records"])
            for layer, st in stats._state.items():
                for name in _LayerState.TENSORS:
                    setattr(st, name, fh.get_tensor(f"layer{layer}.{name}"))
        return stats


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
def update_splits(
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
        row_record[torch.tensor(in_split)] = torch.tensor(stats._record_indices(ids), dtype=torch.long)
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
                stats.update_codes(
                    layer, sel_h, record=record[sl][sel], position=tokens.position[sl][sel],
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"statistics [{', '.join(splits)}]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("batches", total=len(batches) if hasattr(batches, "__len__") else None)
        for batch in batches:
            update_splits(targets, batch, saes, token_block=token_block)
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


def write_feature_stats(
    batches: Iterable[ActivationBatch],
    saes: Mapping[int, SAELike],
    splits: str | Mapping[str, Collection[str] | None],
    out_dir: str | Path,
    **kwargs: Any,
) -> dict[str, dict[str, Path]]:
    """Pipeline stage: one pass, then `{split}.parquet`, `{split}.topk.parquet` and
    `{split}.state.safetensors` under `out_dir` (the run's stats/) for each split.

    `splits` is a split name (all records) or split name -> record ids (None = all records).
    Keyword arguments go to `collect_feature_stats_by_split`.
    """
    if isinstance(splits, str):
        splits = {splits: None}
    stats = collect_feature_stats_by_split(batches, saes, splits, **kwargs)
    return {name: st.save(out_dir) for name, st in stats.items()}
