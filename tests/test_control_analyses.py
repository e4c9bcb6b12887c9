"""The removal analyses (control.analyses): set variants, single features, dose-response.

On the planted tiny LLaVA of test_control.py (the yes/no answer reads direction v at layer 2, SAE
feature 0 is v, every other feature orthogonal to it, statistics on text tokens only), and on an
evaluator whose scores are a hand-made function of the removed features.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mmdiff.control.analyses import (
    DOSE_RESPONSE,
    EMPTY,
    EVALUATED,
    NOT_TESTABLE,
    SET_VARIANTS,
    SINGLE_FEATURES,
    SetRemover,
    dose_response,
    dose_sizes,
    eval_roles,
    own_features,
    rank_features,
    run_analyses,
    set_variants,
    write_analysis,
    single_features,
)
from mmdiff.control.evaluator import Evaluator, set_key
from mmdiff.control.removal import removal_experiment
from mmdiff.evals.harness import EvalTask
from mmdiff.stats import save_feature_stats
from test_control import LAYER, _labelled, _records, planted  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _pairs(*features: int, layer: int = LAYER) -> pd.DataFrame:
    return pd.DataFrame({"layer": [layer] * len(features), "feature": list(features)})


def _yesno_tasks(adapter) -> dict[str, EvalTask]:
    spatial = _labelled(adapter, _records(12, "s", seed=1))
    benign = _labelled(adapter, _records(8, "x", tags=("existence", "yesno"), seed=2))
    return {
        "spatial": EvalTask("spatial", spatial, kind="yesno"),
        "existence": EvalTask("existence", benign, kind="yesno"),
    }


# --------------------------------------------------------------------------------- no model
def test_ranking_sizes_roles_and_own_features_by_hand():
    table = pd.DataFrame({
        "layer": [0, 0, 1, 1], "feature": [3, 1, 2, 7],
        "delta_p": [0.1, 0.3, 0.3, 0.05], "odds_ratio": [2.0, 1.5, 4.0, 9.0],
    })  # fmt: skip
    ranked = rank_features(table)
    # delta_p first; the 0.3 tie goes to the larger odds ratio (L1/F2)
    assert list(zip(ranked["layer"], ranked["feature"])) == [(1, 2), (0, 1), (0, 3), (1, 7)]
    assert ranked["score"].tolist() == [0.3, 0.3, 0.1, 0.05]
    no_score = rank_features(table[["layer", "feature"]])
    assert list(no_score["feature"]) == [3, 1, 2, 7] and no_score["score"].isna().all()
    assert dose_sizes(11) == [1, 2, 4, 8, 11]
    assert dose_sizes(8) == [1, 2, 4, 8] and dose_sizes(1) == [1] and dose_sizes(0) == []
    assert dose_sizes(50, most=6) == [1, 2, 4, 6]
    assert eval_roles("ocr", ["ocr", "vqa", "existence"], "vqa", "existence") == [
        ("task", "ocr"), ("general", "vqa"), ("benign", "existence"),
    ]  # fmt: skip
    assert eval_roles("ocr", ["ocr"], "vqa", None) == [("task", "ocr")]
    sets = {"a": _pairs(1, 2, 3), "b": _pairs(2, 3), "c": _pairs(3, 9)}
    assert own_features(sets, "a")["feature"].tolist() == [1]
    assert own_features(sets, "b").empty  # every feature of b is in a
    assert own_features(sets, "c")["feature"].tolist() == [9]
    # analysis_records: evenly spaced records, so a task of three 200-record families keeps all three
    ev = Evaluator(None, {"vqa": EvalTask("vqa", [object()] * 600, kind="yesno")}, progress=False)
    idx = ev.indices("vqa", 200)
    assert idx.size == 200 and idx[0] == 0 and idx[-1] == 599 and (np.diff(idx) >= 3).all()
    assert ev.indices("vqa", None).size == 600 == ev.indices("vqa", 900).size


class _Handmade(Evaluator):
    """Scores without a model: record i of a task scores 1 unless feature f < 8 is removed and
    i < 4 * (f + 1) - the best-ranked features (lower f) break fewer records, so removing the
    top k features breaks 4 * k records of 32 when k <= 8; features >= 8 break nothing."""

    def __init__(self, tasks):
        super().__init__(None, tasks, progress=False)

    def scores(self, name, saes, draws, positions, *, sae_key="", n_records=None, label=""):
        n = self.size(name, n_records)
        out = np.ones(n)
        for i in range(n):
            removed = {f for (_, f) in set_key(draws[i % len(draws)])} if draws else set()
            if any(f < 8 and i < 4 * (f + 1) for f in removed):
                out[i] = 0.0
        self.evaluations[self.account] += 1
        return out


class _FakeSAE:
    def __init__(self, d_sae: int, d_model: int):
        self.W_dec = np.zeros((d_sae, d_model))


def test_dose_response_on_a_constructed_case_is_monotone_and_beyond_random():
    recs = [EvalTask("spatial", [object()] * 32, kind="yesno")]  # records are only counted
    ev = _Handmade({"spatial": recs[0]})
    table = pd.DataFrame({"layer": [0] * 8, "feature": list(range(8)), "delta_p": np.linspace(0.8, 0.1, 8)})
    remover = SetRemover(ev, {0: _FakeSAE(64, 32)}, None, exclude=table, n_random=2, n_boot=200)
    df = dose_response(remover, {"spatial": table}, general=None)
    assert list(df.columns) == list(DOSE_RESPONSE.names)
    assert df["n_features"].tolist() == [1, 2, 4, 8]
    # the top k features are 0..k-1: feature k-1 breaks the first 4k records, 4k of 32
    assert df["effect"].tolist() == pytest.approx([-4 / 32, -8 / 32, -16 / 32, -32 / 32])
    assert (np.diff(df["effect"]) < 0).all()  # monotone in the dose
    # random features are drawn from 8..63 (the set is excluded): they break nothing
    assert (df["control_effect"] == 0).all() and (df["selectivity"] == df["effect"]).all()
    assert (df["selectivity_ci_hi"] < 0).all() and df["mde"].notna().all()
    assert df["dims_share"].tolist() == [1 / 32, 2 / 32, 4 / 32, 8 / 32]
    assert (df["status"] == EVALUATED).all() and df["mass_at_positions"].isna().all()


# ------------------------------------------------------------------------------ tiny model
def test_set_variants_own_features_and_positions_side_by_side(planted):
    adapter, saes, stats, _ = planted
    tasks = _yesno_tasks(adapter)
    ev = Evaluator(adapter, tasks, yesno_metric="p_correct", batch_size=12, progress=False)
    # spatial holds the planted feature 0 and feature 5; ocr holds both (and 9): spatial has no
    # features of its own, ocr's own feature is 9
    sets = {"spatial": _pairs(0, 5), "ocr": _pairs(0, 5, 9)}
    remover = SetRemover(ev, saes, stats, exclude=pd.concat(sets.values()), n_random=2, n_bins=4, n_boot=500)
    df = set_variants(remover, sets, positions=("text", "image"), general=None, benign="existence")
    assert list(df.columns) == list(SET_VARIANTS.names)
    sp = df[df["target_task"] == "spatial"]
    # own features: none, so no evaluation and no effect
    own = sp[sp["variant"] == "own"]
    assert (own["status"] == EMPTY).all() and (own["n_features"] == 0).all() and own["effect"].isna().all()
    full = sp[sp["variant"] == "full"].set_index(["positions", "eval_task"])
    # the statistics saw text tokens only: at image positions the set holds no activation mass,
    # so that removal is not testable and not evaluated; at text positions it is
    assert full.loc[("image", "spatial"), "status"] == NOT_TESTABLE
    assert full.loc[("image", "spatial"), "mass_at_positions"] == 0.0
    assert math.isnan(full.loc[("image", "spatial"), "effect"])
    text = full.loc[("text", "spatial")]
    assert text["status"] == EVALUATED and text["mass_at_positions"] == 1.0
    assert text["effect"] < -0.3 and text["selectivity_ci_hi"] < 0 and text["mde"] > 0
    assert text["dims_share"] == pytest.approx(2 / adapter.backbone("vlm").d_model)
    assert full.loc[("text", "existence"), "role"] == "benign"
    # ocr: its own feature 9 is orthogonal to the read-out, so removing it changes nothing
    ocr_own = df[(df["target_task"] == "ocr") & (df["variant"] == "own") & (df["positions"] == "text")]
    assert ocr_own["n_features"].tolist() == [1] and (ocr_own["role"] == "benign").all()
    assert (ocr_own["effect"].abs() < 0.05).all()
    # the removal experiment's clean pass, full set at text positions and its random draws (the
    # same seed and bins; feature 9 lies in neither set's bin) were all evaluated already
    before = sum(ev.evaluations.values())
    removal_experiment(adapter, saes, {"spatial": sets["spatial"]}, {"spatial": tasks["spatial"]},
                       stats, n_random=2, n_bins=4, yesno_metric="p_correct", exclude_all_sets=True,
                       mismatched=False, evaluator=ev, progress=False)  # fmt: skip
    assert sum(ev.evaluations.values()) == before


def test_single_features_carry_mde_and_selectivity_and_the_runner_writes_them(planted, tmp_path):
    adapter, saes, stats, _ = planted
    tasks = _yesno_tasks(adapter)
    ev = Evaluator(adapter, tasks, yesno_metric="p_correct", batch_size=12, progress=False)
    table = pd.DataFrame({"layer": [LAYER] * 3, "feature": [5, 0, 9], "delta_p": [0.1, 0.4, 0.2]})
    remover = SetRemover(ev, saes, stats, exclude=table, n_random=2, n_bins=4, n_boot=500)
    df = single_features(remover, {"spatial": table}, top=2, general=None, benign="existence")
    assert list(df.columns) == list(SINGLE_FEATURES.names)
    assert df["rank"].tolist() == [1, 1, 2, 2] and df["feature"].tolist() == [0, 0, 9, 9]
    top = df[(df["rank"] == 1) & (df["eval_task"] == "spatial")].iloc[0]
    assert top["score"] == 0.4 and top["n_features"] == 1
    assert top["effect"] < -0.3 and top["selectivity_ci_hi"] < 0 < top["mde"]
    second = df[(df["rank"] == 2) & (df["eval_task"] == "spatial")].iloc[0]
    assert abs(second["effect"]) < 0.05 and not math.isnan(second["selectivity"])
    # categories: feature 0's top records are all "left of" ones, so it is also scored on the
    # spatial records of that relation (every other record of _records asks "above")
    from mmdiff.control.analyses import CATEGORY, feature_categories

    topk = pd.DataFrame({"layer": [LAYER] * 4, "feature": [0, 0, 0, 9], "record_id": ["a", "a", "b", "c"]})
    meta = {"a": {"relation": "left of"}, "b": {"relation": "left of"}, "c": {"relation": "above"}}
    own = feature_categories(topk, meta, "relation")
    assert own == {(LAYER, 0): "left of", (LAYER, 9): "above"}
    df = single_features(remover, {"spatial": table}, top=1, general=None, benign=None,
                         categories={"spatial": ("relation", own)})  # fmt: skip
    cat = df[df["role"] == CATEGORY].iloc[0]
    assert cat["eval_task"] == "spatial (relation=left of)" and cat["n"] == 6  # 12 records, half "left of"
    assert cat["effect"] < -0.3 and not math.isnan(cat["selectivity"]) and cat["mde"] > 0
    # the runner: a run directory's task tables, SAEs and statistics, written to eval/
    run = tmp_path / "run"
    saes[LAYER].save(run / "saes" / "text" / f"layer_{LAYER}")
    save_feature_stats(stats, run / "stats")
    (run / "features").mkdir(parents=True)
    table.to_parquet(run / "features" / "spatial.parquet")
    done = run_analyses(run, ev, stats_split="vqa", variant_positions=["text"], single_top=1,
                        dose_max=2, general=None, n_random=2, n_bins=4, n_boot=200)  # fmt: skip
    assert set(done) == {"set_variants", "single_features", "dose_response"}
    dose = pd.read_parquet(run / "eval" / "dose_response.parquet")
    assert dose["n_features"].tolist() == [1, 2] and set(dose["eval_task"]) == {"spatial"}
    saved = json.loads((run / "eval" / "single_features.json").read_text())
    assert saved["settings"]["top"] == 1 and "cpu_seconds" in saved and len(saved["single_features"]) == 2


# ------------------------------------------------------------------------------ findings
def _row(**kw):
    """One analysis row: an evaluated removal on 200 records, with what the test sets."""
    base = dict(target_task="spatial", positions="all", n_features=4, dims_share=4 / 128, mass_at_positions=0.9,
                status=EVALUATED, eval_task="spatial", role="task", metric="accuracy", baseline=0.8, treated=0.7,
                effect=-0.1, ci_lo=-0.15, ci_hi=-0.05, control_effect=0.0, control_ci_lo=-0.02, control_ci_hi=0.02,
                selectivity=-0.1, selectivity_ci_lo=-0.15, selectivity_ci_hi=-0.05, mde=0.05, n=200)  # fmt: skip
    return {**base, **kw}


def write_fake_analyses(run) -> None:
    """Analysis tables of a run where spatial's own features, one spatial feature and two of its
    top features lower spatial beyond random (one feature alone is matched by random features), and
    the full pipeline's features spare general VQA while the contrastive-only ones do not."""
    out = run / "eval"
    variants = [_row(variant="full"), _row(variant="own", n_features=2),
                _row(variant="own", positions="text", status=NOT_TESTABLE, mass_at_positions=0.01, effect=math.nan)]
    write_analysis(pd.DataFrame(variants, columns=list(SET_VARIANTS.names)), SET_VARIANTS, out, cpu_seconds=12.0)
    single = [_row(rank=1, layer=2, feature=7, score=0.3, n_features=1),
              _row(rank=1, layer=2, feature=7, score=0.3, n_features=1, eval_task="vqa", role="general",
                   effect=0.005, ci_lo=-0.01, ci_hi=0.02)]  # fmt: skip
    write_analysis(pd.DataFrame(single, columns=list(SINGLE_FEATURES.names)), SINGLE_FEATURES, out, cpu_seconds=20.0)
    dose = [_row(n_features=1, effect=-0.05, ci_lo=-0.08, ci_hi=-0.02, selectivity=-0.01,
                 selectivity_ci_lo=-0.04, selectivity_ci_hi=0.02),
            _row(n_features=2)]  # fmt: skip
    write_analysis(pd.DataFrame(dose, columns=list(DOSE_RESPONSE.names)), DOSE_RESPONSE, out, cpu_seconds=30.0)
    from mmdiff.control.analyses import PIPELINE_ABLATION

    pipe = [_row(selection=s, step=i, applied=True, n_features=n, eval_task=t, role=role, **kw)
            for i, s, n in ((2, "contrastive", 9), (5, "+ adapted", 4))
            for t, role, kw in (("spatial", "task", {}),
                                ("vqa", "general", {"effect": -0.2 if n == 9 else 0.0, "ci_lo": -0.3 if n == 9 else -0.02,
                                                    "ci_hi": -0.1 if n == 9 else 0.02}))]  # fmt: skip
    write_analysis(pd.DataFrame(pipe, columns=list(PIPELINE_ABLATION.names)), PIPELINE_ABLATION, out, cpu_seconds=9.0)


