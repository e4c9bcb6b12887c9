"""Batches kept across evaluations (evals.reuse): the same scores, fewer preprocessing and vision passes.

On a tiny LLaVA: evaluating with a `BatchReuse` gives exactly the answers, scores and P(correct) of
building every batch again (clean, a removal at text positions that needs token types, a generated
task), the second evaluation of the same batches runs neither the processor nor the vision tower,
and a budget too small to keep anything changes nothing but the cost. Steering evaluates alpha 0
(the unsteered model, for both methods and every layer) once per split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mmdiff.control import steering_experiment
from mmdiff.control import steering as steering_module
from mmdiff.control._evaluate import evaluate_under
from mmdiff.control.evaluator import Evaluator, ablation_builder
from mmdiff.evals.harness import EvalTask
from mmdiff.evals.reuse import BatchReuse

from test_control import LAYER, _labelled, _records, planted  # noqa: F401 - the fixture


def _vision_calls(adapter) -> list[int]:
    calls: list[int] = []
    tower = adapter.backbone("vlm").model.model.vision_tower
    tower.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _same(a, b) -> None:
    assert a.record_ids == b.record_ids
    assert a.scores == b.scores and a.predictions == b.predictions and a.p_correct == b.p_correct


def test_reused_batches_score_exactly_as_rebuilt_ones(planted):
    adapter, saes, _, _ = planted
    records = _records(10, "r", seed=5)
    yesno = EvalTask("spatial", records, kind="yesno")
    generated = EvalTask("g", records, kind="generate", score=lambda p, r: float(p == "yes"), max_new_tokens=3)
    feature = pd.DataFrame({"layer": [LAYER], "feature": [0]})
    text, every = ablation_builder(saes, feature, "text"), ablation_builder(saes, feature, "all")
    reuse = BatchReuse(adapter)
    calls = _vision_calls(adapter)
    for task in (yesno, generated):
        for b, positions in ((None, "all"), (text, "text"), (every, "all")):
            plain = evaluate_under(adapter, task, b, positions, batch_size=4, progress=False)
            first = evaluate_under(adapter, task, b, positions, batch_size=4, progress=False, reuse=reuse)
            n = len(calls)
            again = evaluate_under(adapter, task, b, positions, batch_size=4, progress=False, reuse=reuse)
            _same(plain, first)
            _same(plain, again)
            assert len(calls) == n  # the kept batches' image features: no vision pass
    assert reuse.misses == 3 and reuse.hits > 0  # three batches of 4, 4 and 2 records, built once
    assert "get_image_features" not in vars(adapter.backbone("vlm").model.model)  # the patch is undone


def test_a_budget_that_keeps_nothing_changes_only_the_cost(planted):
    adapter, saes, _, _ = planted
    task = EvalTask("spatial", _records(6, "b", seed=6), kind="yesno")
    build = ablation_builder(saes, pd.DataFrame({"layer": [LAYER], "feature": [0]}), "text")
    none = BatchReuse(adapter, budget_bytes=0)
    plain = evaluate_under(adapter, task, build, "text", batch_size=4, progress=False)
    _same(plain, evaluate_under(adapter, task, build, "text", batch_size=4, progress=False, reuse=none))
    _same(plain, evaluate_under(adapter, task, build, "text", batch_size=4, progress=False, reuse=none))
    assert none.used == 0 and none.hits == 0


def test_the_evaluator_keeps_batches_across_removals(planted):
    adapter, saes, _, _ = planted
    tasks = {"spatial": EvalTask("spatial", _labelled(adapter, _records(8, "k", seed=7)), kind="yesno")}
    ev = Evaluator(adapter, tasks, yesno_metric="p_correct", batch_size=4, progress=False)
    calls = _vision_calls(adapter)
    clean = ev.clean("spatial")
    first = len(calls)
    one = ev.scores("spatial", saes, [pd.DataFrame({"layer": [LAYER], "feature": [0]})], "text")
    other = ev.scores("spatial", saes, [pd.DataFrame({"layer": [LAYER], "feature": [1]})], "all")
    assert first == 2 and len(calls) == first  # two batches, each through the vision tower once
    assert clean.shape == one.shape == other.shape == (8,)
    assert not np.array_equal(clean, one)  # removing the planted read-out direction still bites


def test_steering_evaluates_alpha_zero_once_per_split(planted, monkeypatch):
    adapter, saes, stats, _ = planted
    test = EvalTask("spatial", _labelled(adapter, _records(6, "t", seed=2)), kind="yesno")
    val = EvalTask("spatial", _labelled(adapter, _records(6, "v", seed=3)), kind="yesno")
    seen: list[tuple[str, bool]] = []
    real = steering_module.evaluate_under

    def counting(adapter_, task, build, *args, **kwargs):
        seen.append((kwargs.get("description", ""), build is None))
        return real(adapter_, task, build, *args, **kwargs)

    monkeypatch.setattr(steering_module, "evaluate_under", counting)
    alphas = (-1.0, 0.0, 1.0)
    df = steering_experiment(
        adapter, saes, pd.DataFrame({"layer": [LAYER], "feature": [0]}), test, val, stats,
        positive_records=val.records, negative_records=_records(4, "n", tags=("vqa",), seed=4),
        alphas=alphas, layers=[1, 2], yesno_metric="p_correct", batch_size=8, progress=False,
    )  # fmt: skip
    # validation: 3 feature + 2 layers x 3 alphas; test: 3 feature + 3 baseline; alpha 0 once per split
    assert len(seen) == (3 + 6 + 3 + 3) - (2 + 1)
    assert sum(clean for _, clean in seen) == 2
    zero = df[df["alpha"] == 0.0]
    for split, rows in zero.groupby("split"):
        assert rows["score"].nunique() == 1, split  # every alpha-0 row is the one clean evaluation
    assert len(zero) == 3 + 2  # the rows are all still there
