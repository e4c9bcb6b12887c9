"""Task features by contrastive firing, intersected with the adapted set, lexically filtered (docs/method.md#task-features).

For a task split D_T (spatial, OCR, safety, ...) against a generic base split D_B, per feature:

- firing frequency p_f(D) = fires_f(D) / n(D), counted over the token types under study (default:
  all non-special tokens);
- Delta p_f = p_f(D_T) - p_f(D_B);
- odds ratio with +0.5 added to every cell of the 2x2 table (Haldane-Anscombe):
  OR_f = [(a + .5) / (b + .5)] / [(c + .5) / (d + .5)], a / b = fired / silent tokens of D_T,
  c / d = fired / silent tokens of D_B;
- Fisher's exact test on the unsmoothed table, vectorised through the hypergeometric distribution
  (X = fired tokens among the n(D_T) task tokens, given all fired tokens of both splits):
  "greater" (default) = one-sided enrichment P(X >= a), equal to scipy.stats.fisher_exact(...,
  alternative="greater"); "two-sided" = the doubled smaller tail min(1, 2 min(P(X >= a), P(X <= a)))
  (the "central" Fisher p-value, which differs from scipy's default minimum-likelihood two-sided
  p-value in the rare asymmetric cases);
- Benjamini-Hochberg q-values across all features of all layers.

A feature is a candidate when Delta p_f > min_delta_p, OR_f > 1 and q_f < alpha; a task feature when
it is also in the adapted set, and when, on a re-run with a neutral instruction on the same images,
it stays active (firing frequency >= min_neutral_firing) and its activation mass is dominated by
image tokens (image share of sum h_f >= min_image_share). Tokens are the statistical unit, as in the
paper; tokens of one record are not independent, so treat p-values as a ranking device and check
the bootstrap stability of the adapted set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import hypergeom

from mmdiff.atomic import write_parquet
from mmdiff.errors import ConfigError
from mmdiff.schema import Artifact, Column
from mmdiff.stats import FeatureStats

NEUTRAL_INSTRUCTION = "Describe the positions of all objects in the image."

REASON_DELTA_P = "delta_p_below_threshold"
REASON_ODDS = "odds_ratio_not_above_1"
REASON_NOT_SIGNIFICANT = "not_significant"
REASON_NOT_ADAPTED = "not_adapted"
REASON_INACTIVE = "inactive_in_neutral_run"
REASON_TEXT_DOMINATED = "not_image_dominated_in_neutral_run"
REASON_KEPT = "kept"

_COLUMNS = (
    Column("task", str),
    Column("layer", int),
    Column("feature", int),
    Column("fires_task", int, "tokens of the task split on which the feature fired"),
    Column("tokens_task", int),
    Column("fires_base", int),
    Column("tokens_base", int),
    Column("p_task", float, "firing frequency on the task split"),
    Column("p_base", float),
    Column("delta_p", float, "p_task - p_base"),
    Column("odds_ratio", float, "+0.5-smoothed"),
    Column("p_value", float, "Fisher's exact test"),
    Column("q_value", float, "Benjamini-Hochberg across all features of all layers"),
    Column("candidate", bool, "delta_p, odds ratio and q-value pass"),
    Column("in_adapted_set", bool, "NA when the adapted set was not given"),
    Column("neutral_firing_frequency", float, "NaN without the lexical filter"),
    Column("neutral_image_share", float),
    Column("neutral_active", bool, "NA without the lexical filter"),
    Column("neutral_image_dominated", bool),
    Column("kept", bool, "a task feature"),
    Column("reason", str, "the first criterion it fails, 'kept' otherwise"),
)
DETECT = Artifact(
    "stats/detect_{task}.parquet", "task_features", _COLUMNS, doc="Every feature's scores for one task.",
    required=("layer", "feature", "p_task", "p_base", "delta_p", "odds_ratio", "candidate", "kept"),
)
TASK_FEATURES = Artifact(
    "features/{task}.parquet", "task_features", _COLUMNS, required=("layer", "feature"),
    doc="The task features: the `kept` rows of DETECT.",
)


def firing_frequency(fires: np.ndarray, n_tokens: np.ndarray | int) -> np.ndarray:
    """p = fires / n (NaN where n = 0)."""
    fires = np.asarray(fires, dtype=np.float64)
    n = np.asarray(n_tokens, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, fires / n, np.nan)


def odds_ratio(fires_task, n_task, fires_base, n_base) -> np.ndarray:
    """OR with +0.5 on each cell: [(a+.5)/(b+.5)] / [(c+.5)/(d+.5)], b = n_task - a, d = n_base - c."""
    a = np.asarray(fires_task, dtype=np.float64)
    c = np.asarray(fires_base, dtype=np.float64)
    b = np.asarray(n_task, dtype=np.float64) - a
    d = np.asarray(n_base, dtype=np.float64) - c
    if (b < 0).any() or (d < 0).any():
        raise ConfigError("a firing count exceeds its token count: the counts do not come from one table")
    return ((a + 0.5) * (d + 0.5)) / ((b + 0.5) * (c + 0.5))


def fisher_exact_pvalues(
    fires_task, n_task, fires_base, n_base, alternative: Literal["greater", "two-sided"] = "greater"
) -> np.ndarray:
    """Fisher exact p-values of the 2x2 tables [[a, n_task - a], [c, n_base - c]], one per feature."""
    a = np.asarray(fires_task, dtype=np.int64)
    c = np.asarray(fires_base, dtype=np.int64)
    n_t = np.broadcast_to(np.asarray(n_task, dtype=np.int64), a.shape)
    n_b = np.broadcast_to(np.asarray(n_base, dtype=np.int64), a.shape)
    total, fired = n_t + n_b, a + c
    upper = hypergeom.sf(a - 1, total, fired, n_t)  # P(X >= a)
    if alternative == "greater":
        p = upper
    elif alternative == "two-sided":
        lower = hypergeom.cdf(a, total, fired, n_t)  # P(X <= a)
        p = np.minimum(1.0, 2.0 * np.minimum(upper, lower))
    else:
        raise ConfigError(f"alternative must be 'greater' or 'two-sided', found {alternative!r}")
    return np.clip(np.nan_to_num(p, nan=1.0), 0.0, 1.0)


def benjamini_hochberg(p_values) -> np.ndarray:
    """BH-adjusted q-values: q_(i) = min_{j >= i} min(1, m p_(j) / j) over the ascending order."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ConfigError(f"benjamini_hochberg takes a 1-D array of p-values, found shape {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ConfigError("p-values must lie in [0, 1] with no NaN")
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    q = np.empty(m)
    q[order] = q_sorted
    return q


def _check_pair(a: FeatureStats, b: FeatureStats, what: str) -> list[int]:
    layers = sorted(a.layers)
    if sorted(b.layers) != layers or any(a.d_sae(layer) != b.d_sae(layer) for layer in layers):
        raise ConfigError(
            f"{what}: split {a.split!r} has layers/features {[(l, a.d_sae(l)) for l in layers]}, split "
            f"{b.split!r} has {[(l, b.d_sae(l)) for l in sorted(b.layers)]}; use statistics of the same SAEs"
        )
    return layers


def contrastive_firing(
    task: FeatureStats,
    base: FeatureStats,
    *,
    token_types: Sequence[int] | None = None,
    alternative: Literal["greater", "two-sided"] = "greater",
) -> pd.DataFrame:
    """Per (layer, feature): fires and tokens per split, p_task, p_base, delta_p, odds_ratio,
    p_value (Fisher) and q_value (BH across all features of all layers)."""
    layers = _check_pair(task, base, "contrastive firing")
    frames = []
    for layer in layers:
        F = task.d_sae(layer)
        a = task.firing_counts(layer, token_types).numpy()
        c = base.firing_counts(layer, token_types).numpy()
        n_t, n_b = task.n_tokens(layer, token_types), base.n_tokens(layer, token_types)
        if n_t == 0 or n_b == 0:
            raise ConfigError(
                f"layer {layer}: split {task.split!r} has {n_t} tokens and {base.split!r} has {n_b} tokens of "
                f"types {token_types}; firing frequencies need tokens on both sides"
            )
        p_t, p_b = firing_frequency(a, n_t), firing_frequency(c, n_b)
        frames.append(
            pd.DataFrame(
                {
                    "layer": np.full(F, layer, dtype=np.int64),
                    "feature": np.arange(F, dtype=np.int64),
                    "fires_task": a,
                    "tokens_task": np.full(F, n_t, dtype=np.int64),
                    "fires_base": c,
                    "tokens_base": np.full(F, n_b, dtype=np.int64),
                    "p_task": p_t,
                    "p_base": p_b,
                    "delta_p": p_t - p_b,
                    "odds_ratio": odds_ratio(a, n_t, c, n_b),
                    "p_value": fisher_exact_pvalues(a, n_t, c, n_b, alternative),
                }
            )
        )
    df = pd.concat(frames, ignore_index=True)
    df["q_value"] = benjamini_hochberg(df["p_value"].to_numpy())
    return df


def lexical_filter(
    neutral: FeatureStats,
    *,
    min_neutral_firing: float = 1e-3,
    min_image_share: float = 0.5,
    token_types: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Per (layer, feature) of the neutral-instruction run: neutral_firing_frequency (over
    `token_types`, default all non-special), neutral_image_share (image tokens' share of sum h),
    neutral_active, neutral_image_dominated."""
    frames = []
    for layer in neutral.layers:
        F = neutral.d_sae(layer)
        p = neutral.firing_frequency(layer, token_types).numpy()
        share = neutral.image_share(layer).numpy()
        frames.append(
            pd.DataFrame(
                {
                    "layer": np.full(F, layer, dtype=np.int64),
                    "feature": np.arange(F, dtype=np.int64),
                    "neutral_firing_frequency": p,
                    "neutral_image_share": share,
                    "neutral_active": p >= min_neutral_firing,
                    "neutral_image_dominated": np.nan_to_num(share, nan=0.0) >= min_image_share,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _adapted_keys(adapted: pd.DataFrame | Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    if isinstance(adapted, pd.DataFrame):
        missing = {"layer", "feature"} - set(adapted.columns)
        if missing:
            raise ConfigError(f"the adapted-set table needs columns layer and feature; missing {sorted(missing)}")
        rows = adapted[adapted["selected"]] if "selected" in adapted.columns else adapted
        return set(zip(rows["layer"].astype(int), rows["feature"].astype(int)))
    return {(int(layer), int(f)) for layer, f in adapted}


def task_features(
    task: FeatureStats,
    base: FeatureStats,
    *,
    adapted: pd.DataFrame | Iterable[tuple[int, int]] | None = None,
    neutral: FeatureStats | None = None,
    task_name: str | None = None,
    token_types: Sequence[int] | None = None,
    min_delta_p: float = 0.01,
    alpha: float = 0.05,
    alternative: Literal["greater", "two-sided"] = "greater",
    min_neutral_firing: float = 1e-3,
    min_image_share: float = 0.5,
    neutral_token_types: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per (layer, feature): every contrastive score, the filters, `kept` and the `reason`.

    `adapted` is the table of `mmdiff.diff.adapted_features` (its `selected` rows are the adapted
    set) or (layer, feature) pairs; None skips the intersection. `neutral` is the statistics of the
    neutral-instruction re-run (`NEUTRAL_INSTRUCTION`) on the task images, encoded with the same
    SAEs; None skips the lexical filter. Skipped filters leave their columns NA. `reason` is the
    first criterion a feature fails, in the order delta_p, odds ratio, significance, adapted set,
    neutral activity, image dominance; "kept" otherwise.
    """
    if not 0 < alpha <= 1:
        raise ConfigError(f"alpha must be in (0, 1], found {alpha}")
    df = contrastive_firing(task, base, token_types=token_types, alternative=alternative)
    df.insert(0, "task", task_name or task.split)
    pass_dp = df["delta_p"].to_numpy() > min_delta_p
    pass_or = df["odds_ratio"].to_numpy() > 1.0
    pass_q = df["q_value"].to_numpy() < alpha
    df["candidate"] = pass_dp & pass_or & pass_q
    n = len(df)
    if adapted is not None:
        keys = _adapted_keys(adapted)
        in_a = np.fromiter(((l, f) in keys for l, f in zip(df["layer"], df["feature"])), dtype=bool, count=n)
        df["in_adapted_set"] = pd.array(in_a, dtype="boolean")
    else:
        in_a = np.ones(n, dtype=bool)
        df["in_adapted_set"] = pd.array([pd.NA] * n, dtype="boolean")
    if neutral is not None:
        _check_pair(task, neutral, "lexical filter")
        lex = lexical_filter(
            neutral, min_neutral_firing=min_neutral_firing, min_image_share=min_image_share,
            token_types=neutral_token_types,
        )
        df = df.merge(lex, on=["layer", "feature"], how="left", validate="one_to_one")
        active = df["neutral_active"].to_numpy(dtype=bool)
        image_dom = df["neutral_image_dominated"].to_numpy(dtype=bool)
    else:
        active = image_dom = np.ones(n, dtype=bool)
        df["neutral_firing_frequency"] = np.full(n, np.nan)
        df["neutral_image_share"] = np.full(n, np.nan)
        df["neutral_active"] = pd.array([pd.NA] * n, dtype="boolean")
        df["neutral_image_dominated"] = pd.array([pd.NA] * n, dtype="boolean")
    reason = np.full(n, REASON_KEPT, dtype=object)
    # fill from the last criterion to the first, so the first failing one wins
    for ok, why in (
        (image_dom, REASON_TEXT_DOMINATED), (active, REASON_INACTIVE), (in_a, REASON_NOT_ADAPTED),
        (pass_q, REASON_NOT_SIGNIFICANT), (pass_or, REASON_ODDS), (pass_dp, REASON_DELTA_P),
    ):
        reason[~ok] = why
    df["kept"] = reason == REASON_KEPT
    df["reason"] = reason
    df.attrs.update(
        {
            "task": task_name or task.split,
            "base_split": base.split,
            "min_delta_p": min_delta_p,
            "alpha": alpha,
            "alternative": alternative,
            "adapted_intersection": adapted is not None,
            "lexical_filter": neutral is not None,
            "min_neutral_firing": min_neutral_firing,
            "min_image_share": min_image_share,
        }
    )
    return df


def write_task_features(
    tasks: Mapping[str, FeatureStats],
    base: FeatureStats,
    run_dir: str | Path,
    *,
    adapted: pd.DataFrame | Iterable[tuple[int, int]] | None = None,
    neutral: Mapping[str, FeatureStats] | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Path]]:
    """Pipeline stage: for each task split, every feature's scores to stats/detect_{task}.parquet and
    the kept task features to features/{task}.parquet. `neutral` maps task -> neutral-run statistics;
    a task without an entry is not lexically filtered (its table's attrs say so)."""
    run_dir = Path(run_dir)
    adapted_keys = None if adapted is None else _adapted_keys(adapted)
    out: dict[str, dict[str, Path]] = {}
    for name, stats in tasks.items():
        df = task_features(
            stats, base, adapted=adapted_keys, neutral=(neutral or {}).get(name), task_name=name, **kwargs
        )
        paths = {"scores": DETECT.path_in(run_dir, task=name), "features": TASK_FEATURES.path_in(run_dir, task=name)}
        write_parquet(paths["scores"], DETECT.validate(df))
        write_parquet(paths["features"], TASK_FEATURES.validate(df[df["kept"]].reset_index(drop=True)))
        out[name] = paths
    return out
