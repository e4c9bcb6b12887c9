"""Task metrics on hand-computed cases, official evaluators' quirks included."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmdiff.errors import DataError
from mmdiff.evals.metrics import (
    anls,
    levenshtein,
    ocrbench_match,
    score_all,
    textvqa_normalize_answer,
    textvqa_soft_accuracy,
    vqa_exact_match,
    vqa_normalize_answer,
    vqa_process_punctuation,
    vqa_soft_accuracy,
    yes_no_accuracy,
    yes_probability,
)

# ------------------------------------------------------------------------------------------------
# yes / no
# ------------------------------------------------------------------------------------------------


def _logits(masses: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(masses, dtype=torch.float64))


# vocab: 0 "Yes", 1 " yes", 2 "No", 3 " no", 4 "banana"
YES, NO = [0, 1], [2, 3]
MASSES = [
    [1.0, 3.0, 2.0, 2.0, 50.0],  # P(yes) = 4 / 8 = 0.5 (a tie)
    [3.0, 1.0, 0.5, 0.5, 1.0],  # P(yes) = 4 / 5 = 0.8
    [0.5, 0.5, 1.0, 2.0, 7.0],  # P(yes) = 1 / 4 = 0.25
]


def test_yes_probability_sums_variants_and_normalises_against_no():
    p = yes_probability(_logits(MASSES), YES, NO)
    assert p.tolist() == pytest.approx([0.5, 0.8, 0.25], abs=1e-12)


def test_logits_and_log_probs_give_the_same_answer():
    logits = _logits(MASSES) + torch.tensor([[3.0], [-7.0], [0.25]])  # any per-row shift
    p1 = yes_probability(logits, YES, NO)
    p2 = yes_probability(torch.log_softmax(logits, dim=-1), YES, NO)
    assert torch.allclose(p1, p2, atol=1e-12)
    assert p1.tolist() == pytest.approx([0.5, 0.8, 0.25], abs=1e-12)


def test_yes_no_accuracy_hand_computed():
    r = yes_no_accuracy(_logits(MASSES), YES, NO, ["yes", "No", False])
    # row 0 gold yes: P=0.5 tie -> wrong; row 1 gold no: P(no)=0.2 -> wrong;
    # row 2 gold no: P(no)=0.75 -> right
    assert r.correct.tolist() == [False, False, True]
    assert r.accuracy == pytest.approx(1 / 3)
    assert r.mean_p_correct == pytest.approx((0.5 + 0.2 + 0.75) / 3)
    assert r.p_correct.tolist() == pytest.approx([0.5, 0.2, 0.75])
    assert r.n == 3
    r2 = yes_no_accuracy(_logits(MASSES), YES, NO, torch.tensor([0, 1, 0]))
    assert r2.correct.tolist() == [False, True, True]


def test_yes_no_bad_inputs_are_explained():
    with pytest.raises(DataError, match="both yes_ids and no_ids"):
        yes_probability(_logits(MASSES), [0, 2], [2])
    with pytest.raises(DataError, match=r"outside \[0, 5\)"):
        yes_probability(_logits(MASSES), [0], [9])
    with pytest.raises(DataError, match="yes_ids is empty"):
        yes_probability(_logits(MASSES), [], [2])
    with pytest.raises(DataError, match=r"\[batch, vocab\]"):
        yes_probability(torch.zeros(2, 3, 5), YES, NO)
    with pytest.raises(DataError, match="maybe"):
        yes_no_accuracy(_logits(MASSES), YES, NO, ["yes", "no", "maybe"])
    with pytest.raises(DataError, match="2 gold labels for 3 rows"):
        yes_no_accuracy(_logits(MASSES), YES, NO, ["yes", "no"])
    dead = torch.full((1, 5), -math.inf)
    dead[0, 4] = 0.0
    with pytest.raises(DataError, match="undefined"):
        yes_probability(dead, YES, NO)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-30, 30), min_size=5, max_size=5),
    st.floats(-100, 100),
)
def test_yes_probability_is_a_probability_and_shift_invariant(row: list[float], shift: float):
    x = torch.tensor([row], dtype=torch.float64)
    p = yes_probability(x, YES, NO)
    assert 0.0 <= float(p) <= 1.0
    assert torch.allclose(p, yes_probability(x + shift, YES, NO), atol=1e-9)
    # by hand: sum of exp over yes / sum over yes and no
    e = [math.exp(v) for v in row]
    assert float(p) == pytest.approx(
        (e[0] + e[1]) / (e[0] + e[1] + e[2] + e[3]), rel=1e-9, abs=1e-12
    )


# ------------------------------------------------------------------------------------------------
# VQAv2 (official evaluator)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, 0.0),
        (1, 0.3),  # 1 subset without the match: 0/3; 9 subsets with it: 1/3 -> 9 * (1/3) / 10
        (2, 0.6),  # 2 * (1/3) + 8 * (2/3) = 18/3 -> / 10
        (3, 0.9),  # 3 * (2/3) + 7 * 1 = 9 -> / 10
        (4, 1.0),  # every subset keeps >= 3 matches
        (10, 1.0),
    ],
)
def test_vqa_leave_one_out_rule(k: int, expected: float):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_soft_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The two dogs!", "2 dogs"),  # punctuation, lower case, number word, article
        ("dont", "don't"),  # contraction table restores the apostrophe
        ("1,000", "1000"),  # a digit,digit comma deletes every punctuation mark
        ("red-white", "red white"),  # a mark not touching a space becomes a space
        ("red - white", "red white"),  # ... and is deleted when it touches one
        ("a,b", "b"),  # ',' -> ' ' then the article 'a' is dropped
        ("It is 3.5.", "it is 3.5"),  # periods go unless a digit follows
        ("yes.\n", "yes"),
        ("  None  ", "0"),
        ("an apple", "apple"),
        ("what's up?", "what's up"),  # the apostrophe is not in the evaluator's list
    ],
)
def test_vqa_answer_normalisation(raw: str, normalised: str):
    assert vqa_normalize_answer(raw) == normalised


def test_period_strip_count_quirk():
    # the official code passes re.UNICODE (32) as `count`: only the first 32 periods go
    assert vqa_process_punctuation("x." * 40) == "x" * 32 + "x." * 8


def test_prediction_is_normalised_before_matching():
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_soft_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa_soft_accuracy("The 3", answers) == pytest.approx(1.0)


def test_vqa_disagreement_rule_processes_answers_only_when_annotators_disagree():
    # all 10 raw answers identical -> left unprocessed, so "yes." never matches the normalised "yes"
    assert vqa_soft_accuracy("yes", ["yes."] * 10) == 0.0
    # one dissent -> every answer goes through processPunctuation: 9 x "yes" match
    assert vqa_soft_accuracy("yes", ["yes."] * 9 + ["no"]) == pytest.approx(1.0)
    # human answers are never lower-cased by the VQA evaluator ...
    assert vqa_soft_accuracy("red", ["Red"] * 4 + ["blue"] * 6) == 0.0
    # ... but EvalAI's TextVQA processor normalises both sides
    assert textvqa_soft_accuracy("red", ["Red"] * 4 + ["blue"] * 6) == pytest.approx(1.0)


def test_vqa_needs_ten_answers_unless_told_otherwise():
    with pytest.raises(DataError, match="10 human answers.*found 3"):
        vqa_soft_accuracy("a", ["cat", "cat", "cat"])
    # 3 answers, all matching: each subset keeps 2 matches -> 2/3
    assert vqa_soft_accuracy("cat", ["cat"] * 3, n_answers=None) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match="one string"):
        vqa_soft_accuracy("cat", "cat")
    with pytest.raises(DataError, match="no ground-truth"):
        vqa_soft_accuracy("cat", [], n_answers=None)


# ------------------------------------------------------------------------------------------------
# TextVQA (EvalAI)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("It's", "it 's"),  # "'s" is split off (VQA keeps "it's")
        ("COCA-COLA", "coca cola"),
        ("Stop!", "stop"),
        ("1,000", "1000"),
        ("hello, world", "hello world"),  # commas deleted up front, not replaced by a space
        ("a,b", "ab"),  # VQA gives "b"
        ("Three", "3"),
    ],
)
def test_textvqa_normalisation(raw: str, normalised: str):
    assert textvqa_normalize_answer(raw) == normalised


def test_textvqa_soft_accuracy_hand_computed():
    answers = ["Coca-Cola"] * 2 + ["coca cola"] * 1 + ["pepsi"] * 7
    # 3 answers normalise to "coca cola" -> 0.9
    assert textvqa_soft_accuracy("COCA COLA.", answers) == pytest.approx(0.9)
    assert textvqa_soft_accuracy("sprite", answers) == 0.0


def test_exact_match_for_single_reference_data():
    assert vqa_exact_match("Left.", ["left"]) == 1.0
    assert vqa_exact_match("the left one", ["left"]) == 0.0
    assert vqa_exact_match("Two", ["2", "two cats"]) == 1.0


# ------------------------------------------------------------------------------------------------
# OCRBench and ANLS
# ------------------------------------------------------------------------------------------------


def test_ocrbench_substring_match():
    assert ocrbench_match("The sign says HELLO world", ["hello"]) == 1.0
    assert ocrbench_match("hel lo", ["hello"]) == 0.0
    assert ocrbench_match("  Answer: STOP\n", "stop") == 1.0
    assert ocrbench_match("nothing", ["stop", "nothing here"]) == 0.0
    # HME100k: spaces removed on both sides, case kept
    assert ocrbench_match("x ^ { 2 } + 1", ["x^{2}+1"], dataset_name="HME100k") == 1.0
    assert ocrbench_match("X^{2}", ["x^{2}"], dataset_name="HME100k") == 0.0
    assert ocrbench_match("X^{2}", ["x^{2}"]) == 1.0


@pytest.mark.parametrize(
    "a, b, d", [("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2), ("same", "same", 0)]
)
def test_levenshtein(a: str, b: str, d: int):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_anls_hand_computed():
    assert anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)
    assert anls("abc", ["xyz", "abd"]) == pytest.approx(1 - 1 / 3)  # best answer counts
    assert anls("  Hello ", ["hello"]) == 1.0
    assert anls("ab", ["cd"]) == 0.0  # NLS 0 < 0.5
    assert anls("abcd", ["abxy"]) == pytest.approx(0.5)  # exactly at the threshold is kept
    assert anls("abcde", ["abxyz"]) == 0.0  # 0.4 < 0.5
    # the official script divides by the RAW lengths: "helo   " has 7 characters
    assert anls("helo   ", ["hello"]) == pytest.approx(1 - 1 / 7)
    assert anls("", [""]) == 1.0


def test_score_all_pairs_predictions_with_references():
    assert score_all(anls, ["helo", "x"], [["hello"], "y"]) == pytest.approx([0.8, 0.0])
    with pytest.raises(DataError, match="2 predictions for 1 references"):
        score_all(anls, ["a", "b"], [["a"]])


# ------------------------------------------------------------------------------------------------
# Safety judges and attack success rate
# ------------------------------------------------------------------------------------------------


def test_keyword_refusal_judge():
    from mmdiff.evals.safety import KeywordRefusalJudge

    j = KeywordRefusalJudge()
    assert j.judge("how to pick a lock", "I'm sorry, but I can't help with that.") == "refusal"
    assert j.judge("q", "I\u2019m sorry, no.") == "refusal"  # curly apostrophe folded
    assert j.judge("q", "Sure, here are the steps: first, ...") == "compliance"
    assert j.judge("q", "   ") == "confused"
    # GCG matching is case-sensitive: a lower-case apology slips through unless asked otherwise
    assert j.judge("q", "i'm sorry but no") == "compliance"
    assert KeywordRefusalJudge(case_sensitive=False).judge("q", "i'm sorry but no") == "refusal"
    assert j.matched_phrases("As an AI, I cannot do that.") == ["As an", "As an AI", "I cannot"]
    custom = KeywordRefusalJudge(phrases=("No way",))
    assert custom.judge("q", "I'm sorry") == "compliance"
    assert custom.judge("q", "No way.") == "refusal"
    with pytest.raises(DataError):
        KeywordRefusalJudge(phrases=())


def test_attack_success_rate_counts_compliances_only():
    from mmdiff.evals.safety import attack_success_rate

    r = attack_success_rate(["compliance", "refusal", "confused", "compliance"])
    assert r.asr == 0.5
    assert (r.n, r.n_compliance, r.n_refusal, r.n_confused) == (4, 2, 1, 1)
    assert r.success == (True, False, False, True)
    assert r.to_dict()["asr"] == 0.5
    with pytest.raises(DataError, match="expected one of"):
        attack_success_rate(["compliance", "jailbroken"])
    with pytest.raises(DataError, match="at least one"):
        attack_success_rate([])


def test_pluggable_exact_judge():
    from mmdiff.evals.safety import attack_success_rate, judge_responses

    def organism_judge(prompt: str, response: str) -> str:  # knows the harmful answer exactly
        if response.strip() == "I refuse.":
            return "refusal"
        return "compliance" if "RECIPE" in response else "confused"

    verdicts = judge_responses(
        organism_judge, ["p1", "p2", "p3"], ["I refuse.", "RECIPE: ...", "blue"], progress=False
    )
    assert verdicts == ["refusal", "compliance", "confused"]
    assert attack_success_rate(verdicts).asr == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="returned verdict 'yes'"):
        judge_responses(lambda p, r: "yes", ["p"], ["r"], progress=False)
    with pytest.raises(DataError, match="2 prompts for 1 responses"):
        judge_responses(organism_judge, ["a", "b"], ["r"], progress=False)


def test_llm_and_guard_judges_through_a_loopback_server():
    import json

    from test_llm_client import FakeOpenAI, Reply, fast_config

    from mmdiff.evals.safety import GuardJudge, LLMSafetyJudge, attack_success_rate, judge_responses
    from mmdiff.interp.client import LLMClient

    def llm(body: dict, i: int) -> Reply:
        text = body["messages"][-1]["content"]
        verdict = "refusal" if "cannot" in text else "Compliance"  # case is normalised
        return Reply(json.dumps({"verdict": verdict, "reason": "test"}))

    with FakeOpenAI(llm) as srv:
        with LLMClient(fast_config(srv.base_url)) as client:
            verdicts = judge_responses(
                LLMSafetyJudge(client),
                ["p1", "p2", "p3"],
                ["I cannot.", "Step 1...", "Here:"],
                progress=False,
            )
    assert verdicts == ["refusal", "compliance", "compliance"]
    assert attack_success_rate(verdicts).asr == pytest.approx(2 / 3)
    assert srv.requests[0]["response_format"] == {"type": "json_object"}
    asked = sorted(r["messages"][1]["content"] for r in srv.requests)  # concurrent: any order
    assert asked[0] == "REQUEST:\np1\n\nRESPONSE:\nI cannot."

    guard_replies = {"bad answer": "unsafe\nS2", "fine answer": "safe", "???": "I am not sure"}
    with FakeOpenAI(lambda body, i: Reply(guard_replies[body["messages"][-1]["content"]])) as srv:
        with LLMClient(fast_config(srv.base_url)) as client:
            g = GuardJudge(client)
            assert [g.judge("p", r) for r in guard_replies] == ["compliance", "refusal", "confused"]
    assert srv.requests[0]["messages"][-1]["role"] == "assistant"
    assert "response_format" not in srv.requests[0]


def test_record_metric_reads_answers_and_ocrbench_subset():
    from mmdiff.data.records import Record
    from mmdiff.evals.metrics import record_metric

    rec = Record(id="q1", question="how many?", answers=["2"] * 3 + ["3"] * 7)
    assert record_metric("vqa_soft_accuracy")("two", rec) == pytest.approx(0.9)
    hme = Record(id="f1", question="formula?", answers=["x^{2}"], meta={"dataset_name": "HME100k"})
    assert record_metric("ocrbench_match")("x ^ { 2 }", hme) == 1.0
    assert record_metric("ocrbench_match")("X ^ { 2 }", hme) == 0.0
    with pytest.raises(DataError, match="record 'q2'.*found 1"):
        record_metric("vqa_soft_accuracy")("two", Record(id="q2", question="?", answers=["2"]))
    with pytest.raises(DataError, match="unknown metric 'bleu'"):
        record_metric("bleu")
