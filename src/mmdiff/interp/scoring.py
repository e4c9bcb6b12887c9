"""Detection scoring of explanations, after delphi's detection scorer.

Given an explanation and a shuffled mix of activating and non-activating examples (shown as plain
text, nothing highlighted), an LLM says which examples the feature fires on. A good explanation
lets it pick the activating ones: we report precision, recall and balanced accuracy
((TPR + TNR) / 2, robust to the activating / non-activating ratio). Shuffles are deterministic
given the seed; the requests go through the same OpenAI-compatible client (cached, concurrent).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from mmdiff.errors import DataError
from mmdiff.interp.explain import ActivatingExample, Explanation

if TYPE_CHECKING:
    from mmdiff.interp.client import LLMClient

ExampleLike = Union[str, ActivatingExample]


@dataclass(frozen=True)
class DetectionMetrics:
    """Confusion counts and the scores derived from them (activating = positive class)."""

    tp: int
    fp: int
    tn: int
    fn: int
    precision: float  # tp / (tp + fp); 0.0 when nothing was predicted positive
    recall: float  # tp / (tp + fn)
    specificity: float  # tn / (tn + fp)
    balanced_accuracy: float  # (recall + specificity) / 2
    accuracy: float
    f1: float


def detection_metrics(labels: Sequence[bool], predictions: Sequence[bool]) -> DetectionMetrics:
    """Precision, recall, balanced accuracy, ... of predictions vs labels (True = activating)."""
    if len(labels) != len(predictions):
        raise DataError(
            f"{len(labels)} labels for {len(predictions)} predictions; they must pair up"
        )
    tp = sum(bool(y) and bool(p) for y, p in zip(labels, predictions))
    fp = sum((not y) and bool(p) for y, p in zip(labels, predictions))
    tn = sum((not y) and (not p) for y, p in zip(labels, predictions))
    fn = sum(bool(y) and (not p) for y, p in zip(labels, predictions))
    if tp + fn == 0 or tn + fp == 0:
        raise DataError(
            f"detection scoring needs both activating and non-activating examples; found "
            f"{tp + fn} activating and {tn + fp} non-activating"
        )
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    specificity = tn / (tn + fp)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return DetectionMetrics(
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        precision=precision,
        recall=recall,
        specificity=specificity,
        balanced_accuracy=(recall + specificity) / 2,
        accuracy=(tp + tn) / len(labels),
        f1=f1,
    )


@dataclass
class DetectionResult:
    """The detection score of one explanation, with what the LLM saw and said."""

    feature_id: str
    metrics: DetectionMetrics
    texts: list[str]  # the examples in the order shown
    labels: list[bool]  # True = activating, same order
    predictions: list[bool]  # the LLM's answers, same order
    seed: int
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "feature_id": self.feature_id,
            "precision": m.precision,
            "recall": m.recall,
            "balanced_accuracy": m.balanced_accuracy,
            "accuracy": m.accuracy,
            "f1": m.f1,
            "tp": m.tp,
            "fp": m.fp,
            "tn": m.tn,
            "fn": m.fn,
            "n_activating": m.tp + m.fn,
            "n_non_activating": m.tn + m.fp,
            "seed": self.seed,
            "source": self.source,
            "labels": self.labels,
            "predictions": self.predictions,
        }


def _text(ex: ExampleLike) -> str:
    if isinstance(ex, ActivatingExample):
        return ex.plain_text()
    if isinstance(ex, str):
        return ex
    raise DataError(f"expected an example as text or ActivatingExample, found {type(ex).__name__}")


def shuffled_mix(
    activating: Sequence[ExampleLike], non_activating: Sequence[ExampleLike], seed: int
) -> tuple[list[str], list[bool]]:
    """The examples as plain text, shuffled deterministically by `seed`, with their labels."""
    items = [(_text(e), True) for e in activating] + [(_text(e), False) for e in non_activating]
    random.Random(seed).shuffle(items)
    return [t for t, _ in items], [y for _, y in items]


DETECTION_SYSTEM = (
    "You are an interpretability researcher. A feature of a language model is described by an "
    "explanation. You will see numbered text examples; <image> stands for an image in the input. "
    "Some examples make the feature activate and the others do not. "
    "For each example decide whether "
    "the feature activates on it, judging only from the explanation. Answer with a JSON object "
    '{"activates": [<1 or 0 for example 1>, <1 or 0 for example 2>, ...]} with exactly one entry '
    "per example, in order."
)


def _reply_validator(n: int) -> Callable[[Any], list[bool]]:
    def validate(value: Any) -> list[bool]:
        if not isinstance(value, dict) or "activates" not in value:
            raise ValueError(f'expected {{"activates": [...]}}, found {str(value)[:100]}')
        marks = value["activates"]
        if not isinstance(marks, list) or len(marks) != n:
            got = len(marks) if isinstance(marks, list) else type(marks).__name__
            raise ValueError(f"expected {n} entries in 'activates', found {got}")
        out = []
        for m in marks:
            if isinstance(m, bool) or m in (0, 1):
                out.append(bool(m))
            elif isinstance(m, str) and m.strip().lower() in (
                "0",
                "1",
                "yes",
                "no",
                "true",
                "false",
            ):
                out.append(m.strip().lower() in ("1", "yes", "true"))
            else:
                raise ValueError(f"entries of 'activates' must be 1 or 0, found {m!r}")
        return out

    validate.__name__ = f"activates_list_of_{n}"
    return validate


@dataclass
class DetectionScorer:
    """Scores explanations by detection: can an LLM tell activating examples from the rest?"""

    client: "LLMClient"
    batch_size: int = 10
    system_prompt: str = DETECTION_SYSTEM
    max_chars: int = 1500  # per example, so one long context cannot crowd out the others

    def messages(self, explanation: Explanation, texts: Sequence[str]) -> list[dict[str, Any]]:
        from mmdiff.interp.client import system_message, user_message

        lines = [f"Explanation: {explanation.description}", ""]
        for i, t in enumerate(texts, start=1):
            lines.append(f"Example {i}: {t[: self.max_chars]}")
        return [system_message(self.system_prompt), user_message("\n".join(lines))]

    def _plan(
        self,
        explanation: Explanation,
        activating: Sequence[ExampleLike],
        non_activating: Sequence[ExampleLike],
        seed: int,
    ) -> tuple[list[str], list[bool], list[Any]]:
        from mmdiff.interp.client import ChatRequest

        if self.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, found {self.batch_size}")
        if not activating or not non_activating:
            raise DataError(
                f"feature {explanation.feature_id}: detection needs activating and non-activating "
                f"examples, found {len(activating)} and {len(non_activating)}"
            )
        texts, labels = shuffled_mix(activating, non_activating, seed)
        batches = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        reqs = [
            ChatRequest(self.messages(explanation, b), validator=_reply_validator(len(b)))
            for b in batches
        ]
        return texts, labels, reqs

    def _result(
        self,
        explanation: Explanation,
        texts: list[str],
        labels: list[bool],
        replies: list,
        seed: int,
    ) -> DetectionResult:
        predictions = [p for r in replies for p in r]
        return DetectionResult(
            feature_id=explanation.feature_id,
            metrics=detection_metrics(labels, predictions),
            texts=texts,
            labels=labels,
            predictions=predictions,
            seed=seed,
            source=f"llm:{self.client.name}",
        )

    def score(
        self,
        explanation: Explanation,
        activating: Sequence[ExampleLike],
        non_activating: Sequence[ExampleLike],
        *,
        seed: int = 0,
        progress: bool = False,
    ) -> DetectionResult:
        """Detection score of one explanation on a seeded shuffle of the two example sets."""
        texts, labels, reqs = self._plan(explanation, activating, non_activating, seed)
        replies = self.client.chat_many(reqs, progress=progress, description="detection scoring")
        return self._result(explanation, texts, labels, replies, seed)

    def score_many(
        self,
        items: Sequence[tuple[Explanation, Sequence[ExampleLike], Sequence[ExampleLike]]],
        *,
        seed: int = 0,
        progress: bool = True,
    ) -> list[DetectionResult]:
        """Detection scores of many (explanation, activating, non_activating) triples; every
        feature's batches share one request pool, so a slow feature does not idle the others."""
        plans = [self._plan(e, a, n, seed) for e, a, n in items]
        flat = [r for _, _, reqs in plans for r in reqs]
        replies = self.client.chat_many(flat, progress=progress, description="detection scoring")
        out, at = [], 0
        for (explanation, _, _), (texts, labels, reqs) in zip(items, plans):
            out.append(self._result(explanation, texts, labels, replies[at : at + len(reqs)], seed))
            at += len(reqs)
        return out
