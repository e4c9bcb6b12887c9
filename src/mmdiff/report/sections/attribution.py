"""Section 5: attribution patching to attention heads: per-layer curves, layer x head heatmaps, the
per-feature summary and the attention overlays (files of `mmdiff.attribution.attribute_features`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmdiff.attribution.frames import HEADS, LAYERS
from mmdiff.report.sections._common import (
    NOT_RUN,
    Block,
    Section,
    dashboard_link,
    ensure_plot,
    fmt,
    frame_table,
    png_figure,
    read,
    read_json,
    save_png,
)

MAX_PLOTTED = 6  # features drawn in the curves and heatmaps (largest total |score| first)
MAX_OVERLAY_FEATURES = 4
OVERLAY_NAME = re.compile(r"^L(\d+)F(\d+)_(.+)\.png$")


def score_column(df: pd.DataFrame) -> str:
    """Method A when computed, else Method B."""
    return "score_a" if "score_a" in df and df["score_a"].notna().any() else "score_b"


def plotted_features(heads: pd.DataFrame, n: int = MAX_PLOTTED) -> list[tuple[int, int]]:
    """The n features with the largest total |head score|."""
    col = score_column(heads)
    total = heads.assign(_abs=heads[col].abs()).groupby(["feature_layer", "feature"])["_abs"].sum()
    return [
        (int(l), int(f)) for l, f in total.sort_values(ascending=False, kind="stable").index[:n]
    ]


def plot_layer_curves(layers: pd.DataFrame, keys: list[tuple[int, int]]):
    """Per-layer attribution (sum of the layer's head scores), Method A and B, one line per feature."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    methods = [
        (c, t)
        for c, t in (("score_a", "Method A (noising)"), ("score_b", "Method B (denoising)"))
        if c in layers and layers[c].notna().any()
    ]
    fig = Figure(figsize=(4.6 * max(1, len(methods)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(methods)), squeeze=False)[0]
    for ax, (col, title) in zip(axes, methods):
        for layer, feature in keys:
            r = layers[
                (layers["feature_layer"] == layer) & (layers["feature"] == feature)
            ].sort_values("layer")
            (line,) = ax.plot(r["layer"], r[col], marker="o", ms=3, label=f"L{layer}/F{feature}")
            exact = "exact" if col == "score_a" else "exact_denoising"
            if exact in r and r[exact].notna().any():
                ax.plot(r["layer"], r[exact], ls=":", color=line.get_color())
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("attribution (sum over heads)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    return fig


def plot_head_heatmaps(heads: pd.DataFrame, keys: list[tuple[int, int]]):
    """A layer x head heatmap of each feature's scores (diverging, symmetric around 0)."""
    from matplotlib.figure import Figure

    col = score_column(heads)
    fig = Figure(figsize=(3.4 * max(1, len(keys)), 3.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    for ax, (layer, feature) in zip(axes, keys):
        r = heads[(heads["feature_layer"] == layer) & (heads["feature"] == feature)]
        grid = r.pivot_table(index="layer", columns="head", values=col, aggfunc="mean").sort_index()
        m = float(np.nanmax(np.abs(grid.to_numpy()))) if grid.size else 1.0
        im = ax.imshow(
            grid.to_numpy(),
            cmap="RdBu_r",
            vmin=-(m or 1.0),
            vmax=m or 1.0,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
        )
        ax.set_yticks(range(len(grid.index)), [str(v) for v in grid.index])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"L{layer}/F{feature} ({'A' if col == 'score_a' else 'B'})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def top_heads(heads: pd.DataFrame, layer: int, feature: int, n: int = 3) -> str:
    col = score_column(heads)
    r = heads[(heads["feature_layer"] == layer) & (heads["feature"] == feature)]
    r = r.reindex(r[col].abs().sort_values(ascending=False, kind="stable").index).head(n)
    return ", ".join(
        f"L{int(a)}H{int(b)} ({fmt(s)})" for a, b, s in zip(r["layer"], r["head"], r[col])
    )


def attribution_section(run_dir: Path) -> Section:
    """Curves, heatmaps, per-feature summary and overlays of the attribution stage."""
    section = Section(
        "attribution",
        "Attribution to attention heads",
        intro="Attribution patching from each head's o_proj input to the feature's objective (the layer-L "
        "residual projected on its decoder direction). Clean run = image + question; corrupt run = the "
        "layer-0 image-token embeddings replaced by their mean. Method A = (o_corr − o_clean)·∇m at the "
        "clean run; Method B = (o_clean − o_corr)·∇m at the corrupt run. Dotted lines: exact patching.",
    )
    out, plots = run_dir / "attribution", run_dir / "report"
    heads = read(HEADS, run_dir, section)
    layers = read(LAYERS, run_dir, section)
    summary = read_json(out / "summary.json", run_dir, section)
    overlays = sorted((out / "overlays").glob("*.png")) if (out / "overlays").is_dir() else []
    if heads is None and layers is None and summary is None and not overlays:
        if not section.warnings:
            section.status = NOT_RUN
            section.notes.append(
                f"The attribution stage has not run (no {HEADS.rel()})."
            )
        return section

    if heads is not None and not heads.empty:
        keys = plotted_features(heads)
        block = Block("Per-layer curves and head heatmaps")
        if len(keys) < heads.groupby(["feature_layer", "feature"]).ngroups:
            block.notes.append(f"Showing the {len(keys)} features with the largest total |score|.")
        if layers is not None and not layers.empty:
            fig = ensure_plot(
                plots / "attribution_layers.png",
                lambda p: save_png(plot_layer_curves(layers, keys), p),
                "Per-layer attribution",
                "Sum of each layer's head scores, per feature.",
                section,
                run_dir,
                [LAYERS.path_in(run_dir)],
            )
            block.figures += [fig] if fig else []
        fig = ensure_plot(
            plots / "attribution_heads.png",
            lambda p: save_png(plot_head_heatmaps(heads, keys), p),
            "Head scores (layer x head)",
            "Red = the head raises the feature's objective under the method, blue = lowers it.",
            section,
            run_dir,
            [HEADS.path_in(run_dir)],
        )
        block.figures += [fig] if fig else []
        section.blocks.append(block)
        section.blocks.append(_summary_block(run_dir, heads, summary))
    elif summary is not None:
        section.blocks.append(_summary_block(run_dir, None, summary))
    if overlays:
        section.blocks.append(_overlay_block(run_dir, overlays))
    return section


def _summary_block(run_dir: Path, heads: pd.DataFrame | None, summary: Any) -> Block:
    block = Block("Per-feature summary")
    rows: list[dict[str, Any]] = []
    feats = summary.get("features") if isinstance(summary, dict) else None
    if isinstance(feats, list):
        rows = [f for f in feats if isinstance(f, dict) and "feature_layer" in f and "feature" in f]
        block.notes.append(
            f"Objective: {summary.get('objective', '–')!s}; positions: {summary.get('positions', '–')!s}; "
            f"top-k samples: {summary.get('top_k', '–')!s}."
        )
        skipped = summary.get("skipped_no_activation") or []
        if skipped:
            block.notes.append(
                f"Skipped (never activated on the records): {', '.join(map(str, skipped))}."
            )
    elif heads is not None:
        rows = [
            {"feature_layer": l, "feature": f}
            for l, f in heads[["feature_layer", "feature"]]
            .drop_duplicates()
            .itertuples(index=False)
        ]
    if not rows:
        return block
    df = pd.DataFrame(rows)
    if heads is not None:
        df["top_heads"] = [
            top_heads(heads, l, f) for l, f in zip(df["feature_layer"], df["feature"])
        ]
    block.tables.append(
        frame_table(
            df,
            "Features attributed",
            [
                "feature",
                "n_samples",
                "top_heads",
                "mean_m_clean",
                "mean_m_corrupt",
                "spearman_a_vs_exact",
                "spearman_b_vs_exact_denoising",
                "attribution_seconds",
                "exact_seconds",
                "speed_ratio",
            ],
            max_rows=200,
            caption="top heads by |score| (Method A, else B); Spearman = rank correlation with exact patching; "
            "speed ratio = exact / attribution seconds.",
            cell=lambda c, v, r: (
                dashboard_link(run_dir, r["feature_layer"], v) if c == "feature" else None
            ),
        )
    )
    return block


def _overlay_block(run_dir: Path, overlays: list[Path]) -> Block:
    block = Block("Attention overlays")
    by_feature: dict[tuple[int, int], list[tuple[str, Path]]] = {}
    for path in overlays:
        m = OVERLAY_NAME.match(path.name)
        if m:
            by_feature.setdefault((int(m.group(1)), int(m.group(2))), []).append((m.group(3), path))
    for (layer, feature), items in list(by_feature.items())[:MAX_OVERLAY_FEATURES]:
        for name, path in items:
            block.figures.append(
                png_figure(
                    path,
                    f"L{layer}/F{feature}: {name}",
                    "Head attention from the objective positions onto the image.",
                )
            )
    if len(by_feature) > MAX_OVERLAY_FEATURES:
        block.notes.append(
            f"Overlays of {len(by_feature) - MAX_OVERLAY_FEATURES} more features are in attribution/overlays/ "
            "and on the feature dashboards."
        )
    return block
