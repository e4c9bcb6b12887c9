"""Per-record scores of the evaluation tasks under feature removals, each (removal, task) evaluated once.

The control stage's analyses (the removal experiment, the own-feature sets, single features, the
dose-response and the selection-pipeline ablation) remove many feature sets and score a few tasks
under each. They share one `Evaluator`: the clean pass is run once, a removal evaluated for one
analysis (the full set at text positions, its matched random controls) is not evaluated again for
another, and an analysis only pays for the tasks it asks for. It also keeps the CPU seconds each
analysis spent (`charged_to`), which the stage reports. Every evaluation builds a batch's inputs and
image features once (`evals.reuse.BatchReuse`: a removal changes neither).

A removal is a list of feature sets ("draws"): with one, every record is scored under it; with
several, record i of each task is scored under draw i mod len(draws) (the split random control:
the draws' mean effect, unbiased, for the cost of one evaluation). An empty set removes nothing and
scores as the clean model, without being evaluated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mmdiff.control._evaluate import check_positions, evaluate_under, record_scores
from mmdiff.control.controls import features_by_layer
from mmdiff.errors import DataError
from mmdiff.bootstrap import paired_effect
from mmdiff.evals.harness import EvalTask
from mmdiff.evals.power import paired_mde
from mmdiff.evals.reuse import BatchReuse
from mmdiff.interventions import ablate_features, decoder_directions


def ablation_builder(saes: Mapping[int, Any], pairs: pd.DataFrame, positions: str):
    """A builder (backbone, token types) -> ablate_features over the decoder rows of `pairs`."""
    directions = decoder_directions(saes, features_by_layer(pairs))  # {layer: [n, d_model]}

    def build(backbone, token_types):
        return ablate_features(backbone, directions, positions=positions, token_types=token_types)

    return build


def set_key(pairs: pd.DataFrame) -> tuple[tuple[int, int], ...]:
    """The (layer, feature) pairs of a set, sorted: what identifies a removal."""
    return tuple(sorted({(int(a), int(b)) for a, b in zip(pairs["layer"], pairs["feature"])}))


@dataclasses.dataclass
class Outcome:
    """One task's records under one removal: score, answer and P(correct) (NaN where none)."""

    scores: np.ndarray
    predictions: list[str]
    p_correct: np.ndarray

    def take(self, idx: np.ndarray) -> "Outcome":
        return Outcome(self.scores[idx], [self.predictions[int(i)] for i in idx], self.p_correct[idx])


