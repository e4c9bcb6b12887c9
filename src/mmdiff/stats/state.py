"""`FeatureStats`: the running sums of one split's SAE codes, and the read-outs the method needs.

The state is filled by `mmdiff.stats.accumulate`, reduced by `mmdiff.stats.reduce` (and
`mmdiff.parallel.stats` over ranks), tabulated by `mmdiff.stats.tables` and persisted by
`mmdiff.stats.persist`; this module only holds it and answers questions about it.
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping, Protocol, Sequence

import torch

from mmdiff.errors import ConfigError, DataError
from mmdiff.models.base import TokenType
from mmdiff.stats.histogram import LogHistogram

COUNTED_TYPES: tuple[int, int] = (int(TokenType.TEXT), int(TokenType.IMAGE))  # axis 1 of chunk arrays
TYPE_NAMES = {int(TokenType.TEXT): "text", int(TokenType.IMAGE): "image"}


class SAELike(Protocol):
    """The duck type the statistics need: a dense encoder and a decoder matrix."""

    W_dec: torch.Tensor  # [d_sae, d_in]

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...  # [..., d_in] -> [..., d_sae]


def chunk_of(record_id: str, n_chunks: int) -> int:
    """The bootstrap chunk of a record: stable across runs, processes and machines."""
    return zlib.crc32(record_id.encode("utf-8")) % n_chunks


class LayerState:
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
        # the top-k records by their max activation (one entry per record), where that max sits
        self.rec_value = torch.full((top_k, d_sae), -math.inf, dtype=torch.float32, device=device)  # [k, F]
        self.rec_record = torch.full((top_k, d_sae), -1, dtype=torch.int32, device=device)  # [k, F]
        self.rec_position = torch.full((top_k, d_sae), -1, dtype=torch.int32, device=device)  # [k, F]
        self.rec_type = torch.full((top_k, d_sae), -1, dtype=torch.int8, device=device)  # [k, F]

    TENSORS = (
        "sum_h", "chunk_sum_h2", "chunk_fires", "chunk_tokens", "hist", "min_pos",
        "top_value", "top_record", "top_position", "top_type",
        "rec_value", "rec_record", "rec_position", "rec_type",
    )

    TOP_LISTS = ("top", "rec")
    """The two top-k lists: "top" the k largest token activations (a record may hold several),
    "rec" the k records with the largest max activation (each record once)."""

    ADDITIVE = ("sum_h", "chunk_sum_h2", "chunk_fires", "chunk_tokens", "hist")

    def merge_top(
        self, value: torch.Tensor, record: torch.Tensor, position: torch.Tensor, ttype: torch.Tensor,
        which: str = "top",
    ) -> None:
        """Keep the k largest of the current top-k list `which` ("top" or "rec") and the candidates
        ([k', F] each; empty slots have value -inf and record -1).

        For "rec" each record is listed once per feature: the candidates name distinct records per
        feature, and a candidate whose record is already kept updates that entry to the larger of
        the two maxima (a record split over two updates) instead of taking a second slot.
        """
        if which not in self.TOP_LISTS:
            raise ValueError(f"top-k list {which!r}: expected one of {self.TOP_LISTS}")
        names = [f"{which}_{n}" for n in ("value", "record", "position", "type")]
        kept = [getattr(self, n) for n in names]
        new = [value.to(kept[0].dtype), record.to(kept[1].dtype), position.to(kept[2].dtype), ttype.to(kept[3].dtype)]
        if which == "rec":
            same = (kept[1][:, None, :] == new[1][None, :, :]) & (new[1] >= 0)[None]  # [k, k', F]
            if bool(same.any()):
                theirs = torch.where(same, new[0][None], torch.full_like(new[0][None], -math.inf)).amax(1)  # [k, F]
                better = theirs > kept[0]
                at = same.to(torch.uint8).argmax(1)  # [k, F] the matching candidate's slot
                kept = [torch.where(better, t.gather(0, at), mine) for mine, t in zip(kept, new)]
                new[0] = new[0].masked_fill(same.any(0), -math.inf)  # matched candidates take no slot
                new[1] = new[1].masked_fill(same.any(0), -1)
        k = kept[0].shape[0]
        best_value, best = torch.cat([kept[0], new[0]], dim=0).topk(k, dim=0)  # [k, F]
        setattr(self, names[0], best_value)
        for name, mine, t in zip(names[1:], kept[1:], new[1:]):
            setattr(self, name, torch.cat([mine, t], 0).gather(0, best))


class FeatureStats:
    """Streaming per-(layer, feature) statistics of SAE activations on one split of one run.

    Build with `collect_feature_stats`, or by hand: `FeatureStats(d_sae={12: 16384}, split="vqa")`,
    then `accumulate_batch(stats, batch, saes)` per batch, `merge_stats` to reduce shards,
    `feature_summary` / `top_examples` for the tables, `save_feature_stats` / `load_feature_stats`.
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
        self.d_sae_by_layer = {int(k): int(v) for k, v in d_sae.items()}
        self.record_ids: list[str] = []
        self._record_index: dict[str, int] = {}
        self.device = torch.device(device) if device is not None else None
        self.states: dict[int, LayerState] = {}
        """Per layer, the running sums; empty until the first update (then on its device)."""
        if self.device is not None:
            self.init_states(self.device)

    # ----------------------------------------------------------------------------- bookkeeping
    def init_states(self, device: torch.device) -> None:
        """Allocate the zero state of every layer on `device`."""
        self.device = device
        for layer in self.layers:
            self.states[layer] = LayerState(
                self.d_sae_by_layer[layer], self.n_chunks, self.top_k, self.histogram.n_bins, device
            )

    @property
    def settings(self) -> tuple:
        """What two statistics must share to be merged: (split, d_sae, top_k, n_chunks, histogram)."""
        return (self.split, self.d_sae_by_layer, self.top_k, self.n_chunks, self.histogram)

    def d_sae(self, layer: int) -> int:
        return self.d_sae_by_layer[self.check_layer(layer)]

    def check_layer(self, layer: int) -> int:
        if layer not in self.d_sae_by_layer:
            raise ConfigError(
                f"split {self.split!r} has statistics for layers {self.layers}, not layer {layer}; "
                "collect it with an SAE for that layer"
            )
        return layer

    def layer_state(self, layer: int) -> LayerState:
        """The running sums of `layer` (allocated on the CPU if nothing was accumulated yet)."""
        self.check_layer(layer)
        if not self.states:
            self.init_states(torch.device("cpu"))
        return self.states[layer]

    def index_records(self, record_ids: Sequence[str]) -> list[int]:
        """Indices into `record_ids` of these records, registering the ones not seen before."""
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
        st = self.layer_state(layer)
        if name not in ("sum_h2", "fires"):
            raise ConfigError(f"per-chunk sums exist for 'sum_h2' and 'fires', not {name!r}")
        arr = st.chunk_sum_h2 if name == "sum_h2" else st.chunk_fires
        return arr[:, self._types(token_types)].sum(1, dtype=arr.dtype if name == "sum_h2" else torch.int64).cpu()

    def chunk_tokens(self, layer: int, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """[n_chunks] token counts per chunk over token_types."""
        return self.layer_state(layer).chunk_tokens[:, self._types(token_types)].sum(1).cpu()

    def n_tokens(self, layer: int, token_types: Sequence[int] | None = None) -> int:
        return int(self.chunk_tokens(layer, token_types).sum())

    def sum_h(self, layer: int, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """[d_sae] float64 sum of activations (activation mass) over token_types."""
        return self.layer_state(layer).sum_h[self._types(token_types)].sum(0).cpu()

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
        return self.layer_state(layer).top_value[0].clamp_min(0).double().cpu()

    def quantiles(self, layer: int, qs: Sequence[float]) -> torch.Tensor:
        """[len(qs), d_sae] quantiles of the positive activations of each feature (NaN if it never fired).

        Estimated from the log histogram (see `LogHistogram` for the method and its resolution).
        """
        st = self.layer_state(layer)
        return self.histogram.quantiles(st.hist, st.min_pos, st.top_value[0], qs)
