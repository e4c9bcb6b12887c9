"""The report's feature browser: one compact JSON record per feature, drawn into a card by the
page's inline script (templates/report.js) when a reader searches or picks a feature, task or head.

A record gathers what the run holds of the feature: the tasks whose sets hold it, the scores that
selected it (its row of features/{task}.parquet and of the diff table), its explanation with the
explanation's measured scores only (held-out detection, grounded concepts with IoU and AUROC), its
top examples from interp/cards.json (`interp.cards`), its top attribution heads and the effects of
removing each task set that holds it. The JSON is written into the page with <, > and & escaped,
so no dataset text can close the script element.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmdiff.interp.heldout import describe_detection
from mmdiff.report.sections._common import Section, feature_label, fmt, fmt_p, read

TOP_HEADS = 5
MAX_ADAPTED = 60  # adapted features listed beyond the task features (by variance gap)
TASK_SCORES = ("p_task", "p_base", "delta_p", "odds_ratio", "q_value", "neutral_image_share")
DIFF_SCORES = ("variance_gap", "decoder_cosine", "gap_rank", "firing_frequency_vision", "firing_frequency_text")


def _scores(row: pd.Series, columns: tuple[str, ...]) -> list[list[str]]:
    return [[c, fmt_p(row[c]) if c == "q_value" else fmt(row[c])] for c in columns if c in row.index]


def _grounded(g: Any) -> str | None:
    if not isinstance(g, Mapping):
        return None
    if not g.get("text"):
        return None
    d = g.get("detection")
    if isinstance(d, Mapping) and d.get("concept"):
        return f"{g['text']}; held-out detection of {d['concept']}: {describe_detection(d)} (balanced accuracy [95%])"
    return str(g["text"])


def feature_records(run_dir: Path, explanations: Mapping[str, Any], section: Section) -> list[dict[str, Any]]:
    """Every feature the run selected (task features first, then the top adapted ones)."""
    from mmdiff.control.removal import EFFECTS, REMOVAL
    from mmdiff.detect import TASK_FEATURES
    from mmdiff.diff import ADAPTED, DIFF
    from mmdiff.interp.cards import CARDS_FILE, read_cards
    from mmdiff.report.sections.control import interval

    records: dict[str, dict[str, Any]] = {}

    def entry(layer: Any, feature: Any) -> dict[str, Any]:
        fid = feature_label(layer, feature)
        if fid not in records:
            records[fid] = {"id": fid, "layer": int(layer), "feature": int(feature), "tasks": [], "scores": []}
        return records[fid]

    adapted_stem = Path(ADAPTED.path).stem
    for task in TASK_FEATURES.found(run_dir):
        if task == adapted_stem:
            continue
        df = read(TASK_FEATURES, run_dir, section, task=task)
        if df is None or df.empty:
            continue
        if "odds_ratio" in df:
            df = df.sort_values("odds_ratio", ascending=False, kind="stable")
        for _, r in df.iterrows():
            e = entry(r["layer"], r["feature"])
            e["tasks"].append(task)
            e["scores"].append({"table": f"{task} task features", "rows": _scores(r, TASK_SCORES)})
    diff = read(DIFF, run_dir, section)
    if diff is not None and not diff.empty:
        selected = diff[diff["selected"].astype(bool)].sort_values("variance_gap", ascending=False, kind="stable")
        listed = set(records)
        extra = 0
        for _, r in selected.iterrows():
            fid = feature_label(r["layer"], r["feature"])
            if fid not in listed:
                if extra >= MAX_ADAPTED:
                    continue
                extra += 1
            e = entry(r["layer"], r["feature"])
            e["tasks"].append("adapted")
        keys = {(e["layer"], e["feature"]) for e in records.values()}
        rows = diff[[(int(a), int(b)) in keys for a, b in zip(diff["layer"], diff["feature"])]]
        for _, r in rows.iterrows():
            records[feature_label(r["layer"], r["feature"])]["scores"].append(
                {"table": "adaptation (diff)", "rows": _scores(r, DIFF_SCORES)}
            )
    for fid, ex in explanations.items():
        if fid in records:
            records[fid]["explanation"] = {
                "description": str(ex.description),
                "score": ex.measured_score(),
                "grounded": _grounded(getattr(ex, "grounded", None)),
            }
    heads_path = run_dir / "attribution" / "heads.parquet"
    if heads_path.is_file():
        heads = pd.read_parquet(heads_path)
        if {"feature_layer", "feature", "layer", "head", "score_a"} <= set(heads.columns):
            for (fl, f), g in heads.groupby(["feature_layer", "feature"], sort=False):
                fid = feature_label(fl, f)
                if fid in records:
                    top = g.reindex(g["score_a"].abs().sort_values(ascending=False, kind="stable").index).head(TOP_HEADS)
                    records[fid]["heads"] = [
                        [f"L{int(r.layer)}.H{int(r.head)}", f"{float(r.score_a):+.3g}"] for r in top.itertuples()
                    ]
    effects = read(EFFECTS, run_dir, section)
    if effects is not None and not effects.empty:
        own = effects[effects["kind"] == REMOVAL]
        for e in records.values():
            rows = own[own["target_task"].astype(str).isin(e["tasks"])]
            e["effects"] = [
                [str(r.target_task), f"{r.eval_task} ({r.metric})", interval(r.effect, r.ci_lo, r.ci_hi),
                 interval(r.selectivity, r.selectivity_ci_lo, r.selectivity_ci_hi)]
                for r in rows.itertuples()
            ]  # fmt: skip
    try:
        cards = read_cards(run_dir / "interp" / CARDS_FILE)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        section.warn(f"interp/{CARDS_FILE} could not be read ({exc}); re-run the interp stage")
        cards = {}
    for fid, e in records.items():
        c = cards.get(fid)
        if c is not None:
            e["examples"] = c.get("examples", [])
            if c.get("image_share") is not None:
                e["image_share"] = c["image_share"]
        else:
            e["no_examples"] = (
                f"No stored examples: interp/{CARDS_FILE} lacks this feature (the interp stage did not "
                "reach it, or ran before cards were stored)."
            )
        name = f"L{e['layer']}_F{e['feature']}.html"
        if (run_dir / "interp" / "dashboards" / name).is_file():
            e["dashboard"] = f"../interp/dashboards/{name}"
    return list(records.values())


def script_json(value: Any) -> str:
    """JSON safe inside <script type="application/json">: <, > and & as \\u escapes, no NaN."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
