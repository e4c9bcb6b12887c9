"""Task metrics, computed exactly as the benchmarks' official scripts compute them.

- Yes/No tasks (VSR, VQAv2 yes/no): accuracy and mean P(correct) from next-token scores, with
  P(yes) = sum of the yes variants' probabilities normalised against the no variants'
  (docs/method.md#evaluation-tasks-and-metrics).
- VQAv2 soft accuracy: the official evaluator (GT-Vision-Lab/VQA, PythonEvaluationTools/
  vqaEvaluation/vqaEval.py, master), normalisation quirks included.
- TextVQA soft accuracy: EvalAI's answer processor (pythia/MMF `EvalAIAnswerProcessor`, the one
  behind the TextVQA leaderboard and LLaVA's `m4c_evaluator.py`).
- OCRBench: case-insensitive substring match (HME100k: spaces removed, case kept).
- ANLS: the DocVQA / ST-VQA robust-reading-competition script, threshold 0.5.

Every function scores one prediction and returns a float, so a caller can keep per-example scores
for bootstrap confidence intervals; `score_all` maps one over a dataset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from mmdiff.errors import DataError

if TYPE_CHECKING:
    from mmdiff.data.records import Record

# --------------------------------------------------------------------------------------------
# Yes / No
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class YesNoResult:
    """Accuracy and mean P(correct) of a yes/no task, with the per-example values behind them."""

    accuracy: float
    mean_p_correct: float
    p_yes: torch.Tensor  # [batch] P(yes) normalised against P(no)
    p_correct: torch.Tensor  # [batch] P(gold answer), same normalisation
    correct: torch.Tensor  # [batch] bool; a tie (P(yes) == 0.5 exactly) counts as wrong
    n: int


def _check_ids(ids: Sequence[int], name: str, vocab: int) -> torch.Tensor:
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    if ids_t.numel() == 0:
        raise DataError(
            f"{name} is empty: expected at least one token id for the {name[:-4]} variants "
            "(e.g. 'Yes', ' yes'); get them from the adapter's yes_no_token_ids()"
        )
    if int(ids_t.min()) < 0 or int(ids_t.max()) >= vocab:
        raise DataError(
            f"{name} {ids_t.tolist()} has ids outside [0, {vocab}), the vocabulary of the scores: "
            "are these ids from another tokenizer?"
        )
    return ids_t


def yes_probability(
    scores: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]
) -> torch.Tensor:
    """P(yes) = sum_yes p / (sum_yes p + sum_no p) from next-token logits or log-probabilities.

    `scores` is [batch, vocab] of logits or log-probs: the normalisation against the no variants
    cancels softmax's partition function, so both give the same answer. Computed stably as
    sigmoid(logsumexp(scores[yes]) - logsumexp(scores[no])). Returns [batch] float64.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise DataError(
            f"expected next-token scores of shape [batch, vocab], found {shape}; "
            "take logits[:, -1, :] of the last prompt position first"
        )
    vocab = scores.shape[1]
    yes_t = _check_ids(yes_ids, "yes_ids", vocab)
    no_t = _check_ids(no_ids, "no_ids", vocab)
    overlap = set(yes_t.tolist()) & set(no_t.tolist())
    if overlap:
        raise DataError(
            f"token ids {sorted(overlap)} are in both yes_ids and no_ids; they must be disjoint"
        )
    s = scores.detach().to(torch.float64)
    lse_yes = torch.logsumexp(s[:, yes_t], dim=1)  # [batch]
    lse_no = torch.logsumexp(s[:, no_t], dim=1)  # [batch]
    bad = (
        torch.isnan(lse_yes)
        | torch.isnan(lse_no)
        | ~(torch.isfinite(lse_yes) | torch.isfinite(lse_no))
    )
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()[:5]
        raise DataError(
            f"rows {rows}: the yes/no scores are nan, or every variant has zero probability "
            "(-inf), "
            "so P(yes) is undefined; check the scores are taken at the answer position"
        )
    return torch.sigmoid(lse_yes - lse_no)


def _parse_label(label: object, i: int) -> bool:
    if isinstance(label, bool):
        return label
    if isinstance(label, (int,)) and label in (0, 1):
        return bool(label)
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        return _parse_label(label.item(), i)
    if isinstance(label, str):
        s = label.strip().lower().rstrip(".")
        if s in ("yes", "true"):
            return True
        if s in ("no", "false"):
            return False
    raise DataError(
        f"gold label {i} is {label!r}: expected 'yes'/'no', True/False or 1/0; "
        "is this record from a yes/no task?"
    )


