"""Kill-safe training checkpoints: SAE weights, optimizer, dead-latent counters, RNG states and the
stream position, written atomically; and the content keys of the data and the warm start, so that a
checkpoint never resumes on other data or from another warm start."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mmdiff.atomic import atomic_dir, save_safetensors
from mmdiff.errors import ConfigError
from mmdiff.sae.loss import DeadLatents
from mmdiff.sae.stream import CapturedActivations, StreamPosition, is_store

if TYPE_CHECKING:
    from mmdiff.sae.train_config import TrainConfig

CHECKPOINT_DIR = "checkpoint"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    folder: Path,
    saes: Mapping[int, Any],
    optimizer: torch.optim.Optimizer,
    dead: DeadLatents,
    position: StreamPosition,
    step: int,
    tokens: int,
    metrics: list[dict[str, Any]],
    cfg: TrainConfig,
    sources: Mapping[str, str | None] | None = None,
) -> None:
    """Atomically replace `folder` with weights, optimizer, RNG, data position, step and metrics.

    sources: content keys of the data and the warm start ({"data": ..., "init": ...}), so that a
    checkpoint never resumes on other data or from another warm start.
    """
    with atomic_dir(folder) as tmp:
        save_safetensors(
            tmp / "saes.safetensors",
            {
                f"{L}.{name}": t.detach().cpu()
                for L, s in saes.items()
                for name, t in s.state_dict().items()
            },
        )
        state = {
            "step": step,
            "tokens": tokens,
            "position": position.to_state(),
            "optimizer": optimizer.state_dict(),
            "since_fired": {str(L): t.cpu() for L, t in dead.since_fired.items()},
            "rng": _rng_state(),
            "metrics": metrics,
            "trajectory": cfg.trajectory_key(),
            "layers": sorted(saes),
            "sources": dict(sources or {}),
        }
        with open(tmp / "state.pt", "wb") as fh:
            torch.save(state, fh)


def load_checkpoint(
    folder: Path,
    saes: Mapping[int, Any],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    sources: Mapping[str, str | None] | None = None,
) -> tuple[dict[str, Any], DeadLatents, StreamPosition]:
    """Load a checkpoint into `saes` and `optimizer`; the state dict, dead counters and position."""
    from safetensors.torch import load_file

    state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    if state["layers"] != sorted(saes):
        raise ConfigError(
            f"the checkpoint in {folder} trains layers {state['layers']}, this run {sorted(saes)}: "
            "use another out_dir or the same layers"
        )
    if state["trajectory"] != cfg.trajectory_key():
        diff = sorted(
            k for k in cfg.trajectory_key() if state["trajectory"].get(k) != cfg.trajectory_key()[k]
        )
        raise ConfigError(
            f"the checkpoint in {folder} was trained with other settings ({diff}); "
            "resume with the same TrainConfig, or delete the checkpoint to start over"
        )
    for name, key in (sources or {}).items():
        stored = state.get("sources", {}).get(name)
        if key is not None and stored is not None and key != stored:
            raise ConfigError(
                f"the checkpoint in {folder} was trained on another {name} "
                f"({'warm-start SAEs' if name == 'init' else 'activation source'}); resume with "
                "the same one, or delete the checkpoint to start over"
            )
    weights = load_file(str(folder / "saes.safetensors"))
    for L, sae in saes.items():
        sae.load_state_dict({name: weights[f"{L}.{name}"] for name in sae.state_dict()})
    optimizer.load_state_dict(state["optimizer"])
    device = next(iter(saes.values())).W_dec.device
    dead = DeadLatents(
        {int(L): t.to(device) for L, t in state["since_fired"].items()}, cfg.dead_tokens_threshold
    )
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state, dead, StreamPosition.from_state(state["position"])


def recover_checkpoint(ckpt: Path) -> None:
    """Put back the previous checkpoint when a kill fell between atomic_dir's two renames.

    atomic_dir moves the old folder to .<name>.old before renaming the new one into place; a kill
    in between leaves no checkpoint folder but a complete .old one, which is still a valid resume
    point.
    """
    old = ckpt.with_name(f".{ckpt.name}.old")
    if not ckpt.exists() and (old / "state.pt").is_file():
        old.rename(ckpt)


def checkpoint_dims(folder: Path, layers: Sequence[int]) -> dict[int, int]:
    """d_in per layer of the SAEs stored in a checkpoint (read from the safetensors header)."""
    from safetensors import safe_open

    with safe_open(str(folder / "saes.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        missing = [L for L in layers if f"{L}.W_enc" not in keys]
        if missing:
            raise ConfigError(
                f"the checkpoint in {folder} has no SAE for layers {missing}: use another out_dir"
            )
        return {L: int(fh.get_slice(f"{L}.W_enc").get_shape()[0]) for L in layers}


def _tensor_digest(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes())


def data_fingerprint(data: Any) -> str | None:
    """A content key of a training source, or None when it cannot be told without consuming it.

    A store: the hash of its manifest (which lists every shard's hash). A live capture: the record
    ids, side, layers and model path. An in-memory list of batches: the bytes of its tensors.
    One-shot iterators and other iterables: None (not checked).
    """
    from mmdiff.atomic import sha256_file, sha256_json

    if is_store(data) and hasattr(data, "root"):
        return "store:" + sha256_file(Path(data.root) / "manifest.json")
    if isinstance(data, CapturedActivations):
        model = data.adapter.backbone(data.side).model
        name = str(getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__))
        ids = [getattr(r, "id", repr(r)) for r in data.records]
        return "capture:" + sha256_json([ids, data.side, data.layers, name])
    if isinstance(data, (list, tuple)):
        h = hashlib.sha256()
        for item in data:
            acts = item.get("acts") if isinstance(item, Mapping) else getattr(item, "acts", None)
            acts = acts if isinstance(acts, Mapping) else {0: acts}
            types = item.get("token_types") if isinstance(item, Mapping) else item.token_types
            for key in sorted(acts):
                _tensor_digest(h, acts[key])
            _tensor_digest(h, types)
            if getattr(item, "attention_mask", None) is not None:
                _tensor_digest(h, item.attention_mask)
        return "list:" + h.hexdigest()
    return None


def init_fingerprint(init: Mapping[int, Any] | None) -> str | None:
    """A content key of warm-start SAEs (objects: their tensors; paths: their files)."""
    from mmdiff.atomic import sha256_tree

    if init is None:
        return None
    h = hashlib.sha256()
    for layer in sorted(init):
        given = init[layer]
        h.update(f"layer {layer}".encode())
        if isinstance(given, (str, Path)):
            h.update(sha256_tree(given).encode())
        else:
            for name, t in sorted(given.state_dict().items()):
                h.update(name.encode())
                _tensor_digest(h, t)
    return h.hexdigest()
