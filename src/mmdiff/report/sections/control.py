"""Section 6: control: the effects table (each intervention x each task, effect with its 95% CI and
the control's effect beside it) and the steering sweeps (alpha vs score, feature vs single-layer).

Files: eval/effects.parquet (`control.removal.EFFECTS`) and eval/steering.parquet with its JSON
mirror (`control.steering.STEERING`), written by the control stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from mmdiff.control.removal import EFFECTS
from mmdiff.control.steering import FEATURE, SINGLE_LAYER, STEERING
from mmdiff.report.sections._common import (
    NOT_RUN,
    Block,
    Section,
    Table,
    ensure_plot,
    fmt,
    read,
    read_json,
    save_png,
)

METHOD_STYLE = {
    FEATURE: ("#e7298a", "feature steering"),
    SINGLE_LAYER: ("#555555", "single-layer (CAA)"),
}


def interval(mean: Any, lo: Any, hi: Any, *, signed: bool = True) -> str:
    """'+0.083 [+0.051, +0.120]', or the mean alone when the interval is missing."""

    def f(v: Any) -> str:
        try:
            x = float(v)
        except (TypeError, ValueError):
            return "–"
        return "–" if math.isnan(x) else (f"{x:+.3f}" if signed else f"{x:.3f}")

    if f(lo) == "–" or f(hi) == "–":
        return f(mean)
    return f"{f(mean)} [{f(lo)}, {f(hi)}]"


def excludes_zero(lo: Any, hi: Any) -> bool:
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        return False
    return not (math.isnan(lo) or math.isnan(hi)) and (lo > 0 or hi < 0)


def at_floor(baseline_ci_lo: Any, floor: Any) -> bool:
    """Whether the clean score's 95% interval fails to clear the constant-answer floor (what one
    answer given to every record scores, e.g. 0.5 for always "yes"): the model does not do the task.
    False when either is missing (effects tables written before the floor was recorded, or the
    attack success rate, which has none)."""
    try:
        lo, fl = float(baseline_ci_lo), float(floor)
    except (TypeError, ValueError):
        return False
    return not (math.isnan(lo) or math.isnan(fl)) and lo <= fl


def effects_table(effects: pd.DataFrame) -> Table:
    rows = []
    for r in effects.sort_values(
        ["intervention", "target_task", "eval_task", "metric"], kind="stable"
    ).itertuples():
        rows.append(
            [
                str(r.intervention),
                str(r.target_task),
                str(r.eval_task),
                str(r.metric),
                fmt(r.baseline)
                + (
                    f" (at floor {fmt(r.floor)})"
                    if at_floor(r.baseline_ci_lo, r.floor)
                    else ""
                ),
                fmt(r.treated),
                interval(r.effect, r.ci_lo, r.ci_hi)
                + (" *" if excludes_zero(r.ci_lo, r.ci_hi) else ""),
                str(r.control)
                if r.control is not None
                and not (isinstance(r.control, float) and math.isnan(r.control))
                else "–",
                interval(r.control_effect, r.control_ci_lo, r.control_ci_hi)
                + (" *" if excludes_zero(r.control_ci_lo, r.control_ci_hi) else ""),
                fmt(r.n),
            ]
        )
    return Table(
        "Intervention effects",
        [
            "intervention",
            "target task",
            "eval task",
            "metric",
            "baseline",
            "treated",
            "effect [95% CI]",
            "control",
            "control effect [95% CI]",
            "n",
        ],
        rows,
        caption="effect = treated − baseline on the same records (paired bootstrap interval); * = the interval "
        "excludes 0. The control (e.g. random features of matched firing frequency) is applied the same way. "
        "'at floor': the clean score's 95% interval does not clear what one constant answer scores (0.5 for "
        "always 'yes'), so the model does not do that task and its effects there say little.",
    )


def effects_matrix(effects: pd.DataFrame) -> Table:
    """Each intervention (rows) x each evaluation task and metric (columns): effect [95% CI], with the
    control's effect in brackets."""
    cols = list(dict.fromkeys(zip(effects["eval_task"].astype(str), effects["metric"].astype(str))))
    rows = []
    for name, g in effects.groupby(effects["intervention"].astype(str), sort=True):
        cells = {}
        for r in g.itertuples():
            text = interval(r.effect, r.ci_lo, r.ci_hi) + (
                " *" if excludes_zero(r.ci_lo, r.ci_hi) else ""
            )
            if not pd.isna(r.control_effect):
                text += f" (control {interval(r.control_effect, r.control_ci_lo, r.control_ci_hi)})"
            cells[(str(r.eval_task), str(r.metric))] = text
        rows.append([name] + [cells.get(c, "–") for c in cols])
    return Table(
        "Effects: intervention x task",
        ["intervention"] + [f"{task} ({metric})" for task, metric in cols],
        rows,
        caption="effect [95% CI] on each evaluation task; * = the interval excludes 0; in brackets the "
        "control's effect (random features of matched firing frequency).",
    )


