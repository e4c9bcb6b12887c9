"""Plots of the diff and detection tables (analogues of the seed paper's Figures 2, 3, 8 and 9).

Each function takes the DataFrames of `mmdiff.diff` / `mmdiff.detect` and an output path, writes one
image atomically (format from the suffix: .png, .svg, .pdf) and returns the path. Figures are
built with `matplotlib.figure.Figure`, never pyplot, so no global backend or state is touched.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mmdiff.atomic import atomic_path
from mmdiff.detect import DETECT
from mmdiff.diff import ADAPTED_PER_LAYER, DIFF
from mmdiff.errors import DataError

GREY, PINK = "#b0b0b0", "#e7298a"
TASK_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#66a61e", "#e6ab02", "#a6761d")


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{what} needs columns {missing}, the table has {list(df.columns)}; pass the table of "
            "mmdiff.diff.adapted_features / mmdiff.detect.task_features"
        )


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
    return path


def plot_gap_vs_cosine(
    diff: pd.DataFrame, path: str | Path, task_features: Mapping[str, pd.DataFrame] | None = None
) -> Path:
    """Variance gap against decoder cosine for every feature; the adapted set and task sets marked."""
    _require(diff, ["layer", "feature", "variance_gap", "decoder_cosine", "selected"], "plot_gap_vs_cosine")
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    rest = diff[~diff["selected"]]
    ax.scatter(rest["decoder_cosine"], rest["variance_gap"], s=3, c=GREY, alpha=0.5, lw=0, rasterized=True,
               label=f"all features ({len(diff)})")
    sel = diff[diff["selected"]]
    ax.scatter(sel["decoder_cosine"], sel["variance_gap"], s=8, c=PINK, lw=0, label=f"adapted set ({len(sel)})")
    for colour, (name, tf) in zip(TASK_COLOURS, (task_features or {}).items()):
        _require(tf, ["layer", "feature", "kept"], "plot_gap_vs_cosine task table")
        kept = tf.loc[tf["kept"].fillna(False).astype(bool), ["layer", "feature"]]
        pts = diff.merge(kept, on=["layer", "feature"])
        ax.scatter(pts["decoder_cosine"], pts["variance_gap"], s=28, facecolors="none", edgecolors=colour,
                   lw=1.2, label=f"{name} ({len(pts)})")
    if "gap_threshold" in diff.attrs:
        ax.axhline(diff.attrs["gap_threshold"], color="k", ls=":", lw=0.8)
    if "cosine_threshold" in diff.attrs:
        ax.axvline(diff.attrs["cosine_threshold"], color="k", ls=":", lw=0.8)
    linthresh = _linthresh(diff["variance_gap"])
    ax.set_yscale("symlog", linthresh=linthresh)
    _symlog_ticks(ax, linthresh)
    ax.set_xlabel("decoder cosine $c_f$ (base vs adapted)")
    ax.set_ylabel(r"variance gap $\Delta_f = E_{vision}[h_f^2] - E_{text}[h_f^2]$")
    ax.set_title("Adapted features: variance gap vs decoder cosine")
    ax.legend(loc="best", fontsize=8, markerscale=2)
    return _save(fig, path)


def _symlog_ticks(ax, linthresh: float) -> None:
    """Major ticks at 0 and at the powers of ten at least ten times `linthresh`, no minor labels:
    matplotlib's default symlog ticks put +-linthresh and 0 on top of one another."""
    from matplotlib.ticker import FixedLocator, NullLocator

    lo, hi = ax.get_ylim()
    first = math.ceil(math.log10(10 * linthresh))
    top = max(abs(lo), abs(hi))
    ticks = [0.0]
    for k in range(first, first + 40):
        t = 10.0**k
        if t > top:
            break
        ticks += [v for v in (t, -t) if lo <= v <= hi]
    ax.yaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.yaxis.set_minor_locator(NullLocator())


def _no_minor_labels(ax) -> None:
    """Log axes spanning under two decades label their minor ticks too, and the labels collide."""
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())


def _linthresh(values: pd.Series) -> float:
    v = np.abs(values.to_numpy(dtype=float))
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.quantile(v, 0.1)) if len(v) else 1.0


