"""Explainers (offline on a hand-made case, LLM through a loopback server) and detection scoring."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from PIL import Image
from test_llm_client import FakeOpenAI, Reply, fast_config

from mmdiff.errors import DataError
from mmdiff.interp.client import LLMClient, LLMReplyError
from mmdiff.interp.explain import (
    ActivatingExample,
    Explanation,
    FeatureEvidence,
    LLMExplainer,
    OfflineExplainer,
    make_explainer,
    mark_example,
    promoted_tokens,
)
from mmdiff.interp.scoring import DetectionScorer, detection_metrics, shuffled_mix

T, IMG, S = 0, 1, 2  # TokenType TEXT, IMAGE, SPECIAL


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3, 2), 128).save(buf, format="PNG")
    return buf.getvalue()


def hand_made_evidence(with_heatmap: bool = False) -> FeatureEvidence:
    ex1 = ActivatingExample(
        tokens=["<s>", "The", " cat", " is", " left", " of", " the", " dog"],
        activations=[9.0, 0.0, 0.0, 0.0, 4.0, 0.5, 0.0, 0.0],  # the BOS spike is SPECIAL: ignored
        token_types=[S, T, T, T, T, T, T, T],
        record_id="r1",
    )
    ex2 = ActivatingExample(
        tokens=["<image>", "<image>", "Is", " it", " Left", "?"],
        activations=[2.0, 0.0, 0.0, 0.0, 2.0, 0.0],
        token_types=[IMG, IMG, T, T, T, T],
        heatmap_png=_png() if with_heatmap else None,
        record_id="r2",
    )
    ex3 = ActivatingExample(["Right", " side"], [1.5, 0.2], record_id="r3", source="VSR")
    return FeatureEvidence(
        feature_id="L3/F7",
        examples=[ex1, ex2, ex3],
        promoted_tokens=[("left", 1.0), ("right", 0.6)],
    )


class TinyTokenizer:
    vocab = ["left", "right", "up", "down"]

    def decode(self, ids: list[int]) -> str:
        return self.vocab[ids[0]]


def test_promoted_tokens_through_the_unembedding():
    W_U = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 2]])  # [vocab=4, d_model=3]
    d_f = torch.tensor([1.0, 0.6, -1.0])  # W_U d_f = [1.0, 0.6, -1.0, -2.0]
    top = promoted_tokens(d_f, W_U, TinyTokenizer(), k=2)
    assert [t for t, _ in top] == ["left", "right"]
    assert [v for _, v in top] == pytest.approx([1.0, 0.6])
    with pytest.raises(DataError, match="d_model=2"):
        promoted_tokens(torch.ones(2), W_U, TinyTokenizer())


def test_image_token_share_from_examples():
    ev = hand_made_evidence()
    # positive mass without the special BOS: ex1 4 + 0.5, ex2 2 (image) + 2, ex3 1.5 + 0.2 = 10.2
    assert ev.image_token_share() == pytest.approx(2.0 / 10.2)
    ev.image_share = 0.9
    assert ev.image_token_share() == 0.9


def test_offline_explainer_hand_made_case():
    ev = hand_made_evidence()
    exp = OfflineExplainer(rel_threshold=0.3, max_patterns=2).explain(ev)
    # the BOS spike (9.0) is special and ignored: peak 4.0 -> cut 1.2
    # activating: ex1 'left' 4.0; ex2 image 2.0 and 'Left' 2.0; ex3 'Right' 1.5 -> total 9.5
    # mass: left 6.0, <image> 2.0, right 1.5; top-2 = left, <image> -> coverage 8 / 9.5
    assert exp.cue_counts == {"left": 2, "<image>": 1}
    assert exp.coverage == pytest.approx(8.0 / 9.5)
    assert exp.confidence is None and exp.measured_score() is None  # nothing measured
    assert exp.description == (
        "Fires mainly on text tokens (80% of activation mass); strongest on 'left'; "
        "promotes 'left', 'right'."
    )
    assert exp.patterns == [
        "token 'left': 63% of activating mass, in 2/3 examples",
        "image tokens: 21% of activating mass, in 1/3 examples",
        "promoted through the unembedding: 'left', 'right'",
    ]
    assert exp.source == "offline" and exp.feature_id == "L3/F7"
    assert Explanation.from_dict(exp.to_dict()) == exp
    # a higher threshold keeps only the strongest cue
    strict = OfflineExplainer(rel_threshold=0.6).explain(ev)
    assert strict.cue_counts == {"left": 1} and strict.coverage == 1.0


def test_offline_explainer_image_dominated_and_silent_features():
    ex = ActivatingExample(["<image>"] * 3 + [" red"], [3.0, 3.0, 0.0, 1.0], [IMG, IMG, IMG, T])
    exp = OfflineExplainer().explain(FeatureEvidence("L0/F1", [ex]))
    # cut 0.9: image 6.0 and 'red' 1.0 activate; image share 6 / 7
    assert (
        exp.description
        == "Fires mainly on image tokens (86% of activation mass); strongest on 'red'."
    )
    assert exp.cue_counts == {"<image>": 1, "red": 1}
    assert exp.coverage == pytest.approx(1.0) and exp.confidence is None
    silent = OfflineExplainer().explain(FeatureEvidence("L0/F2", [ActivatingExample(["a"], [0.0])]))
    assert silent.coverage == 0.0 and "never fires" in silent.description
    with pytest.raises(DataError, match="no activating examples"):
        OfflineExplainer().explain(FeatureEvidence("L0/F3", []))
    with pytest.raises(DataError, match="2 tokens but 1 activations"):
        ActivatingExample(["a", "b"], [1.0])


def test_example_from_token_ids_and_explanations_round_trip(tmp_path):
    from mmdiff.interp.explain import read_explanations, write_explanations

    ex = ActivatingExample.from_token_ids(
        torch.tensor([0, 1, 3]),
        torch.tensor([0.5, 0.0, 2.0]),
        TinyTokenizer(),
        token_types=[IMG, T, T],
    )
    assert ex.tokens == ["left", "right", "down"]
    assert ex.activations == [0.5, 0.0, 2.0] and ex.token_types == [1, 0, 0]
    exps = [
        OfflineExplainer().explain(hand_made_evidence()),
        Explanation("d", 0.5, ["p"], {"c": 1}),
    ]
    write_explanations(tmp_path / "interp" / "explanations.json", exps)
    assert read_explanations(tmp_path / "interp" / "explanations.json") == exps
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="write_explanations"):
        read_explanations(tmp_path / "bad.json")


def test_mark_example_collapses_image_runs_and_marks_active_tokens():
    ex = hand_made_evidence().examples[1]
    assert (
        mark_example(ex, threshold=1.0)
        == "<image: 2 tokens, 1 active, max 2.00> Is it <<Left>>(2.00)?"
    )
    assert ex.plain_text() == "<image> Is it Left?"


def test_make_explainer_picks_offline_without_endpoint():
    assert isinstance(make_explainer(None), OfflineExplainer)
    exp = make_explainer(fast_config("http://127.0.0.1:9/v1"))
    assert isinstance(exp, LLMExplainer)
    exp.client.close()


GOOD_REPLY = {
    "description": "Spatial relation 'left', in text and in the image.",
    "confidence": 0.8,
    "patterns": ["the word left", "left half of the image"],
    "cue_counts": {"left": 2},
}


def test_llm_explainer_prompt_reply_and_images():
    with FakeOpenAI(lambda body, i: Reply(json.dumps(GOOD_REPLY))) as srv:
        with LLMClient(fast_config(srv.base_url)) as client:
            exp = LLMExplainer(client).explain(hand_made_evidence(with_heatmap=True))
        with LLMClient(fast_config(srv.base_url, supports_images=False)) as client:
            LLMExplainer(client).explain(hand_made_evidence(with_heatmap=True))
    assert exp == Explanation(
        description=GOOD_REPLY["description"],
        confidence=0.8,
        patterns=GOOD_REPLY["patterns"],
        cue_counts={"left": 2},
        source="llm:fake-model",
        feature_id="L3/F7",
    )
    first, second = srv.requests
    assert first["response_format"] == {"type": "json_object"}
    system, user = first["messages"]
    assert system["role"] == "system" and '"cue_counts"' in system["content"]
    text_part, image_part = user["content"]
    text = text_part["text"]
    # examples sorted by max activation (the special BOS is skipped); threshold 0.3 * 4 = 1.2
    assert "Example 1 (max activation 4.00): The cat is <<left>>(4.00) of the dog" in text
    assert (
        "Example 2 (max activation 2.00): "
        "<image: 2 tokens, 1 active, max 2.00> Is it <<Left>>(2.00)?" in text
    )
    assert "Example 3 [VSR] (max activation 1.50): <<Right>>(1.50) side" in text
    assert "Share of activation mass on image tokens: 20%." in text
    assert "Tokens the feature promotes through the unembedding: 'left', 'right'." in text
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    # without image support the heatmap is left out and the message is plain text
    assert isinstance(second["messages"][1]["content"], str)
    assert "annotated concepts" not in text  # no grounded evidence given, none shown


def test_llm_explainer_gets_the_grounded_evidence_as_context():
    import dataclasses

    evidence = dataclasses.replace(
        hand_made_evidence(), grounded="relation=left of (text: IoU 0.91, AUROC 0.97, balanced accuracy 0.88)")
    with FakeOpenAI(lambda body, i: Reply(json.dumps(GOOD_REPLY))) as srv:
        with LLMClient(fast_config(srv.base_url, supports_images=False)) as client:
            LLMExplainer(client).explain(evidence)
    text = srv.requests[0]["messages"][1]["content"]
    assert ("Measured on held-out records with annotated concepts (IoU of where it fires with the concept's region, "
            "AUROC of the concept's presence): relation=left of (text: IoU 0.91, AUROC 0.97") in text


def test_llm_explainer_rejects_out_of_range_confidence():
    bad = dict(GOOD_REPLY, confidence=1.7)
    with FakeOpenAI(lambda body, i: Reply(json.dumps(bad))) as srv:
        with LLMClient(fast_config(srv.base_url, reply_retries=0)) as client:
            with pytest.raises(LLMReplyError, match="confidence"):
                LLMExplainer(client).explain(hand_made_evidence())


# ------------------------------------------------------------------------------------------------
# Detection scoring
# ------------------------------------------------------------------------------------------------


def test_detection_metrics_hand_computed():
    labels = [True, True, True, True, False, False, False, False, False, False]
    preds = [True, True, True, False, True, False, False, False, False, False]
    m = detection_metrics(labels, preds)
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 1, 5)
    assert m.precision == pytest.approx(0.75)
    assert m.recall == pytest.approx(0.75)
    assert m.specificity == pytest.approx(5 / 6)
    assert m.balanced_accuracy == pytest.approx((0.75 + 5 / 6) / 2)
    assert m.accuracy == pytest.approx(0.8)
    assert m.f1 == pytest.approx(0.75)
    assert detection_metrics([True, False], [False, False]).precision == 0.0
    with pytest.raises(DataError, match="both activating and non-activating"):
        detection_metrics([True, True], [True, False])


def _detector(body: dict, i: int) -> Reply:
    """Answers like a perfect reader of the explanation 'fires on the word left'."""
    text = body["messages"][1]["content"]
    examples = re.findall(r"^Example \d+: (.*)$", text, flags=re.M)
    return Reply(json.dumps({"activates": [int("left" in e.lower()) for e in examples]}))


ACTIVATING = ["the cup left of the plate", "Is the cat to the left?", "LEFT side", "a red ball"]
NON_ACTIVATING = ["the dog is right of the car", "two apples", "what colour?", "she left early"]


def test_detection_scoring_with_a_deterministic_server(tmp_path):
    explanation = Explanation("fires on the word 'left'", 0.9, feature_id="L3/F7")
    with FakeOpenAI(_detector) as srv:
        with LLMClient(fast_config(srv.base_url, cache_dir=tmp_path)) as client:
            scorer = DetectionScorer(client, batch_size=3)
            r = scorer.score(explanation, ACTIVATING, NON_ACTIVATING, seed=1)
            r_again = scorer.score(explanation, ACTIVATING, NON_ACTIVATING, seed=1)
    # 3 of 4 activating mention 'left' (tp 3, fn 1); 1 of 4 non-activating does (fp 1, tn 3)
    m = r.metrics
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 1, 3)
    assert (m.precision, m.recall, m.balanced_accuracy) == pytest.approx((0.75, 0.75, 0.75))
    assert len(srv.requests) == 3  # 8 examples in batches of 3; the repeat came from the cache
    assert r_again.texts == r.texts and r_again.predictions == r.predictions
    for t, y in zip(r.texts, r.labels):
        assert (t in ACTIVATING) == y
    assert not any("<<" in json.dumps(q) for q in srv.requests)  # nothing highlighted
    assert r.to_dict()["balanced_accuracy"] == pytest.approx(0.75)


def test_score_many_pools_features_and_matches_score():
    left = Explanation("fires on the word 'left'", 0.9, feature_id="L3/F7")
    other = Explanation("fires on fruit", 0.5, feature_id="L1/F2")
    with FakeOpenAI(_detector) as srv:
        with LLMClient(fast_config(srv.base_url)) as client:
            scorer = DetectionScorer(client, batch_size=4)
            many = scorer.score_many(
                [(left, ACTIVATING, NON_ACTIVATING), (other, ["an apple"], ["left turn"])],
                seed=3,
                progress=False,
            )
            single = scorer.score(left, ACTIVATING, NON_ACTIVATING, seed=3)
    assert [r.feature_id for r in many] == ["L3/F7", "L1/F2"]
    assert many[0].metrics == single.metrics and many[0].texts == single.texts
    # the fake reader marks 'left turn' (non-activating) and misses 'an apple': all wrong
    m = many[1].metrics
    assert (m.tp, m.fn, m.fp, m.tn) == (0, 1, 1, 0) and m.balanced_accuracy == 0.0
    assert len(srv.requests) == 2 + 1 + 2  # 8 examples / 4, then 2 / 4, then the repeat


def test_shuffle_is_deterministic_by_seed():
    a = shuffled_mix(ACTIVATING, NON_ACTIVATING, seed=0)
    assert a == shuffled_mix(ACTIVATING, NON_ACTIVATING, seed=0)
    orders = {tuple(shuffled_mix(ACTIVATING, NON_ACTIVATING, seed=s)[0]) for s in range(5)}
    assert len(orders) > 1
    assert sorted(a[0]) == sorted(ACTIVATING + NON_ACTIVATING)


def test_detection_reply_with_wrong_length_is_rejected():
    with FakeOpenAI(lambda body, i: Reply('{"activates": [1]}')) as srv:
        with LLMClient(fast_config(srv.base_url, reply_retries=1)) as client:
            with pytest.raises(LLMReplyError, match="expected 2 entries"):
                DetectionScorer(client, batch_size=2).score(
                    Explanation("x", 0.5), ["a"], ["b"], seed=0
                )
    assert len(srv.requests) == 2


def test_only_a_held_out_detection_score_is_printed():
    """An explanation prints a score only where one was measured on held-out examples."""
    exp = Explanation("left of", confidence=0.9, coverage=1.0, source="llm:m", feature_id="L1/F2")
    assert exp.measured_score() is None  # a self-rating and an in-sample share are not measured
    scored = exp.with_detection(0.8333, 24)
    assert scored.measured_score() == "detection 0.83 (balanced accuracy, 24 held-out examples)"
    assert Explanation.from_dict(scored.to_dict()) == scored
    # files written before coverage / detection existed still read
    old = Explanation.from_dict({"description": "x", "confidence": 1.0, "source": "offline"})
    assert old.measured_score() is None and old.coverage is None
