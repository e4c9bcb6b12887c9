"""Clamping SAE features while keeping the SAE's error term: y <- y + W_dec (f_clamped - f).

W_dec (f_clamped - f) is taken in the residual stream's units: for an SAE that scales its input
(Llama Scope's norm_scale) the decoder rows come from `sae.decode`, which undoes the scaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmdiff.interventions._hooks import Intervention, InterventionError, Positions, check_layer
from mmdiff.models.base import Backbone


def decoder_rows(sae: Any, features: torch.Tensor) -> torch.Tensor:
    """[n_clamped, d_in] what one unit of each feature adds to the residual stream, in its own units.

    With `sae.decode` (an affine decoder: ours divides by norm_scale, SAELens may undo an input
    normalisation) the rows are decode(e_i) - decode(0), so any output scaling is honoured; an SAE
    without decode is taken as x_hat = f W_dec + b_dec and its W_dec rows are used as they are.
    """
    w_dec = sae.W_dec  # [d_sae, d_in]
    if not hasattr(sae, "decode"):
        return w_dec[features].detach()
    basis = torch.zeros(len(features), w_dec.shape[0], device=w_dec.device, dtype=w_dec.dtype)
    basis[torch.arange(len(features)), features.to(w_dec.device)] = 1.0
    with torch.no_grad():
        rows = sae.decode(basis) - sae.decode(torch.zeros_like(basis))  # [n_clamped, d_in]
    if rows.shape != (len(features), w_dec.shape[1]):
        raise InterventionError(
            f"sae.decode returned shape {tuple(rows.shape)} for {len(features)} one-hot codes; "
            f"expected [{len(features)}, {w_dec.shape[1]}]"
        )
    return rows.detach()


def clamp_delta(
    sae: Any,
    x: torch.Tensor,
    features: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """[n, d_in] residuals -> [n, d_in] W_dec (f_clamped - f), with f = sae.encode(x) (dense [n, d_sae]).

    Only the clamped features differ between f_clamped and f, so only their decoder rows
    (`decoder_rows`, pass them to skip recomputing) are used; features clamped to their current
    value give exactly zero, and whatever the SAE does not reconstruct (its error term) is kept.
    """
    w_dec = sae.W_dec  # [d_sae, d_in]
    f = sae.encode(x.to(w_dec.device, w_dec.dtype))  # [n, d_sae]
    if f.dim() != 2 or f.shape[0] != x.shape[0]:
        raise InterventionError(
            f"sae.encode returned shape {tuple(f.shape)} for input {tuple(x.shape)}; expected [n, d_sae]"
        )
    rows = decoder_rows(sae, features) if rows is None else rows  # [n_clamped, d_in]
    diff = values.to(f.device, f.dtype) - f[:, features]  # [n, n_clamped]
    return (diff @ rows.to(f.device, f.dtype)).to(x.device, x.dtype)  # [n, d_in]


class FeatureClamp(Intervention):
    """At the selected positions of each layer, set chosen SAE features to fixed values."""

    def __init__(
        self,
        backbone: Backbone,
        saes: Mapping[int, Any],
        values: Mapping[int, Mapping[int, float]],
        positions: Positions = "text",
        token_types: torch.Tensor | None = None,
    ) -> None:
        super().__init__(backbone, positions, token_types)
        self.saes: dict[int, Any] = {}
        self.features: dict[int, torch.Tensor] = {}
        self.rows: dict[int, torch.Tensor] = {}  # [n_clamped, d_model] per layer
        self.values: dict[int, torch.Tensor] = {}
        for layer, clamp in values.items():
            check_layer(backbone, layer)
            if layer not in saes:
                raise InterventionError(
                    f"features are clamped at layer {layer} but no SAE was given for it; saes has layers {sorted(saes)}"
                )
            sae = saes[layer]
            if not hasattr(sae, "encode") or not hasattr(sae, "W_dec"):
                raise InterventionError(
                    f"the SAE of layer {layer} ({type(sae).__name__}) lacks encode() or W_dec"
                )
            d_sae, d_in = sae.W_dec.shape
            if d_in != backbone.d_model:
                raise InterventionError(
                    f"the SAE at layer {layer} has d_in={d_in}, the model's hidden size is {backbone.d_model}: "
                    "is this SAE for another model?"
                )
            idx = [int(i) for i in clamp]
            bad = [i for i in idx if not 0 <= i < d_sae]
            if bad:
                raise InterventionError(
                    f"features {bad} do not exist in the SAE of layer {layer} (d_sae={d_sae})"
                )
            if not idx:
                continue  # nothing clamped: an exact no-op
            self.saes[layer] = sae
            self.features[layer] = torch.tensor(idx, dtype=torch.long)
            self.rows[layer] = decoder_rows(sae, self.features[layer])
            self.values[layer] = torch.tensor([float(clamp[i]) for i in clamp], dtype=torch.float64)

    def layers(self) -> list[int]:
        return sorted(self.saes)

    def edit(self, layer: int, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        sae, values, rows = self.saes[layer], self.values[layer], self.rows[layer]
        features = self.features[layer].to(sae.W_dec.device)
        if mask is None:
            flat = y.reshape(-1, y.shape[-1])  # [batch * seq, d_model]
            return y + clamp_delta(sae, flat, features, values, rows).reshape(y.shape)
        if not mask.any():
            return y
        out = y.clone()
        out[mask] = y[mask] + clamp_delta(sae, y[mask], features, values, rows)
        return out


def clamp_features(
    backbone: Backbone,
    saes: Mapping[int, Any],
    values: Mapping[int, Mapping[int, float]],
    positions: Positions = "text",
    token_types: torch.Tensor | None = None,
) -> FeatureClamp:
    """A context manager that clamps SAE features through the SAE, keeping its error term.

    saes: {layer: SAE with encode(x [n, d_in]) -> dense [n, d_sae] and W_dec [d_sae, d_in]}.
    values: {layer: {feature: value}}; 0 switches a feature off, a multiple of its max steers it.
    At hook point L and the selected positions: y <- y + W_dec (f_clamped - f), f = sae.encode(y).
    """
    return FeatureClamp(backbone, saes, values, positions, token_types)
