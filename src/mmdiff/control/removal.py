"""Removal of task features against honest controls, every effect with a paired bootstrap CI.

For each task set: project the span of its decoder directions out of the residual stream at each of
its layers (`ablate_features`, docs/method.md#interventions-and-controls), evaluate every task (the target and the others), and
compare per record with the clean run: effect = mean(treated - clean) with a 95% percentile
bootstrap interval over records (`paired_effect`). Beside it, the same for random features matched
in layer and firing-frequency bin (the per-record mean over `n_random` draws), and, as rows of
their own, the mismatched task set (the OCR set for spatial and vice versa).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmdiff.control.outputs import write_table
from mmdiff.control._evaluate import check_positions, check_yesno_metric, progress_bar
from mmdiff.control.controls import (
    feature_pairs,
    features_by_layer,
    firing_frequencies,
    matched_random_features,
    mismatched_pairs,
)
from mmdiff.control.evaluator import Evaluator, effect_columns
from mmdiff.control.tasks import answer_floor, metric_name
from mmdiff.errors import ConfigError, DataError
from mmdiff.bootstrap import bootstrap_mean
from mmdiff.evals.harness import EvalTask
from mmdiff.models.base import TokenType
from mmdiff.schema import Artifact, Column

REMOVAL, CONTROL_MISMATCHED, OTHER = "removal", "control_mismatched", "other"


def _legacy_kind(df: pd.DataFrame) -> np.ndarray:
    """The kind of a row of a table written before the `kind` column, read off its label once: a
    removal says "remov" or "ablat" but not "head"; one that also says "mismatch" or "control"
    removes a control set."""
    label = df["intervention"].astype(str).str.lower()
    removal = label.str.contains("remov|ablat") & ~label.str.contains("head")
    control = label.str.contains("mismatch|control")
    return np.where(removal & control, CONTROL_MISMATCHED, np.where(removal, REMOVAL, OTHER))


SCORE_COLUMNS = (
    Column("metric", str, "the eval task's metric"),
    Column("baseline", float, "clean score"),
    Column("treated", float, "score with the set removed"),
    Column("effect", float, "mean per-record treated - clean"),
    Column("ci_lo", float, "95% paired bootstrap interval of the effect"),
    Column("ci_hi", float),
)
"""The columns of a removal's score and effect, in every removal table (here and control.analyses)."""

EFFECTS = Artifact(
    "eval/effects.parquet",
    "removal_experiment",
    doc="One row per (intervention, eval task): the effect of removing a feature set, with the "
    "random control's effect beside it.",
    legacy_kind=_legacy_kind,
    columns=(
        Column("intervention", str, "the row's label for people, e.g. 'remove spatial'"),
        Column("kind", str, "what the row is", default=None, kinds={
            REMOVAL: "the target task's own feature set removed",
            CONTROL_MISMATCHED: "another task's set removed, as a control of the target task's rows",
            OTHER: "another intervention (e.g. a head ablation in a hand-made table): shown, not judged",
        }),
        Column("target_task", str, "the task whose features (or whose control) were removed"),
        Column("eval_task", str, "the task evaluated"),
        *SCORE_COLUMNS,
        Column("control", str, "the random control's description, 'none' without one"),
        Column("control_effect", float, "the same for the random control (mean over its draws)"),
        Column("control_ci_lo", float),
        Column("control_ci_hi", float),
        Column("n", int, "records"),
        Column("baseline_ci_lo", float, "lower end of the clean score's 95% bootstrap interval",
               default=math.nan),
        Column("floor", float, "what one constant answer scores on the same records "
               "(control.tasks.answer_floor; NaN for the attack success rate)", default=math.nan),
        Column("mde", float, "minimum detectable effect of this paired comparison at 80% power "
               "(evals.power.paired_mde)", default=math.nan),
        Column("selectivity", float, "effect minus the random control's effect: mean per-record "
               "treated - control (NaN without a control)", default=math.nan),
        Column("selectivity_ci_lo", float, "its 95% paired bootstrap interval", default=math.nan),
        Column("selectivity_ci_hi", float, default=math.nan),
        Column("mass_at_positions", float, "share of the removed set's activation mass (sum of h_f "
               "over the statistics split's prompt tokens) at the removal positions", default=math.nan),
    ),
)  # fmt: skip
"""A clean score whose interval (`baseline_ci_lo`) does not clear the `floor` means the model does
not do the task, so no removal can show that the features carried it (report.findings: "not
testable"). Tables written before `kind`, `baseline_ci_lo` and `floor` are read with the kind
derived from the label and NaN for the other two."""


