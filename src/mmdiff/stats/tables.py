"""The tables read from `FeatureStats`: one row per feature (`feature_summary`), the top-k
activating tokens of each feature (`top_examples`) and its top-k records by max activation
(`top_records`). Their columns are the schemas of the run's stats/{split}.parquet,
stats/{split}.topk.parquet and stats/{split}.toprecords.parquet (written by `mmdiff.stats.persist`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from mmdiff.stats.state import COUNTED_TYPES, TYPE_NAMES, FeatureStats

TOP_EXAMPLE_COLUMNS = ("layer", "feature", "rank", "record_id", "position", "token_type", "value")
"""Columns of `top_examples` and `top_records`: rank 0 is the feature's largest activation; token_type
is a TokenType value. In `top_records` each record appears once per feature, at its max activation
(value), whose position and token type are given."""


def feature_summary(stats: FeatureStats, quantile_levels: Sequence[float] = (0.5, 0.9, 0.99)) -> pd.DataFrame:
    """One row per (layer, feature): counts, sums, E[h^2], p_f, image share, max, quantiles.

    Columns: split, layer, feature, then tokens_/fires_/sum_h_/sum_h2_ per token type (text,
    image), mean_sq, firing_frequency, image_share, max_activation and q<level * 100> per level.
    """
    frames = []
    for layer in stats.layers:
        F = stats.d_sae(layer)
        cols: dict[str, Any] = {
            "split": stats.split,
            "layer": np.full(F, layer, dtype=np.int64),
            "feature": np.arange(F, dtype=np.int64),
        }
        for t in COUNTED_TYPES:
            name = TYPE_NAMES[t]
            cols[f"tokens_{name}"] = np.full(F, stats.n_tokens(layer, (t,)), dtype=np.int64)
            cols[f"fires_{name}"] = stats.firing_counts(layer, (t,)).numpy()
            cols[f"sum_h_{name}"] = stats.sum_h(layer, (t,)).numpy()
            cols[f"sum_h2_{name}"] = stats.sum_h2(layer, (t,)).numpy()
        n = stats.n_tokens(layer)
        with np.errstate(invalid="ignore", divide="ignore"):
            cols["mean_sq"] = stats.sum_h2(layer).numpy() / n if n else np.full(F, np.nan)
            cols["firing_frequency"] = stats.firing_counts(layer).numpy() / n if n else np.full(F, np.nan)
        cols["image_share"] = stats.image_share(layer).numpy()
        cols["max_activation"] = stats.max_activation(layer).numpy()
        qv = stats.quantiles(layer, quantile_levels).numpy()
        for q, row in zip(quantile_levels, qv):
            cols[f"q{q * 100:g}"] = row
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def top_examples(stats: FeatureStats, layer: int | None = None) -> pd.DataFrame:
    """Top-k activating tokens per feature (columns `TOP_EXAMPLE_COLUMNS`), of one layer or all.

    Only tokens with a positive activation are listed.
    """
    return _top_table(stats, layer, "top")


def top_records(stats: FeatureStats, layer: int | None = None) -> pd.DataFrame:
    """Top-k records per feature by their max activation over non-special tokens (columns
    `TOP_EXAMPLE_COLUMNS`, each record once per feature), of one layer or all: the records the
    interp stage shows. Only records where the feature fires are listed."""
    return _top_table(stats, layer, "rec")


def _top_table(stats: FeatureStats, layer: int | None, which: str) -> pd.DataFrame:
    frames = []
    for lyr in stats.layers if layer is None else [stats.check_layer(layer)]:
        st = stats.layer_state(lyr)
        value = getattr(st, f"{which}_value").cpu()
        ok = value > 0  # [k, F]
        rank, feat = ok.nonzero(as_tuple=True)
        rec = getattr(st, f"{which}_record").cpu()[rank, feat]
        frames.append(
            pd.DataFrame(
                {
                    "layer": np.full(len(rank), lyr, dtype=np.int64),
                    "feature": feat.numpy(),
                    "rank": rank.numpy(),
                    "record_id": [stats.record_ids[i] for i in rec.tolist()],
                    "position": getattr(st, f"{which}_position").cpu()[rank, feat].numpy().astype(np.int64),
                    "token_type": getattr(st, f"{which}_type").cpu()[rank, feat].numpy().astype(np.int64),
                    "value": value[rank, feat].numpy(),
                }
            ).sort_values(["feature", "rank"], kind="stable")
        )
    return pd.concat(frames, ignore_index=True)
