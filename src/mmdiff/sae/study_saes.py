"""The `train` stage of a study (the organism's recipe): base-LM SAEs first (trained, or pretrained
ones imported: `sae/pretrained.py`), then the masking regimes on the VLM warm-started from them, then
the held-out evaluation (`sae/evaluation.py`) written as tables and plots (`sae/training_report.py`).
Finished roles are reused only when their settings, data and warm start are unchanged."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdiff.distributed import on_main
from mmdiff.errors import ConfigError
from mmdiff.sae.checkpoint import data_fingerprint, init_fingerprint
from mmdiff.sae.pretrained import import_base_saes
from mmdiff.sae.stream import CapturedActivations
from mmdiff.sae.trainer import (
    METRICS_FILE,
    REGIMES,
    Local,
    TrainConfig,
    TrainResult,
    gather_trained_saes,
    train_saes,
)
from mmdiff.sae.warm_start import warm_start_sae

ROLES: tuple[str, ...] = ("base", "full", "image", "text", "random")

TRAIN_CONFIG_FILE = "train_config.json"


@dataclass
class StudySAEs:
    """What `train_study_saes` produced: per role (base, full, image, text, random) and layer."""

    saes: dict[str, dict[int, Any]]
    sae_dirs: dict[str, dict[int, Path]]
    results: dict[str, TrainResult]
    tables: dict[
        str, Path
    ]  # name -> Parquet / PNG path (see training_report.write_training_report)


def role_settings(
    cfg: TrainConfig, layers: Sequence[int], data: Any, init: Mapping[int, Any] | None
) -> dict[str, Any]:
    """What a finished role's SAEs depend on: settings, data and warm start (not where they
    trained or how often they logged)."""
    return {
        "config": {**cfg.trajectory_key(), "total_tokens": cfg.total_tokens},
        "layers": list(layers),
        "data": data_fingerprint(data),
        "init": init_fingerprint(init),
    }


def role_is_finished(role_dir: Path, settings: dict[str, Any]) -> bool:
    """True when role_dir holds every layer's SAEs trained with these settings."""
    import json

    marker = role_dir / TRAIN_CONFIG_FILE
    return (
        marker.is_file()
        and json.loads(marker.read_text()) == json.loads(json.dumps(settings))
        and (role_dir / METRICS_FILE).is_file()
        and all((role_dir / f"layer_{L}").is_dir() for L in settings["layers"])
    )


def clear_stale_role(role_dir: Path, settings: dict[str, Any]) -> None:
    """Delete role_dir unless it was trained (or is being trained) with these settings: a folder of
    unknown provenance, or one trained on other data / settings / warm start, is never resumed."""
    import json

    marker = role_dir / TRAIN_CONFIG_FILE
    if role_dir.exists() and (
        not marker.is_file() or json.loads(marker.read_text()) != json.loads(json.dumps(settings))
    ):
        shutil.rmtree(role_dir)


def reload_role(
    role_dir: Path, layers: Sequence[int], init: Mapping[int, Any] | None, k: int
) -> TrainResult:
    """A finished role's SAEs, metrics and warm starts, read back from role_dir."""
    import pandas as pd

    from mmdiff.sae import load_sae

    saes = {L: load_sae(role_dir / f"layer_{L}", layer=L) for L in layers}
    metrics = pd.read_parquet(role_dir / METRICS_FILE).to_dict("records")
    warm = {L: warm_start_sae(init[L], L, k) for L in layers} if init is not None else {}
    return TrainResult(
        saes,
        metrics,
        role_dir,
        {L: role_dir / f"layer_{L}" for L in layers},
        steps=int(metrics[-1]["step"]) if metrics else 0,
        tokens=int(metrics[-1]["tokens"]) if metrics else 0,
        init=warm,
        reloaded=True,
    )


def train_or_reload(
    init: Mapping[int, Any] | None,
    data: Any,
    layers: Sequence[int],
    cfg: TrainConfig,
    role_dir: Path,
    progress: bool,
    resume: bool = True,
    strategy: Local | None = None,
) -> TrainResult:
    """One role's SAEs in role_dir: reloaded when finished with the same settings, else trained (a
    checkpoint of the same settings is resumed). Every process gets every layer's SAE back.

    resume=False trains from scratch whatever the folder holds (the pipeline's --force).
    """
    from mmdiff.atomic import write_json
    from mmdiff.distributed import broadcast_object, on_main

    settings = role_settings(cfg, layers, data, init)

    def finished() -> bool:  # on the main process only: it may delete the folder
        if not resume and role_dir.exists():
            shutil.rmtree(role_dir)
        if role_is_finished(role_dir, settings):
            return True
        clear_stale_role(role_dir, settings)
        return False

    if broadcast_object(on_main(finished)):
        return reload_role(role_dir, layers, init, cfg.k)
    on_main(write_json, role_dir / TRAIN_CONFIG_FILE, settings)
    result = train_saes(init, data, layers, cfg, role_dir, progress, strategy=strategy)
    return gather_trained_saes(result, init, cfg)


