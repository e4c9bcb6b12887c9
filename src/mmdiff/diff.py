"""Adapted features: variance gap, decoder cosine and the global two-stage selection (docs/method.md#adapted-features).

Inputs are two `FeatureStats` over the same records: `vision` = the VLM on image + question encoded
with the adapted SAEs, `text` = the base LM on caption + question encoded with the base SAEs. Then

- variance gap   Delta_f = E_vision[h_f^2] - E_text[h_f^2]. Which token types enter each
  expectation is a parameter; the default is all non-special tokens of each run (image and text
  tokens of the vision run, the text tokens of the text run);
- decoder cosine c_f = cos(W_dec_f base, W_dec_f adapted);
- relative decoder norm ||d_adapted|| / (||d_base|| + ||d_adapted||) (crosscoder style: 0.5 =
  unchanged norm, towards 1 = the feature grew in the adapted SAE, towards 0 = it shrank). It is
  reported only where it can vary: SAEs whose decoder rows are kept at unit norm (TopK training,
  converted JumpReLU warm starts) give 0.5 for every feature by construction, so the column is NaN
  and `df.attrs["relative_decoder_norm_absent"]` says why;
- selection: pool every feature of every layer; stage 1 keeps the top ceil(p_gap * N) by Delta_f,
  stage 2 keeps the bottom ceil(p_cos * n_stage1) of those by c_f. Ties are broken by (layer,
  feature) order; a feature with an undefined cosine (a zero decoder row) is never selected;
- bootstrap stability: resample the records' chunks with replacement (the same chunks on both
  sides, since a record's chunk is a hash of its id), recompute Delta_f and the selection with the
  cosines fixed, and report the share of resamples in which each feature is selected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from mmdiff.atomic import write_parquet
from mmdiff.errors import ConfigError, SAEError
from mmdiff.schema import Artifact, Column
from mmdiff.stats import FeatureStats

REJECTED_GAP = "variance_gap"
REJECTED_COSINE = "decoder_cosine"

_FEATURE_COLUMNS = (
    Column("layer", int),
    Column("feature", int),
    Column("mean_sq_vision", float, "E_vision[h_f^2]"),
    Column("mean_sq_text", float, "E_text[h_f^2]"),
    Column("variance_gap", float, "Delta_f = mean_sq_vision - mean_sq_text"),
    Column("decoder_cosine", float, "c_f = cos(W_dec_f base, W_dec_f adapted); NaN for a zero row"),
    Column("decoder_norm_base", float),
    Column("decoder_norm_adapted", float),
    Column("relative_decoder_norm", float, "||d_adapted|| / (||d_base|| + ||d_adapted||)"),
    Column("firing_frequency_vision", float),
    Column("firing_frequency_text", float),
    Column("gap_rank", int, "1 = the largest gap of all layers"),
    Column("passed_gap", bool, "kept by stage 1 (top p_gap by gap)"),
    Column("selected", bool, "in the adapted set (stage 2: bottom p_cos of those by cosine)"),
    Column("rejected_at", str, f"{REJECTED_GAP!r}, {REJECTED_COSINE!r}, or None when selected"),
    Column("stability", float, "share of bootstrap resamples selecting it; NaN without bootstrap"),
)
_READ_NEEDS = ("layer", "feature", "variance_gap", "decoder_cosine", "selected")
DIFF = Artifact("stats/diff.parquet", "adapted_features", _FEATURE_COLUMNS, required=_READ_NEEDS,
                doc="Every feature of every layer; the thresholds used are in its attrs.")
ADAPTED = Artifact("features/adapted.parquet", "adapted_features", _FEATURE_COLUMNS,
                   required=("layer", "feature"), doc="The adapted set: the `selected` rows of DIFF.")
ADAPTED_PER_LAYER = Artifact(
    "stats/adapted_per_layer.parquet", "adapted_counts_per_layer", doc="Seed Fig. 8: counts per layer.",
    required=("layer", "n_features", "n_adapted", "mean_cosine_adapted", "mean_cosine_all"),
    columns=(
        Column("layer", int),
        Column("n_features", int),
        Column("n_passed_gap", int),
        Column("n_adapted", int),
        Column("share_adapted", float),
        Column("mean_cosine_all", float),
        Column("mean_cosine_adapted", float, "NaN when the layer has no adapted feature"),
        Column("mean_gap_adapted", float),
    ),
)  # fmt: skip


def _decoder(sae_or_matrix: Any, layer: int, role: str) -> torch.Tensor:
    w = getattr(sae_or_matrix, "W_dec", sae_or_matrix)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise SAEError(f"{role} SAE of layer {layer}: expected an SAE with W_dec [d_sae, d_in] or that matrix")
    return w.detach().to(device="cpu", dtype=torch.float64)


def decoder_cosine(w_base: torch.Tensor, w_adapted: torch.Tensor) -> torch.Tensor:
    """[d_sae] c_f = cos(W_dec_f base, W_dec_f adapted); NaN where either row is zero."""
    w_base, w_adapted = w_base.double(), w_adapted.double()
    nb, na = w_base.norm(dim=1), w_adapted.norm(dim=1)
    cos = (w_base * w_adapted).sum(1) / (nb * na)
    return torch.where((nb > 0) & (na > 0), cos, torch.full_like(cos, math.nan))


def relative_decoder_norm(w_base: torch.Tensor, w_adapted: torch.Tensor) -> torch.Tensor:
    """[d_sae] ||d_adapted|| / (||d_base|| + ||d_adapted||); NaN where both rows are zero."""
    nb, na = w_base.double().norm(dim=1), w_adapted.double().norm(dim=1)
    tot = nb + na
    return torch.where(tot > 0, na / tot.clamp_min(1e-300), torch.full_like(tot, math.nan))


UNIT_NORM_TOL = 1e-3  # float32 renormalised rows differ from 1 by ~1e-7; a trained norm by far more


def relative_norm_absence(norms_base: torch.Tensor, norms_adapted: torch.Tensor) -> str | None:
    """Why the relative decoder norm carries no information for these decoder row norms ([N] each,
    pooled over layers), or None when it can vary. Zero rows (dead, pruned) are left out."""
    nb, na = norms_base.double(), norms_adapted.double()
    live = (nb > 0) & (na > 0)
    if not bool(live.any()):
        return "every decoder row is zero in one of the two SAEs"
    nb, na = nb[live], na[live]
    if bool(((nb - 1).abs() <= UNIT_NORM_TOL).all() and ((na - 1).abs() <= UNIT_NORM_TOL).all()):
        return (
            "both SAEs keep every decoder row at unit norm, so ||d_adapted|| / (||d_base|| + "
            "||d_adapted||) is 0.5 for every feature by construction; the decoder cosine carries "
            "the whole decoder change"
        )
    rel = na / (nb + na)
    if float(rel.max() - rel.min()) <= 1e-9:
        return f"every feature's relative decoder norm is {float(rel[0]):.3g}: the norms never changed"
    return None


def variance_gap(
    vision: FeatureStats,
    text: FeatureStats,
    layer: int,
    *,
    vision_token_types: Sequence[int] | None = None,
    text_token_types: Sequence[int] | None = None,
) -> torch.Tensor:
    """[d_sae] Delta_f = E_vision[h_f^2] - E_text[h_f^2] (default token types: all non-special)."""
    return vision.mean_sq(layer, vision_token_types) - text.mean_sq(layer, text_token_types)


def _count(p: float, n: int, name: str) -> int:
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"{name} is a share of features in (0, 1], found {p}")
    return min(n, math.ceil(p * n - 1e-9))


def two_stage_selection(
    gap: torch.Tensor, cosine: torch.Tensor, p_gap: float = 0.2, p_cos: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stage-1 mask, selected mask), both [N], over features pooled from all layers.

    Stage 1: the top ceil(p_gap * N) by `gap` (NaN gaps rank last); stage 2: of those, the bottom
    ceil(p_cos * n_stage1) by `cosine` (NaN cosines are never kept). Ties keep pooled order.
    """
    n = gap.numel()
    n1 = _count(p_gap, n, "p_gap")
    key = torch.nan_to_num(gap.double(), nan=-math.inf)
    order = torch.sort(key, descending=True, stable=True).indices
    stage1 = torch.zeros(n, dtype=torch.bool)
    stage1[order[:n1]] = True
    idx1 = stage1.nonzero().squeeze(1)  # ascending pooled order
    cos1 = cosine.double()[idx1]
    n2 = min(_count(p_cos, n1, "p_cos") if n1 else 0, int((~torch.isnan(cos1)).sum()))
    order2 = torch.sort(torch.nan_to_num(cos1, nan=math.inf), stable=True).indices
    selected = torch.zeros(n, dtype=torch.bool)
    selected[idx1[order2[:n2]]] = True
    return stage1, selected


