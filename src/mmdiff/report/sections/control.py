"""Section 6: control: the effects table (each intervention x each task, effect with its 95% CI and
the control's effect beside it) and the steering sweeps (alpha vs score, feature vs single-layer).

Files: eval/effects.parquet (EFFECT_COLUMNS) and eval/steering.parquet (STEERING_COLUMNS), written
by the control stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from mmdiff.report.sections._common import (
    NOT_RUN,
    Block,
    Section,
    Table,
    ensure_plot,
    fmt,
    read_json,
    read_table,
    save_png,
)

EFFECT_COLUMNS = [
    "intervention",
    "target_task",
    "eval_task",
    "metric",
    "baseline",
    "treated",
    "effect",
    "ci_lo",
    "ci_hi",
    "control",
    "control_effect",
    "control_ci_lo",
    "control_ci_hi",
    "n",
]
STEERING_COLUMNS = ["method", "task", "alpha", "score", "ci_lo", "ci_hi"]
METHOD_STYLE = {
    "feature": ("#e7298a", "feature steering"),
    "single_layer": ("#555555", "single-layer (CAA)"),
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
                    if at_floor(getattr(r, "baseline_ci_lo", None), getattr(r, "floor", None))
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
    """The rows scored on the test split (all rows when the table has no `split`)."""
    if "split" not in steering:
        return steering
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
            if "selected" in r:
                chosen = r[r["selected"].fillna(False).astype(bool)]
                ax.plot(chosen["alpha"], chosen["score"], "*", ms=11, color=line.get_color())
        ax.set_xlabel("steering strength α")
        metric = sub["metric"].dropna().astype(str) if "metric" in sub else pd.Series(dtype=str)
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
        sel = g[g["selected"].fillna(False).astype(bool)] if "selected" in g else g.iloc[:0]
        out.append(sel.iloc[:1] if len(sel) else g.loc[[g["score"].astype(float).idxmax()]])
    return pd.concat(out, ignore_index=True) if out else rows.iloc[:0]


def control_section(run_dir: Path) -> Section:
    section = Section(
        "control",
        "Control: removal and steering",
        intro="Removal projects the features' decoder directions out of the residual stream at their layer; "
        "steering adds α·s·v. Every effect is shown with its 95% bootstrap interval and the control's effect.",
    )
    ev = run_dir / "eval"
    effects = read_table(ev / "effects.parquet", run_dir, section, EFFECT_COLUMNS)
    steering = read_table(ev / "steering.parquet", run_dir, section, STEERING_COLUMNS)
    if effects is None and steering is None:
        if not section.warnings:
            section.status = NOT_RUN
            section.notes.append(
                "The control stage has not run (no eval/effects.parquet, eval/steering.parquet)."
            )
        return section
    if effects is not None:
        block = Block("Effects")
        if effects.empty:
            block.notes.append("eval/effects.parquet has no rows.")
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
            [ev / "steering.parquet"],
        )
        block.figures += [fig] if fig else []
        chosen = chosen_per_method(steering)
        summary = (read_json(ev / "steering.json", run_dir, section) or {}).get("summary", {})
        rows = []
        for r in chosen.itertuples():
            rows.append(
                [
                    str(r.task),
                    METHOD_STYLE.get(str(r.method), (None, str(r.method)))[1],
                    fmt(getattr(r, "layer", None)),
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