LOW_MASS = 0.05
"""A removal whose positions hold less than this share of its features' activation mass touches
(almost) nothing: its effect says nothing about what the features carry (report and findings)."""

_POSITION_TYPES: dict[str, tuple[int, ...] | None] = {
    "text": (int(TokenType.TEXT),),
    "image": (int(TokenType.IMAGE),),
    "all": None,
}


def mass_at_positions(stats: Any, pairs: pd.DataFrame, positions: str) -> float:
    """Share of a feature set's activation mass (sum of h_f over every non-special prompt token of
    the statistics) that lies at the removal `positions`: near 0 when the features fire where the
    removal does not touch (image-token features removed at text positions). NaN when the set never
    fired. Generated tokens are not in the statistics; "text" removal also edits them."""
    at = total = 0.0
    for layer, feats in features_by_layer(pairs).items():
        idx = torch.as_tensor(feats, dtype=torch.long)
        at += float(stats.sum_h(layer, _POSITION_TYPES[check_positions(positions)])[idx].sum())
        total += float(stats.sum_h(layer, None)[idx].sum())
    return at / total if total > 0 else math.nan


def set_overlaps(sets: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    """How much the task sets share: {"counts": {a: {b: |a & b|}} (the diagonal is each set's size),
    "own": {a: |a minus every other set|}, "in_all": features in every set}. Removing two sets that
    are mostly the same features cannot tell one task's features from the other's."""
    keys = {n: set(map(tuple, p[["layer", "feature"]].to_numpy().tolist())) for n, p in sets.items()}
    counts = {a: {b: len(keys[a] & keys[b]) for b in keys} for a in keys}
    own = {a: len(keys[a] - set().union(*(keys[b] for b in keys if b != a))) for a in keys}
    in_all = len(set.intersection(*keys.values())) if keys else 0
    return {"counts": counts, "own": own, "in_all": in_all}


@dataclass
class _Scores:
    """Per-record scores of one feature set on every eval task: {task: [n_records]}, with the
    model's answers and (yes/no tasks) its probability of the correct answer, record by record."""

    by_task: dict[str, np.ndarray]
    predictions: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    p_correct: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


RECORDS = Artifact(
    "eval/removal_records.parquet",
    "removal_experiment",
    doc="One row per (task set, eval task, record): the clean and the treated model's answer, score "
    "and probability of the correct answer; what the report's qualitative examples are chosen from.",
    columns=(
        Column("set", str, "the removed task set"),
        Column("eval_task", str, "the task evaluated"),
        Column("record_id", str, "the record"),
        Column("clean_score", float, "the clean model's score on the record"),
        Column("treated_score", float, "the score with the set removed"),
        Column("clean_p_correct", float, "P(correct answer), clean (yes/no tasks; NaN otherwise)"),
        Column("treated_p_correct", float, "P(correct answer) with the set removed"),
        Column("clean_answer", str, "the clean model's answer"),
        Column("treated_answer", str, "the answer with the set removed"),
    ),
)  # fmt: skip

N_EXAMPLES = 2
"""Qualitative examples per task set (effects.json "examples"), chosen by `choose_examples`."""


def _check_inputs(
    saes: Mapping[int, Any],
    task_sets: Mapping[str, pd.DataFrame],
    eval_tasks: Mapping[str, EvalTask],
) -> dict[str, pd.DataFrame]:
    if not task_sets:
        raise ConfigError("removal needs at least one task set: {name: DataFrame(layer, feature)}")
    if not eval_tasks:
        raise ConfigError(
            "removal needs at least one evaluation task: {name: EvalTask} (see study_eval_tasks)"
        )
    for name, task in eval_tasks.items():
        if not task.records:
            raise DataError(f"evaluation task {name!r} has no records")
    sets = {}
    for name, table in task_sets.items():
        pairs = feature_pairs(table, f"task set {name!r}")
        for layer, feats in features_by_layer(pairs).items():
            if layer not in saes:
                raise DataError(
                    f"task set {name!r} has features at layer {layer}, but no SAE was given for it (SAEs at layers {sorted(saes)})"
                )
            d_sae = int(saes[layer].W_dec.shape[0])
            bad = [f for f in feats if f >= d_sae]
            if bad:
                raise DataError(
                    f"task set {name!r}: features {bad[:5]} do not exist in the layer-{layer} SAE (d_sae={d_sae}); is the table from another SAE?"
                )
        sets[name] = pairs
    return sets


def removal_experiment(
    adapter: Any,
    saes: Mapping[int, Any],
    task_sets: Mapping[str, pd.DataFrame],
    eval_tasks: Mapping[str, EvalTask],
    stats: Any | None,
    *,
    positions: str = "text",
    n_random: int = 3,
    seed: int = 0,
    n_bins: int = 10,
    mismatched: Mapping[str, str] | bool | None = None,
    exclude_all_sets: bool = True,
    stats_token_types: Sequence[int] | None = None,
    yesno_metric: str = "accuracy",
    n_boot: int = 2000,
    batch_size: int = 16,
    control_records: str = "split",
    progress: bool = True,
    evaluator: Evaluator | None = None,
) -> pd.DataFrame:
    """The effects table: one row per (task set, eval task), plus mismatched-control rows.

    saes: {layer: SAE} whose decoder rows W_dec[f] are the feature directions. task_sets: {name:
    DataFrame with columns layer, feature}. eval_tasks: {name: EvalTask} (`study_eval_tasks`).
    stats: FeatureStats of the same SAEs, for the firing-frequency bins of the matched random
    controls (None: matched in layer only, and the `control` column says so). positions: where the
    directions are removed ("text": prompt text and generated tokens; "image"; "all").
    mismatched: {target: control set} pairs, None for the default (spatial <-> ocr), False for none.
    Random controls never draw a feature of the task set, nor of any other given set when
    `exclude_all_sets`. yesno_metric: "accuracy" or "p_correct" for yes/no tasks.
    control_records: "split" scores record i of each task under random draw i mod n_random (the
    draws' mean effect, unbiased, for the cost of one evaluation); "every" scores every draw on
    every record (the per-record mean over draws, n_random evaluations).
    evaluator: an `Evaluator` over the same eval_tasks to share (its clean pass and removals serve
    the stage's other analyses); None makes one from yesno_metric, batch_size and progress.
    Columns: EFFECTS; effects are treated - clean, CIs are 95% paired bootstrap intervals.
    """
    check_positions(positions)
    check_yesno_metric(yesno_metric)
    sets = _check_inputs(saes, task_sets, eval_tasks)
    if n_random < 0:
        raise ConfigError(f"n_random must be >= 0, got {n_random}")
    if control_records not in ("split", "every"):
        raise ConfigError(f"control_records must be 'split' or 'every', got {control_records!r}")
    split = control_records == "split" and n_random > 1
    pairs_map = (
        {}
        if mismatched is False
        else mismatched_pairs(sets, None if mismatched in (None, True) else mismatched)
    )
    d_sae = {int(L): int(s.W_dec.shape[0]) for L, s in saes.items()}
    every_set = pd.concat(list(sets.values()), ignore_index=True) if exclude_all_sets else None
    layers = sorted({int(L) for p in sets.values() for L in p["layer"].unique()})
    freqs = (
        firing_frequencies(stats, layers, stats_token_types)
        if stats is not None and layers
        else None
    )
    control_name = (
        f"random matched in layer and firing-frequency bin ({n_bins} bins, {n_random} draws, seed {seed})"
        if stats is not None
        else f"random matched in layer only, no statistics ({n_random} draws, seed {seed})"
    )
    draws = {
        name: matched_random_features(
            pairs, d_sae, freqs, n_draws=n_random, seed=seed, n_bins=n_bins, exclude=every_set
        )
        if n_random > 0
        else []
        for name, pairs in sets.items()
    }
    if evaluator is None:
        evaluator = Evaluator(
            adapter, eval_tasks, yesno_metric=yesno_metric, batch_size=batch_size, progress=progress
        )
    n_runs = 1 + len(sets) * (2 if split else 1 + n_random)
    with progress_bar(progress) as bar, evaluator.charged_to("removal"):
        overall = bar.add_task("removal experiments", total=n_runs)
        before, evaluator.bar = evaluator.bar, bar

        def run(draw_sets: Sequence[pd.DataFrame], label: str) -> _Scores:
            """Every task with record i under draw_sets[i mod len] removed (none: clean)."""
            got = {
                tname: evaluator.outcome(tname, saes, draw_sets, positions, label=label)
                for tname in eval_tasks
            }
            bar.advance(overall)
            return _Scores(
                {t: o.scores for t, o in got.items()},
                {t: list(o.predictions) for t, o in got.items()},
                {t: o.p_correct for t, o in got.items()},
            )

        try:
            clean = run([], "clean")
            treated = {name: run([p], f"remove {name}") for name, p in sets.items()}
            controls: dict[str, list[_Scores]] = {}
            for name in sets:
                if split and draws[name]:
                    controls[name] = [run(draws[name], f"random controls for {name}")]
                    continue
                controls[name] = [
                    run([d], f"random control {i + 1} for {name}") for i, d in enumerate(draws[name])
                ]
        finally:
            evaluator.bar = before

    mass = {
        name: mass_at_positions(stats, p, positions) if stats is not None else math.nan
        for name, p in sets.items()
    }
    floors = {tname: answer_floor(task, yesno_metric) for tname, task in eval_tasks.items()}
    clean_lo = {
        tname: bootstrap_mean(clean.by_task[tname], n_boot=n_boot, seed=seed).lo for tname in eval_tasks
    }

    def rows_for(intervention: str, kind: str, target: str, set_name: str) -> list[dict[str, Any]]:
        out = []
        for tname, task in eval_tasks.items():
            base = clean.by_task[tname]
            tr = treated[set_name].by_task[tname]
            ctrl = (
                np.mean([c.by_task[tname] for c in controls[set_name]], axis=0)  # [n_records]
                if controls[set_name]
                else None
            )
            cols = effect_columns(tr, base, ctrl, n_boot=n_boot, seed=seed)
            row: dict[str, Any] = {
                "intervention": intervention,
                "kind": kind,
                "target_task": target,
                "eval_task": tname,
                "metric": metric_name(task, yesno_metric),
                **cols,
                "control": control_name if ctrl is not None else "none",
            }
            row["baseline_ci_lo"] = clean_lo[tname]
            row["floor"] = floors[tname].score if floors[tname] is not None else np.nan
            row["mass_at_positions"] = mass[set_name]
            out.append(row)
        return out

    rows = []
    for name in sets:
        rows += rows_for(f"remove {name}", REMOVAL, name, name)
    for target, other in pairs_map.items():
        rows += rows_for(f"remove {other} (mismatched control for {target})", CONTROL_MISMATCHED, target, other)
    df = pd.DataFrame(rows, columns=list(EFFECTS.names))
    per_record = record_frame(clean, treated, eval_tasks)
    df.attrs["removal"] = {
        "positions": positions,
        "n_random": n_random,
        "seed": seed,
        "n_bins": n_bins,
        "yesno_metric": yesno_metric,
        "n_boot": n_boot,
        "exclude_all_sets": exclude_all_sets,
        "mismatched": pairs_map,
        "floors": {t: (vars(f) if f is not None else None) for t, f in floors.items()},
        "set_sizes": {k: len(v) for k, v in sets.items()},
        "overlaps": set_overlaps(sets),
        "mass_at_positions": mass,
        "control_records": control_records if split else "every",
        "control_draws": {
            name: [
                {
                    "features": d[["layer", "feature"]].to_numpy().tolist(),
                    "max_bin_distance": int(d["bin_distance"].max()) if len(d) else 0,
                    "effects": _draw_effects(
                        controls[name][0 if split else i], clean, i if split else 0,
                        len(draws[name]) if split else 1,
                    ),
                }
                for i, d in enumerate(draws[name])
            ]
            for name in sets
        },
        "examples": choose_examples(per_record, eval_tasks),
    }
    df.attrs["records"] = per_record.to_dict("list")  # plain lists: attrs are compared and copied
    return df


def record_frame(clean: _Scores, treated: Mapping[str, _Scores], eval_tasks: Mapping[str, EvalTask]) -> pd.DataFrame:
    """`RECORDS`: every task set's removal, record by record, beside the clean run."""
    parts = []
    for name, tr in treated.items():
        for tname, task in eval_tasks.items():
            n = len(task.records)
            parts.append(pd.DataFrame({
                "set": name, "eval_task": tname, "record_id": [str(r.id) for r in task.records],
                "clean_score": clean.by_task[tname], "treated_score": tr.by_task[tname],
                "clean_p_correct": clean.p_correct.get(tname, np.full(n, np.nan)),
                "treated_p_correct": tr.p_correct.get(tname, np.full(n, np.nan)),
                "clean_answer": clean.predictions.get(tname, [""] * n),
                "treated_answer": tr.predictions.get(tname, [""] * n),
            }))  # fmt: skip
    return RECORDS.validate(pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(RECORDS.names)))