def _check_inputs(
    vision: FeatureStats, text: FeatureStats, base: Mapping[int, Any], adapted: Mapping[int, Any]
) -> list[int]:
    layers = sorted(vision.layers)
    if sorted(text.layers) != layers:
        raise ConfigError(
            f"vision statistics cover layers {layers}, text statistics {sorted(text.layers)}: "
            "collect both runs at the same hook points"
        )
    for layer in layers:
        if vision.d_sae(layer) != text.d_sae(layer):
            raise SAEError(
                f"layer {layer}: vision statistics have {vision.d_sae(layer)} features, text statistics "
                f"{text.d_sae(layer)}; the adapted SAE must be index-aligned with its base SAE"
            )
        for role, saes in (("base", base), ("adapted", adapted)):
            if layer not in saes:
                raise SAEError(f"no {role} SAE for layer {layer}; have layers {sorted(saes)}")
    return layers


def adapted_features(
    vision: FeatureStats,
    text: FeatureStats,
    base_saes: Mapping[int, Any],
    adapted_saes: Mapping[int, Any],
    *,
    p_gap: float = 0.2,
    p_cos: float = 0.2,
    vision_token_types: Sequence[int] | None = None,
    text_token_types: Sequence[int] | None = None,
    n_bootstrap: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (layer, feature) with every score of the diff and whether it is in the adapted set.

    Columns: layer, feature, mean_sq_vision, mean_sq_text, variance_gap, decoder_cosine,
    decoder_norm_base, decoder_norm_adapted, relative_decoder_norm, firing_frequency_vision,
    firing_frequency_text (relative_decoder_norm is NaN where it cannot vary: see
    `relative_norm_absence`), gap_rank (1 = largest gap, global), passed_gap, selected, rejected_at
    ("variance_gap", "decoder_cosine" or None when selected), stability (share of bootstrap
    resamples in which the feature is selected; NaN when n_bootstrap = 0).
    `base_saes` / `adapted_saes` map layer -> SAE (anything with W_dec [d_sae, d_in]) or the matrix.
    The thresholds used are in `df.attrs`.
    """
    layers = _check_inputs(vision, text, base_saes, adapted_saes)
    frames, gaps, cosines = [], [], []
    for layer in layers:
        wb = _decoder(base_saes[layer], layer, "base")
        wa = _decoder(adapted_saes[layer], layer, "adapted")
        if wb.shape != wa.shape or wb.shape[0] != vision.d_sae(layer):
            raise SAEError(
                f"layer {layer}: base W_dec {tuple(wb.shape)}, adapted W_dec {tuple(wa.shape)}, statistics have "
                f"{vision.d_sae(layer)} features; expected equal [d_sae, d_in] shapes for index-aligned SAEs"
            )
        gap = variance_gap(vision, text, layer, vision_token_types=vision_token_types, text_token_types=text_token_types)
        cos = decoder_cosine(wb, wa)
        gaps.append(gap)
        cosines.append(cos)
        F = wb.shape[0]
        frames.append(
            pd.DataFrame(
                {
                    "layer": np.full(F, layer, dtype=np.int64),
                    "feature": np.arange(F, dtype=np.int64),
                    "mean_sq_vision": vision.mean_sq(layer, vision_token_types).numpy(),
                    "mean_sq_text": text.mean_sq(layer, text_token_types).numpy(),
                    "variance_gap": gap.numpy(),
                    "decoder_cosine": cos.numpy(),
                    "decoder_norm_base": wb.norm(dim=1).numpy(),
                    "decoder_norm_adapted": wa.norm(dim=1).numpy(),
                    "relative_decoder_norm": relative_decoder_norm(wb, wa).numpy(),
                    "firing_frequency_vision": vision.firing_frequency(layer, vision_token_types).numpy(),
                    "firing_frequency_text": text.firing_frequency(layer, text_token_types).numpy(),
                }
            )
        )
    df = pd.concat(frames, ignore_index=True)
    absent = relative_norm_absence(
        torch.tensor(df["decoder_norm_base"].to_numpy()),
        torch.tensor(df["decoder_norm_adapted"].to_numpy()),
    )
    if absent is not None:  # a statistic that cannot vary is not reported (module docstring)
        df["relative_decoder_norm"] = np.nan
    gap_all, cos_all = torch.cat(gaps), torch.cat(cosines)
    stage1, selected = two_stage_selection(gap_all, cos_all, p_gap, p_cos)
    order = torch.sort(torch.nan_to_num(gap_all, nan=-math.inf), descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    df["gap_rank"] = rank.numpy()
    df["passed_gap"] = stage1.numpy()
    df["selected"] = selected.numpy()
    df["rejected_at"] = np.where(selected.numpy(), None, np.where(stage1.numpy(), REJECTED_COSINE, REJECTED_GAP))
    df["stability"] = (
        bootstrap_stability(
            vision, text, cos_all, layers, p_gap=p_gap, p_cos=p_cos, n_bootstrap=n_bootstrap, seed=seed,
            vision_token_types=vision_token_types, text_token_types=text_token_types, progress=progress,
        ).numpy()
        if n_bootstrap > 0
        else np.full(len(df), np.nan)
    )
    df.attrs.update(
        {
            "p_gap": p_gap,
            "p_cos": p_cos,
            "n_features": len(df),
            "n_passed_gap": int(stage1.sum()),
            "n_selected": int(selected.sum()),
            "gap_threshold": float(gap_all[stage1].min()) if stage1.any() else math.nan,
            "cosine_threshold": float(cos_all[selected].max()) if selected.any() else math.nan,
            "n_bootstrap": n_bootstrap,
            "relative_decoder_norm_absent": absent,
            "vision_split": vision.split,
            "text_split": text.split,
        }
    )
    return df


def bootstrap_stability(
    vision: FeatureStats,
    text: FeatureStats,
    cosine: torch.Tensor,
    layers: Sequence[int],
    *,
    p_gap: float = 0.2,
    p_cos: float = 0.2,
    n_bootstrap: int = 100,
    seed: int = 0,
    vision_token_types: Sequence[int] | None = None,
    text_token_types: Sequence[int] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """[N] share of chunk-bootstrap resamples in which each pooled feature is selected.

    Both runs are resampled with the same chunk weights (paired: chunk c holds the same records on
    both sides). A layer whose resample has no tokens on one side gets NaN gaps (never selected).
    """
    if vision.n_chunks != text.n_chunks:
        raise ConfigError(
            f"the bootstrap pairs chunks of both runs, but vision has {vision.n_chunks} chunks and text "
            f"{text.n_chunks}; collect both with the same n_chunks"
        )
    C = vision.n_chunks
    parts = []
    for layer in layers:
        parts.append(
            (
                vision.chunk_sums(layer, "sum_h2", vision_token_types),  # [C, F]
                vision.chunk_tokens(layer, vision_token_types).double(),  # [C]
                text.chunk_sums(layer, "sum_h2", text_token_types),
                text.chunk_tokens(layer, text_token_types).double(),
            )
        )
    gen = torch.Generator().manual_seed(seed)
    hits = torch.zeros(int(cosine.numel()), dtype=torch.int64)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("bootstrap stability"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("resamples", total=n_bootstrap)
        for _ in range(n_bootstrap):
            w = torch.bincount(torch.randint(0, C, (C,), generator=gen), minlength=C).double()  # [C]
            gaps = []
            for vs, vn, ts, tn in parts:  # no tokens on a side: 0 / 0 = NaN, never selected
                gaps.append((w @ vs) / (w @ vn) - (w @ ts) / (w @ tn))
            _, sel = two_stage_selection(torch.cat(gaps), cosine, p_gap, p_cos)
            hits += sel
            bar.advance(task)
    return hits.double() / n_bootstrap


def adapted_counts_per_layer(df: pd.DataFrame) -> pd.DataFrame:
    """Per layer: features, stage-1 survivors, adapted count and share, mean cosines (seed Fig. 8)."""
    rows = []
    for layer, g in df.groupby("layer", sort=True):
        sel = g[g["selected"]]
        rows.append(
            {
                "layer": int(layer),
                "n_features": len(g),
                "n_passed_gap": int(g["passed_gap"].sum()),
                "n_adapted": len(sel),
                "share_adapted": len(sel) / len(g),
                "mean_cosine_all": float(g["decoder_cosine"].mean()),
                "mean_cosine_adapted": float(sel["decoder_cosine"].mean()) if len(sel) else math.nan,
                "mean_gap_adapted": float(sel["variance_gap"].mean()) if len(sel) else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=list(ADAPTED_PER_LAYER.names))


def write_adapted_features(
    vision: FeatureStats,
    text: FeatureStats,
    base_saes: Mapping[int, Any],
    adapted_saes: Mapping[int, Any],
    run_dir: str | Path,
    **kwargs: Any,
) -> dict[str, Path]:
    """Pipeline stage: the diff of every feature to stats/diff.parquet, the adapted set to
    features/adapted.parquet, per-layer counts to stats/adapted_per_layer.parquet."""
    run_dir = Path(run_dir)
    df = adapted_features(vision, text, base_saes, adapted_saes, **kwargs)
    paths = {"diff": DIFF.path_in(run_dir), "adapted": ADAPTED.path_in(run_dir),
             "per_layer": ADAPTED_PER_LAYER.path_in(run_dir)}  # fmt: skip
    write_parquet(paths["diff"], DIFF.validate(df))
    write_parquet(paths["adapted"], ADAPTED.validate(df[df["selected"]].reset_index(drop=True)))
    write_parquet(paths["per_layer"], ADAPTED_PER_LAYER.validate(adapted_counts_per_layer(df)))
    return paths
