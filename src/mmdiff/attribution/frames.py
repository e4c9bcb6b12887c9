"""The stage's tables: one row per head (heads.parquet) and one per layer (layers.parquet)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from mmdiff.attribution.exact import ExactPatching
from mmdiff.attribution.patching import HeadAttribution
from mmdiff.schema import Artifact, Column

_KEY = (
    Column("feature_layer", int, "the attributed feature's layer"),
    Column("feature", int, "the attributed feature"),
    Column("layer", int, "the layer of the head (or of the layer's heads together)"),
)
_SCORES = (
    Column("score_a", float, "Method A (noising) attribution; NaN when not computed"),
    Column("score_b", float, "Method B (denoising) attribution; NaN when not computed"),
    Column("exact", float, "exact patching (noising); NaN when not run", default=math.nan),
    Column("exact_denoising", float, "exact patching (denoising); NaN when not run", default=math.nan),
    Column("n_samples", int, "records the scores average over", default=pd.NA),
)
HEADS = Artifact(
    "attribution/heads.parquet", "attribute_features", doc="One row per (feature, layer, head).",
    columns=(*_KEY, Column("head", int, "the head within its layer"), *_SCORES),
)
LAYERS = Artifact(
    "attribution/layers.parquet", "attribute_features",
    doc="One row per (feature, layer): the sums of the layer's head scores, and exact patching of all its heads.",
    columns=(*_KEY, *_SCORES),
)


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