def yes_no_accuracy(
    scores: torch.Tensor,
    yes_ids: Sequence[int],
    no_ids: Sequence[int],
    labels: Sequence[object] | torch.Tensor,
) -> YesNoResult:
    """Accuracy and mean P(correct) of yes/no answers from next-token scores [batch, vocab].

    `labels`: one gold answer per row ('yes'/'no', bool or 0/1). A row is correct when the
    normalised P(gold) > 0.5; an exact tie is counted wrong (the model did not decide).
    """
    p_yes = yes_probability(scores, yes_ids, no_ids)
    labels_list = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if len(labels_list) != p_yes.shape[0]:
        raise DataError(
            f"{len(labels_list)} gold labels for {p_yes.shape[0]} rows of scores; "
            "give one label per row"
        )
    gold = torch.tensor([_parse_label(x, i) for i, x in enumerate(labels_list)], dtype=torch.bool)
    p_correct = torch.where(gold, p_yes, 1.0 - p_yes)
    correct = p_correct > 0.5
    n = int(gold.numel())
    if n == 0:
        raise DataError("no rows to score: yes_no_accuracy needs at least one example")
    return YesNoResult(
        accuracy=float(correct.double().mean()),
        mean_p_correct=float(p_correct.mean()),
        p_yes=p_yes,
        p_correct=p_correct,
        correct=correct,
        n=n,
    )


# --------------------------------------------------------------------------------------------
# VQA normalisation tables (shared by the official VQA evaluator and EvalAI's processor)
# --------------------------------------------------------------------------------------------

# The evaluators' contraction table, verbatim in content: missing apostrophes are restored.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: tuple[str, ...] = ("a", "an", "the")
PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip
# The official pattern is "(?!<=\d)(\.)(?!\d)": the first group is a mistyped look-behind that
# never matches, so in effect every period not followed by a digit is removed ("3.5" survives).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The evaluators call PERIOD_STRIP.sub("", text, re.UNICODE): re.UNICODE lands in the `count`
# argument, so at most 32 periods are removed. Kept for exactness.
_PERIOD_SUB_COUNT = int(re.UNICODE)


def vqa_process_punctuation(text: str) -> str:
    """The evaluator's processPunctuation: each mark is deleted when it touches a space (or the
    text has a digit,digit comma), else replaced by a space; then periods not before a digit go."""
    out = text
    delete_all = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        # The test reads the ORIGINAL text while edits accumulate in `out`, as in the official code.
        if delete_all or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_SUB_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """The evaluator's processDigitArticle: lower-case, number words -> digits, drop articles,
    restore contractions, single spaces."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize_answer(text: str) -> str:
    """A prediction as the official VQA evaluator normalises it before matching."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def _check_answers(answers: Sequence[str], n_answers: int | None, metric: str) -> list[str]:
    if isinstance(answers, str):
        raise DataError(f"{metric}: expected a list of human answers, found one string {answers!r}")
    answers = list(answers)
    if not answers:
        raise DataError(f"{metric}: the record has no ground-truth answers")
    if n_answers is not None and len(answers) != n_answers:
        raise DataError(
            f"{metric} is defined on {n_answers} human answers per question, found {len(answers)}. "
            "With fewer answers the leave-one-out score is biased low "
            "(one answer always scores 0); "
            "for single-reference data use vqa_exact_match, or pass n_answers=None to accept it"
        )
    return answers


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    # mean over the n leave-one-out subsets of min(1, #matches among the other n-1 / 3)
    matches = sum(a == prediction for a in answers)
    total = 0.0
    for a in answers:
        others = matches - (a == prediction)
        total += min(1.0, others / 3.0)
    return total / len(answers)


def vqa_soft_accuracy(
    prediction: str, answers: Sequence[str], *, n_answers: int | None = 10
) -> float:
    """VQAv2 accuracy of one prediction, exactly as the official evaluator computes it.

    The prediction is fully normalised (punctuation, lower case, number words, articles,
    contractions). The human answers are NOT lower-cased or digit-mapped (the annotation files
    are already normalised); they only go through the punctuation step, and only when the
    annotators disagree (more than one distinct raw answer): the evaluator's disagreement rule.
    Accuracy = mean over the 10 leave-one-out subsets of min(1, #matches among the other 9 / 3),
    so 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.
    """
    answers = _check_answers(answers, n_answers, "VQA soft accuracy")
    pred = vqa_normalize_answer(prediction)
    if len(set(answers)) > 1:
        answers = [vqa_process_punctuation(a) for a in answers]
    return _leave_one_out(pred, answers)


# --------------------------------------------------------------------------------------------
# TextVQA (EvalAI)
# --------------------------------------------------------------------------------------------

# EvalAI's comma rule is "(?<=\d)(\,)+(?=\d)"; it never fires because commas are already gone.
_EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")


