"""Section 6: control: the effects table (each intervention x each task, effect with its 95% CI and
the control's effect beside it) and the steering sweeps (alpha vs score, feature vs single-layer).

Files: eval/effects.parquet (`control.removal.EFFECTS`) and eval/steering.parquet with its JSON
mirror (`control.steering.STEERING`), written by the control stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmdiff.control.removal import CONTROL_MISMATCHED, EFFECTS, LOW_MASS, REMOVAL
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


def interval_decimals(lo: Any, hi: Any, default: int = 3) -> int:
    """Decimals an interval justifies: two significant digits of its width (0.069 -> 3, 0.3 -> 2),
    between 1 and 4; `default` for a missing or zero-width interval."""
    try:
        width = abs(float(hi) - float(lo))
    except (TypeError, ValueError):
        return default
    if not math.isfinite(width) or width == 0:
        return default
    return min(4, max(1, 1 - math.floor(math.log10(width))))


def interval(mean: Any, lo: Any, hi: Any, *, signed: bool = True) -> str:
    """'+0.083 [+0.051, +0.120]' (rounded to what the interval's width justifies,
    `interval_decimals`), or the mean alone when the interval is missing."""
    digits = interval_decimals(lo, hi)

    def f(v: Any) -> str:
        try:
            x = float(v)
        except (TypeError, ValueError):
            return "–"
        return "–" if math.isnan(x) else (f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}")

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
                fmt(_value(r, "mde")),
                fmt(_value(r, "mass_at_positions"))
                + (" (touches almost nothing)" if _value(r, "mass_at_positions") < LOW_MASS else ""),
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
            "MDE",
            "mass at positions",
            "n",
        ],
        rows,
        caption="effect = treated − baseline on the same records (paired bootstrap interval); * = the interval "
        "excludes 0. The control (e.g. random features of matched firing frequency) is applied the same way. "
        "MDE = the smallest effect this paired comparison detects with 80% power at 5% (2.80 × sd of the "
        "per-record differences / √n, and for 0/1 scores never below 2.80² / (n + 2.80²)): an effect inside "
        "±MDE with an interval containing 0 is no evidence of absence. mass at positions = the share of the "
        "removed features' activation mass (on the statistics split's prompt tokens) at the positions the "
        "removal edits; below 5% the removal touches (almost) nothing and its effect is no negative result. "
        "'at floor': the clean score's 95% interval does not clear what one constant answer scores (0.5 for "
        "always 'yes'), so the model does not do that task and its effects there say little.",
    )


def _value(row: Any, name: str) -> float:
    try:
        return float(getattr(row, name))
    except (AttributeError, TypeError, ValueError):
        return math.nan


def task_matrix(
    df: pd.DataFrame,
    title: str,
    first: str,
    cell: Any,
    *,
    caption: str = "",
    sort: bool = True,
) -> Table:
    """One row per intervention, one column per (eval task, metric), each cell `cell(row)`."""
    cols = list(dict.fromkeys(zip(df["eval_task"].astype(str), df["metric"].astype(str))))
    rows = []
    for name, g in df.groupby(df["intervention"].astype(str), sort=sort):
        cells = {(str(r.eval_task), str(r.metric)): cell(r) for r in g.itertuples()}
        rows.append([name] + [cells.get(c, "–") for c in cols])
    return Table(title, [first] + [f"{task} ({metric})" for task, metric in cols], rows, caption=caption)


def selectivity_rows(effects: pd.DataFrame) -> pd.DataFrame:
    """The rows the selectivity matrix shows: every removal of a task set and of a mismatched set
    (by `kind`), with a matched random control to subtract."""
    rows = effects[effects["kind"].isin((REMOVAL, CONTROL_MISMATCHED))]
    return rows[rows["selectivity"].notna()] if "selectivity" in rows else rows.iloc[:0]


def selectivity_matrix(effects: pd.DataFrame) -> Table | None:
    """Task sets (rows) x evaluation tasks (columns): effect minus the matched random control's
    effect, paired per record, with its 95% interval; the seed's claim is that each set's row is
    negative on its own task only. None for tables written before the selectivity column."""
    rows_df = selectivity_rows(effects)
    if rows_df.empty:
        return None

    def cell(r: Any) -> str:
        text = interval(r.selectivity, r.selectivity_ci_lo, r.selectivity_ci_hi)
        text += " *" if excludes_zero(r.selectivity_ci_lo, r.selectivity_ci_hi) else ""
        own = str(r.eval_task) == str(r.target_task) and r.kind == REMOVAL
        return ("▶ " if own else "") + text

    return task_matrix(
        rows_df,
        "Selectivity: task set x task, effect minus the matched random control's",
        "removed set",
        cell,
        sort=False,
        caption="Each cell: the mean per-record (treated − control) difference, i.e. the removal's effect "
        "beyond random features of the same layers and firing frequencies, with its 95% paired bootstrap "
        "interval; * = the interval excludes 0; ▶ = the set's own task. Selective removal: negative on its own "
        "task, within noise elsewhere. A cell of a removal that touches almost none of its features' "
        "activation (see the effects table's mass column) cannot show selectivity either way.",
    )


def plot_selectivity(effects: pd.DataFrame):
    """Heat map of the selectivity matrix (effect minus matched control), intervals in each cell."""
    from matplotlib.figure import Figure

    rows_df = selectivity_rows(effects)
    names = list(dict.fromkeys(rows_df["intervention"].astype(str)))
    labels = [n.removeprefix("remove ").replace("mismatched control for", "control for") for n in names]
    cols = list(dict.fromkeys(rows_df["eval_task"].astype(str) + " (" + rows_df["metric"].astype(str) + ")"))
    grid = np.full((len(names), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in names]
    for r in rows_df.itertuples():
        i, j = names.index(str(r.intervention)), cols.index(f"{r.eval_task} ({r.metric})")
        grid[i, j] = float(r.selectivity)
        star = " *" if excludes_zero(r.selectivity_ci_lo, r.selectivity_ci_hi) else ""
        text[i][j] = (
            f"{float(r.selectivity):+.2f}{star}",
            f"[{float(r.selectivity_ci_lo):+.2f}, {float(r.selectivity_ci_hi):+.2f}]",
        )
    lim = max(0.05, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
    fig = Figure(figsize=(1.2 * len(cols) + 2.4, 0.6 * len(names) + 1.3), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(names)):
        for j in range(len(cols)):
            if text[i][j]:
                dark = abs(grid[i, j]) > 0.6 * lim  # white on the darkest cells
                colour = "white" if dark else "black"
                ax.text(j, i - 0.12, text[i][j][0], ha="center", va="center", fontsize=10, color=colour)
                ax.text(j, i + 0.22, text[i][j][1], ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(cols)), [c.replace(" (", "\n(") for c in cols], fontsize=8)
    ax.set_yticks(range(len(names)), labels, fontsize=9)
    fig.colorbar(im, ax=ax, label="effect − matched random control", shrink=0.9)
    return fig


def overlaps_table(overlaps: Any) -> Table | None:
    """The task sets' shared features: counts of each pair (diagonal: set size), each set's own."""
    if not isinstance(overlaps, dict) or not isinstance(overlaps.get("counts"), dict):
        return None
    counts, own = overlaps["counts"], overlaps.get("own", {})
    names = list(counts)
    rows = [[a] + [fmt(counts[a].get(b)) for b in names] + [fmt(own.get(a))] for a in names]
    return Table(
        "Task-set overlaps",
        ["set"] + names + ["own (in no other set)"],
        rows,
        caption=f"Features shared by each pair of task sets (diagonal: the set's size); {fmt(overlaps.get('in_all'))} "
        "features are in every set. Sets that share most of their features cannot show which task the "
        "shared ones carry: read the effects of their own features beside the full sets'.",
    )


def effects_matrix(effects: pd.DataFrame) -> Table:
    """Each intervention (rows) x each evaluation task and metric (columns): effect [95% CI], with the
    control's effect in brackets."""

    def cell(r: Any) -> str:
        text = interval(r.effect, r.ci_lo, r.ci_hi) + (" *" if excludes_zero(r.ci_lo, r.ci_hi) else "")
        if not pd.isna(r.control_effect):
            text += f" (control {interval(r.control_effect, r.control_ci_lo, r.control_ci_hi)})"
        return text

    return task_matrix(
        effects,
        "Effects: intervention x task",
        "intervention",
        cell,
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
    if effects is not None and not effects.empty:
        matrix = selectivity_matrix(effects)
        if matrix is not None:
            block = Block("Selectivity")
            fig = ensure_plot(
                run_dir / "report" / "selectivity.png",
                lambda p: save_png(plot_selectivity(effects), p),
                "Selectivity matrix",
                "Removing each task set (rows), scored on each task (columns): effect minus the matched "
                "random control's effect with its 95% interval. Blue: the removal costs more than random "
                "features do.",
                section,
                run_dir,
                [EFFECTS.path_in(run_dir)],
            )
            block.figures += [fig] if fig else []
            block.tables.append(matrix)
            section.blocks.append(block)
    if effects is not None:
        block = Block("Effects")
        if effects.empty:
            block.notes.append(f"{EFFECTS.rel()} has no rows.")
        else:
            removal = (read_json(EFFECTS.path_in(run_dir).with_suffix(".json"), run_dir, section) or {}).get(
                "removal", {}
            )
            overlaps = overlaps_table(removal.get("overlaps") if isinstance(removal, dict) else None)
            mass = removal.get("mass_at_positions", {}) if isinstance(removal, dict) else {}
            for name, share in (mass.items() if isinstance(mass, dict) else []):
                if isinstance(share, (int, float)) and share < LOW_MASS:
                    block.notes.append(
                        f"Removing the {name} set at {removal.get('positions', '?')} positions touches "
                        f"{100 * share:.1f}% of its features' activation mass: they fire elsewhere (image "
                        "tokens), so its effects cannot say whether the features carry the task."
                    )
            block.tables.append(effects_matrix(effects))
            block.tables.append(effects_table(effects))
            if overlaps is not None:
                block.tables.append(overlaps)
        section.blocks.append(block)
    from mmdiff.report.sections.control_analyses import analysis_blocks  # it imports this module

    section.blocks += analysis_blocks(run_dir, section)
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
