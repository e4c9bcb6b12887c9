"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations of each token, then ReLU."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig, SAEOutput
from mmdiff.sae.kernels import topk_autoencode
from mmdiff.sae.registry import register_sae_class
from mmdiff.sae.selection import CandidateDtype, certified_topk


@register_sae_class("topk")
class TopKSAE(SAE):
    """f = ReLU(TopK_k(pre)); with decoder_norm_gating the k latents are ranked by pre*||d_i||."""

    candidate_dtype: CandidateDtype = "auto"
    """Product the fast path draws its candidate latents from ("auto": the split bf16 product
    "bf16x3" on CUDA, bf16 on CPUs with fast bf16, else the working dtype; "bf16x3"; a dtype; None:
    the working dtype). The selection is the exact TopK whatever it is (mmdiff.sae.selection): it
    only decides the speed."""
    selection_margin: int | None = None
    """Candidates beyond k (None: k for low-precision candidates, min(k, 8) otherwise)."""

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None:
            raise SAEError("a TopK SAE needs SAEConfig.k (active latents per token), got None.")
        super().__init__(cfg)

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.decoder_norm_gating:
            indices = self.gating_pre(pre).topk(self.cfg.k, dim=-1, sorted=False).indices
            return pre.gather(-1, indices).relu(), indices
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return values.relu(), indices

    def activation(self, pre: Tensor) -> Tensor:  # [..., d_sae] -> [..., d_sae]
        values, indices = self._select(pre)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[..., d_in] -> (values [..., k], indices [..., k]) of the active latents."""
        return self._select(self.hidden_pre(x))

    def forward(self, x: Tensor) -> SAEOutput:
        """x [..., d_in] -> SAEOutput; the k-sparse fast path unless decoder_norm_gating is on."""
        if self.cfg.decoder_norm_gating:
            pre = self.hidden_pre(x)
            values, indices = self._select(pre)
            return SAEOutput(self.decode_sparse(values, indices), hidden_pre=pre,
                             top_values=values, top_indices=indices, d_sae=self.cfg.d_sae)
        if x.shape[-1] != self.cfg.d_in:
            self.sae_in(x)  # raises the shape error
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype)
        if self.cfg.norm_scale != 1.0:
            x2 = x2 * self.cfg.norm_scale
        x_hat, values, indices = topk_autoencode(
            x2, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.cfg.k,
            subtract_b_dec=self.cfg.apply_b_dec_to_input,
            select=partial(certified_topk, candidate_dtype=self.candidate_dtype,
                           margin=self.selection_margin))
        if self.cfg.norm_scale != 1.0:
            x_hat = x_hat / self.cfg.norm_scale
        k = self.cfg.k
        return SAEOutput(x_hat.reshape(*lead, self.cfg.d_in), top_values=values.reshape(*lead, k),
                         top_indices=indices.reshape(*lead, k), d_sae=self.cfg.d_sae)