class Evaluator:
    """Scores of `eval_tasks` (clean and under removals), cached by (SAEs, positions, sets, task).

    `sae_key` names the SAEs a removal's decoder rows come from (the study's role by default;
    another regime's SAEs need another key). `n_records` scores n evenly spaced records of a task
    (None: all); an evaluation of one set on every record serves any subset.
    """

    def __init__(
        self,
        adapter: Any,
        eval_tasks: Mapping[str, EvalTask],
        *,
        yesno_metric: str = "accuracy",
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        self.adapter, self.tasks = adapter, dict(eval_tasks)
        self.yesno_metric, self.batch_size, self.progress = yesno_metric, batch_size, progress
        self.bar: Any = None  # a running rich Progress to add evaluation lines to, when set
        self.reuse = BatchReuse(adapter)  # each batch's inputs and image features, built once
        self._cache: dict[tuple, Outcome] = {}
        self.account = "removal"
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self.evaluations: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def charged_to(self, account: str) -> Iterator[None]:
        """Charge the evaluations run inside to `account` (an analysis's name)."""
        before, self.account = self.account, account
        try:
            yield
        finally:
            self.account = before

    def task(self, name: str) -> EvalTask:
        if name not in self.tasks:
            raise DataError(f"no evaluation task {name!r}; the tasks are {sorted(self.tasks)}")
        return self.tasks[name]

    def indices(self, name: str, n_records: int | None) -> np.ndarray:
        """The records of a task scored at `n_records`: all of them (None, or at least as many as
        the task has), else n evenly spaced ones, so a task made of several families keeps them all."""
        total = len(self.task(name).records)
        if n_records is None or n_records >= total:
            return np.arange(total)
        return np.unique(np.linspace(0, total - 1, max(1, int(n_records))).round().astype(np.int64))

    def size(self, name: str, n_records: int | None = None) -> int:
        return int(self.indices(name, n_records).size)

    def clean(self, name: str, n_records: int | None = None) -> np.ndarray:
        """[n] per-record clean scores of a task."""
        return self.scores(name, {}, [], "all", n_records=n_records)

    def scores(
        self,
        name: str,
        saes: Mapping[int, Any],
        draws: Sequence[pd.DataFrame],
        positions: str,
        *,
        sae_key: str = "",
        n_records: int | None = None,
        label: str = "",
    ) -> np.ndarray:
        """[n] per-record scores of task `name` (its records `indices(name, n_records)`) with record
        i of them under draws[i mod len(draws)] removed at `positions`; no draws (or only empty ones)
        = the clean model. A removal of one set already scored on every record is sliced, not rerun."""
        return self.outcome(
            name, saes, draws, positions, sae_key=sae_key, n_records=n_records, label=label
        ).scores

    def outcome(
        self,
        name: str,
        saes: Mapping[int, Any],
        draws: Sequence[pd.DataFrame],
        positions: str,
        *,
        sae_key: str = "",
        n_records: int | None = None,
        label: str = "",
    ) -> Outcome:
        """`scores`, with the model's answer and P(correct) (yes/no tasks; NaN otherwise) per record."""
        idx = self.indices(name, n_records)
        keys = tuple(set_key(d) for d in draws)
        if not any(keys):
            keys, positions, sae_key = (), "all", ""
        else:
            check_positions(positions)
        key = (sae_key, positions, keys, name, idx.size)
        if key in self._cache:
            return self._cache[key]
        whole = self._cache.get(key[:-1] + (len(self.task(name).records),))
        if whole is not None and len(keys) <= 1:  # no split over draws: each record's score stands alone
            return whole.take(idx)
        task = self.task(name)
        records = [task.records[int(i)] for i in idx]
        out = Outcome(
            np.empty(idx.size, dtype=np.float64), [""] * idx.size, np.full(idx.size, np.nan)
        )
        parts = [ablation_builder(saes, d, positions) for d in draws] if keys else [None]
        start = time.process_time()
        for d, build in enumerate(parts):
            sub = records[d :: len(parts)]
            if not sub:
                continue
            res = evaluate_under(
                self.adapter,
                dataclasses.replace(task, records=sub),
                build,
                positions if build is not None else "all",  # type: ignore[arg-type]
                batch_size=self.batch_size,
                progress=self.progress,
                bar=self.bar,
                reuse=self.reuse,
                description=f"{label or ('clean' if build is None else 'removal')}: {name}",
            )
            out.scores[d :: len(parts)] = record_scores(res, self.yesno_metric)
            out.predictions[d :: len(parts)] = [str(p) for p in res.predictions] or [""] * len(sub)
            if res.p_correct:
                out.p_correct[d :: len(parts)] = res.p_correct
        self.cpu_seconds[self.account] += time.process_time() - start
        self.evaluations[self.account] += 1
        self._cache[key] = out
        return out


def effect_columns(
    treated: np.ndarray,
    clean: np.ndarray,
    control: np.ndarray | None,
    *,
    n_boot: int,
    seed: int,
) -> dict[str, float]:
    """The columns every effect carries: baseline, treated, effect [95% CI] (treated - clean,
    paired bootstrap), the control's effect [CI], selectivity [CI] (treated - control per record),
    the MDE at 80% power (evals.power.paired_mde) and n. NaN where there is no control."""
    eff = paired_effect(treated, clean, n_boot=n_boot, seed=seed)
    row: dict[str, float] = {
        "baseline": float(clean.mean()),
        "treated": float(treated.mean()),
        "effect": eff.mean,
        "ci_lo": eff.lo,
        "ci_hi": eff.hi,
        "control_effect": math.nan,
        "control_ci_lo": math.nan,
        "control_ci_hi": math.nan,
        "selectivity": math.nan,
        "selectivity_ci_lo": math.nan,
        "selectivity_ci_hi": math.nan,
        "mde": paired_mde(treated, clean),
        "n": int(clean.size),
    }
    if control is not None:
        ce = paired_effect(control, clean, n_boot=n_boot, seed=seed)
        sel = paired_effect(treated, control, n_boot=n_boot, seed=seed)  # (tr - base) - (ctrl - base)
        row.update(
            control_effect=ce.mean, control_ci_lo=ce.lo, control_ci_hi=ce.hi,
            selectivity=sel.mean, selectivity_ci_lo=sel.lo, selectivity_ci_hi=sel.hi,
        )  # fmt: skip
    return row
