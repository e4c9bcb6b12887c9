"""Held-out detection of grounded and LLM explanations on the same records (interp.heldout), and
the report's side-by-side columns."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_llm_client import FakeOpenAI, Reply, fast_config

from mmdiff.data import shapes
from mmdiff.data.records import Record
from mmdiff.interp.explain import Explanation
from mmdiff.interp.grounded import NO_CONCEPT, ConceptScore, GroundedExplanation, HeldOut
from mmdiff.interp.heldout import (
    NOT_MEASURABLE,
    balanced_accuracy_interval,
    describe_detection,
    detection_sample,
    grounded_detection,
    judge_text,
)
from mmdiff.interp.scoring import detection_metrics


def test_detection_sample_takes_both_classes_evenly():
    fires = np.array([True] * 50 + [False] * 7)
    idx = detection_sample(fires, max_each=20)
    assert (fires[idx].sum(), (~fires[idx]).sum()) == (17, 7)  # every 3rd of 50 firing ones, all 7 others
    assert list(idx[:3]) == [0, 3, 6] and list(idx) == sorted(idx)
    assert detection_sample(np.ones(5, bool)) is None and detection_sample(np.zeros(5, bool)) is None


def test_balanced_accuracy_interval_agresti_caffo_by_hand():
    m = detection_metrics([True] * 10 + [False] * 10, [True] * 8 + [False] * 2 + [False] * 9 + [True])
    assert m.balanced_accuracy == pytest.approx(0.85)
    lo, hi = balanced_accuracy_interval(m)
    # TPR (8+1)/12 = 0.75, TNR (9+1)/12 = 0.8333; half-width 1.96 * 0.5 * sqrt(.75*.25/12 + .8333*.1667/12)
    half = 1.959963984540054 * 0.5 * np.sqrt(0.75 * 0.25 / 12 + 0.8333333 * 0.1666667 / 12)
    assert (lo, hi) == pytest.approx((0.7916667 - half, 0.7916667 + half), abs=1e-6)
    perfect = detection_metrics([True, False], [True, False])
    assert balanced_accuracy_interval(perfect)[1] <= 1.0 and balanced_accuracy_interval(perfect)[0] > 0.0


def _score(concept: str) -> ConceptScore:
    return ConceptScore(concept, "image", 1.0, 1.0, 1.0, 3, 3, 3)


def test_grounded_detection_predicts_from_the_concepts_presence():
    records = tuple(Record(f"r{i}", f"q{i}?") for i in range(6))
    present = (frozenset({"text"}), frozenset({"text"}), frozenset(), frozenset({"text"}), frozenset(), frozenset())
    maxima = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.5, 0.0]])  # [R, n]
    held = HeldOut(records, present, (None,) * 6, maxima)
    found = GroundedExplanation((_score("text"),), (_score("text"),), 0.5)
    d = grounded_detection(held, 0, found)
    # fires on r0, r1, r5; "text" in r0, r1, r3: tp 2, fn 1, tn 2, fp 1
    assert (d["tp"], d["fn"], d["tn"], d["fp"], d["n"]) == (2, 1, 2, 1, 6) and d["concept"] == "text" and d["found"]
    assert d["balanced_accuracy"] == pytest.approx(2 / 3)
    assert describe_detection(d) == f"0.67 [{d['ci_lo']:.2f}, {d['ci_hi']:.2f}], 6 records"
    assert grounded_detection(held, 1, found) == {"concept": "text", "found": True, "reason": NOT_MEASURABLE}
    none = GroundedExplanation((), (), 0.5)
    assert grounded_detection(held, 0, none) == {"reason": "no concept could be scored"}
    assert judge_text(held, 0) == "q0? [annotated in this record: text]"
    assert judge_text(held, 2) == "q2? [annotated in this record: none]"


def test_report_columns_put_both_explanations_side_by_side():
    from mmdiff.report.sections.tasks import NO_LLM, _grounded_detection, _llm_detection

    detection = {"concept": "colour=red", "found": True, "balanced_accuracy": 0.9, "ci_lo": 0.75, "ci_hi": 0.97,
                 "tp": 18, "fn": 2, "tn": 18, "fp": 2, "n": 40}
    offline = Explanation("Fires on image tokens", source="offline", feature_id="L1/F1",
                          grounded={"text": "colour=red (...)", "found": True, "detection": detection})
    llm = Explanation("red objects", confidence=0.9, source="llm:m", feature_id="L1/F2").with_detection(
        0.8, 40, ci=(0.66, 0.9))
    unscored = Explanation("red objects", confidence=0.9, source="llm:m", feature_id="L1/F3",
                           grounded={"text": NO_CONCEPT, "found": False,
                                     "detection": {**detection, "found": False, "concept": "shape=cross"}})
    exps = {e.feature_id: e for e in (offline, llm, unscored)}
    assert _llm_detection(exps, 1, 1) == NO_LLM  # plainly: there is no LLM explanation offline
    assert _llm_detection(exps, 1, 2) == "0.80 [0.66, 0.90], 40 records"
    assert _llm_detection(exps, 1, 3).startswith("not measured")
    assert _llm_detection(exps, 1, 9) == "no explanation (no activating example)"
    assert _grounded_detection(exps, 1, 1) == "colour=red: 0.90 [0.75, 0.97], 40 records"
    assert _grounded_detection(exps, 1, 2) == "not grounded"
    assert _grounded_detection(exps, 1, 3) == "none found (best candidate shape=cross: 0.90 [0.75, 0.97], 40 records)"
    assert llm.measured_score() == "detection 0.80 [0.66, 0.90] (balanced accuracy, 95% interval, 40 held-out examples)"
    assert Explanation.from_dict(json.loads(json.dumps(llm.to_dict()))) == llm


def _fake_llm(body: dict, i: int) -> Reply:
    """An explainer that always says 'red objects', and a judge that says 'fires' where red is annotated."""
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    user = user if isinstance(user, str) else " ".join(p.get("text", "") for p in user)
    if "explaining one feature" in system:
        return Reply(json.dumps({"description": "red objects", "confidence": 0.8, "patterns": ["red"],
                                 "cue_counts": {"red": 2}}))
    examples = re.findall(r"^Example \d+: (.*)$", user, flags=re.M)
    return Reply(json.dumps({"activates": [int("colour=red" in e) for e in examples]}))


def test_llm_explanations_are_judged_on_the_grounding_records(tmp_path):
    """With an LLM explainer and grounding records, each LLM explanation gets its held-out detection
    (interval included) and each grounded explanation its own, on the same records."""
    import pandas as pd
    import torch

    from mmdiff.data.loaders.scene_concepts import organism_concepts
    from mmdiff.interp.client import LLMClient
    from mmdiff.interp.dashboard import write_interp
    from mmdiff.interp.examples import token_activations
    from mmdiff.interp.explain import LLMExplainer, read_explanations
    from mmdiff.models.base import TokenType
    from mmdiff.models import load_adapter
    from mmdiff.models.tiny import BASE_SUBDIR, VLM_SUBDIR, build_tiny
    from mmdiff.sae import SAEConfig, build_sae

    root = build_tiny("llava", tmp_path / "llava")
    adapter = load_adapter(root / VLM_SUBDIR, base_lm=root / BASE_SUBDIR, dtype=torch.float32)
    sae = build_sae(SAEConfig(architecture="relu", d_in=adapter.vlm.d_model, d_sae=8))
    sae.init_weights(seed=0)
    records = [shapes.make_record("validation", fam, i) for fam in ("colour", "spatial_yesno", "ocr") for i in range(4)]
    features = pd.DataFrame({"layer": [1] * 8, "feature": list(range(8))})
    # each feature's threshold raised to its median record maximum: it fires on about half the records
    keys = [(1, f) for f in range(8)]
    maxima = torch.stack([torch.stack([ra.activations[k][ra.token_types != int(TokenType.SPECIAL)].max() for k in keys])
                          for ra in token_activations(adapter, {1: sae}, records, keys, progress=False)])  # [R, 8]
    with torch.no_grad():
        sae.b_enc -= maxima.median(0).values
    with FakeOpenAI(_fake_llm) as srv, LLMClient(fast_config(srv.base_url)) as client:
        paths = write_interp(adapter, {1: sae}, features, {"organism": records[:3]}, tmp_path / "interp", k=2,
                             grounding=organism_concepts, grounding_records=records,
                             explainer=LLMExplainer(client), progress=False)
    judged = [r for r in srv.requests if "explaining one feature" not in r["messages"][0]["content"]]
    assert judged and all("[annotated in this record:" in r["messages"][1]["content"] for r in judged)
    exps = read_explanations(paths["explanations"])
    assert exps and all(e.source.startswith("llm") for e in exps)
    scored = [e for e in exps if e.detection is not None]
    assert scored, "some feature fires on some grounding records and not on others"
    for e in scored:
        lo, hi = e.detection_ci
        assert 0.0 <= lo <= e.detection <= hi <= 1.0 and 2 <= e.detection_n <= len(records)
        d = e.grounded["detection"]
        # both explanations measured on the same records
        assert d.get("reason") or d["n"] == e.detection_n
