"""BatchTopK SAE (Bussmann et al. 2024): keep the k * n_tokens largest activations of a batch.

Training mode selects over the whole batch; evaluation mode uses the learned global threshold
(a JumpReLU, which is also how the SAE is saved, as SAELens does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig
from mmdiff.sae.registry import register_sae_class


@register_sae_class("batchtopk")
class BatchTopKSAE(SAE):
    """`threshold` [d_sae] buffer (one value repeated) holds the inference threshold."""

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None:
            raise SAEError("a BatchTopK SAE needs SAEConfig.k (mean active latents per token).")
        if cfg.decoder_norm_gating:
            raise SAEError("decoder_norm_gating is not supported for BatchTopK; set it to False.")
        super().__init__(cfg)
        self.register_buffer(
            "threshold", torch.zeros(cfg.d_sae, dtype=self.W_enc.dtype, device=self.W_enc.device))

    def batch_topk(self, pre: Tensor) -> Tensor:  # [..., d_sae] -> [..., d_sae]
        """Keep the k * n_tokens largest ReLU(pre) over all tokens of the batch."""
        acts = pre.relu()
        flat = acts.reshape(-1)
        n_tokens = acts.numel() // self.cfg.d_sae
        top = flat.topk(min(self.cfg.k * n_tokens, flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(acts.shape)

    def activation(self, pre: Tensor) -> Tensor:
        if self.training:
            return self.batch_topk(pre)
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    @torch.no_grad()
    def update_threshold(self, feature_acts: Tensor, lr: float = 0.01) -> None:
        """EMA of the smallest positive batch-top-k activation: theta <- (1-lr) theta + lr min."""
        pos = feature_acts[feature_acts > 0]
        if pos.numel():
            self.threshold.mul_(1 - lr).add_(lr * pos.min().to(self.threshold.dtype))
