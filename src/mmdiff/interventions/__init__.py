"""Interventions on a backbone's residual stream and attention heads, as composable context managers.

Each one is effective on prompt and generated tokens alike and gives the same result with and
without the KV cache (docs/method.md#interventions-and-controls). Compose them by nesting, or with `compose(a, b, ...)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mmdiff.interventions._hooks import Intervention, InterventionError, Positions, position_mask
from mmdiff.interventions.ablate import (
    FeatureAblation,
    ablate_features,
    decoder_directions,
    orthonormal_basis,
    project_out,
)
from mmdiff.interventions.caa import difference_of_means, layer_vectors
from mmdiff.interventions.clamp import FeatureClamp, clamp_delta, clamp_features, decoder_rows
from mmdiff.interventions.heads import (
    HeadMeanAblation,
    head_means,
    mean_ablate_heads,
    replace_heads,
)
from mmdiff.interventions.steer import AdditiveSteering, steer_features, steer_vector


@contextlib.contextmanager
def compose(*interventions: Intervention) -> Iterator[tuple[Intervention, ...]]:
    """Enter several interventions at once (in order); all are removed on exit, also on error."""
    with contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(i) for i in interventions)


__all__ = [
    "AdditiveSteering",
    "FeatureAblation",
    "FeatureClamp",
    "HeadMeanAblation",
    "Intervention",
    "InterventionError",
    "Positions",
    "ablate_features",
    "clamp_delta",
    "clamp_features",
    "compose",
    "decoder_directions",
    "decoder_rows",
    "difference_of_means",
    "head_means",
    "layer_vectors",
    "mean_ablate_heads",
    "orthonormal_basis",
    "position_mask",
    "project_out",
    "replace_heads",
    "steer_features",
    "steer_vector",
]
