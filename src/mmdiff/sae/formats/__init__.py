"""Read every supported SAE checkpoint format (auto-detected); write our native SAELens folders.

Formats: SAELens folders, Llama Scope folders, Gemma Scope `params.npz`, EleutherAI sparsify
folders (`cfg.json` + `sae.safetensors`), MMDiff checkpoints (`<name>.safetensors` + `<name>.json`). Hub ids are fetched with huggingface_hub when online.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE
from mmdiff.sae.formats.common import fit_check, move


def detect_format(path: Path) -> str:
    """"saelens" | "sparsify" | "llama_scope" | "gemma_scope" | "mmdiff"; SAEError describing
    what was found."""
    from mmdiff.sae.formats import gemma_scope, llama_scope, mmdiff_ckpt, saelens, sparsify

    if saelens.is_saelens_folder(path):
        return "saelens"
    if sparsify.is_sparsify_folder(path):
        return "sparsify"
    if llama_scope.is_llama_scope_folder(path):
        return "llama_scope"
    if gemma_scope.find_npz(path) is not None:
        return "gemma_scope"
    if mmdiff_ckpt.find_checkpoint(path) is not None:
        return "mmdiff"
    found = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else [path.name]
    raise SAEError(
        f"no SAE checkpoint recognised at {path} (found: {found}). Expected one of: a SAELens "
        "folder (cfg.json + sae_weights.safetensors), a sparsify folder (cfg.json + "
        "sae.safetensors, one per hook point such as layers.12), a Llama Scope folder "
        "(hyperparams.json + checkpoints/final.safetensors), a Gemma Scope params.npz, or an "
        "MMDiff checkpoint (<name>.safetensors + <name>.json)."
    )


def load_sae(
    path: str | Path,
    *,
    d_in: int | None = None,
    d_sae: int | None = None,
    layer: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> SAE:
    """Load an SAE from a local path (any supported format) or a hub id ("owner/repo[/folder]").

    d_in / d_sae / layer are what the caller's model and hook point expect; a checkpoint that
    does not fit raises SAEError. NaN/inf weights and corrupt files raise SAEError naming the file.
    """
    from mmdiff.sae.formats import gemma_scope, llama_scope, mmdiff_ckpt, saelens, sparsify
    from mmdiff.sae.formats.hub import resolve_path

    local = resolve_path(path)
    fmt = detect_format(local)
    if fmt == "saelens":
        sae = saelens.load_saelens(local)
    elif fmt == "sparsify":
        sae = sparsify.load_sparsify(local)
    elif fmt == "llama_scope":
        sae = llama_scope.load_llama_scope(local)
    elif fmt == "gemma_scope":
        sae = gemma_scope.load_gemma_scope(gemma_scope.find_npz(local))
    else:
        sae = mmdiff_ckpt.load_mmdiff_checkpoint(mmdiff_ckpt.find_checkpoint(local))
    fit_check(sae, d_in=d_in, d_sae=d_sae, layer=layer)
    return move(sae, device, dtype)


__all__ = ["detect_format", "load_sae"]