def rows_on_test_split(steering: pd.DataFrame) -> pd.DataFrame:
    """The rows scored on the test split (every row of a table written before `split` existed)."""
    return steering[steering["split"].astype(str) == "test"]


def plot_steering(steering: pd.DataFrame):
    """Test score against alpha, one panel per task, feature steering vs the single-layer baseline;
    the validation-chosen alpha of each method starred."""
    from matplotlib.figure import Figure

    steering = rows_on_test_split(steering)
    tasks = list(dict.fromkeys(steering["task"].astype(str)))
    fig = Figure(figsize=(4.2 * max(1, len(tasks)), 3.3), layout="constrained")
    axes = fig.subplots(1, max(1, len(tasks)), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        sub = steering[steering["task"].astype(str) == task]
        for method in dict.fromkeys(sub["method"].astype(str)):
            r = sub[sub["method"].astype(str) == method].sort_values("alpha")
            colour, label = METHOD_STYLE.get(method, (None, method))
            (line,) = ax.plot(r["alpha"], r["score"], marker="o", ms=3, color=colour, label=label)
            ax.fill_between(
                r["alpha"].to_numpy(float),
                r["ci_lo"].to_numpy(float),
                r["ci_hi"].to_numpy(float),
                color=line.get_color(),
                alpha=0.15,
                lw=0,
            )
            chosen = r[r["selected"].fillna(False).astype(bool)]
            ax.plot(chosen["alpha"], chosen["score"], "*", ms=11, color=line.get_color())
        ax.set_xlabel("steering strength α")
        metric = sub["metric"].dropna().astype(str)
        ax.set_ylabel(metric.iloc[0] if len(metric) else "score")
        ax.set_title(task)
        ax.legend(fontsize=8)
    return fig


def chosen_per_method(steering: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method), one test row: the validation-chosen one (`selected`) when marked, else
    the highest-scoring alpha."""
    rows = rows_on_test_split(steering)
    out = []
    for _, g in rows.groupby(["task", "method"], sort=True):
        sel = g[g["selected"].fillna(False).astype(bool)]
        out.append(sel.iloc[:1] if len(sel) else g.loc[[g["score"].astype(float).idxmax()]])
    return pd.concat(out, ignore_index=True) if out else rows.iloc[:0]


def control_section(run_dir: Path) -> Section:
    section = Section(
        "control",
        "Control: removal and steering",
        intro="Removal projects the features' decoder directions out of the residual stream at their layer; "
        "steering adds α·s·v. Every effect is shown with its 95% bootstrap interval and the control's effect.",
    )
    effects = read(EFFECTS, run_dir, section)
    steering = read(STEERING, run_dir, section)
    if effects is None and steering is None:
        if not section.warnings:
            section.status = NOT_RUN
            section.notes.append(
                f"The control stage has not run (no {EFFECTS.rel()}, {STEERING.rel()})."
            )
        return section
    if effects is not None:
        block = Block("Effects")
        if effects.empty:
            block.notes.append(f"{EFFECTS.rel()} has no rows.")
        else:
            block.tables.append(effects_matrix(effects))
            block.tables.append(effects_table(effects))
        section.blocks.append(block)
    if steering is not None and not steering.empty:
        block = Block("Steering sweeps")
        fig = ensure_plot(
            run_dir / "report" / "steering.png",
            lambda p: save_png(plot_steering(steering), p),
            "Steering: score vs α",
            "Test split; shaded: 95% intervals; stars: the validation-chosen α.",
            section,
            run_dir,
            [STEERING.path_in(run_dir)],
        )
        block.figures += [fig] if fig else []
        chosen = chosen_per_method(steering)
        mirror = STEERING.path_in(run_dir).with_suffix(".json")
        summary = (read_json(mirror, run_dir, section) or {}).get("summary", {})
        rows = []
        for r in chosen.itertuples():
            rows.append(
                [
                    str(r.task),
                    METHOD_STYLE.get(str(r.method), (None, str(r.method)))[1],
                    fmt(r.layer),
                    fmt(r.alpha),
                    interval(r.score, r.ci_lo, r.ci_hi, signed=False),
                ]
            )
        block.tables.append(
            Table(
                "Chosen settings, test scores",
                ["task", "method", "layer", "α", "test score [95% CI]"],
                rows,
                caption="α (and the baseline's layer) chosen on the validation split when the table marks "
                "a choice (`selected`, starred in the plot), else the best test α.",
            )
        )
        diffs = []
        for task, s in summary.items() if isinstance(summary, dict) else []:
            d = s.get("feature_minus_baseline_test") if isinstance(s, dict) else None
            if isinstance(d, dict):
                diffs.append([str(task), interval(d.get("mean"), d.get("lo"), d.get("hi"))])
        if diffs:
            block.tables.append(
                Table(
                    "Feature steering minus single-layer steering (paired, test split)",
                    ["task", "difference [95% CI]"],
                    diffs,
                )
            )
        section.blocks.append(block)
    return section
