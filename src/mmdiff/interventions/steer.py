"""Additive steering of the residual stream: feature steering and steering by an arbitrary vector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mmdiff.interventions._hooks import (
    Intervention,
    InterventionError,
    Positions,
    check_layer,
    check_vector,
)
from mmdiff.models.base import Backbone


def add_at(y: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """y + delta at the selected positions. y [batch, seq, d], delta [d], mask [batch, seq] or None."""
    d = delta.to(y.device, y.dtype)
    if mask is None:
        return y + d
    return y + mask[..., None].to(y.dtype) * d


class AdditiveSteering(Intervention):
    """y <- y + delta_L at the selected positions of each layer L."""

    def __init__(
        self,
        backbone: Backbone,
        deltas: Mapping[int, torch.Tensor],
        positions: Positions = "all",
        token_types: torch.Tensor | None = None,
    ) -> None:
        super().__init__(backbone, positions, token_types)
        self.deltas: dict[int, torch.Tensor] = {}
        for layer, delta in deltas.items():
            check_layer(backbone, layer)
            delta = check_vector(
                f"the steering vector of layer {layer}", torch.as_tensor(delta), backbone.d_model
            )
            if delta.dim() != 1:
                raise InterventionError(
                    f"the steering vector of layer {layer} must be [d_model]; got {tuple(delta.shape)}"
                )
            self.deltas[layer] = delta.detach()

    def layers(self) -> list[int]:
        return sorted(self.deltas)

    def edit(self, layer: int, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return add_at(y, self.deltas[layer], mask)


def feature_steering_delta(
    features: Sequence[tuple[torch.Tensor, float]], alpha: float, d_model: int
) -> torch.Tensor:
    """[d_model] sum over features of alpha * s * v, v the unit direction and s its typical max activation."""
    total = torch.zeros(d_model, dtype=torch.float64)
    for i, (direction, scale) in enumerate(features):
        v = check_vector(f"steering direction {i}", torch.as_tensor(direction), d_model).to(
            "cpu", torch.float64
        )
        if v.dim() != 1:
            raise InterventionError(
                f"steering direction {i} must be [d_model]; got shape {tuple(v.shape)}"
            )
        norm = v.norm()
        if not norm > 0:
            raise InterventionError(
                f"steering direction {i} is the zero vector: it has no direction to steer along"
            )
        total += alpha * float(scale) * v / norm
    return total


def steer_features(
    backbone: Backbone,
    features: Mapping[int, Sequence[tuple[torch.Tensor, float]]],
    alpha: float,
    positions: Positions = "all",
    token_types: torch.Tensor | None = None,
) -> AdditiveSteering:
    """A context manager that steers along SAE features: y <- y + alpha * s * v at hook point L.

    features: {layer: [(direction [d_model], s), ...]}; v = direction / ||direction|| and s is the
    feature's typical max activation (e.g. a high quantile of its activations). positions as in
    `ablate_features`, default "all".
    """
    deltas = {
        layer: feature_steering_delta(feats, alpha, backbone.d_model)
        for layer, feats in features.items()
    }
    return AdditiveSteering(backbone, deltas, positions, token_types)


def steer_vector(
    backbone: Backbone,
    layer: int,
    vector: torch.Tensor,
    alpha: float,
    positions: Positions = "all",
    token_types: torch.Tensor | None = None,
) -> AdditiveSteering:
    """A context manager that adds alpha * vector ([d_model], used as given) to hook point `layer`.

    The single-layer baseline (CAA, with `difference_of_means`) and concept shift steering use it.
    """
    check_layer(backbone, layer)
    vector = check_vector("the steering vector", torch.as_tensor(vector), backbone.d_model)
    return AdditiveSteering(
        backbone, {layer: alpha * vector.detach().to(torch.float64)}, positions, token_types
    )
