"""Held-out detection of both explanations of a feature, on the same records, so a report can put
them side by side (docs/method.md#grounded-explanations).

The records are the grounding records (`interp.grounding`, not the ones the features were selected
or explained on), re-run once for every feature (`interp.grounded.observe`). A record is
"activating" for a feature when the feature fires on it (max activation over its image and text
positions > 0). Per feature, up to `MAX_EACH` activating and `MAX_EACH` non-activating records,
evenly spaced in record order, make its detection sample; both explanations predict "activating"
on that one sample:

- the grounded explanation predicts it where the record holds its concept (the first grounded
  concept, or the best candidate when none was found; a record whose source does not annotate the
  concept's kind does not hold it);
- an LLM explanation is judged by the LLM, delphi-style (`interp.scoring.DetectionScorer`), from
  what a judge can read of each record: its question and the annotated concepts present (the same
  annotations the grounded explanation is scored on, so neither side sees more of the image).

Both give balanced accuracy (chance 0.5) with an Agresti-Caffo 95% interval (one success and one
failure added to each class before the normal approximation; `balanced_accuracy_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmdiff.interp.grounded import GroundedExplanation, HeldOut
from mmdiff.interp.scoring import DetectionMetrics, detection_metrics

MAX_EACH = 20  # activating and non-activating records per feature's detection sample
Z95 = 1.959963984540054


def detection_sample(fires: np.ndarray, max_each: int = MAX_EACH) -> np.ndarray | None:
    """Indices of up to `max_each` records where the feature fires and up to `max_each` where it
    does not (evenly spaced, record order); None when either class is empty (nothing to detect)."""
    fires = np.asarray(fires, dtype=bool)
    picked = []
    for idx in (np.flatnonzero(fires), np.flatnonzero(~fires)):
        if not len(idx):
            return None
        step = -(-len(idx) // max_each)
        picked.append(idx[::step])
    return np.sort(np.concatenate(picked))


def balanced_accuracy_interval(m: DetectionMetrics, z: float = Z95) -> tuple[float, float]:
    """Agresti-Caffo 95% interval of the balanced accuracy (TPR + TNR) / 2: each rate estimated with
    one success and one failure added, normal approximation, clipped to [0, 1]."""
    pos, neg = m.tp + m.fn, m.tn + m.fp
    tpr, tnr = (m.tp + 1) / (pos + 2), (m.tn + 1) / (neg + 2)
    centre = (tpr + tnr) / 2
    half = z * 0.5 * math.sqrt(tpr * (1 - tpr) / (pos + 2) + tnr * (1 - tnr) / (neg + 2))
    return max(0.0, centre - half), min(1.0, centre + half)


def detection_summary(m: DetectionMetrics) -> dict[str, Any]:
    """JSON-ready: balanced accuracy, its 95% interval, the confusion counts and n."""
    lo, hi = balanced_accuracy_interval(m)
    return {"balanced_accuracy": m.balanced_accuracy, "ci_lo": lo, "ci_hi": hi,
            "tp": m.tp, "fn": m.fn, "tn": m.tn, "fp": m.fp, "n": m.tp + m.fn + m.tn + m.fp}


def describe_detection(d: Mapping[str, Any] | None) -> str:
    """ "0.81 [0.66, 0.92], 40 records" for a `detection_summary`, or why none was measured."""
    if not d:
        return "not measured"
    if d.get("reason"):
        return str(d["reason"])
    return f"{d['balanced_accuracy']:.2f} [{d['ci_lo']:.2f}, {d['ci_hi']:.2f}], {int(d['n'])} records"


NOT_MEASURABLE = "not measurable: the feature fires on every held-out record or on none"


def judge_text(held: HeldOut, i: int) -> str:
    """What the LLM judge reads of held-out record i: its question and the annotated concepts present."""
    concepts = ", ".join(sorted(held.present[i])) or "none"
    return f"{held.records[i].question} [annotated in this record: {concepts}]"


def grounded_detection(held: HeldOut, f: int, g: GroundedExplanation, max_each: int = MAX_EACH) -> dict[str, Any]:
    """Held-out detection of feature f's grounded explanation: its concept (the first found, else the
    best candidate) predicts "fires"; a `detection_summary` with "concept" and "found", or a reason."""
    best = g.concepts[0] if g.concepts else (g.candidates[0] if g.candidates else None)
    if best is None:
        return {"reason": "no concept could be scored"}
    idx = detection_sample(held.maxima[:, f] > 0, max_each)
    if idx is None:
        return {"concept": best.concept, "found": g.found, "reason": NOT_MEASURABLE}
    labels = [bool(held.maxima[i, f] > 0) for i in idx]
    predictions = [best.concept in held.present[i] for i in idx]
    return {"concept": best.concept, "found": g.found, **detection_summary(detection_metrics(labels, predictions))}


def llm_detection_items(held: HeldOut, f: int, max_each: int = MAX_EACH) -> tuple[list[str], list[str]] | None:
    """(activating, non-activating) judge texts of feature f's detection sample, or None."""
    idx = detection_sample(held.maxima[:, f] > 0, max_each)
    if idx is None:
        return None
    fires = held.maxima[:, f] > 0
    return ([judge_text(held, i) for i in idx if fires[i]], [judge_text(held, i) for i in idx if not fires[i]])


def score_llm_explanations(scorer: Any, explanations: Mapping[Any, Any], keys: Sequence[Any], held: HeldOut,
                           *, max_each: int = MAX_EACH, seed: int = 0, progress: bool = False) -> dict[Any, Any]:
    """Each LLM explanation of `explanations` (feature key -> Explanation) with its held-out detection
    (`Explanation.with_detection`, interval included), judged by `scorer` (a DetectionScorer) on the
    same records as the grounded one; explanations without a sample are returned unchanged."""
    column = {key: f for f, key in enumerate(keys)}
    plan = []
    for key, ex in explanations.items():
        items = llm_detection_items(held, column[key], max_each)
        if items is not None:
            plan.append((key, ex, *items))
    results = scorer.score_many([(ex, a, n) for _, ex, a, n in plan], seed=seed, progress=progress) if plan else []
    out = dict(explanations)
    for (key, ex, _, _), r in zip(plan, results):
        lo, hi = balanced_accuracy_interval(r.metrics)
        out[key] = ex.with_detection(r.metrics.balanced_accuracy, len(r.labels), ci=(lo, hi))
    return out
