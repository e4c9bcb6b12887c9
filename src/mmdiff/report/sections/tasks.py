"""Section 4: task features: firing shift plots and the kept features of each task with their scores
and explanations (tables of `mmdiff.detect.write_task_features`, explanations of
`mmdiff.interp.explain.write_explanations`), each linking to its dashboard."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmdiff.detect import DETECT, TASK_FEATURES
from mmdiff.diff import ADAPTED
from mmdiff.interp.grounded import MATCH_SHARE, NO_CONCEPT
from mmdiff.interp.heldout import describe_detection
from mmdiff.report.sections._common import (
    NOT_RUN,
    Block,
    Link,
    Section,
    Table,
    dashboard_link,
    ensure_plot,
    fmt,
    fmt_p,
    frame_table,
    read,
)

MAX_FEATURES = 100  # rows per task list; the full list is in features/{task}.parquet
FILTER_NOTES = {
    "adapted_intersection": "intersected with the adapted set",
    "lexical_filter": "lexically filtered (neutral instruction on the same images)",
}


def _task_names(run_dir: Path, section: Section) -> list[str]:
    names = DETECT.found(run_dir)
    adapted = Path(ADAPTED.path).stem
    for name in TASK_FEATURES.found(run_dir):
        if name == adapted or name in names:
            continue
        df = read(TASK_FEATURES, run_dir, section, task=name)
        if df is not None and "task" in df.columns:
            names.append(name)
    return names


def tasks_section(run_dir: Path, explanations: Mapping[str, Any]) -> Section:
    """One block per task split: plots, filter summary, and the kept task features."""
    section = Section(
        "tasks",
        "Task features",
        intro="Contrastive firing: Δp_f = p_f(D_task) − p_f(D_base) and the +0.5-smoothed odds ratio, "
        "Fisher exact p-values with Benjamini-Hochberg q-values; candidates are intersected with the "
        "adapted set and kept when they stay active, image-dominated, under a neutral instruction.",
    )
    names = _task_names(run_dir, section)
    if not names:
        if not section.warnings:
            section.status = NOT_RUN
            section.notes.append(
                "The detect stage has not run (no stats/detect_*.parquet, features/{task}.parquet)."
            )
        return section
    if (run_dir / "interp" / "dashboards" / "index.html").is_file():
        link = Link("index of every feature dashboard", "../interp/dashboards/index.html")
        section.blocks.append(Block("Dashboards", tables=[Table("", ["dashboards"], [[link]])]))
    if not explanations:
        section.notes.append(
            "No explanations (interp/explanations.json): the interp stage has not run."
        )
    share = read(MATCH_SHARE, run_dir, section)
    if share is not None and len(share):
        section.blocks.append(Block("Grounded explanations: task features explained by their task's concept", tables=[
            Table("share of each task's features whose best grounded concept is of its kind (Wilson 95%)",
                  ["task", "matched / features", "share [95%]", "grounded", "AUROC quartiles", "score quartiles"],
                  [[r.task, f"{r.matched} / {r.features}", f"{fmt(r.share)} [{fmt(r.ci_lo)}, {fmt(r.ci_hi)}]",
                    fmt(r.found), f"{fmt(r.auroc_q25)} / {fmt(r.auroc_q50)} / {fmt(r.auroc_q75)}",
                    f"{fmt(r.score_q25)} / {fmt(r.score_q50)} / {fmt(r.score_q75)}"]
                   for r in share.itertuples()])]))
    for name in names:
        section.blocks.append(_task_block(run_dir, name, explanations, section))
    return section


def _task_block(
    run_dir: Path, name: str, explanations: Mapping[str, Any], section: Section
) -> Block:
    from mmdiff.report import feature_plots as fp

    block = Block(f"Task: {name}")
    detect = read(DETECT, run_dir, section, task=name)
    kept = read(TASK_FEATURES, run_dir, section, task=name)
    if kept is None and detect is not None:
        kept = detect[detect["kept"].astype(bool)]
    if detect is not None:
        plots = run_dir / "report"
        a = detect.attrs
        applied = [text for key, text in FILTER_NOTES.items() if a.get(key)]
        skipped = [text for key, text in FILTER_NOTES.items() if key in a and not a.get(key)]
        block.notes.append(
            f"{int(detect['candidate'].astype(bool).sum()):,} candidates of {len(detect):,} features; "
            f"{int(detect['kept'].astype(bool).sum()):,} task features kept"
            + (
                f" (base split {a['base_split']!s}, min Δp {fmt(a.get('min_delta_p'))}, α {fmt(a.get('alpha'))})"
                if "base_split" in a
                else ""
            )
            + "."
        )
        if applied:
            block.notes.append("Filters applied: " + "; ".join(applied) + ".")
        if skipped:
            block.notes.append("Filters NOT applied: " + "; ".join(skipped) + ".")
        if "reason" in detect:
            counts = Counter(detect["reason"].astype(str))
            block.tables.append(
                Table(
                    "Why features were dropped (first failed criterion)",
                    ["reason", "features"],
                    [[k, fmt(v)] for k, v in counts.most_common()],
                )
            )
        draws = [
            (
                f"{name}_firing.png",
                fp.plot_firing_distributions,
                "Firing frequencies, base vs task split",
            ),
            (f"{name}_candidates.png", fp.plot_task_candidates, "Δp vs log odds ratio"),
        ]
        if "in_adapted_set" in detect and not detect["in_adapted_set"].isna().all():
            draws.append(
                (
                    f"{name}_adapted_firing.png",
                    fp.plot_adapted_firing,
                    "Adapted features under both splits",
                )
            )
        for file, draw, title in draws:
            fig = ensure_plot(
                plots / file,
                lambda p, d=draw: d(detect, p),
                f"{name}: {title}",
                "",
                section,
                run_dir,
                [DETECT.path_in(run_dir, task=name)],
            )
            block.figures += [fig] if fig else []
    if kept is None:
        block.notes.append(f"No task-feature list for {name}.")
        return block
    if kept.empty:
        block.notes.append(f"No feature of {name} passed every criterion.")
        return block
    order = kept.sort_values("odds_ratio", ascending=False) if "odds_ratio" in kept else kept
    pairs = list(zip(order["layer"], order["feature"]))
    order = order.assign(
        explanation=[_describe(explanations, l, f) for l, f in pairs],
        **{LLM_COLUMN: [_llm_detection(explanations, l, f) for l, f in pairs],
           GROUNDED_COLUMN: [_grounded_detection(explanations, l, f) for l, f in pairs]},
    )
    grounded_shown = any(isinstance(getattr(e, "grounded", None), Mapping) for e in explanations.values())
    block.tables.append(
        frame_table(
            order,
            f"{name} task features ({len(order):,})",
            [
                "feature",
                "p_task",
                "p_base",
                "delta_p",
                "odds_ratio",
                "q_value",
                "neutral_image_share",
                "explanation",
                LLM_COLUMN,
                *([GROUNDED_COLUMN] if grounded_shown else []),
            ],
            max_rows=MAX_FEATURES,
            caption="Sorted by odds ratio. Feature ids link to their dashboards where one exists. "
            f"q-values below {fmt_p(0.0)[2:]} print as {fmt_p(0.0)}: each token counts as an independent "
            "draw, so smaller tail probabilities are a ranking, not a calibrated error rate. "
            "Held-out detection = balanced accuracy (chance 0.5) [Agresti-Caffo 95% interval] of telling the "
            "held-out records the feature fires on from the rest, on the same records for both explanations: "
            "an LLM judge reading the LLM explanation, the question and the annotated concepts; the grounded "
            "concept's presence (docs/method.md#grounded-explanations).",
            cell=lambda c, v, r: (
                dashboard_link(run_dir, r["layer"], v)
                if c == "feature"
                else fmt_p(v) if c in ("q_value", "p_value") else None
            ),
        )
    )
    return block


def _describe(explanations: Mapping[str, Any], layer: int, feature: int) -> str:
    e = explanations.get(f"L{int(layer)}/F{int(feature)}")
    return "–" if e is None else str(e.description)


LLM_COLUMN = "LLM explanation: held-out detection [95%]"
GROUNDED_COLUMN = "grounded concept: held-out detection [95%]"
NO_LLM = "no LLM explanation (offline explainer: interp.llm not set)"


def _llm_detection(explanations: Mapping[str, Any], layer: int, feature: int) -> str:
    """The LLM explanation's held-out detection (balanced accuracy [95%], n), or why there is none:
    the explainer's own confidence is not a measurement and is not shown."""
    e = explanations.get(f"L{int(layer)}/F{int(feature)}")
    if e is None:
        return "no explanation (no activating example)"
    if not str(getattr(e, "source", "")).startswith("llm"):
        return NO_LLM
    value = getattr(e, "detection", None)
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "not measured (needs interp.grounding records on which the feature fires and does not)"
    ci = getattr(e, "detection_ci", None)
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"{value:.2f}{interval}, {int(e.detection_n or 0)} records"


def _grounded_detection(explanations: Mapping[str, Any], layer: int, feature: int) -> str:
    """The grounded explanation's concept and its held-out detection on the same records, or why none."""
    e = explanations.get(f"L{int(layer)}/F{int(feature)}")
    g = getattr(e, "grounded", None)
    if not isinstance(g, Mapping):
        return "not grounded"
    d = g.get("detection")
    if not isinstance(d, Mapping):
        return "found" if g.get("found") else NO_CONCEPT
    if not d.get("concept"):
        return f"{NO_CONCEPT}: {describe_detection(d)}"
    if d.get("found"):
        return f"{d['concept']}: {describe_detection(d)}"
    return f"none found (best candidate {d['concept']}: {describe_detection(d)})"