def choose_examples(
    per_record: pd.DataFrame, eval_tasks: Mapping[str, EvalTask], n: int = N_EXAMPLES
) -> dict[str, list[dict[str, Any]]]:
    """The qualitative examples of each task set, chosen by rule, not by hand: on the set's own task
    (the eval task of the same name), the `n` records whose probability of the correct answer drops
    most when the set is removed (yes/no tasks; the score for others), ties broken by record id.
    Each: record, question, gold answers, clean and treated answer, P(correct) and score, and a
    small PNG thumbnail (base64) of the image."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, g in per_record.groupby("set", sort=True):
        own = g[g["eval_task"] == name]
        if own.empty or name not in eval_tasks:
            continue
        yesno = own["clean_p_correct"].notna().all()
        col = "p_correct" if yesno else "score"
        own = own.assign(change=own[f"treated_{col}"] - own[f"clean_{col}"])
        own = own.sort_values(["change", "record_id"], kind="stable").head(n)
        records = {str(r.id): r for r in eval_tasks[name].records}
        items = []
        for r in own.itertuples():
            rec = records.get(str(r.record_id))
            items.append({
                "record": str(r.record_id), "eval_task": name, "rule": f"largest drop in {col.replace('_', ' ')}",
                "question": str(getattr(rec, "question", "")), "answers": [str(a) for a in getattr(rec, "answers", [])][:3],
                "clean_answer": r.clean_answer, "treated_answer": r.treated_answer,
                "clean_p_correct": _none(r.clean_p_correct), "treated_p_correct": _none(r.treated_p_correct),
                "clean_score": _none(r.clean_score), "treated_score": _none(r.treated_score),
                "image": _thumbnail(rec),
            })  # fmt: skip
        out[str(name)] = items
    return out


def _none(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _thumbnail(record: Any, side: int = 160) -> str | None:
    """The record's image as a base64 PNG at most `side` pixels wide and high; None without one."""
    import base64
    import io

    if record is None or getattr(record, "image", None) is None:
        return None
    try:
        image = record.load_image()
    except Exception:  # noqa: BLE001 - an example without its picture is still an example
        return None
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _draw_effects(control: _Scores, clean: _Scores, first: int, step: int) -> dict[str, float]:
    """One draw's mean effect per task, over the records it scored (every `step`-th from `first`)."""
    out = {}
    for t, scores in control.by_task.items():
        d = scores[first::step] - clean.by_task[t][first::step]
        out[t] = float(d.mean()) if d.size else math.nan
    return out