def test_findings_of_the_analyses_by_hand(tmp_path):
    from mmdiff.report.findings import (
        NOT_MEASURED,
        REPRODUCED,
        dose_finding,
        own_features_finding,
        single_feature_finding,
    )

    assert own_features_finding(tmp_path).status == NOT_MEASURED
    write_fake_analyses(tmp_path)
    own = own_features_finding(tmp_path)
    assert own.status == REPRODUCED and own.measured == "1 of 1 sets"
    single = single_feature_finding(tmp_path)
    assert single.status == REPRODUCED and "L2/F7 (rank 1)" in single.detail and "general VQA +0.005" in single.detail
    dose = dose_finding(tmp_path)
    # k = 1 lowers spatial (-0.05, interval below 0) but random features of one feature match it
    assert dose.status == REPRODUCED and "beyond random from k = 2" in dose.detail
    assert "at k = [1] random sets of the same size match the effect: not a finding" in dose.detail
    # a set whose only dose random features match is not reproduced, and says so
    df = pd.read_parquet(tmp_path / "eval" / "dose_response.parquet").head(1)
    write_analysis(df, DOSE_RESPONSE, tmp_path / "eval")
    dose = dose_finding(tmp_path)
    assert dose.status == "not reproduced" and "not a finding" in dose.detail
    # the own-features rows of a set with none: not testable
    empty = pd.DataFrame([_row(variant="own", status=EMPTY, n_features=0, effect=math.nan)],
                         columns=list(SET_VARIANTS.names))  # fmt: skip
    write_analysis(empty, SET_VARIANTS, tmp_path / "eval")
    assert own_features_finding(tmp_path).status == "not testable"


