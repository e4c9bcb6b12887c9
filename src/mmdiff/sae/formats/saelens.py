"""SAELens folders (`cfg.json` + `sae_weights.safetensors`): our native format, both ways.

Saving folds what SAELens cannot express into the weights, so SAELens gives the same feature
activations as we do:
  norm_scale s:        W_enc <- s W_enc, W_dec <- W_dec / s, b_dec <- b_dec / s   (exact)
  JumpReLU gating:     theta_i <- theta_i / ||d_i||                             (exact)
  TopK gating:         W_enc, b_enc <- * ||d_i||, W_dec <- / ||d_i||  (same latents and x_hat;
                       activations become pre_i * ||d_i||, the unit-decoder convention)
BatchTopK is saved as a JumpReLU with its learned threshold, as SAELens does.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmdiff.atomic import atomic_dir, save_safetensors, write_json
from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig, dtype_to_str
from mmdiff.sae.formats.common import (
    layer_from_name,
    read_json,
    read_safetensors,
    resid_post_hook_name,
    sae_from_tensors,
)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"

_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}


def is_saelens_folder(path: Path) -> bool:
    return path.is_dir() and (path / CFG_FILENAME).is_file() and (path / WEIGHTS_FILENAME).exists()


def _saelens_version() -> str:
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "6.0.0"


@torch.no_grad()
def saelens_tensors(sae: SAE) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors SAELens should load (folded as the module docstring says) and notes on folds."""
    cfg = sae.cfg
    s = cfg.norm_scale
    n = sae.W_dec.detach().norm(dim=1)  # [d_sae], norms of the unfolded decoder
    t = {
        "W_enc": sae.W_enc.detach() * s,
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": sae.W_dec.detach() / s,
        "b_dec": sae.b_dec.detach() / s,
    }
    notes: dict[str, Any] = {"folded_norm_scale": s}
    if cfg.architecture in ("jumprelu", "batchtopk"):
        theta = sae.threshold.detach().clone()
        if cfg.decoder_norm_gating:
            big = torch.finfo(theta.dtype).max
            theta = torch.where(n > 0, theta / n.clamp_min(torch.finfo(n.dtype).tiny),
                                torch.full_like(theta, big))
            notes["folded_decoder_norm_gating"] = True
        t["threshold"] = theta
    elif cfg.architecture == "topk" and cfg.decoder_norm_gating:
        t["W_enc"] = t["W_enc"] * n
        t["b_enc"] = t["b_enc"] * n
        t["W_dec"] = t["W_dec"] / n.clamp_min(1e-12)[:, None]
        notes["folded_decoder_norms"] = True
    return {k: v.contiguous() for k, v in t.items()}, notes


