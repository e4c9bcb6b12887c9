"""Architecture conversions for warm starts (Llama Scope -> TopK, k = 50: docs/method.md#sae-architectures-and-training)."""

from __future__ import annotations

import copy

import torch

from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig
from mmdiff.sae.formats.common import sae_from_tensors


@torch.no_grad()
def to_topk(sae: SAE, k: int = 50) -> SAE:
    """A TopK SAE with the same latents (index-aligned) to fine-tune from a JumpReLU/ReLU SAE.

    Decoder norms are folded into the encoder (W_enc, b_enc *= ||d_i||; W_dec /= ||d_i||), so the
    TopK ranks latents by pre_i * ||d_i|| (Llama Scope's gating rule; a no-op for the unit-norm
    decoders of Gemma Scope) and starts with the unit-norm decoder TopK training keeps.
    norm_scale and apply_b_dec_to_input carry over; the JumpReLU threshold is dropped.
    """
    if not isinstance(k, int) or not 0 < k <= sae.cfg.d_sae:
        raise SAEError(f"to_topk: k must be an int in [1, d_sae={sae.cfg.d_sae}], got {k!r}.")
    if sae.cfg.architecture not in ("jumprelu", "relu", "batchtopk", "topk"):
        raise SAEError(f"to_topk cannot convert architecture {sae.cfg.architecture!r}.")
    n = sae.W_dec.detach().norm(dim=1)  # [d_sae]
    safe = n.clamp_min(1e-12)
    tensors = {
        "W_enc": sae.W_enc.detach() * n,
        "b_enc": sae.b_enc.detach() * n,
        "W_dec": sae.W_dec.detach() / safe[:, None],
        "b_dec": sae.b_dec.detach().clone(),
    }
    meta = copy.deepcopy(sae.cfg.metadata)
    meta["warm_start_from"] = sae.cfg.architecture
    if hasattr(sae, "threshold"):
        meta["dropped_threshold_mean"] = float(sae.threshold.detach().float().mean())
    cfg = SAEConfig(
        architecture="topk", d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, k=k,
        l1_coefficient=0.0, dtype=sae.cfg.dtype, device=str(sae.W_enc.device),
        hook_layer=sae.cfg.hook_layer, hook_name=sae.cfg.hook_name,
        model_name=sae.cfg.model_name, norm_scale=sae.cfg.norm_scale,
        apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input, decoder_norm_gating=False,
        metadata=meta,
    )
    return sae_from_tensors(cfg, tensors, "to_topk")
