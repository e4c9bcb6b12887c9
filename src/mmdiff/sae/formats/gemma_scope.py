"""Gemma Scope `params.npz` (W_enc [D,F], W_dec [F,D], b_enc [F], b_dec [D], threshold [F]).

Gemma Scope JumpReLU: f = ReLU(pre) * 1[pre > threshold], pre = x W_enc + b_enc (no b_dec
subtraction, no input scaling); x_hat = f W_dec + b_dec.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from mmdiff.atomic import atomic_path
from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig
from mmdiff.sae.formats.common import check_shape, layer_from_name, require_keys, sae_from_tensors

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def find_npz(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".npz":
        return path
    if path.is_dir() and (path / "params.npz").is_file():
        return path / "params.npz"
    return None


def load_gemma_scope(npz_path: Path) -> SAE:
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise SAEError(f"Gemma Scope file {npz_path} cannot be read ({type(e).__name__}: {e}): "
                       "it is corrupt or truncated; re-download it.") from None
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    require_keys(tensors, KEYS, npz_path)
    if tensors["W_enc"].ndim != 2:
        raise SAEError(f"{npz_path}: W_enc should be 2-D [d_in, d_sae], "
                       f"found shape {tuple(tensors['W_enc'].shape)}.")
    d_in, d_sae = (int(n) for n in tensors["W_enc"].shape)
    for name, shape in (("W_dec", (d_sae, d_in)), ("b_enc", (d_sae,)), ("b_dec", (d_in,)),
                        ("threshold", (d_sae,))):
        check_shape(tensors, name, shape, npz_path)
    dtype = tensors["W_enc"].dtype
    layer = layer_from_name(str(npz_path.parent)) if npz_path.parent != Path(".") else None
    cfg = SAEConfig(
        architecture="jumprelu", d_in=d_in, d_sae=d_sae,
        dtype=str(dtype).removeprefix("torch.") if dtype != torch.float16 else "float16",
        hook_layer=layer, apply_b_dec_to_input=False,
        metadata={"source_format": "gemma_scope", "source": str(npz_path)},
    )
    return sae_from_tensors(cfg, {k: tensors[k] for k in KEYS}, npz_path)


@torch.no_grad()
def save_gemma_scope(sae: SAE, path: str | Path) -> Path:
    """Write a JumpReLU SAE as a Gemma Scope params.npz (scale and gating folded, exact)."""
    from mmdiff.sae.formats.saelens import saelens_tensors

    if sae.cfg.architecture not in ("jumprelu", "batchtopk"):
        raise SAEError(f"Gemma Scope params.npz holds JumpReLU SAEs; got {sae.cfg.architecture!r}.")
    tensors, _ = saelens_tensors(sae)
    if sae.cfg.apply_b_dec_to_input:  # Gemma Scope never subtracts b_dec: move it into b_enc
        tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: tensors[k].float().cpu().numpy() for k in KEYS})
    return path
