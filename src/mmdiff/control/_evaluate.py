"""Evaluating a task under an intervention whose positions depend on each batch's token types.

`ablate_features(..., positions="text")` needs the prompt's token types ([batch, seq]), which only
exist once a batch is built; the harness builds its inputs itself. So the records are cut into
batches here, each batch's token types are read from the adapter's inputs, the intervention is
built for them, and the harness scores the batch inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from rich.progress import Progress

from mmdiff.errors import ConfigError
from mmdiff.evals.harness import EvalResult, EvalTask, evaluate, model_inputs
from mmdiff.evals.reuse import BatchReuse
from mmdiff.models.base import Backbone
from mmdiff.progress import progress_bar

PositionName = Literal["text", "image", "all"]
# (backbone, token types [batch, seq] or None) -> a context manager that intervenes while entered
Builder = Callable[[Backbone, "torch.Tensor | None"], AbstractContextManager[Any]]


def check_positions(positions: str) -> PositionName:
    if positions not in ("text", "image", "all"):
        raise ConfigError(f"positions must be 'text', 'image' or 'all'; got {positions!r}")
    return positions  # type: ignore[return-value]


def evaluate_under(
    adapter: Any,
    task: EvalTask,
    build: Builder | None,
    positions: PositionName = "all",
    *,
    batch_size: int = 16,
    progress: bool = True,
    description: str | None = None,
    bar: Progress | None = None,
    reuse: BatchReuse | None = None,
) -> EvalResult:
    """`evaluate(adapter, task)` with `build(backbone, token_types)` entered around every batch.

    build=None evaluates the clean model. Token types are computed only when `positions` needs them
    ("text" / "image"); with "all" the builder gets None. `bar`: a running rich Progress to add
    this evaluation's line to (rich allows one live display at a time); else one of its own.
    `reuse`: batches' inputs, token types and image features kept across evaluations (the same
    records in the same batches score exactly as when built again).
    """
    positions = check_positions(positions)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    backbone = adapter.backbone(task.side)
    records: Sequence = list(task.records)
    out = EvalResult(task.name, task.kind, [], [])
    with contextlib.ExitStack() as stack:
        if bar is None:
            bar = stack.enter_context(progress_bar(progress))
        if reuse is not None:
            stack.enter_context(reuse.vision(task.side))
        job = bar.add_task(description or f"eval {task.name}", total=len(records))
        stack.callback(bar.remove_task, job)
        for i in range(0, len(records), batch_size):
            chunk = list(records[i : i + batch_size])
            encoded = (reuse.inputs(task.side, chunk) if reuse is not None
                       else model_inputs(adapter, task.side, chunk))  # fmt: skip
            if build is None:
                ctx: AbstractContextManager[Any] = contextlib.nullcontext()
            else:
                token_types = None
                if positions != "all":  # [batch, seq]
                    token_types = (reuse.token_types(task.side, chunk) if reuse is not None
                                   else adapter.token_types(encoded, task.side))  # fmt: skip
                ctx = build(backbone, token_types)
            with ctx:
                part = evaluate(
                    adapter,
                    dataclasses.replace(task, records=chunk),
                    batch_size=len(chunk),
                    progress=False,
                    inputs=lambda side, batch, encoded=encoded: encoded,
                )
            out.record_ids += part.record_ids
            out.scores += part.scores
            out.predictions += part.predictions
            out.p_correct += part.p_correct
            bar.advance(job, len(chunk))
    return out


def check_yesno_metric(name: str) -> str:
    if name not in ("accuracy", "p_correct"):
        raise ConfigError(f"yesno_metric must be 'accuracy' or 'p_correct', got {name!r}")
    return name


def record_scores(result: EvalResult, yesno_metric: str = "accuracy") -> list[float]:
    """Per-record scores of a result: yes/no tasks give accuracy (0/1) or P(correct)."""
    if result.kind == "yesno":
        if yesno_metric == "p_correct":
            return list(result.p_correct)
        if yesno_metric != "accuracy":
            raise ConfigError(
                f"yesno_metric must be 'accuracy' or 'p_correct', got {yesno_metric!r}"
            )
    return list(result.scores)