def write_effects(effects: pd.DataFrame, out: str | Path) -> dict[str, Path]:
    """out/effects.parquet (the table) and out/effects.json (the same rows, plus the settings, each
    control draw's features and effects and the qualitative examples from `effects.attrs`), and
    out/removal_records.parquet (`RECORDS`) when the attrs carry the per-record results."""
    from mmdiff.atomic import write_parquet

    attrs = dict(effects.attrs)
    per_record = attrs.pop("records", None)
    paths = write_table(effects, EFFECTS, out, extra=attrs)
    if isinstance(per_record, Mapping):
        paths["records"] = Path(out) / Path(RECORDS.path).name
        write_parquet(paths["records"], RECORDS.validate(pd.DataFrame(per_record)))
    return paths


def run_removal(
    run_dir: str | Path,
    adapter: Any,
    eval_tasks: Mapping[str, EvalTask] | Sequence[Any],
    *,
    tasks: Sequence[str] | None = None,
    role: str = "text",
    stats_split: str | None = "vqa",
    out: str | Path | None = None,
    safety_judge: Any = None,
    relations: Mapping[str, Sequence[str]] | None = None,
    **kwargs: Any,
) -> dict[str, Path]:
    """Pipeline stage / `mmdiff ablate`: the removal experiment of a run, written to out (run_dir/eval).

    Reads the task sets run_dir/features/<task>.parquet (`tasks`, default all), their layers' SAEs
    run_dir/saes/<role>/layer_<L>/ and the statistics run_dir/stats/<stats_split>.state.safetensors
    (None: random controls matched in layer only). eval_tasks: {name: EvalTask}, or records, which
    `study_eval_tasks(records, safety_judge=...)` turns into tasks. relations: {eval task: relations}
    adds that task's relation-matched and relation-mismatched subsets (`relation_subsets`, VSR's
    control for relation-specific features) as tasks of their own. Other keyword arguments go to
    `removal_experiment`. Writes effects.parquet and effects.json; returns their paths.
    """
    from mmdiff.control.inputs import load_removal_inputs
    from mmdiff.control.tasks import relation_subsets, study_eval_tasks

    run_dir = Path(run_dir)
    if not isinstance(eval_tasks, Mapping):
        eval_tasks = study_eval_tasks(list(eval_tasks), safety_judge=safety_judge)
    eval_tasks = dict(eval_tasks)
    for name, rels in (relations or {}).items():
        if name not in eval_tasks:
            raise DataError(
                f"relations name task {name!r}; the evaluation tasks are {sorted(eval_tasks)}"
            )
        eval_tasks.update(relation_subsets(eval_tasks[name], rels))
    task_sets, saes, stats = load_removal_inputs(run_dir, adapter, tasks, role, stats_split)
    effects = removal_experiment(adapter, saes, task_sets, eval_tasks, stats, **kwargs)
    effects.attrs["inputs"] = {
        "run_dir": str(run_dir),
        "role": role,
        "stats_split": stats_split,
        "eval_tasks": {k: len(t.records) for k, t in eval_tasks.items()},
    }
    return write_effects(effects, run_dir / "eval" if out is None else out)
