"""The control section's removal analyses: own features vs full sets at text vs all positions,
single features, dose-response, the selection-pipeline ablation (control.analyses; one block
function per analysis).

Files: eval/set_variants.parquet, eval/single_features.parquet, eval/dose_response.parquet,
eval/pipeline_ablation.parquet and their JSON mirrors (settings, CPU seconds), written by the ablate stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mmdiff.control.analyses import (
    DOSE_RESPONSE,
    PIPELINE_ABLATION,
    EVALUATED,
    SET_VARIANTS,
    SINGLE_FEATURES,
    TARGET,
)
from mmdiff.report.sections._common import Block, Section, Table, ensure_plot, fmt, read, read_json, save_png
from mmdiff.report.sections.control import excludes_zero, interval

_CAPTION = (
    "effect = treated − clean on the same records [95% paired bootstrap interval]; selectivity = effect "
    "minus the matched random features' effect (same layers and firing-frequency bins, record i under "
    "draw i mod n_random), paired per record; * = the interval excludes 0; MDE = the smallest effect "
    "detectable at 80% power. 'not testable': the removal positions hold under 5% of the set's "
    "activation mass, so it was not evaluated."
)


def _cells(r: Any) -> list[str]:
    if r.status != EVALUATED:
        return [str(r.status), "–", "–", fmt(r.n)]
    eff = interval(r.effect, r.ci_lo, r.ci_hi) + (" *" if excludes_zero(r.ci_lo, r.ci_hi) else "")
    sel = interval(r.selectivity, r.selectivity_ci_lo, r.selectivity_ci_hi)
    sel += " *" if excludes_zero(r.selectivity_ci_lo, r.selectivity_ci_hi) else ""
    return [eff, sel, fmt(getattr(r, "mde")), fmt(r.n)]


def _seconds(run_dir: Path, artifact: Any, section: Section) -> str:
    data = read_json(artifact.path_in(run_dir).with_suffix(".json"), run_dir, section) or {}
    s = data.get("cpu_seconds") if isinstance(data, dict) else None
    return f" This analysis cost {float(s):.0f} CPU-s beyond the evaluations shared with others." if isinstance(
        s, (int, float)
    ) else ""


def _table_block(
    run_dir: Path, section: Section, artifact: Any, title: str, first: list[str], lead: Any, caption: str
) -> Block | None:
    """A block with one table of an analysis: the `first` columns from `lead(row)`, then the eval
    task and the effect columns."""
    df = read(artifact, run_dir, section)
    if df is None or df.empty:
        return None
    rows = [[*lead(r), fmt(r.mass_at_positions), f"{r.eval_task} ({r.role})", *_cells(r)] for r in df.itertuples()]
    block = Block(title)
    block.tables.append(Table(
        title, [*first, "mass at positions", "eval task", "effect [95% CI]", "selectivity [95% CI]", "MDE", "n"],
        rows, caption=caption + " " + _CAPTION + _seconds(run_dir, artifact, section),
    ))  # fmt: skip
    return block


def variants_block(run_dir: Path, section: Section) -> Block | None:
    """Each set in full and its own features (minus the other sets), at each position kind."""
    return _table_block(
        run_dir, section, SET_VARIANTS, "Own features vs the full set, text vs all positions",
        ["set", "features", "positions", "n features"],
        lambda r: [str(r.target_task), str(r.variant), str(r.positions), fmt(r.n_features)],
        "own = the set minus every other task set's features (shared features cannot say which task they carry).",
    )  # fmt: skip


def single_block(run_dir: Path, section: Section) -> Block | None:
    """The top features of each set, each removed alone."""
    return _table_block(
        run_dir, section, SINGLE_FEATURES, "One feature at a time",
        ["set", "rank", "feature", "score (Δp)", "positions"],
        lambda r: [str(r.target_task), fmt(r.rank), f"L{int(r.layer)}/F{int(r.feature)}", fmt(r.score),
                   str(r.positions)],
        "Each set's features ranked by Δp (task minus base firing frequency, what they were selected on; "
        "ties by odds ratio), each of the top ones removed alone and scored on its task, general VQA and a "
        "benign control.",
    )  # fmt: skip


def plot_dose(df: pd.DataFrame):
    """Effect on the set's own task against the number of features removed (log 2), beside random
    sets of the same size; general VQA dashed. Shaded: 95% intervals."""
    from matplotlib.figure import Figure

    df = df[df["status"] == EVALUATED]
    sets = list(dict.fromkeys(df["target_task"].astype(str)))
    fig = Figure(figsize=(4.2 * max(1, len(sets)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(sets)), squeeze=False)[0]
    for ax, name in zip(axes, sets):
        sub = df[df["target_task"].astype(str) == name]
        for role, style in ((TARGET, "-"), ("general", "--")):
            r = sub[sub["role"] == role].sort_values("n_features")
            if r.empty:
                continue
            x = r["n_features"].to_numpy(float)
            for what, colour, lab in (("", "#d95f02", "removed"), ("control_", "#7570b3", "random, same size")):
                y = r[f"{what}effect"].to_numpy(float)
                ax.plot(x, y, style, marker="o", ms=3, color=colour, label=f"{lab}: {r['eval_task'].iloc[0]}")
                ax.fill_between(x, r[f"{what}ci_lo"].to_numpy(float), r[f"{what}ci_hi"].to_numpy(float),
                                color=colour, alpha=0.12 if role == TARGET else 0.06, lw=0)  # fmt: skip
        ax.axhline(0, color="#999999", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("features removed (top k by Δp)")
        ax.set_ylabel("effect (treated − clean)")
        top = sub.sort_values("n_features").iloc[-1]
        ax.set_title(f"{name}: {int(top['n_features'])} features = {100 * float(top['dims_share']):.0f}% of a layer's dims",
                     fontsize=9)  # fmt: skip
        ax.legend(fontsize=7)
    return fig


def dose_block(run_dir: Path, section: Section) -> Block | None:
    """Dose-response: the top k features removed against random sets of the same size."""
    df = read(DOSE_RESPONSE, run_dir, section)
    if df is None or df.empty:
        return None
    block = Block("Dose-response")
    fig = ensure_plot(
        run_dir / "report" / "dose_response.png", lambda p: save_png(plot_dose(df), p),
        "Dose-response", "Effect of removing each set's top k features (x: k, log scale) on its task (solid) and "
        "on general VQA (dashed), beside random sets of the same size and firing-frequency bins (purple). "
        "A step that the random sets match is not a finding.",
        section, run_dir, [DOSE_RESPONSE.path_in(run_dir)],
    )  # fmt: skip
    block.figures += [fig] if fig else []
    rows = []
    for r in df.itertuples():
        matched = (
            r.status == EVALUATED and r.role == TARGET and excludes_zero(r.ci_lo, r.ci_hi)
            and not excludes_zero(r.selectivity_ci_lo, r.selectivity_ci_hi)
        )  # fmt: skip
        rows.append([str(r.target_task), fmt(r.n_features), f"{100 * float(r.dims_share):.1f}%",
                     f"{r.eval_task} ({r.role})", *_cells(r),
                     "random sets of this size match it: not a finding" if matched else ""])  # fmt: skip
    block.tables.append(Table(
        "Dose-response", ["set", "k features", "largest share of a layer's dims", "eval task", "effect [95% CI]",
                          "selectivity [95% CI]", "MDE", "n", "note"], rows,
        caption="x = the number of features removed (the top k by Δp); 'largest share of a layer's dims' = "
        "max over layers of the features removed there / d_model. " + _CAPTION
        + _seconds(run_dir, DOSE_RESPONSE, section),
    ))  # fmt: skip
    return block


def pipeline_block(run_dir: Path, section: Section) -> Block | None:
    """The selection-pipeline ablation: each step's features, and random ones, removed."""
    return _table_block(
        run_dir, section, PIPELINE_ABLATION, "Selection-pipeline ablation",
        ["set", "selection", "filter run", "n features", "largest share of a layer's dims"],
        lambda r: [str(r.target_task), str(r.selection), "yes" if bool(r.applied) else "no (same set)",
                   fmt(r.n_features), f"{100 * float(r.dims_share):.1f}%"],
        "The features each step of the selection keeps (contrastive firing only; + visual responsiveness; "
        "+ the lexical filter; + the adapted-feature filter = the task set), and random features matched to "
        "the task set (its control, so no selectivity), removed and scored on the task and general VQA. "
        "The seed's argument: each filter keeps the task effect while sparing general VQA.",
    )  # fmt: skip


def analysis_blocks(run_dir: Path, section: Section) -> list[Block]:
    """The analyses' blocks that have a table, in order."""
    out = []
    for make in (variants_block, single_block, dose_block, pipeline_block):
        block = make(run_dir, section)
        if block is not None:
            out.append(block)
    return out

