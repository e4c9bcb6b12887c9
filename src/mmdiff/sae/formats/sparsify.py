"""EleutherAI sparsify checkpoints (`cfg.json` + `sae.safetensors`, as `SparseCoder.save_to_disk`
writes them, one folder per hook point named after the module, e.g. `layers.12`).

sparsify encodes relu(encoder(x - b_dec)) and keeps the k largest; ours keeps the k largest
pre-activations and applies the ReLU after, which selects the same positive latents with the same
values. Tensors map as W_enc = encoder.weight^T [d_in, d_sae], b_enc = encoder.bias,
W_dec [d_sae, d_in], b_dec [d_in]. Transcoders, skip connections and GroupMax activations have no
counterpart in our TopK SAE and are refused. A folder named after a submodule (`layers.12.mlp`)
reads that module's output, not the residual stream, and is refused too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig, dtype_to_str
from mmdiff.sae.formats.common import (
    check_shape,
    layer_from_name,
    read_json,
    read_safetensors,
    require_keys,
    resid_post_hook_name,
    sae_from_tensors,
)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
_RESIDUAL_HOOKPOINT = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)$")


def is_sparsify_folder(path: Path) -> bool:
    return path.is_dir() and (path / CFG_FILENAME).is_file() and (path / WEIGHTS_FILENAME).exists()


def sparsify_facts(folder: Path) -> tuple[dict[str, Any], int, int, int | None]:
    """(config, d_in, d_sae, layer) of a sparsify folder, from cfg.json and the folder's name;
    SAEError for what our TopK SAE cannot express."""
    cfg_path = folder / CFG_FILENAME
    raw = read_json(cfg_path)
    try:
        d_in = int(raw["d_in"])
        d_sae = int(raw.get("num_latents") or 0) or d_in * int(raw["expansion_factor"])
        k = int(raw["k"])
    except KeyError as e:
        raise SAEError(f"{cfg_path} lacks the key {e.args[0]!r}: is this a sparsify cfg.json?") from None
    if raw.get("transcode"):
        raise SAEError(f"{cfg_path}: a sparsify transcoder predicts a module's output from its input; "
                       "mmdiff reads autoencoders of the residual stream")
    if raw.get("skip_connection"):
        raise SAEError(f"{cfg_path}: skip_connection=true adds x @ W_skip^T to the reconstruction, "
                       "which mmdiff's TopK SAE cannot express")
    if raw.get("activation", "topk") != "topk":
        raise SAEError(f"{cfg_path}: activation={raw['activation']!r} is not supported; mmdiff "
                       "reads sparsify's TopK SAEs (activation='topk')")
    m = _RESIDUAL_HOOKPOINT.match(folder.name)
    if m is None and layer_from_name(folder.name) is not None:
        raise SAEError(f"{folder}: the hook point {folder.name!r} is a submodule's output, not the "
                       "residual stream after a layer (sparsify's `layers.N`); mmdiff reads "
                       "residual-stream SAEs")
    raw["k"] = k
    return raw, d_in, d_sae, int(m.group(1)) if m else None


def load_sparsify(folder: Path) -> SAE:
    """Read a sparsify folder into our TopK SAE (same latents, same reconstruction)."""
    raw, d_in, d_sae, layer = sparsify_facts(folder)
    w_path = folder / WEIGHTS_FILENAME
    t = read_safetensors(w_path)
    require_keys(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), w_path)
    for name, shape in {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                        "W_dec": (d_sae, d_in), "b_dec": (d_in,)}.items():
        check_shape(t, name, shape, w_path)
    cfg = SAEConfig(
        architecture="topk", d_in=d_in, d_sae=d_sae, k=raw["k"], dtype=dtype_to_str(t["W_dec"].dtype),
        hook_layer=layer, hook_name=resid_post_hook_name(layer), apply_b_dec_to_input=True,
        metadata={"source_format": "sparsify", "source": str(folder), "hookpoint": folder.name},
    )
    tensors = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}
    return sae_from_tensors(cfg, tensors, w_path)


__all__ = ["CFG_FILENAME", "WEIGHTS_FILENAME", "is_sparsify_folder", "load_sparsify", "sparsify_facts"]