def _record_model_names(adapter: Any, results: Mapping[str, TrainResult]) -> None:
    """Name in each saved SAE the model it reads (the base LM for `base`, else the VLM): the
    trainer only sees activations, and SAELens / Neuronpedia need the name."""
    from mmdiff.sae.formats.saelens import set_model_name

    for role, result in results.items():
        model = adapter.backbone("base" if role == "base" else "vlm").model
        name = getattr(getattr(model, "config", None), "name_or_path", None)
        if not name:
            continue
        for L, folder in result.sae_dirs.items():
            on_main(set_model_name, folder, str(name))
            result.saes[L].cfg.model_name = str(name)


def train_study_saes(
    adapter: Any,
    records_train: Sequence[Any],
    records_heldout: Sequence[Any],
    layers: Sequence[int],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    regimes: Sequence[str] = ("full", "image", "text", "random"),
    base_cfg: TrainConfig | None = None,
    capture_batch_size: int = 8,
    spliced: bool = True,
    plots: bool = True,
    progress: bool = True,
    data: Mapping[str, Any] | None = None,
    heldout: Mapping[str, Any] | None = None,
    base_saes: Mapping[int, Any] | None = None,
    resume: bool = True,
    strategy: Local | None = None,
) -> StudySAEs:
    """The `train` stage of a study without pretrained SAEs (the organism).

    1. A base-LM SAE per layer, from random init, on the base LM run on caption + question
       (side="base", regime full, `base_cfg` or `cfg`).
    2. The regimes on the VLM (image + question), warm-started from the base SAEs (random: same
       shape, random init).
    Writes out_dir/saes/{base,full,image,text,random}/layer_<L>/ (native format) with each role's
    train_metrics.parquet, then the held-out tables (FVU by token type, L0, dead fraction; the
    spliced-in loss when `spliced`; decoder cosine to the base SAE) to out_dir/stats/sae_*.parquet
    and their plots to out_dir/report/sae_*.png.

    Activations come from `mmdiff.capture.iter_activations` on the adapter, unless `data` /
    `heldout` give them per side ({"base": ..., "vlm": ...}: ActivationBatch iterables or stores).
    A killed call resumes: finished roles are reloaded, the interrupted one resumes its checkpoint.
    resume=False retrains every role from scratch (wire it to the pipeline's --force); with
    resume=True a role is reloaded only when its settings, data and warm start are unchanged.
    `base_saes` ({layer: SAE or `load_sae`-readable path}, e.g. Llama Scope folders) replaces step 1:
    they are copied to out_dir/saes/base/ in their own architecture and the regimes warm-start from
    them (JumpReLU through `to_topk`). `strategy`: how each training step is distributed (None =
    one process; under torchrun `mmdiff.parallel.training_strategy()`).
    """
    from mmdiff.sae.evaluation import evaluate_study_saes
    from mmdiff.sae.training_report import fvu_curves, heldout_table, write_training_report

    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        raise ConfigError(f"unknown regimes {bad}; expected some of {REGIMES}")
    layers = sorted({int(L) for L in layers})
    out_dir = Path(out_dir)
    if cfg.device is None and adapter is not None:  # train where the activations are produced
        cfg = dataclasses.replace(cfg, device=str(next(adapter.vlm.model.parameters()).device))
    if base_cfg is not None and base_cfg.device is None:
        base_cfg = dataclasses.replace(base_cfg, device=cfg.device)

    def source(
        given: Mapping[str, Any] | None, records: Sequence[Any], side: str, bar: bool
    ) -> Any:
        if given is not None and given.get(side) is not None:
            return given[side]
        return CapturedActivations(adapter, records, layers, side, capture_batch_size, bar)

    src = {side: source(data, records_train, side, False) for side in ("base", "vlm")}
    held = {side: source(heldout, records_heldout, side, progress) for side in ("base", "vlm")}

    results: dict[str, TrainResult] = {}
    if base_saes is not None:
        d_in = adapter.backbone("base").d_model if adapter is not None else None
        results["base"] = import_base_saes(base_saes, layers, out_dir / "saes" / "base", d_in)
    else:
        bcfg = base_cfg or dataclasses.replace(cfg, regime="full")
        results["base"] = train_or_reload(
            None, src["base"], layers, bcfg, out_dir / "saes" / "base", progress, resume, strategy
        )
    for regime in regimes:
        results[regime] = train_or_reload(
            results["base"].saes,
            src["vlm"],
            layers,
            dataclasses.replace(cfg, regime=regime),
            out_dir / "saes" / regime,
            progress,
            resume,
            strategy,
        )
    saes = {role: r.saes for role, r in results.items()}
    if adapter is not None:
        _record_model_names(adapter, results)
    held_out = evaluate_study_saes(
        saes, {role: r.init for role, r in results.items()}, layers, held, adapter=adapter,
        records=list(records_heldout), batch_size=capture_batch_size,
        exclude_special=cfg.exclude_special, spliced=spliced, progress=progress,
    )  # fmt: skip
    spliced_df = None
    if held_out.spliced is not None:
        import pandas as pd

        spliced_df = pd.DataFrame(held_out.spliced)
    tables = write_training_report(
        out_dir / "stats",
        out_dir / "report",
        fvu_curves({role: r.metrics for role, r in results.items() if r.metrics}),
        heldout_table(held_out.rows),
        held_out.cosines,
        spliced_df,
        plots=plots,
    )
    return StudySAEs(saes, {role: r.sae_dirs for role, r in results.items()}, results, tables)
