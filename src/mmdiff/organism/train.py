"""The organism's training loop: one short explicit loop shared by the three stages."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from mmdiff.data.records import Record
from mmdiff.organism.recipe import StageConfig
from mmdiff.organism.batches import IGNORE


def lr_at(step: int, stage: StageConfig) -> float:
    """Linear warmup to the peak rate, then cosine decay to 10% of it."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    t = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from logits[:, t] where the label is set."""
    # logits [batch, seq, vocab], labels [batch, seq]
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def train_stage(
    model: nn.Module,
    params: list[nn.Parameter],
    records: Iterator[Record],
    make_batch: Callable[[list[Record]], dict[str, torch.Tensor]],
    stage: StageConfig,
    *,
    description: str,
    progress: bool = True,
) -> list[float]:
    """Train `params` of `model` for `stage.steps` steps on consecutive batches of `records`.

    Returns the loss of every step. `make_batch` turns records into model inputs with "labels".
    """
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.98))
    model.train()
    losses: list[float] = []
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=stage.steps, loss="-")
        for step in range(stage.steps):
            batch = make_batch(list(itertools.islice(records, stage.batch_size)))
            labels = batch.pop("labels")
            for group in opt.param_groups:
                group["lr"] = lr_at(step, stage)
            logits = model(**batch).logits
            loss = next_token_loss(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == stage.steps - 1:
                recent = losses[-10:]
                bar.update(task, completed=step + 1, loss=f"{sum(recent) / len(recent):.3f}")
    model.eval()
    return losses
