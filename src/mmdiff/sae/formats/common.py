"""Shared readers and checks for SAE checkpoint formats: every failure names the file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig, build_sae, str_to_dtype


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; SAEError naming the file when missing, corrupt or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SAEError(f"SAE config file {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEError(f"SAE config file {path} is not valid JSON ({e}): the file is corrupt or "
                       "truncated; re-download or re-save it.") from None
    if not isinstance(obj, dict):
        raise SAEError(f"SAE config file {path} should hold a JSON object, found {type(obj).__name__}.")
    return obj


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file (on CPU); SAEError naming the file when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SAEError(f"SAE weights file {path} does not exist.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise SAEError(f"SAE weights file {path} cannot be read ({e}): it is corrupt or truncated; "
                       "re-download or re-save it.") from None


def require_keys(tensors: dict[str, Tensor], names: Iterable[str], path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEError(f"SAE weights file {path} lacks tensors {missing}; it holds "
                       f"{sorted(tensors)}. Is this the right format?")


def check_shape(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...], path: Path) -> None:
    if tuple(tensors[name].shape) != tuple(shape):
        raise SAEError(f"SAE weights file {path}: tensor {name!r} has shape "
                       f"{tuple(tensors[name].shape)}, expected {tuple(shape)} from the config.")


def layer_from_name(name: str | None) -> int | None:
    """12 from "blocks.12.hook_resid_post", "model.layers.12", "layer_12/width_16k/..."."""
    if not name:
        return None
    hits = re.findall(r"(?:blocks|layers|layer)[._/-]?(\d+)", str(name))
    return int(hits[-1]) if hits else None  # the last one: the nearest folder of a path


def resid_post_hook_name(layer: int | None) -> str | None:
    """The residual stream after decoder layer `layer` (HF hidden_states[layer + 1]) in the
    TransformerLens names SAELens and Neuronpedia use: "blocks.12.hook_resid_post"."""
    return None if layer is None else f"blocks.{layer}.hook_resid_post"


def sae_from_tensors(cfg: SAEConfig, tensors: dict[str, Tensor], path: Path) -> SAE:
    """Build the SAE `cfg` names and put `tensors` in it without a random init first."""
    device = cfg.device
    cfg.device = "meta"
    sae = build_sae(cfg)
    cfg.device = device
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise SAEError(f"SAE weights from {path} lack {missing} needed by a {cfg.architecture} SAE.")
    dtype = str_to_dtype(cfg.dtype)
    state = {}
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise SAEError(f"SAE weights from {path}: tensor {name!r} has shape {tuple(t.shape)}, "
                           f"expected {shape} for d_in={cfg.d_in}, d_sae={cfg.d_sae}.")
        state[name] = t.detach().to(device=device, dtype=dtype).contiguous()
    sae.load_state_dict(state, assign=True)
    sae.check_finite(f"loaded from {path}")
    return sae.eval()  # loaded SAEs infer; BatchTopK uses its threshold in eval mode


def fit_check(sae: SAE, *, d_in: int | None, d_sae: int | None, layer: int | None) -> None:
    """SAEError when the SAE does not fit the model (hidden size), width, or layer asked for."""
    cfg = sae.cfg
    where = f"at layer {cfg.hook_layer if cfg.hook_layer is not None else layer}"
    where = f"SAE {where}" if (cfg.hook_layer is not None or layer is not None) else "SAE"
    if d_in is not None and cfg.d_in != d_in:
        raise SAEError(f"{where} expects d_in={cfg.d_in}, the model's hidden size is {d_in}: "
                       "is this SAE for another model?")
    if d_sae is not None and cfg.d_sae != d_sae:
        raise SAEError(f"{where} has d_sae={cfg.d_sae} latents, expected {d_sae}: "
                       "is this the width you meant (e.g. 8x vs 32x)?")
    if layer is not None:
        if cfg.hook_layer is not None and cfg.hook_layer != layer:
            raise SAEError(f"SAE was trained at layer {cfg.hook_layer} (hook {cfg.hook_name!r}), "
                           f"but is asked to serve layer {layer}: pick the checkpoint of layer {layer}.")
        cfg.hook_layer = layer


def move(sae: SAE, device: str | torch.device | None, dtype: str | torch.dtype | None) -> SAE:
    """Move/cast the SAE and keep its config in step."""
    if device is not None:
        sae.to(device=torch.device(device))
        sae.cfg.device = str(torch.device(device))
    if dtype is not None:
        dt = str_to_dtype(dtype)
        sae.to(dtype=dt)
        sae.cfg.dtype = str(dt).removeprefix("torch.")
    return sae
