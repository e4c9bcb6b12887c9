"""The `train` stage of a study (the organism's recipe): base-LM SAEs first (trained, or pretrained
ones imported), then the masking regimes on the VLM warm-started from them, then the held-out tables
(FVU by token type, L0, dead fraction, spliced-in loss, decoder cosine). Finished roles are reused
only when their settings, data and warm start are unchanged."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmdiff.distributed import on_main
from mmdiff.errors import ConfigError, SAEError
from mmdiff.sae.checkpoint import data_fingerprint, init_fingerprint
from mmdiff.sae.stream import CapturedActivations
from mmdiff.sae.trainer import METRICS_FILE, REGIMES, TrainConfig, TrainResult
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


def _role_settings(
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


def _finished_role(role_dir: Path, settings: dict[str, Any]) -> bool:
    """True when role_dir holds SAEs trained with these settings; stale ones clear the folder."""
    import json

    marker = role_dir / TRAIN_CONFIG_FILE
    if not marker.is_file():
        if role_dir.exists():  # no marker: a folder of unknown provenance, never resumed
            shutil.rmtree(role_dir)
        return False
    if json.loads(marker.read_text()) != json.loads(json.dumps(settings)):
        shutil.rmtree(role_dir)  # trained on other data / settings / warm start: start over
        return False
    layers = settings["layers"]
    return (role_dir / METRICS_FILE).is_file() and all(
        (role_dir / f"layer_{L}").is_dir() for L in layers
    )


def train_role(
    role: str,
    init: Mapping[int, Any] | None,
    data: Any,
    layers: Sequence[int],
    cfg: TrainConfig,
    role_dir: Path,
    progress: bool,
    resume: bool = True,
) -> TrainResult:
    """Train (or resume, or reload when already done with the same settings) one role's SAEs.

    resume=False trains from scratch whatever the folder holds (the pipeline's --force).
    """
    from mmdiff.atomic import write_json
    from mmdiff.distributed import broadcast_object, on_main
    from mmdiff.parallel import train_saes_distributed

    if not resume and role_dir.exists():
        on_main(shutil.rmtree, role_dir)
    settings = _role_settings(cfg, layers, data, init)
    if broadcast_object(on_main(_finished_role, role_dir, settings)):  # rank 0 may clear the folder
        import pandas as pd

        from mmdiff.sae import load_sae

        saes = {L: load_sae(role_dir / f"layer_{L}", layer=L) for L in layers}
        metrics = pd.read_parquet(role_dir / METRICS_FILE).to_dict("records")
        warm = {L: warm_start_sae(init[L], L, cfg.k) for L in layers} if init is not None else {}
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
    on_main(write_json, role_dir / TRAIN_CONFIG_FILE, settings)
    # under torchrun: layers sharded across ranks; every rank gets every SAE back for the evaluation
    return train_saes_distributed(init, data, layers, cfg, role_dir, progress=progress, gather_saes=True)


def import_base_saes(
    base_saes: Mapping[int, Any], layers: Sequence[int], role_dir: Path, d_in: int | None = None
) -> TrainResult:
    """Pretrained base-LM SAEs as the `base` role: checked, then saved natively to role_dir/layer_<L>/."""
    from mmdiff.sae import load_sae
    from mmdiff.sae.base import SAE

    missing = [L for L in layers if L not in base_saes]
    if missing:
        raise SAEError(
            f"no pretrained base SAE for layers {missing} (given: {sorted(base_saes)}); "
            "give one per study layer or leave base_saes unset to train them"
        )
    saes, dirs = {}, {}
    for L in layers:
        given = base_saes[L]
        sae = given if isinstance(given, SAE) else load_sae(given, d_in=d_in, layer=L)
        if d_in is not None and sae.cfg.d_in != d_in:
            raise SAEError(
                f"the base SAE for layer {L} expects d_in={sae.cfg.d_in}, the base LM's hidden size "
                f"is {d_in}: is this SAE for another model?"
            )
        sae.check_finite(f"base SAE for layer {L}")
        saes[L], dirs[L] = sae, Path(sae.save(role_dir / f"layer_{L}"))
    return TrainResult(saes, [], role_dir, dirs, steps=0, tokens=0)


def _to_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}


def spliced_loss_rows(
    adapter: Any,
    side: str,
    records: Sequence[Any],
    saes: Mapping[str, Mapping[int, Any]],
    batch_size: int,
    exclude_special: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Spliced-in CE (clean / SAE / zero, fraction recovered) of every role's SAE on one model side,
    in one pass over the records, scored where the side was trained to predict (TRAINED_TARGETS:
    the VLM on the answers, the base LM on all text; the `targets` column says which)."""
    from mmdiff.sae.metrics import TRAINED_TARGETS, spliced_losses

    backbone = adapter.backbone(side)
    device = next(backbone.model.parameters()).device
    make = adapter.vlm_inputs if side == "vlm" else adapter.base_inputs
    answered = all(r.answers for r in records)  # else no answer to append: score the text tokens
    targets = TRAINED_TARGETS[side] if answered else "text"

    starts = range(0, len(records), batch_size)

    def batches(bar: Any, task: Any) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for s in starts:
            inputs = make(records[s : s + batch_size], with_answer=answered)
            yield _to_device(inputs, device), adapter.token_types(inputs, side=side).to(device)
            bar.update(task, advance=1)

    keyed = {(role, L): (sae, L) for role, by_layer in saes.items() for L, sae in by_layer.items()}
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"spliced-in loss ({side})", total=len(starts))
        results = spliced_losses(
            backbone, keyed, batches(bar, task), exclude_special=exclude_special, targets=targets
        )
    return [{"regime": role, "side": side, **r.row()} for (role, _), r in results.items()]


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
    them (JumpReLU through `to_topk`).
    """
    from mmdiff.sae.metrics import decoder_cosine, evaluate_saes
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
        results["base"] = train_role(
            "base", None, src["base"], layers, bcfg, out_dir / "saes" / "base", progress, resume
        )
    for regime in regimes:
        results[regime] = train_role(
            regime,
            results["base"].saes,
            src["vlm"],
            layers,
            dataclasses.replace(cfg, regime=regime),
            out_dir / "saes" / regime,
            progress,
            resume,
        )
    saes = {role: r.saes for role, r in results.items()}
    if adapter is not None:
        _record_model_names(adapter, results)

    rows = []
    for side, roles in (("base", ["base"]), ("vlm", list(saes))):
        evals = evaluate_saes(
            {(role, L): (saes[role][L], L) for role in roles for L in layers},
            held[side],
            exclude_special=cfg.exclude_special,
        )
        rows += [{"regime": role, "side": side, **ev.row()} for (role, _), ev in evals.items()]
    cosines = {
        role: {L: decoder_cosine(r.saes[L], r.init[L]) for L in layers}
        for role, r in results.items()
        if r.init
    }
    spliced_df = None
    if spliced:
        import pandas as pd

        held_records = list(records_heldout)
        spliced_rows = spliced_loss_rows(
            adapter, "base", held_records, {"base": saes["base"]}, capture_batch_size,
            cfg.exclude_special, progress,
        )  # fmt: skip
        spliced_rows += spliced_loss_rows(
            adapter, "vlm", held_records, saes, capture_batch_size, cfg.exclude_special, progress
        )
        spliced_df = pd.DataFrame(spliced_rows)
    tables = write_training_report(
        out_dir / "stats",
        out_dir / "report",
        fvu_curves({role: r.metrics for role, r in results.items() if r.metrics}),
        heldout_table(rows),
        cosines,
        spliced_df,
        plots=plots,
    )
    return StudySAEs(saes, {role: r.sae_dirs for role, r in results.items()}, results, tables)
