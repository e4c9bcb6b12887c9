"""Section 3: adapted features (tables of `mmdiff.diff.write_adapted_features`, plots of
`mmdiff.report.feature_plots`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmdiff.detect import DETECT
from mmdiff.diff import ADAPTED, ADAPTED_PER_LAYER, DIFF
from mmdiff.report.sections._common import (
    NOT_RUN,
    Block,
    Section,
    dashboard_link,
    ensure_plot,
    fmt,
    frame_table,
    read,
)

TOP_ADAPTED = 30  # rows of the top-adapted table; the full set is in features/adapted.parquet


def task_tables(run_dir: Path, section: Section) -> dict[str, pd.DataFrame]:
    """Each task's detection table (`detect.DETECT`), by task name."""
    out = {}
    for task in DETECT.found(run_dir):
        df = read(DETECT, run_dir, section, task=task)
        if df is not None:
            out[task] = df
    return out


def adapted_section(run_dir: Path, explanations: Mapping[str, Any]) -> Section:
    """Gap vs cosine, counts per layer, the top adapted features with their explanations."""
    from mmdiff.report import feature_plots as fp

    section = Section(
        "adapted",
        "Adapted features",
        intro="Variance gap Δ_f = E_vision[h_f²] − E_text[h_f²] and decoder cosine c_f = cos(W_dec_f base, "
        "W_dec_f adapted). All features of all layers are pooled; the top p_gap by Δ_f are kept, then "
        "the bottom p_cos of those by c_f: the adapted set.",
    )
    plots = run_dir / "report"
    diff = read(DIFF, run_dir, section)
    per_layer = read(ADAPTED_PER_LAYER, run_dir, section)
    adapted = read(ADAPTED, run_dir, section)
    if adapted is None and diff is not None:
        adapted = diff[diff["selected"].astype(bool)]
    if diff is None and per_layer is None and adapted is None:
        if not section.warnings:
            section.status = NOT_RUN
            section.notes.append(
                f"The diff stage has not run (no {DIFF.rel()}, {ADAPTED.rel()})."
            )
        return section

    block = Block("Variance gap vs decoder cosine")
    if diff is not None:
        n, n_sel = len(diff), int(diff["selected"].astype(bool).sum())
        a = diff.attrs
        block.notes.append(
            f"{n_sel:,} of {n:,} features are in the adapted set ({100 * n_sel / max(n, 1):.2f}%)"
            + (f"; {int(a['n_passed_gap']):,} passed the gap stage" if "n_passed_gap" in a else "")
            + (
                f"; p_gap = {fmt(a['p_gap'])}, p_cos = {fmt(a['p_cos'])}"
                if "p_gap" in a and "p_cos" in a
                else ""
            )
            + (
                f"; gap threshold {fmt(a['gap_threshold'])}, cosine threshold {fmt(a['cosine_threshold'])}"
                if "gap_threshold" in a and "cosine_threshold" in a
                else ""
            )
            + "."
        )
        tasks = task_tables(run_dir, section)
        fig = ensure_plot(
            plots / "gap_vs_cosine.png",
            lambda p: fp.plot_gap_vs_cosine(diff, p, tasks),
            "Variance gap vs decoder cosine",
            "Every feature of every layer (grey), the adapted set (pink), task features circled.",
            section,
            run_dir,
            [DIFF.path_in(run_dir), *(DETECT.path_in(run_dir, task=t) for t in tasks)],
        )
        block.figures += [fig] if fig else []
    else:
        block.notes.append(
            f"{DIFF.rel()} is missing: the scatter of all features cannot be drawn."
        )
    section.blocks.append(block)

    if per_layer is not None:
        block = Block("Adapted features per layer")
        fig = ensure_plot(
            plots / "adapted_per_layer.png",
            lambda p: fp.plot_adapted_per_layer(per_layer, p),
            "Adapted features per layer",
            "Count per layer and mean decoder cosine of the adapted set vs all features.",
            section,
            run_dir,
            [ADAPTED_PER_LAYER.path_in(run_dir)],
        )
        block.figures += [fig] if fig else []
        block.tables.append(
            frame_table(
                per_layer.sort_values("layer"),
                "Counts per layer",
                [
                    "layer",
                    "n_features",
                    "n_passed_gap",
                    "n_adapted",
                    "share_adapted",
                    "mean_cosine_all",
                    "mean_cosine_adapted",
                    "mean_gap_adapted",
                ],
                max_rows=500,
            )
        )
        section.blocks.append(block)

    if adapted is not None:
        block = Block("Top adapted features")
        top = (
            adapted.sort_values("variance_gap", ascending=False)
            if "variance_gap" in adapted
            else adapted
        )
        absent = diff.attrs.get("relative_decoder_norm_absent") if diff is not None else None
        rel_norm = "relative_decoder_norm" in top and top["relative_decoder_norm"].notna().any()
        if not rel_norm:
            block.notes.append(
                "Relative decoder norm is not reported: "
                + (absent or "it is undefined for every feature (no decoder norms recorded)")
                + "."
            )
        block.tables.append(
            frame_table(
                top.assign(
                    explanation=[
                        _explanation(explanations, l, f)
                        for l, f in zip(top["layer"], top["feature"])
                    ]
                ),
                f"Top {min(TOP_ADAPTED, len(top))} adapted features by variance gap",
                [
                    "feature",
                    "variance_gap",
                    "decoder_cosine",
                    *(["relative_decoder_norm"] if rel_norm else []),
                    "firing_frequency_vision",
                    "firing_frequency_text",
                    "stability",
                    "explanation",
                ],
                max_rows=TOP_ADAPTED,
                caption="stability = share of bootstrap resamples of the records in which the feature is selected"
                + ("; relative decoder norm 0.5 = unchanged norm" if rel_norm else "")
                + ". Feature ids link to their dashboards where one exists.",
                cell=lambda c, v, r: (
                    dashboard_link(run_dir, r["layer"], v) if c == "feature" else None
                ),
            )
        )
        section.blocks.append(block)
    return section


def _explanation(explanations: Mapping[str, Any], layer: int, feature: int) -> str:
    e = explanations.get(f"L{int(layer)}/F{int(feature)}")
    if e is None:
        return "–"
    score = e.measured_score()  # held-out detection only: an unmeasured confidence is never printed
    return e.description + (f" ({score})" if score else "")