def saelens_cfg(sae: SAE, notes: dict[str, Any]) -> dict[str, Any]:
    cfg = sae.cfg
    if cfg.architecture not in _TO_SAELENS:
        raise SAEError(f"cannot save architecture {cfg.architecture!r} in SAELens format; "
                       f"supported: {sorted(_TO_SAELENS)}.")
    out: dict[str, Any] = {
        "architecture": _TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": dtype_to_str(sae.W_enc.dtype),  # the tensors' dtype, even after sae.to(...)
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    version = _saelens_version()
    out["metadata"] = {
        "sae_lens_version": version,
        "sae_lens_training_version": version,
        "model_name": cfg.model_name,
        # SAELens and Neuronpedia tell where an SAE reads by this name alone
        "hook_name": cfg.hook_name or resid_post_hook_name(cfg.hook_layer),
        "hook_head_index": None,
        "mmdiff": {
            "architecture": cfg.architecture,
            "k": cfg.k,
            "l1_coefficient": cfg.l1_coefficient,
            "hook_layer": cfg.hook_layer,
            "metadata": cfg.metadata,
            **notes,
        },
    }
    return out


def save_saelens(sae: SAE, folder: str | Path) -> Path:
    """Write `folder` as a SAELens folder, atomically (a killed save leaves no half folder)."""
    folder = Path(folder)
    sae.check_finite("to save")
    tensors, notes = saelens_tensors(sae)
    cfg = saelens_cfg(sae, notes)
    with atomic_dir(folder) as tmp:
        save_safetensors(tmp / WEIGHTS_FILENAME, {k: v.cpu() for k, v in tensors.items()})
        write_json(tmp / CFG_FILENAME, cfg)
    return folder


def set_model_name(folder: str | Path, model_name: str) -> None:
    """Record in a saved folder's cfg.json the model its SAE reads (SAELens's metadata.model_name),
    for SAEs trained on activations alone, which do not know their model."""
    cfg_path = Path(folder) / CFG_FILENAME
    raw = read_json(cfg_path)
    if (raw.get("metadata") or {}).get("model_name") != model_name:
        raw.setdefault("metadata", {})["model_name"] = model_name
        write_json(cfg_path, raw)


def load_saelens(folder: Path) -> SAE:
    """Read a SAELens folder (ours or SAELens's own, v6 or older) into our SAE."""
    cfg_path, w_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
    raw = read_json(cfg_path)
    tensors = read_safetensors(w_path)
    meta = raw.get("metadata") or {}
    ours = meta.get("mmdiff") or {}
    arch_name = raw.get("architecture")
    if arch_name is None:  # SAELens < 6 configs
        fn = raw.get("activation_fn") or raw.get("activation_fn_str") or "relu"
        kwargs = raw.get("activation_fn_kwargs") or {}
        arch_name = "topk" if fn == "topk" else "standard"
        if fn == "topk":
            raw.setdefault("k", kwargs.get("k"))
    if arch_name not in _FROM_SAELENS:
        raise SAEError(f"{cfg_path}: SAELens architecture {arch_name!r} is not supported; "
                       f"supported: {sorted(_FROM_SAELENS)}.")
    arch = _FROM_SAELENS[arch_name]
    if arch == "jumprelu" and ours.get("architecture") == "batchtopk":
        arch = "batchtopk"
    norm = raw.get("normalize_activations", "none")
    if norm not in (None, "none", False):
        raise SAEError(f"{cfg_path}: normalize_activations={norm!r} is a run-time normalisation "
                       "this loader cannot fold into weights; fold it in SAELens first "
                       "(sae.fold_activation_norm_scaling_factor) and save again.")
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise SAEError(f"{cfg_path}: reshape_activations={raw['reshape_activations']!r} "
                       "(hook_z SAEs) is not supported; mmdiff reads residual-stream SAEs.")
    if "scaling_factor" in tensors:
        if not torch.allclose(tensors["scaling_factor"], torch.ones_like(tensors["scaling_factor"])):
            raise SAEError(f"{w_path}: a finetuning scaling_factor != 1 is not supported.")
        del tensors["scaling_factor"]
    if arch == "batchtopk" and "topk_threshold" in tensors:  # a SAELens training checkpoint
        tensors["threshold"] = tensors.pop("topk_threshold").reshape(()).expand(raw["d_sae"]).clone()
    hook_name = meta.get("hook_name", raw.get("hook_name"))
    layer = ours.get("hook_layer", raw.get("hook_layer"))
    k = ours.get("k", raw.get("k")) if arch in ("topk", "batchtopk") else None
    if k is not None:
        k = round(k) if isinstance(k, float) else k
    try:
        cfg = SAEConfig(
            architecture=arch, d_in=raw["d_in"], d_sae=raw["d_sae"], k=k,
            l1_coefficient=float(ours.get("l1_coefficient", raw.get("l1_coefficient", 0.0)) or 0.0),
            dtype=raw.get("dtype", "float32"), device="cpu",
            hook_layer=layer if layer is not None else layer_from_name(hook_name),
            hook_name=hook_name, model_name=meta.get("model_name", raw.get("model_name")),
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
            metadata={**(ours.get("metadata") or {}), "source_format": "saelens",
                      "source": str(folder)},
        )
    except KeyError as e:
        raise SAEError(f"{cfg_path} lacks the key {e.args[0]!r}.") from None
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        # SAELens ranks pre*||d|| and decodes (f/||d||) @ W_dec; folding the norms is identical.
        n = tensors["W_dec"].norm(dim=1)
        tensors["W_enc"] = tensors["W_enc"] * n
        tensors["b_enc"] = tensors["b_enc"] * n
        tensors["W_dec"] = tensors["W_dec"] / n.clamp_min(1e-12)[:, None]
    if arch == "relu":
        tensors.pop("threshold", None)
    return sae_from_tensors(cfg, tensors, w_path)


__all__ = ["is_saelens_folder", "load_saelens", "saelens_cfg", "saelens_tensors", "save_saelens",
           "set_model_name"]
