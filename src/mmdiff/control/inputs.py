"""Reading what the control stage needs from a run directory: SAEs, task feature tables, statistics.

run_dir/saes/<role>/layer_<L>/          SAEs (any format load_sae reads)
run_dir/features/<task>.parquet         task feature tables (columns layer, feature, ...)
run_dir/stats/<split>.state.safetensors FeatureStats of the same SAEs
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmdiff.control.controls import feature_pairs
from mmdiff.errors import DataError, SAEError, StoreError


def load_task_sets(
    run_dir: str | Path, tasks: Sequence[str] | None = None
) -> dict[str, pd.DataFrame]:
    """{task: its (layer, feature) table} from run_dir/features/<task>.parquet (all of them by default)."""
    folder = Path(run_dir) / "features"
    if tasks is None:
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise StoreError(f"no task feature tables under {folder}; run the detect stage first")
        tasks = [p.stem for p in files]
    out = {}
    for name in tasks:
        path = folder / f"{name}.parquet"
        if not path.is_file():
            have = sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []
            raise StoreError(
                f"no task feature table {path} (tables present: {have}); run the detect stage for task {name!r}"
            )
        out[name] = feature_pairs(pd.read_parquet(path), f"{path}")
    return out


def load_role_saes(
    run_dir: str | Path,
    role: str,
    layers: Iterable[int],
    *,
    d_in: int | None = None,
    device: Any = None,
) -> dict[int, Any]:
    """{layer: SAE} from run_dir/saes/<role>/layer_<L>/ for each layer."""
    from mmdiff.sae import load_sae

    root = Path(run_dir) / "saes" / role
    out = {}
    for layer in sorted({int(L) for L in layers}):
        path = root / f"layer_{layer}"
        if not path.exists():
            have = sorted(p.name for p in root.glob("layer_*")) if root.is_dir() else []
            raise SAEError(
                f"no SAE at {path} (present under {root}: {have}); train SAEs of role {role!r} for layer {layer}"
            )
        out[layer] = load_sae(path, d_in=d_in, layer=layer, device=device).eval()
    return out


def load_stats(run_dir: str | Path, split: str) -> Any:
    """FeatureStats of `split` from run_dir/stats/<split>.state.safetensors."""
    from mmdiff.stats import load_feature_stats

    folder = Path(run_dir) / "stats"
    path = folder / f"{split}.state.safetensors"
    if not path.is_file():
        have = (
            sorted(
                p.name.removesuffix(".state.safetensors")
                for p in folder.glob("*.state.safetensors")
            )
            if folder.is_dir()
            else []
        )
        raise StoreError(
            f"no feature statistics {path} (splits present: {have}); pass stats_split= one of them, or run the statistics stage"
        )
    return load_feature_stats(path)


def check_stats_fit(stats: Any, saes: dict[int, Any]) -> None:
    """The statistics must be of these SAEs: same layers and numbers of features."""
    for layer, sae in saes.items():
        if layer not in stats.layers:
            raise DataError(
                f"statistics of split {stats.split!r} have layers {stats.layers}, not layer {layer}"
            )
        if stats.d_sae(layer) != int(sae.W_dec.shape[0]):
            raise DataError(
                f"layer {layer}: statistics have {stats.d_sae(layer)} features, the SAE {int(sae.W_dec.shape[0])}: "
                "are they of another SAE role?"
            )


def load_removal_inputs(
    run_dir: str | Path, adapter: Any, tasks: Sequence[str] | None, role: str, stats_split: str | None
) -> tuple[dict[str, pd.DataFrame], dict[int, Any], Any]:
    """(task sets, {layer: SAE} of the role at the sets' layers on the VLM's device, statistics of
    `stats_split` checked against them, or None): what every removal of a run reads."""
    task_sets = load_task_sets(run_dir, tasks)
    backbone = adapter.backbone("vlm")
    layers = {int(L) for p in task_sets.values() for L in p["layer"].unique()}
    saes = load_role_saes(run_dir, role, layers, d_in=backbone.d_model, device=backbone.device)
    stats = None
    if stats_split is not None:
        stats = load_stats(run_dir, stats_split)
        check_stats_fit(stats, saes)
    return task_sets, saes, stats