def plot_firing_distributions(detect: pd.DataFrame, path: str | Path) -> Path:
    """Distribution of firing frequencies over features, base split vs task split (seed Fig. 3a)."""
    _require(detect, ["p_task", "p_base"], "plot_firing_distributions")
    task_name = str(detect["task"].iloc[0]) if "task" in detect.columns and len(detect) else "task"
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    pos = np.concatenate([detect["p_task"].to_numpy(), detect["p_base"].to_numpy()])
    pos = pos[np.isfinite(pos) & (pos > 0)]
    if len(pos) == 0:
        raise DataError("plot_firing_distributions: no feature fired in either split; nothing to plot")
    bins = np.logspace(np.log10(pos.min()), np.log10(pos.max()) + 1e-9, 50)
    for col, colour, label in (("p_base", GREY, "base"), ("p_task", PINK, task_name)):
        p = detect[col].to_numpy()
        ax.hist(p[p > 0], bins=bins, histtype="stepfilled" if col == "p_base" else "step", color=colour,
                lw=1.5, label=f"{label} (silent features: {int((p == 0).sum())})")
    ax.set_xscale("log")
    _no_minor_labels(ax)
    ax.set_yscale("log")
    ax.set_xlabel("firing frequency $p_f$")
    ax.set_ylabel("features")
    ax.set_title(f"Firing frequencies: base vs {task_name}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_adapted_firing(detect: pd.DataFrame, path: str | Path) -> Path:
    """p_base vs p_task of the adapted features, task features highlighted (seed Fig. 3b)."""
    _require(detect, ["p_task", "p_base", "in_adapted_set", "kept"], "plot_adapted_firing")
    if detect["in_adapted_set"].isna().all():
        raise DataError("plot_adapted_firing needs a task table computed with the adapted set (adapted=...)")
    ad = detect[detect["in_adapted_set"].fillna(False).astype(bool)]
    kept = ad[ad["kept"]]
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot()
    eps = _floor(ad)
    ax.scatter(ad["p_base"] + eps, ad["p_task"] + eps, s=6, c=GREY, lw=0, label=f"adapted ({len(ad)})")
    ax.scatter(kept["p_base"] + eps, kept["p_task"] + eps, s=18, c=PINK, lw=0, label=f"task features ({len(kept)})")
    lo, hi = eps, max(1.0, float(np.nanmax(ad[["p_base", "p_task"]].to_numpy(), initial=eps)))
    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
    ax.set_xscale("log")
    _no_minor_labels(ax)
    ax.set_yscale("log")
    ax.set_xlabel("$p_f$ on base split")
    ax.set_ylabel("$p_f$ on task split")
    ax.set_title("Adapted features under both splits")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _floor(df: pd.DataFrame) -> float:
    """A small offset so features that never fire still show on log axes."""
    v = df[["p_base", "p_task"]].to_numpy().ravel()
    v = v[np.isfinite(v) & (v > 0)]
    return float(v.min() / 2) if len(v) else 1e-6


def plot_task_candidates(detect: pd.DataFrame, path: str | Path) -> Path:
    """Delta p vs log odds ratio of every feature; candidates, adapted and kept features marked (Fig. 9)."""
    _require(detect, ["delta_p", "odds_ratio", "candidate", "kept"], "plot_task_candidates")
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    log_or = np.log(detect["odds_ratio"].to_numpy())
    groups = [(np.ones(len(detect), bool), GREY, 3, "all features")]
    groups.append((detect["candidate"].to_numpy(bool), "#7570b3", 8, "candidates"))
    if "in_adapted_set" in detect.columns and not detect["in_adapted_set"].isna().all():
        groups.append(((detect["candidate"] & detect["in_adapted_set"].fillna(False)).to_numpy(bool), "#1b9e77", 12,
                       "candidates in adapted set"))
    groups.append((detect["kept"].to_numpy(bool), PINK, 22, "task features"))
    for mask, colour, size, label in groups:
        ax.scatter(detect["delta_p"].to_numpy()[mask], log_or[mask], s=size, c=colour, lw=0,
                   rasterized=label == "all features", label=f"{label} ({int(mask.sum())})")
    ax.axhline(0.0, color="k", ls=":", lw=0.8)
    ax.axvline(detect.attrs.get("min_delta_p", 0.0), color="k", ls=":", lw=0.8)
    ax.set_xlabel(r"$\Delta p_f = p_f(D_{task}) - p_f(D_{base})$")
    ax.set_ylabel(r"$\log OR_f$ (+0.5 smoothed)")
    ax.set_title(f"Task candidates: {detect.attrs.get('task', '')}".rstrip(": "))
    ax.legend(fontsize=8, markerscale=1.5)
    return _save(fig, path)


def plot_adapted_per_layer(per_layer: pd.DataFrame, path: str | Path) -> Path:
    """Adapted features per layer and their mean decoder cosine (seed Fig. 8a/8b)."""
    _require(per_layer, ["layer", "n_adapted", "mean_cosine_adapted", "mean_cosine_all"], "plot_adapted_per_layer")
    fig = Figure(figsize=(9.0, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    x = per_layer["layer"].to_numpy()
    ax1.bar(x, per_layer["n_adapted"], color=PINK)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("adapted features")
    ax1.set_title("Adapted features per layer")
    ax2.plot(x, per_layer["mean_cosine_adapted"], "o-", color=PINK, label="adapted set")
    ax2.plot(x, per_layer["mean_cosine_all"], "s--", color=GREY, label="all features")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("mean decoder cosine")
    ax2.set_title("Mean decoder cosine per layer")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(x)
    return _save(fig, path)


def write_feature_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Report stage: every plot above from a run directory's tables, into `out_dir` (default run/report).

    Reads `diff.DIFF` and `diff.ADAPTED_PER_LAYER` (stats/diff.parquet, stats/adapted_per_layer.parquet)
    and each `detect.DETECT` (stats/detect_{task}.parquet); tables that do not exist are skipped, so
    the report can be drawn after the diff alone.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    tasks = {t: pd.read_parquet(DETECT.path_in(run_dir, task=t)) for t in DETECT.found(run_dir)}
    written: dict[str, Path] = {}
    if DIFF.path_in(run_dir).is_file():
        diff = pd.read_parquet(DIFF.path_in(run_dir))
        written["gap_vs_cosine"] = plot_gap_vs_cosine(diff, out / "gap_vs_cosine.png", tasks)
    if ADAPTED_PER_LAYER.path_in(run_dir).is_file():
        per_layer = pd.read_parquet(ADAPTED_PER_LAYER.path_in(run_dir))
        written["adapted_per_layer"] = plot_adapted_per_layer(per_layer, out / "adapted_per_layer.png")
    for name, table in tasks.items():
        written[f"{name}_firing"] = plot_firing_distributions(table, out / f"{name}_firing.png")
        written[f"{name}_candidates"] = plot_task_candidates(table, out / f"{name}_candidates.png")
        if not table["in_adapted_set"].isna().all():
            written[f"{name}_adapted_firing"] = plot_adapted_firing(table, out / f"{name}_adapted_firing.png")
    if not written:
        raise DataError(f"no diff or detection tables under {run_dir / 'stats'}; run the diff and detect stages first")
    return written