def textvqa_normalize_answer(text: str) -> str:
    """An answer as EvalAI's processor normalises it (applied to predictions AND human answers).

    What differs from the VQA evaluator: everything is lower-cased first, every comma and '?' is
    deleted up front, "'s" is split off as " 's", and the same steps run on the human answers.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    delete_all = _EVALAI_COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if delete_all or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = PERIOD_STRIP.sub("", out, count=_PERIOD_SUB_COUNT)
    return vqa_process_digit_article(out)


def textvqa_soft_accuracy(
    prediction: str, answers: Sequence[str], *, n_answers: int | None = 10
) -> float:
    """TextVQA accuracy of one prediction (EvalAI / m4c evaluator): both sides normalised, then the
    same leave-one-out soft score as VQAv2 (the evaluator asserts 10 answers)."""
    answers = _check_answers(answers, n_answers, "TextVQA soft accuracy")
    pred = textvqa_normalize_answer(prediction)
    return _leave_one_out(pred, [textvqa_normalize_answer(a) for a in answers])


def vqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the EvalAI-normalised prediction equals any normalised answer (ST-VQA accuracy);
    the right score for single-reference data such as the organism's shapes world."""
    answers = _check_answers(answers, None, "exact match")
    pred = textvqa_normalize_answer(prediction)
    return float(any(pred == textvqa_normalize_answer(a) for a in answers))


# --------------------------------------------------------------------------------------------
# OCRBench
# --------------------------------------------------------------------------------------------


def ocrbench_match(
    prediction: str, answers: str | Sequence[str], *, dataset_name: str = ""
) -> float:
    """OCRBench score (1.0 / 0.0): some answer is a substring of the prediction.

    As OCRBench's script: lower-case, strip, newlines -> spaces. For the HME100k subset
    (handwritten formulas) every space is removed and case is kept.
    """
    gold = [answers] if isinstance(answers, str) else list(answers)
    if not gold:
        raise DataError("OCRBench match: the record has no ground-truth answers")
    for answer in gold:
        if dataset_name == "HME100k":
            a = answer.strip().replace("\n", " ").replace(" ", "")
            p = prediction.strip().replace("\n", " ").replace(" ", "")
        else:
            a = answer.lower().strip().replace("\n", " ")
            p = prediction.lower().strip().replace("\n", " ")
        if a in p:
            return 1.0
    return 0.0


# --------------------------------------------------------------------------------------------
# ANLS
# --------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: str | Sequence[str], *, threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (DocVQA / ST-VQA script).

    Both strings are stripped, lower-cased and whitespace-collapsed before the edit distance;
    as in the official script the distance is divided by the longer of the RAW lengths.
    Score = 1 - min over answers of that normalised distance, set to 0 below `threshold`.
    """
    gold = [answers] if isinstance(answers, str) else list(answers)
    if not gold:
        raise DataError("ANLS: the record has no ground-truth answers")
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in gold:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


# --------------------------------------------------------------------------------------------


def score_all(
    metric: Callable[..., float],
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    **kwargs: object,
) -> list[float]:
    """Per-example scores of `metric(prediction, answers, **kwargs)` over a dataset."""
    if len(predictions) != len(references):
        raise DataError(
            f"{len(predictions)} predictions for {len(references)} references; they must pair up"
        )
    return [metric(p, r, **kwargs) for p, r in zip(predictions, references)]


# Open-answer metrics by name, for configs: each scores (prediction, answers).
OPEN_METRICS: dict[str, Callable[..., float]] = {
    "vqa_soft_accuracy": vqa_soft_accuracy,
    "textvqa_soft_accuracy": textvqa_soft_accuracy,
    "exact_match": vqa_exact_match,
    "ocrbench_match": ocrbench_match,
    "anls": anls,
}


def record_metric(name: str, **kwargs: object) -> Callable[[str, "Record"], float]:
    """A `(prediction, record) -> float` score function (the eval harness's ScoreFn) for a named
    metric, reading the human answers from `record.answers`. For OCRBench the subset name comes
    from `record.meta["dataset_name"]` (HME100k is matched without spaces)."""
    if name not in OPEN_METRICS:
        raise DataError(f"unknown metric {name!r}; choose one of {', '.join(sorted(OPEN_METRICS))}")
    metric = OPEN_METRICS[name]

    def score(prediction: str, record: "Record") -> float:
        extra = dict(kwargs)
        if name == "ocrbench_match" and "dataset_name" not in extra:
            extra["dataset_name"] = str(record.meta.get("dataset_name", ""))
        try:
            return metric(prediction, record.answers, **extra)
        except DataError as exc:
            raise DataError(f"record {record.id!r} ({record.source}): {exc}") from exc

    score.__name__ = f"record_{name}"
    return score
