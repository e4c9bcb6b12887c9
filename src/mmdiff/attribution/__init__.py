"""Attribution patching from attention heads to an SAE feature (docs/method.md#attribution-patching).

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

Where things are: `objective` (m and its positions), `corrupt` (the mean visual embedding and the
layer-0 hook), `runs` (one hooked forward pass: corrupt, read and patch o_proj inputs), `patching`
(Methods A and B), `exact` (exact patching, Spearman), `frames` (the tables), `overlays` (attention
maps and overlay PNGs), `stage` (sample selection and the pipeline stage).
"""

from __future__ import annotations

from mmdiff.attribution.corrupt import VisualMean, visual_embedding_mean
from mmdiff.attribution.exact import Direction, ExactPatching, exact_patching, spearman
from mmdiff.attribution.frames import HEADS, LAYERS, heads_frame, layers_frame
from mmdiff.attribution.objective import Objective, Positions, feature_values, objective_positions
from mmdiff.attribution.overlays import (
    attention_overlays,
    attention_weights,
    head_image_attention,
    ranked_heads,
    top_and_bottom_heads,
)
from mmdiff.attribution.patching import HeadAttribution, Method, attribution_patching
from mmdiff.attribution.stage import FeatureAttribution, attribute_features, select_samples

__all__ = [
    "HEADS",
    "LAYERS",
    "Direction",
    "ExactPatching",
    "FeatureAttribution",
    "HeadAttribution",
    "Method",
    "Objective",
    "Positions",
    "VisualMean",
    "attention_overlays",
    "attention_weights",
    "attribute_features",
    "attribution_patching",
    "exact_patching",
    "feature_values",
    "head_image_attention",
    "heads_frame",
    "layers_frame",
    "objective_positions",
    "ranked_heads",
    "top_and_bottom_heads",
    "select_samples",
    "spearman",
    "visual_embedding_mean",
]
