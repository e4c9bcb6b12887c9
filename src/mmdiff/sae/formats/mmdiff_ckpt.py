"""MMDiff checkpoints: `<name>.safetensors` (W_enc, b_enc, W_dec, b_dec[, threshold]) beside
`<name>.json` (the SAEConfig). Lossless: keeps norm_scale and decoder_norm_gating unfolded."""

from __future__ import annotations

from pathlib import Path

from mmdiff.atomic import save_safetensors, write_json
from mmdiff.errors import SAEError
from mmdiff.sae.base import SAE, SAEConfig, dtype_to_str
from mmdiff.sae.formats.common import read_json, read_safetensors, sae_from_tensors

FORMAT = "mmdiff-sae"
VERSION = 1


def find_checkpoint(path: Path) -> Path | None:
    """The .safetensors of an MMDiff checkpoint at `path` (the file, or the only one in a folder)."""
    if path.is_file() and path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        return path
    if path.is_file() and path.suffix == ".json" and path.with_suffix(".safetensors").is_file():
        return path.with_suffix(".safetensors")
    if path.is_dir():
        hits = [p for p in sorted(path.glob("*.safetensors")) if p.with_suffix(".json").is_file()]
        if len(hits) == 1:
            return hits[0]
    return None


def save_mmdiff_checkpoint(sae: SAE, path: str | Path) -> Path:
    """Write `path` (.safetensors) and its .json sidecar; returns the .safetensors path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    sae.check_finite("to save")
    tensors = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
    save_safetensors(path, tensors)
    write_json(path.with_suffix(".json"), {"format": FORMAT, "version": VERSION,
                                           "config": {**sae.cfg.to_dict(), "device": "cpu",
                                                      "dtype": dtype_to_str(sae.W_enc.dtype)}})
    return path


def load_mmdiff_checkpoint(path: Path) -> SAE:
    meta_path = path.with_suffix(".json")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise SAEError(f"{meta_path} is not an MMDiff SAE checkpoint sidecar "
                       f"(expected format={FORMAT!r} and a 'config' object).")
    cfg = SAEConfig.from_dict({**meta["config"], "device": "cpu"})
    cfg.metadata = {**cfg.metadata, "source_format": "mmdiff", "source": str(path)}
    return sae_from_tensors(cfg, read_safetensors(path), path)


__all__ = ["find_checkpoint", "load_mmdiff_checkpoint", "save_mmdiff_checkpoint"]
