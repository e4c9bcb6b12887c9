"""Honest controls for an intervention on a task feature set (docs/method.md#interventions-and-controls).

- Matched random features: for each feature of the task set, a feature of the same layer drawn from
  the same firing-frequency quantile bin (bins are quantiles of that layer's firing frequencies),
  never from the excluded features (the task set, by default every task set), without repetition
  within a draw. Several seeded draws. An ablation that removes as many directions of equally
  common features but changes nothing says the task set's effect is not "removing anything hurts".
- Mismatched task sets: the OCR set is the control for spatial and vice versa; any pairs can be given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mmdiff.errors import ConfigError, DataError

DEFAULT_MISMATCH: dict[str, str] = {"spatial": "ocr", "ocr": "spatial"}


def feature_pairs(table: pd.DataFrame, name: str = "task set") -> pd.DataFrame:
    """The (layer, feature) columns of a feature table as int64, duplicates dropped, sorted."""
    if not isinstance(table, pd.DataFrame):
        raise DataError(
            f"{name}: expected a DataFrame with columns layer, feature; got {type(table).__name__}"
        )
    missing = [c for c in ("layer", "feature") if c not in table.columns]
    if missing:
        raise DataError(
            f"{name}: the feature table lacks columns {missing} (has {list(table.columns)}); "
            "task tables from mmdiff.detect (features/<task>.parquet) have layer and feature"
        )
    out = table[["layer", "feature"]]
    if len(out) and (out.isna().any().any() or (out < 0).any().any()):
        raise DataError(
            f"{name}: layer and feature must be non-negative integers; found NaN or negative values"
        )
    return (
        out.astype("int64")
        .drop_duplicates()
        .sort_values(["layer", "feature"])
        .reset_index(drop=True)
    )


def features_by_layer(table: pd.DataFrame) -> dict[int, list[int]]:
    """{layer: [feature, ...]} of a (layer, feature) table."""
    pairs = feature_pairs(table)
    return {
        int(layer): g["feature"].astype(int).tolist()
        for layer, g in pairs.groupby("layer", sort=True)
    }


def frequency_bins(freq: np.ndarray, n_bins: int) -> np.ndarray:
    """[F] bin index in 0..n_bins-1 of each feature's firing frequency, by the layer's quantiles.

    Edges are the i/n_bins quantiles of `freq`; a value equal to an inner edge goes to the upper
    bin, so equal frequencies always share a bin (many never-firing features collapse into one).
    """
    f = np.asarray(freq, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise DataError(f"firing frequencies must be a non-empty 1-D array, got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise DataError(
            "firing frequencies hold NaN or inf; were any tokens counted for this layer?"
        )
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
    inner = np.quantile(f, np.arange(1, n_bins) / n_bins)
    return np.searchsorted(inner, f, side="right").astype(np.int64)


def firing_frequencies(
    stats, layers: Iterable[int], token_types: Sequence[int] | None = None
) -> dict[int, np.ndarray]:
    """{layer: [d_sae] p_f} from a FeatureStats, over `token_types` (None: text and image tokens)."""
    return {int(L): stats.firing_frequency(int(L), token_types).numpy() for L in layers}


def _nearest_bins(bins_present: np.ndarray, b: int) -> list[int]:
    """Bins ordered by distance from b (ties: the lower bin first)."""
    return sorted(set(bins_present.tolist()), key=lambda x: (abs(x - b), x))


def matched_random_features(
    task_set: pd.DataFrame,
    d_sae: Mapping[int, int],
    frequencies: Mapping[int, np.ndarray] | None,
    *,
    n_draws: int = 3,
    seed: int = 0,
    n_bins: int = 10,
    exclude: pd.DataFrame | Iterable[tuple[int, int]] | None = None,
) -> list[pd.DataFrame]:
    """`n_draws` random feature sets matched to `task_set` in layer and firing-frequency bin.

    Returns one DataFrame per draw with columns layer, feature, matched_feature (the task feature it
    stands for), bin, bin_distance (0 = same bin; > 0 where the bin had too few candidates and the
    nearest bins were used). `frequencies` {layer: [d_sae]} come from `firing_frequencies`; None
    matches the layer only (every feature in one bin). `exclude` (default: the task set) is never
    drawn. Deterministic per (seed, draw).
    """
    pairs = feature_pairs(task_set)
    if n_draws < 1:
        raise ConfigError(f"n_draws must be >= 1, got {n_draws}")
    excluded = {(int(a), int(b)) for a, b in zip(pairs["layer"], pairs["feature"])}
    if exclude is not None:
        ex = (
            feature_pairs(exclude, "exclude")
            if isinstance(exclude, pd.DataFrame)
            else pd.DataFrame(list(exclude), columns=["layer", "feature"])
        )
        excluded |= {(int(a), int(b)) for a, b in zip(ex["layer"], ex["feature"])}
    layers = sorted(pairs["layer"].unique().tolist())
    bins: dict[int, np.ndarray] = {}
    for L in layers:
        if L not in d_sae:
            raise DataError(
                f"the task set has features at layer {L} but no SAE size is known for it (layers {sorted(d_sae)})"
            )
        F = int(d_sae[L])
        feats = pairs.loc[pairs["layer"] == L, "feature"]
        if int(feats.max()) >= F:
            raise DataError(
                f"layer {L}: feature {int(feats.max())} does not exist in an SAE of {F} features"
            )
        if frequencies is None:
            bins[L] = np.zeros(F, dtype=np.int64)
        else:
            if L not in frequencies:
                raise DataError(
                    f"no firing frequencies for layer {L} (have {sorted(frequencies)}); collect statistics "
                    "for every layer of the task set, or pass frequencies=None to match layers only"
                )
            freq = np.asarray(frequencies[L])
            if freq.shape != (F,):
                raise DataError(
                    f"layer {L}: firing frequencies have shape {freq.shape}, the SAE has {F} features"
                )
            bins[L] = frequency_bins(freq, n_bins)
    draws = []
    for draw in range(n_draws):
        rng = np.random.default_rng([int(seed), draw])
        rows = []
        for L in layers:
            feats = pairs.loc[pairs["layer"] == L, "feature"].to_numpy()
            layer_bins = bins[L]
            available = np.ones(layer_bins.size, dtype=bool)
            for lf in (f for (lyr, f) in excluded if lyr == L):
                if lf < layer_bins.size:
                    available[lf] = False
            if int(available.sum()) < feats.size:
                raise DataError(
                    f"layer {L}: {feats.size} task features need as many random matches, but only "
                    f"{int(available.sum())} features of the layer are not excluded; use a wider SAE or a smaller set"
                )
            for b in np.unique(
                layer_bins[feats]
            ):  # sorted bins: the draw does not depend on table order
                wanted = np.sort(feats[layer_bins[feats] == b])
                chosen: list[tuple[int, int]] = []  # (feature, bin distance)
                for nb in _nearest_bins(np.unique(layer_bins), int(b)):
                    need = wanted.size - len(chosen)
                    if need == 0:
                        break
                    pool = np.flatnonzero(available & (layer_bins == nb))
                    take = (
                        rng.choice(pool, size=min(need, pool.size), replace=False)
                        if pool.size
                        else []
                    )
                    for f in take:
                        available[int(f)] = False
                        chosen.append((int(f), abs(int(nb) - int(b))))
                for task_f, (f, dist) in zip(wanted, chosen):
                    rows.append((L, f, int(task_f), int(b), dist))
        draws.append(
            pd.DataFrame(
                rows, columns=["layer", "feature", "matched_feature", "bin", "bin_distance"]
            ).astype("int64")
        )
    return draws


def mismatched_pairs(
    names: Iterable[str], pairs: Mapping[str, str] | None = None
) -> dict[str, str]:
    """{target task: mismatched task set}, keeping the pairs whose two sets both exist.

    Default pairs: spatial <-> ocr (DEFAULT_MISMATCH). A pair naming a set that is not given is
    dropped silently for the defaults, an error for explicit pairs.
    """
    have = set(names)
    wanted = dict(DEFAULT_MISMATCH if pairs is None else pairs)
    out = {}
    for target, control in wanted.items():
        if target == control:
            raise ConfigError(f"a task set cannot be its own mismatched control ({target!r})")
        if target in have and control in have:
            out[target] = control
        elif pairs is not None:
            raise ConfigError(
                f"mismatched pair {target!r} -> {control!r}: the task sets given are {sorted(have)}"
            )
    return out
