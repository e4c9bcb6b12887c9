"""The TopK training objective: FVU + AuxK (dead latents fit the residual), the dead-latent counters
that AuxK needs, and the constraint that keeps decoder rows unit-norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmdiff.sae.kernels import sparse_decode


@dataclass
class StepOut:
    """One SAE's loss on one batch, and what the bookkeeping needs."""

    loss: Tensor  # scalar: fvu + auxk_alpha * auxk
    fvu: Tensor
    auxk: Tensor
    l0: Tensor  # mean non-zero latents per token
    top_indices: Tensor  # [n, k]
    top_values: Tensor  # [n, k]


def topk_loss(sae: Any, x: Tensor, dead_mask: Tensor | None, auxk_alpha: float) -> StepOut:
    """FVU of the TopK reconstruction plus AuxK: the top d_in/2 dead latents fit the residual.

    x: [n, d_in] (model units); dead_mask: [d_sae] bool. The reconstruction goes through the SAE's
    own forward (the k-sparse kernel); AuxK computes pre-activations of the dead latents only. As in
    Gao et al. / sparsify, AuxK is scaled by min(n_dead / k_aux, 1) and normalised by the batch's
    total variance.
    """
    out = sae(x)
    x_hat, top_values, top_indices = (
        out.x_hat,
        out.top_values,
        out.top_indices,
    )  # [n, d_in], [n, k], [n, k]
    total_variance = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    e = x - x_hat
    fvu = e.pow(2).sum() / total_variance
    auxk = fvu.new_zeros(())
    if dead_mask is not None and auxk_alpha > 0 and (n_dead := int(dead_mask.sum())) > 0:
        dead_idx = dead_mask.nonzero().squeeze(-1)  # [n_dead]
        k_aux = max(1, x.shape[-1] // 2)
        scale = min(n_dead / k_aux, 1.0)
        k_aux = min(k_aux, n_dead)
        dead_pre = sae.sae_in(x) @ sae.W_enc[:, dead_idx] + sae.b_enc[dead_idx]  # [n, n_dead]
        aux_values, local = dead_pre.topk(k_aux, dim=-1, sorted=False)  # [n, k_aux]
        # the residual e already contains b_dec, so the dead latents' write carries none
        e_hat = sparse_decode(dead_idx[local], aux_values.relu(), sae.W_dec) / sae.cfg.norm_scale
        auxk = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
    loss = fvu + auxk_alpha * auxk
    l0 = (top_values != 0).sum(-1).float().mean()
    return StepOut(loss, fvu, auxk, l0, top_indices, top_values)


@dataclass
class DeadLatents:
    """Tokens since each latent last fired, per layer; dead = over the threshold."""

    since_fired: dict[int, Tensor]  # layer -> [d_sae] int64
    threshold: int

    def mask(self, layer: int) -> Tensor:
        return self.since_fired[layer] > self.threshold

    def update(self, layer: int, top_indices: Tensor, top_values: Tensor, n_tokens: int) -> None:
        counts = self.since_fired[layer]
        counts += n_tokens
        counts[top_indices[top_values > 0]] = 0

    def fraction(self, layer: int) -> float:
        return float(self.mask(layer).double().mean())


def constrain_decoder_grad(sae: Any) -> None:
    """Remove from each decoder row's gradient its component along the row (rows stay unit-norm)."""
    if sae.W_dec.grad is None:
        return
    with torch.no_grad():
        parallel = (sae.W_dec.grad * sae.W_dec).sum(-1, keepdim=True)  # [d_sae, 1]
        sae.W_dec.grad.sub_(parallel * sae.W_dec)
