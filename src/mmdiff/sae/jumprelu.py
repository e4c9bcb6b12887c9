"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope, Llama Scope): f_i = pre_i * 1[z_i > theta_i].

z_i = pre_i, or pre_i * ||d_i|| under decoder_norm_gating (Llama Scope's sparsity_include_decoder_norm).
ReLU is applied too (as SAELens does), which changes nothing when theta >= 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmdiff.sae.base import SAE, SAEConfig, SAEOutput
from mmdiff.sae.registry import register_sae_class


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class HeavisideSTE(torch.autograd.Function):
    """1[z > theta], with the straight-through pseudo-derivative -(1/eps) K((z - theta)/eps) for
    theta (K the rectangle kernel) and zero gradient for z, as in the JumpReLU paper."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        d_theta = -(1.0 / eps) * _rectangle((z - theta) / eps) * g
        return None, d_theta.reshape(-1, theta.shape[-1]).sum(0), None


@register_sae_class("jumprelu")
class JumpReLUSAE(SAE):
    """Parameters as SAE plus `threshold` [d_sae]."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(
            torch.zeros(cfg.d_sae, dtype=self.W_enc.dtype, device=self.W_enc.device))

    @property
    def bandwidth(self) -> float:
        """Kernel width eps of the threshold's straight-through gradient (metadata override)."""
        return float(self.cfg.metadata.get("jumprelu_bandwidth", 0.001))

    def gate(self, pre: Tensor) -> Tensor:  # [..., d_sae] -> 0/1 [..., d_sae]
        z = self.gating_pre(pre)
        if torch.is_grad_enabled() and self.threshold.requires_grad:
            return HeavisideSTE.apply(z, self.threshold, self.bandwidth)
        return (z > self.threshold).to(pre.dtype)

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu() * self.gate(pre)

    def sparsity_penalty(self, out: SAEOutput) -> Tensor:
        """l1_coefficient * mean over tokens of L0 (differentiable in theta through the STE)."""
        if out.hidden_pre is None:
            raise ValueError("JumpReLU sparsity_penalty needs out.hidden_pre (use SAE.forward).")
        return self.cfg.l1_coefficient * self.gate(out.hidden_pre).sum(-1).mean()
