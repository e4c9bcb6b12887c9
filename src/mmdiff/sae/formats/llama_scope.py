"""Llama Scope folders (`hyperparams.json` + `checkpoints/final.safetensors`), read faithfully.

Inference as docs/method.md#file-formats states it, with s = sqrt(D) / dataset_average_activation_norm["in"]:
    pre = s W_enc x + b_enc;  f_i = pre_i * 1[pre_i ||d_i|| > s theta];  x_hat = (W_dec f + b_dec) / s
which maps onto our JumpReLU SAE as norm_scale = s, decoder_norm_gating =
sparsity_include_decoder_norm, threshold = s * jump_relu_threshold (one value for every latent).
SAELens's Llama Scope loader drops the ||d_i|| factor; this one keeps it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig
from mmdiff.sae.formats.common import (
    check_shape,
    layer_from_name,
    read_json,
    read_safetensors,
    require_keys,
    sae_from_tensors,
)

HYPERPARAMS = "hyperparams.json"
WEIGHTS = Path("checkpoints") / "final.safetensors"


def is_llama_scope_folder(path: Path) -> bool:
    return path.is_dir() and (path / HYPERPARAMS).is_file() and (path / WEIGHTS).exists()


def llama_scope_norm_scale(hp: dict[str, Any], hp_path: Path) -> float:
    """s = sqrt(d_model) / dataset_average_activation_norm["in"] for "dataset-wise", else 1."""
    mode = hp.get("norm_activation", "dataset-wise")
    if mode in ("inference", "none", None):
        return 1.0
    if mode != "dataset-wise":
        raise SAEError(f"{hp_path}: norm_activation={mode!r} depends on each token's norm and "
                       "cannot be expressed as a fixed scale; only 'dataset-wise' and "
                       "'inference' are supported.")
    avg = hp.get("dataset_average_activation_norm")
    if not isinstance(avg, dict) or not isinstance(avg.get("in"), (int, float)) or avg["in"] <= 0:
        raise SAEError(f"{hp_path}: norm_activation is 'dataset-wise' but "
                       f"dataset_average_activation_norm['in'] is {avg!r}; expected a positive number.")
    return math.sqrt(hp["d_model"]) / float(avg["in"])


def load_llama_scope(folder: Path) -> SAE:
    hp_path, w_path = folder / HYPERPARAMS, folder / WEIGHTS
    hp = read_json(hp_path)
    if "d_model" not in hp:
        raise SAEError(f"{hp_path} lacks 'd_model'; is this a Llama Scope hyperparams.json?")
    d_in = int(hp["d_model"])
    d_sae = hp.get("d_sae")
    if d_sae is None and "expansion_factor" in hp:
        d_sae = d_in * int(hp["expansion_factor"])
    if d_sae is None:
        raise SAEError(f"{hp_path} has neither 'd_sae' nor 'expansion_factor'.")
    d_sae = int(d_sae)
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if hook_in is not None and hook_out is not None and hook_in != hook_out:
        raise SAEError(f"{hp_path}: hook_point_in={hook_in!r} != hook_point_out={hook_out!r} is a "
                       "transcoder; mmdiff reads autoencoders of one hook point.")
    s = llama_scope_norm_scale(hp, hp_path)
    act_fn = str(hp.get("act_fn", "relu")).lower()
    arch = {"jumprelu": "jumprelu", "topk": "topk", "relu": "relu"}.get(act_fn)
    if arch is None:
        raise SAEError(f"{hp_path}: act_fn={act_fn!r} is not supported (jumprelu, topk, relu).")
    gating = bool(hp.get("sparsity_include_decoder_norm", True)) and arch != "relu"
    raw = read_safetensors(w_path)
    require_keys(raw, ["encoder.weight", "encoder.bias", "decoder.weight"], w_path)
    check_shape(raw, "encoder.weight", (d_sae, d_in), w_path)
    check_shape(raw, "encoder.bias", (d_sae,), w_path)
    check_shape(raw, "decoder.weight", (d_in, d_sae), w_path)
    use_b_dec = bool(hp.get("use_decoder_bias", True))
    if use_b_dec:
        require_keys(raw, ["decoder.bias"], w_path)
        check_shape(raw, "decoder.bias", (d_in,), w_path)
    dtype = raw["encoder.weight"].dtype
    tensors = {
        "W_enc": raw["encoder.weight"].T,
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["decoder.weight"].T,
        "b_dec": raw["decoder.bias"] if use_b_dec else torch.zeros(d_in, dtype=dtype),
    }
    if arch == "jumprelu":
        theta = hp.get("jump_relu_threshold")
        if not isinstance(theta, (int, float)):
            raise SAEError(f"{hp_path}: act_fn is jumprelu but jump_relu_threshold is {theta!r}.")
        tensors["threshold"] = torch.full((d_sae,), s * float(theta), dtype=torch.float64)
    cfg = SAEConfig(
        architecture=arch, d_in=d_in, d_sae=d_sae,
        k=int(hp["top_k"]) if arch == "topk" else None,
        dtype=str(dtype).removeprefix("torch."), device="cpu",
        hook_layer=layer_from_name(hook_in) if hook_in else layer_from_name(folder.name),
        hook_name=hook_in,
        model_name=hp.get("model_name") or ("meta-llama/Llama-3.1-8B"
                                            if folder.name.startswith("Llama3_1-8B") else None),
        norm_scale=s,
        apply_b_dec_to_input=bool(hp.get("apply_decoder_bias_to_pre_encoder", True)),
        decoder_norm_gating=gating,
        metadata={"source_format": "llama_scope", "source": str(folder),
                  "jump_relu_threshold": hp.get("jump_relu_threshold"),
                  "top_k": hp.get("top_k"),
                  "dataset_average_activation_norm": hp.get("dataset_average_activation_norm")},
    )
    return sae_from_tensors(cfg, tensors, w_path)
