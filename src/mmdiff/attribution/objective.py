"""The objective m for feature f at layer L: which positions it sums over and what it sums there."""

from __future__ import annotations

from typing import Any, Literal

import torch

from mmdiff.errors import ConfigError, SAEError
from mmdiff.models.base import TokenType, VLMAdapter

Objective = Literal["projection", "activation"]
Positions = Literal["all", "text", "image"]


def _feature_direction(sae: Any, feature: int) -> torch.Tensor:
    w = getattr(sae, "W_dec", None)
    if w is None or w.ndim != 2:
        raise SAEError("the SAE has no 2-D W_dec [d_sae, d_in]; pass an mmdiff SAE")
    if not 0 <= feature < w.shape[0]:
        raise SAEError(f"feature {feature} does not exist: the SAE has {w.shape[0]} latents")
    d = w[feature].detach().float()
    norm = d.norm()
    if norm == 0:
        raise SAEError(f"feature {feature} has a zero decoder row; its direction is undefined")
    return d / norm  # [d_model]


def objective_positions(adapter: VLMAdapter, inputs: dict[str, torch.Tensor], positions: Positions) -> torch.Tensor:
    """[batch, seq] bool: the positions the objective sums over (never padding or special tokens)."""
    types = adapter.token_types(inputs).long()  # [batch, seq]
    valid = inputs["attention_mask"].bool() & (types != int(TokenType.SPECIAL))
    if positions == "all":
        return valid
    if positions == "text":
        return valid & (types == int(TokenType.TEXT))
    if positions == "image":
        return valid & (types == int(TokenType.IMAGE))
    raise ConfigError(f"positions must be 'all', 'text' or 'image', got {positions!r}")


def feature_values(resid: torch.Tensor, sae: Any, feature: int, objective: Objective) -> torch.Tensor:
    """[batch, seq] per-position value of the objective: resid . d_f/||d_f||, or h_f = SAE activation."""
    if objective == "projection":
        return resid.float() @ _feature_direction(sae, feature).to(resid.device)
    if objective == "activation":
        w = sae.W_dec
        return sae.encode(resid.to(device=w.device))[..., feature].float().to(resid.device)
    raise ConfigError(f"objective must be 'projection' or 'activation', got {objective!r}")
