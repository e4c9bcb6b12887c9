"""The evaluation harness: a task is records + a prompt format + a metric.

Yes/no tasks are scored from the next-token distribution (no sampling): P(yes) is the summed
probability of the yes variants, normalised against the no variants. Open tasks are generated
greedily and scored by a metric function `(prediction, record) -> float`. Interventions are
context managers the caller enters around `evaluate`, so the harness never needs to know them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from mmdiff.data.records import Record
from mmdiff.errors import DataError
from mmdiff.evals.metrics import yes_probability

ScoreFn = Callable[[str, Record], float]


@dataclass
class EvalTask:
    """Records, how to ask (the adapter's prompt format, by `side`) and how to score."""

    name: str
    records: Sequence[Record]
    kind: Literal["yesno", "generate"] = "generate"
    score: ScoreFn | None = None  # for kind="generate": per-record score of a prediction
    max_new_tokens: int = 8
    side: Literal["vlm", "base"] = "vlm"


@dataclass
class EvalResult:
    task: str
    kind: str
    record_ids: list[str]
    scores: list[float]  # per record: 1/0 accuracy, soft accuracy, compliance indicator, ...
    predictions: list[str] = field(default_factory=list)
    p_correct: list[float] = field(default_factory=list)  # yes/no tasks only

    @property
    def mean(self) -> float:
        return sum(self.scores) / max(len(self.scores), 1)

    def to_frame(self):
        import pandas as pd

        cols = {"task": self.task, "record_id": self.record_ids, "score": self.scores}
        if self.predictions:
            cols["prediction"] = self.predictions
        if self.p_correct:
            cols["p_correct"] = self.p_correct
        return pd.DataFrame(cols)


def _gold_yes(record: Record) -> bool:
    if not record.answers:
        raise DataError(f"record {record.id!r} has no answers; a yes/no task needs 'yes' or 'no'")
    a = record.answers[0].strip().lower()
    if a not in ("yes", "no"):
        raise DataError(f"record {record.id!r}: yes/no task but the answer is {record.answers[0]!r}")
    return a == "yes"


def model_inputs(adapter, side: str, batch: Sequence[Record]) -> dict[str, torch.Tensor]:
    """The adapter's inputs of a batch on `side`, on its model's device."""
    inputs = adapter.vlm_inputs(batch) if side == "vlm" else adapter.base_inputs(batch)
    device = next(adapter.backbone(side).model.parameters()).device
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def _tokenizer(adapter, side: str):
    if side == "vlm":
        return getattr(adapter.processor, "tokenizer", adapter.processor)
    return adapter.base_tokenizer


@torch.inference_mode()
def evaluate(
    adapter,
    task: EvalTask,
    *,
    batch_size: int = 16,
    progress: bool = True,
    inputs: Callable[[str, Sequence[Record]], dict[str, torch.Tensor]] | None = None,
) -> EvalResult:
    """Score every record of `task` with the adapter's model on `task.side`.

    `inputs(side, batch)` builds a batch's model inputs (default: the adapter's, on the model's
    device); `evals.reuse.BatchReuse.inputs` keeps them across evaluations of the same batches."""
    from rich.progress import Progress

    if task.kind == "generate" and task.score is None:
        raise ValueError(f"task {task.name!r} generates answers but has no score function")
    model = adapter.backbone(task.side).model
    result = EvalResult(task.name, task.kind, [], [])
    records = list(task.records)
    if task.kind == "yesno":
        yes_ids, no_ids = adapter.yes_no_token_ids(task.side)
    with Progress(disable=not progress, transient=True) as bar:
        job = bar.add_task(f"eval {task.name}", total=len(records))
        for i in range(0, len(records), batch_size):
            batch = records[i : i + batch_size]
            encoded = inputs(task.side, batch) if inputs is not None else model_inputs(adapter, task.side, batch)
            if task.kind == "yesno":
                logits = model(**encoded).logits[:, -1, :]  # left padding: last position is next token
                p_yes = yes_probability(logits, yes_ids, no_ids).tolist()
                for rec, p in zip(batch, p_yes):
                    gold = _gold_yes(rec)
                    result.p_correct.append(p if gold else 1.0 - p)
                    # an exact tie (p == 0.5) is scored wrong, as evals.metrics.yes_no_accuracy does
                    result.scores.append(float(p > 0.5 if gold else p < 0.5))
                    result.predictions.append("yes" if p > 0.5 else "no" if p < 0.5 else "tie")
            else:
                tok = _tokenizer(adapter, task.side)
                out = model.generate(**encoded, max_new_tokens=task.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                new = out[:, encoded["input_ids"].shape[1]:]
                for rec, ids in zip(batch, new):
                    pred = tok.decode(ids, skip_special_tokens=True).strip()
                    result.predictions.append(pred)
                    result.scores.append(float(task.score(pred, rec)))
            result.record_ids.extend(r.id for r in batch)
            bar.advance(job, len(batch))
    return result
