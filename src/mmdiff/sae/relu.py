"""ReLU SAE with an L1 penalty (Bricken et al. 2023; SAELens's "standard")."""

from __future__ import annotations

from torch import Tensor

from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig, SAEOutput
from mmdiff.sae.registry import register_sae_class


@register_sae_class("relu")
class ReLUSAE(SAE):
    """f = ReLU(pre); sparsity via l1_coefficient * sum_i f_i ||d_i||."""

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.decoder_norm_gating:
            raise SAEError("decoder_norm_gating has no meaning for a ReLU SAE; set it to False.")
        super().__init__(cfg)

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def sparsity_penalty(self, out: SAEOutput) -> Tensor:
        """l1_coefficient * mean over tokens of sum_i f_i * ||d_i|| (decoder-norm-weighted L1)."""
        return self.cfg.l1_coefficient * (out.feature_acts * self.decoder_norms()).sum(-1).mean()
