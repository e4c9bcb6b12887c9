"""The report's first screen: the five questions of a study, each answered in one line with its
number and interval, computed from the same artifacts as the evidence sections below.

1. What did fine-tuning change? (the adapted set: `diff.DIFF`)
2. Which features carry each task? (the task sets: `detect.TASK_FEATURES`)
3. Which heads drive them? (attribution: `attribution.frames.HEADS`, the head-concentration finding)
4. What does removing or steering them do, against controls? (`control.removal.EFFECTS`: each set's
   selectivity on its own task, its effect minus the matched random control's; `control.steering`:
   feature steering minus single-layer steering)
5. What do they mean? (interp/explanations.json: held-out detection and grounded concepts;
   `interp.grounded.MATCH_SHARE`: task features explained by a concept of their task's kind)

An answer whose artifact is missing says so ("not run") instead of a number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmdiff.report.findings import Finding, no_room, tie_at_bound
from mmdiff.report.sections._common import Section, fmt, read, read_json


@dataclass
class Answer:
    question: str
    answer: str
    href: str  # the evidence section
    status: str | None = None  # the finding's status beside it, when one finding decides it


def _status(found: list[Finding], *keys: str) -> str | None:
    states = [f.status for f in found if f.key in keys]
    if not states:
        return None
    return states[0] if len(set(states)) == 1 else None  # mixed: the findings table says which


def what_changed(run_dir: Path, section: Section) -> str:
    from mmdiff.diff import DIFF

    diff = read(DIFF, run_dir, section)
    if diff is None or diff.empty:
        return "not run (no adapted-feature table)"
    sel = diff[diff["selected"].astype(bool)]
    n, k = len(diff), len(sel)
    by_layer = sel.groupby("layer").size().sort_values(ascending=False, kind="stable")
    where = f"; most in layer {int(by_layer.index[0])} ({int(by_layer.iloc[0])})" if len(by_layer) else ""
    gap = (
        f", median decoder cosine to the base SAE {fmt(float(sel['decoder_cosine'].median()), 2)}"
        if k and "decoder_cosine" in sel
        else ""
    )
    return f"{k:,} of {n:,} SAE features ({k / n:.1%}) adapted to images{where}{gap}."


def which_features(run_dir: Path, section: Section) -> str:
    from mmdiff.detect import TASK_FEATURES
    from mmdiff.diff import ADAPTED

    parts = []
    for task in TASK_FEATURES.found(run_dir):
        if task == Path(ADAPTED.path).stem:
            continue
        df = read(TASK_FEATURES, run_dir, section, task=task)
        if df is None:
            continue
        dp = (
            f" (Δp median {float(df['delta_p'].median()):+.2f})"
            if len(df) and "delta_p" in df
            else ""
        )
        parts.append(f"{task} {len(df):,}{dp}")
    if not parts:
        return "not run (no task-feature tables)"
    return "Features firing more on the task than on generic VQA: " + ", ".join(parts) + "."


def which_heads(run_dir: Path, found: list[Finding]) -> str:
    from mmdiff.attribution.frames import HEADS

    heads, why = HEADS.read(run_dir)[:2]
    if heads is None or heads.empty:
        return "not run (no attribution)"
    col = "score_a" if heads["score_a"].notna().any() else "score_b"
    total = heads.assign(a=heads[col].abs()).groupby(["layer", "head"])["a"].sum()
    top = total.sort_values(ascending=False, kind="stable").head(3)
    names = ", ".join(f"L{int(layer)}.H{int(head)}" for layer, head in top.index)
    n_feat = heads.groupby(["feature_layer", "feature"]).ngroups
    conc = next((f for f in found if f.key == "attribution_heads"), None)
    share = f"; {conc.measured}" if conc is not None and conc.measured != "–" else ""
    return f"Top heads over {n_feat} attributed features: {names}{share}."


def _interval(mean: Any, lo: Any, hi: Any) -> str:
    from mmdiff.report.sections.control import interval

    return interval(mean, lo, hi)


def what_removal_does(run_dir: Path, section: Section) -> str:
    from mmdiff.control.removal import EFFECTS, REMOVAL
    from mmdiff.control.steering import STEERING

    effects = read(EFFECTS, run_dir, section)
    parts = []
    if effects is not None and not effects.empty:
        own = effects[(effects["kind"] == REMOVAL) & (effects["eval_task"] == effects["target_task"])]
        for name, g in own.groupby("target_task", sort=False):
            r = g.iloc[0]
            if pd.notna(r["selectivity"]):
                parts.append(f"{name} {_interval(r['selectivity'], r['selectivity_ci_lo'], r['selectivity_ci_hi'])}")
            else:
                parts.append(f"{name} {_interval(r['effect'], r['ci_lo'], r['ci_hi'])} (no control)")
    text = ("Removing a set, beyond matched random features, on its own task: " + "; ".join(parts)) if parts else ""
    summary = (read_json(STEERING.path_in(run_dir).with_suffix(".json"), run_dir, section) or {}).get("summary", {})
    steer = []
    table = STEERING.read(run_dir)[0] if summary else None
    for task, s in summary.items() if isinstance(summary, Mapping) else []:
        d = s.get("feature_minus_baseline_test") if isinstance(s, Mapping) else None
        if not isinstance(d, Mapping):
            continue
        rows = table[table["task"].astype(str) == str(task)] if table is not None else None
        has_rows = rows is not None and not rows.empty
        if has_rows and no_room(rows) is not None:
            # at the ceiling (floor for the attack success rate) a difference of 0 [0, 0] is no
            # measurement: the findings table says "not testable" with the reason
            steer.append(f"{task} not testable (clean score at its bound)")
        else:
            # a tie at the bound is a measurement, but a bare 0 [0, 0] does not say so
            tie = tie_at_bound(rows) if has_rows else None
            steer.append(f"{task} {_interval(d.get('mean'), d.get('lo'), d.get('hi'))}" + (f", {tie}" if tie else ""))
    if steer:
        text += (". " if text else "") + "Feature minus single-layer steering: " + "; ".join(steer)
    return (text + ".") if text else "not run (no effects or steering tables)"


def what_they_mean(run_dir: Path, explanations: Mapping[str, Any], notes: Section) -> str:
    """How many features were explained and grounded, and per task the share of its features whose
    best grounded concept is of the task's kind: read from interp/match_share.parquet, the table
    the "Task features" section shows, so both print the same counts and intervals."""
    from mmdiff.interp.grounded import MATCH_SHARE

    if not explanations:
        return "not run (no explanations)"
    exps = list(explanations.values())
    grounded = [e for e in exps if isinstance(getattr(e, "grounded", None), Mapping)]
    found = sum(bool(e.grounded.get("found")) for e in grounded)
    det = [e.detection for e in exps if isinstance(e.detection, (int, float)) and not np.isnan(e.detection)]
    text = f"{len(exps):,} features explained"
    if grounded:
        text += f"; {found} of {len(grounded)} grounded in an annotated concept (held-out IoU and AUROC)"
        share = read(MATCH_SHARE, run_dir, notes)
        rows = [] if share is None else [r for r in share.itertuples() if r.task != "all"]
        if rows:
            text += "; task features whose concept is of the task's kind: " + ", ".join(
                f"{r.task} {r.matched}/{r.features} [{r.ci_lo:.2f}, {r.ci_hi:.2f}]" for r in rows
            )
    if det:
        text += f"; held-out detection median {np.median(det):.2f} (balanced accuracy)"
    else:
        text += "; no held-out detection score measured"
    return text + "."


def answers(
    run_dir: Path, explanations: Mapping[str, Any], found: list[Finding]
) -> tuple[list[Answer], list[str]]:
    """The five answers, and the warnings met while reading (shown in the summary)."""
    from mmdiff.report.sections._common import guarded

    notes = Section("summary", "Summary")

    def safe(compute: Any) -> str:
        return guarded(compute, lambda why: f"could not be computed ({why})")

    out = [
        Answer("What did fine-tuning change?", safe(lambda: what_changed(run_dir, notes)), "#adapted",
               _status(found, "adapted_share")),
        Answer("Which features carry each task?", safe(lambda: which_features(run_dir, notes)), "#tasks"),
        Answer("Which heads drive them?", safe(lambda: which_heads(run_dir, found)), "#attribution",
               _status(found, "attribution_heads")),
        Answer("What does removing or steering them do, against controls?",
               safe(lambda: what_removal_does(run_dir, notes)), "#control",
               _status(found, "removal_spatial", "removal_ocr", "removal_asr")),
        Answer("What do they mean?", safe(lambda: what_they_mean(run_dir, explanations, notes)), "#browser"),
    ]  # fmt: skip
    return out, notes.warnings
