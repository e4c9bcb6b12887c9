"""Feature ablation: project the span of decoder directions out of the residual stream (docs/method.md#interventions-and-controls)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmdiff.interventions._hooks import (
    Intervention,
    InterventionError,
    Positions,
    check_layer,
    check_vector,
)
from mmdiff.models.base import Backbone


def orthonormal_basis(directions: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """[n, d] directions -> [d, r] orthonormal basis Q of their span (r = numerical rank, may be 0).

    Computed in float64 through an SVD, so duplicated or linearly dependent directions are fine and
    all-zero rows add nothing.
    """
    # [n, d]
    if directions.dim() == 1:
        directions = directions[None]
    if directions.dim() != 2:
        raise InterventionError(
            f"directions must be [n, d_model]; got shape {tuple(directions.shape)}"
        )
    d = directions.shape[1]
    a = directions.detach().to("cpu", torch.float64)
    if a.shape[0] == 0 or not a.abs().max() > 0:
        return torch.zeros(d, 0, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    rank = int((s > rtol * s[0]).sum())
    return vh[:rank].T.contiguous()  # [d, r]


def project_out(y: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """y - Q Q^T y for y [..., d] and orthonormal Q [d, r]; computed in at least float32."""
    if basis.shape[1] == 0:
        return y
    work = torch.promote_types(y.dtype, torch.float32)
    q = basis.to(y.device, work)
    y_w = y.to(work)
    return (y_w - (y_w @ q) @ q.T).to(y.dtype)


def decoder_directions(
    saes: Mapping[int, Any], features: Mapping[int, Sequence[int]]
) -> dict[int, torch.Tensor]:
    """{layer: [n, d_in]} the decoder rows W_dec[f] of the chosen features of each layer's SAE."""
    out: dict[int, torch.Tensor] = {}
    for layer, idx in features.items():
        if layer not in saes:
            raise InterventionError(
                f"features are chosen at layer {layer} but no SAE was given for it; saes has layers {sorted(saes)}"
            )
        w_dec = saes[layer].W_dec  # [d_sae, d_in]
        idx = [int(i) for i in idx]
        bad = [i for i in idx if not 0 <= i < w_dec.shape[0]]
        if bad:
            raise InterventionError(
                f"features {bad} do not exist in the SAE of layer {layer} (d_sae={w_dec.shape[0]})"
            )
        out[layer] = w_dec[torch.tensor(idx, dtype=torch.long, device=w_dec.device)].detach()
    return out


class FeatureAblation(Intervention):
    """y <- y - Q Q^T y at the selected positions of each layer; Q spans that layer's directions."""

    def __init__(
        self,
        backbone: Backbone,
        directions: Mapping[int, torch.Tensor],
        positions: Positions = "text",
        token_types: torch.Tensor | None = None,
    ) -> None:
        super().__init__(backbone, positions, token_types)
        self.bases: dict[int, torch.Tensor] = {}
        for layer, dirs in directions.items():
            check_layer(backbone, layer)
            dirs = check_vector(
                f"the ablation directions of layer {layer}", torch.as_tensor(dirs), backbone.d_model
            )
            basis = orthonormal_basis(dirs)
            if basis.shape[1] > 0:  # a zero set is an exact no-op: no hook at all
                self.bases[layer] = basis

    def layers(self) -> list[int]:
        return sorted(self.bases)

    def edit(self, layer: int, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        edited = project_out(y, self.bases[layer])  # [batch, seq, d_model]
        return edited if mask is None else torch.where(mask[..., None], edited, y)


def ablate_features(
    backbone: Backbone,
    directions: Mapping[int, torch.Tensor],
    positions: Positions = "text",
    token_types: torch.Tensor | None = None,
) -> FeatureAblation:
    """A context manager that removes the span of `directions` ({layer: [n, d_model]}) from hook point L.

    Directions are the SAE decoder rows of the features to ablate; they are orthonormalised first,
    so y <- y - Q Q^T y removes exactly their span. positions: "text" (default; generated tokens
    count as text), "image", "all", or a [batch, seq] bool mask; "text"/"image" need the prompt's
    `token_types` [batch, seq]. An empty or all-zero set installs no hook: an exact no-op.
    """
    return FeatureAblation(backbone, directions, positions, token_types)