class _TwoTasks(Evaluator):
    """Scores without a model, 32 records a task: removing any of features 0-3 breaks spatial's
    first 8 records; removing feature 20 or 21 breaks the first 16 of general VQA."""

    def __init__(self):
        n = [object()] * 32
        super().__init__(None, {"spatial": EvalTask("spatial", n, kind="yesno"),
                                "vqa": EvalTask("vqa", n, kind="yesno")}, progress=False)  # fmt: skip

    def scores(self, name, saes, draws, positions, *, sae_key="", n_records=None, label=""):
        out = np.ones(self.size(name, n_records))
        for i in range(out.size):
            removed = {f for (_, f) in set_key(draws[i % len(draws)])} if draws else set()
            if (name == "spatial" and removed & {0, 1, 2, 3} and i < 8) or (name == "vqa" and removed & {20, 21} and i < 16):
                out[i] = 0.0
        self.evaluations[self.account] += 1
        return out


def test_pipeline_ablation_on_a_constructed_case(tmp_path):
    from mmdiff.control.analyses import PIPELINE_ABLATION, pipeline_ablation, pipeline_sets
    from mmdiff.report.findings import REPRODUCED, pipeline_finding

    # candidates 0-3, 20, 21, 30; 30 is not image-dominated, 20 and 21 go silent under the neutral
    # instruction (lexical), 3 is not adapted; 40 is no candidate
    feats = [0, 1, 2, 3, 20, 21, 30, 40]
    scores = pd.DataFrame({
        "layer": [0] * 8, "feature": feats,
        "candidate": [True] * 7 + [False],
        "neutral_image_dominated": pd.array([True] * 6 + [False, True], dtype="boolean"),
        "neutral_active": pd.array([True] * 4 + [False, False, True, True], dtype="boolean"),
        "in_adapted_set": pd.array([True, True, True, False, True, True, True, True], dtype="boolean"),
    })  # fmt: skip
    steps = pipeline_sets(scores)
    assert [(s, a, p["feature"].tolist()) for s, a, p in steps] == [
        ("contrastive", True, [0, 1, 2, 3, 20, 21, 30]), ("+ visual", True, [0, 1, 2, 3, 20, 21]),
        ("+ lexical", True, [0, 1, 2, 3]), ("+ adapted", True, [0, 1, 2]),
    ]  # fmt: skip
    # a filter the study did not run (no neutral re-run: NA everywhere) is not applied
    no_neutral = scores.assign(neutral_active=pd.array([pd.NA] * 8, dtype="boolean"))
    assert [a for _, a, _ in pipeline_sets(no_neutral)] == [True, True, False, True]
    ev = _TwoTasks()
    remover = SetRemover(ev, {0: _FakeSAE(64, 32)}, None, exclude=scores[scores["candidate"]], n_random=2, n_boot=200)
    # the random regime's rule kept features 50 and 51 of its own SAE, which carry nothing here
    regime_sets = {"spatial": pd.DataFrame({"layer": [0, 0], "feature": [50, 51], "delta_p": [0.2, 0.1]})}
    regime = (SetRemover(ev, {0: _FakeSAE(64, 32)}, None, exclude=regime_sets["spatial"], n_random=2, n_boot=200,
                         sae_key="random"), regime_sets)  # fmt: skip
    df = pipeline_ablation(remover, {"spatial": scores}, general="vqa", regime=regime)
    assert list(df.columns) == list(PIPELINE_ABLATION.names)
    assert df["selection"].tolist() == ["random"] * 2 + ["random-regime SAE"] * 2 + [
        s for s, _, _ in steps for _ in (0, 1)
    ]
    assert df["step"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    eff = df.set_index(["selection", "eval_task"])["effect"]
    # every step keeps a spatial feature: -8/32 on spatial; only the first two keep 20 and 21
    assert [eff[(s, "spatial")] for s, _, _ in steps] == [-0.25] * 4
    assert [eff[(s, "vqa")] for s, _, _ in steps] == [-0.5, -0.5, 0.0, 0.0]
    assert eff[("random", "spatial")] == 0.0 == eff[("random", "vqa")]  # the full set's matched control
    assert df.loc[df["selection"] == "random", "selectivity"].isna().all()
    assert (eff.loc["random-regime SAE"] == 0).all()
    write_analysis(df, PIPELINE_ABLATION, tmp_path / "eval")
    found = pipeline_finding(tmp_path)
    assert found.status == REPRODUCED and "contrastive only (7 features) general VQA -0.500" in found.detail
