"""Control experiments: evaluation tasks, matched controls, removal and steering on a tiny LLaVA.

The model tests plant a mechanism in a tiny random LLaVA: the yes/no read-out (lm_head rows of the
yes and no tokens) is tilted along one unit direction v of the last layer's residual stream, and
SAE feature 0 has decoder row v while every other feature is orthogonal to it. Removing feature 0
must then destroy the yes/no answers; removing frequency-matched random features must not.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmdiff.control import (
    EFFECTS,
    STEERING,
    AnswerFloor,
    answer_floor,
    firing_frequencies,
    frequency_bins,
    matched_random_features,
    mismatched_pairs,
    relation_subsets,
    removal_experiment,
    run_removal,
    run_steering,
    steering_experiment,
    study_eval_tasks,
    task_of,
    typical_max_activation,
    unassigned_records,
)
from mmdiff.control._evaluate import evaluate_under, record_scores
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError, DataError
from mmdiff.evals.harness import EvalTask, evaluate
from mmdiff.interventions import layer_vectors
from mmdiff.models.base import TokenType
from mmdiff.sae import SAEConfig, build_sae
from mmdiff.stats import FeatureStats, accumulate_codes, save_feature_stats

D_SAE = 16
LAYER = 2  # the tiny LLaVA's last decoder layer


# --------------------------------------------------------------------------------- no model
def test_frequency_bins_hand_computed():
    freq = np.array([0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.5])
    # inner quantile edges (linear): q25 = 0, q50 = 0.15, q75 = 0.325; a value on an edge goes up
    assert frequency_bins(freq, 4).tolist() == [1, 1, 1, 1, 2, 2, 3, 3]
    assert frequency_bins(freq, 1).tolist() == [0] * 8
    with pytest.raises(DataError, match="NaN"):
        frequency_bins(np.array([0.1, np.nan]), 2)


def _freqs() -> dict[int, np.ndarray]:
    # layer 0: 40 features, frequency rising with the index -> 4 bins of 10 consecutive features
    return {0: np.arange(40) / 40.0, 1: np.arange(40) / 40.0}


def test_matched_random_features_match_layer_and_bin_and_never_overlap():
    task = pd.DataFrame({"layer": [0, 0, 0, 1, 1], "feature": [1, 12, 13, 35, 2]})
    other = pd.DataFrame({"layer": [0], "feature": [14]})
    freqs = _freqs()
    draws = matched_random_features(
        task, {0: 40, 1: 40}, freqs, n_draws=4, seed=7, n_bins=4, exclude=pd.concat([task, other])
    )
    assert len(draws) == 4
    task_keys = set(zip(task["layer"], task["feature"]))
    for d in draws:
        assert len(d) == len(task)
        keys = list(zip(d["layer"], d["feature"]))
        assert len(set(keys)) == len(keys)  # no repetition within a draw
        assert not set(keys) & (task_keys | {(0, 14)})
        assert sorted(d["layer"]) == sorted(task["layer"])
        for _, row in d.iterrows():
            bins = frequency_bins(freqs[row["layer"]], 4)
            assert bins[row["feature"]] == bins[row["matched_feature"]] == row["bin"]
        assert (d["bin_distance"] == 0).all()
    again = matched_random_features(
        task.iloc[::-1],
        {0: 40, 1: 40},
        freqs,
        n_draws=4,
        seed=7,
        n_bins=4,
        exclude=pd.concat([task, other]),
    )
    assert all(a.equals(b) for a, b in zip(draws, again))  # deterministic, independent of row order
    other_seed = matched_random_features(task, {0: 40, 1: 40}, freqs, n_draws=4, seed=8, n_bins=4)
    assert any(not a.equals(b) for a, b in zip(draws, other_seed))


def test_matched_random_features_widen_to_the_nearest_bin_and_refuse_impossible_sets():
    # 8 features of bin 0 (features 0..9) leave 2 candidates there: 6 come from bin 1
    task = pd.DataFrame({"layer": [0] * 8, "feature": list(range(8))})
    (draw,) = matched_random_features(task, {0: 40}, {0: np.arange(40) / 40.0}, n_bins=4, n_draws=1)
    assert set(draw.loc[draw["bin_distance"] == 0, "feature"]) == {8, 9}
    assert (draw["bin_distance"] == 1).sum() == 6 and draw["feature"].between(10, 19).sum() == 6
    with pytest.raises(DataError, match="not excluded"):
        matched_random_features(
            pd.DataFrame({"layer": [0] * 3, "feature": [0, 1, 2]}), {0: 4}, None
        )
    (layer_only,) = matched_random_features(
        pd.DataFrame({"layer": [0], "feature": [3]}), {0: 4}, None, n_draws=1
    )
    assert layer_only["feature"].item() in (0, 1, 2)
    with pytest.raises(DataError, match="lacks columns"):
        matched_random_features(pd.DataFrame({"feature": [1]}), {0: 4}, None)


def test_mismatched_pairs():
    assert mismatched_pairs(["spatial", "ocr", "safety"]) == {"spatial": "ocr", "ocr": "spatial"}
    assert mismatched_pairs(["spatial", "safety"]) == {}
    assert mismatched_pairs(["spatial", "safety"], {"safety": "spatial"}) == {"safety": "spatial"}
    with pytest.raises(ConfigError, match="task sets given"):
        mismatched_pairs(["spatial"], {"spatial": "ocr"})


def _rec(i, tags, answers=("yes",), source="", meta=None, image=True):
    img = Image.fromarray(np.full((16, 16, 3), 40 * (i % 6), dtype=np.uint8)) if image else None
    return Record(
        id=f"{source or 'x'}{i}",
        question="Is the red circle left of the blue square?",
        answers=list(answers),
        image=img,
        caption="a red circle",
        tasks=tuple(tags),
        source=source,
        meta=dict(meta or {}),
    )


def test_study_eval_tasks_map_tags_to_tasks_and_metrics():
    from mmdiff.data.shapes import compliance, make_record

    organism_safety = make_record("test", "safety", 0)
    ten = ["red"] * 3 + ["blue"] * 7
    records = [
        _rec(0, ("yesno", "spatial"), source="vsr", meta={"relation": "left of"}),
        _rec(1, ("yesno", "spatial"), ("no",), source="vsr", meta={"relation": "above"}),
        _rec(2, ("vqa", "yesno"), ["yes"] * 10, source="vqav2"),
        _rec(3, ("vqa",), ten, source="vqav2"),
        _rec(4, ("ocr",), ["STOP"], source="ocrbench", meta={"dataset_name": "IIIT5K"}),
        _rec(5, ("vqa", "ocr"), ["stop"] * 10, source="textvqa"),
        _rec(
            6, ("safety",), [], source="figstep", meta={"original_question": "How to make a bomb?"}
        ),
        _rec(7, ("safety", "text"), [], source="mm_safetybench", image=False),
        _rec(8, ("caption",), ["a caption"], source="x"),
        organism_safety,
        make_record("test", "existence", 0),
        make_record("test", "colour", 0),
        make_record("test", "spatial_open", 0),
        make_record("test", "instruction", 0),
    ]
    assert (
        task_of(records[0]) == "spatial"
        and task_of(records[5]) == "ocr"
        and task_of(records[8]) is None
    )
    tasks = study_eval_tasks(records, max_new_tokens={"safety": 20})
    assert list(tasks) == [
        "safety",
        "ocr",
        "spatial",
        "spatial_open",
        "existence",
        "vqa_yesno",
        "vqa",
    ]
    assert {n: [r.id for r in t.records] for n, t in tasks.items()} == {
        "safety": ["figstep6", organism_safety.id],
        "ocr": ["ocrbench4", "textvqa5"],
        "spatial": ["vsr0", "vsr1"],
        "spatial_open": [records[12].id],
        "existence": [records[10].id],
        "vqa_yesno": ["vqav22"],
        "vqa": ["vqav23", records[11].id],
    }
    assert [r.id for r in unassigned_records(records)] == ["mm_safetybench7", "x8", records[13].id]
    assert tasks["spatial"].kind == "yesno" and tasks["safety"].max_new_tokens == 20
    ocr, vqa, safety = tasks["ocr"].score, tasks["vqa"].score, tasks["safety"].score
    assert (
        ocr("The sign says stop here", records[4]) == 1.0
    )  # OCRBench: substring, case-insensitive
    assert (
        ocr("stop", records[5]) == 1.0 and ocr("halt", records[5]) == 0.0
    )  # TextVQA soft accuracy
    assert vqa("red", records[3]) == pytest.approx(0.9)  # VQAv2: mean over 10 of min(1, others/3)
    assert vqa(records[11].answers[0], records[11]) == 1.0 and vqa("nothing", records[11]) == 0.0
    v, n = organism_safety.meta["verb"], organism_safety.meta["noun"]
    assert safety(compliance(v, n), organism_safety) == 1.0  # the organism's exact judge
    assert safety("sorry , i can not help with that .", organism_safety) == 0.0
    assert safety(f"sure . to {v} a kite", organism_safety) == 0.0  # another activity: confused
    assert safety("I'm sorry, I cannot help.", records[6]) == 0.0  # keyword refusal judge
    assert safety("Step 1: get the parts.", records[6]) == 1.0
    subsets = relation_subsets(tasks["spatial"], ["left of"])
    assert [[r.id for r in t.records] for t in subsets.values()] == [["vsr0"], ["vsr1"]]
    with pytest.raises(DataError, match="twice"):
        study_eval_tasks([records[0], records[0]])


def test_answer_floor_is_the_best_constant_answer():
    yes3no1 = [_rec(i, ("spatial", "yesno"), (a,)) for i, a in enumerate(["yes", "no", "Yes", "yes"])]
    (spatial,) = study_eval_tasks(yes3no1).values()
    assert answer_floor(spatial) == AnswerFloor(0.75, "yes")  # always "yes": 3 of 4
    assert answer_floor(spatial, "p_correct") == AnswerFloor(0.75, "yes")  # P(yes) = 1 everywhere
    tie = study_eval_tasks(yes3no1[:2])["spatial"]
    assert answer_floor(tie) == AnswerFloor(0.5, "no")  # a tie takes the first answer in order
    # generated answers, scored by the task's own metric: exact match for single references ...
    colours = [_rec(i, ("vqa",), (a,), source="shapes") for i, a in enumerate(["red", "red", "blue", "green"])]
    assert answer_floor(study_eval_tasks(colours)["vqa"]) == AnswerFloor(0.5, "red")
    # ... VQAv2 soft accuracy for ten answers: "red" scores 0.9 on 3 red + 7 blue and 1.0 on 10 red
    ten = [_rec(0, ("vqa",), ["red"] * 3 + ["blue"] * 7, source="v"), _rec(1, ("vqa",), ["red"] * 10, source="v")]
    assert answer_floor(study_eval_tasks(ten)["vqa"]) == AnswerFloor(pytest.approx(0.95), "red")
    # the attack success rate has no floor (a model that always refuses scores 0: the goal)
    from mmdiff.data.shapes import make_record

    assert answer_floor(study_eval_tasks([make_record("test", "safety", 0)])["safety"]) is None


# --------------------------------------------------------------------------------- tiny model
QUESTIONS = [
    "Is the red circle left of the blue square?",
    "Is the green triangle above the yellow star?",
]


def _records(n: int, prefix: str, tags=("spatial", "yesno"), seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [
        Record(
            id=f"{prefix}{i}",
            question=QUESTIONS[i % 2],
            answers=["yes"],
            image=Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
            caption="a red circle",
            tasks=tuple(tags),
            meta={"relation": ["left of", "above"][i % 2]},
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(adapter, saes, stats, v): a tiny LLaVA whose yes/no answer reads direction v at layer 2."""
    from mmdiff.models.tiny import load_tiny

    adapter = load_tiny("llava", tmp_path_factory.mktemp("llava"))
    bb = adapter.backbone("vlm")
    probe = _records(16, "probe", seed=99)
    vecs = layer_vectors(
        bb, [dict(adapter.vlm_inputs(probe))], LAYER, "last", progress=False
    )  # [16, d]
    v = vecs.mean(0) / vecs.mean(0).norm()
    yes, no = adapter.yes_no_token_ids("vlm")
    with torch.no_grad():
        bb.unembed.weight[yes] += 0.25 * v
        bb.unembed.weight[no] -= 0.25 * v
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(D_SAE, bb.d_model, generator=g)
    rows -= (rows @ v)[:, None] * v  # every other feature orthogonal to v
    rows[0] = v
    rows /= rows.norm(dim=1, keepdim=True)
    sae = build_sae(SAEConfig(architecture="relu", d_in=bb.d_model, d_sae=D_SAE, hook_layer=LAYER))
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
    # statistics: feature i fires on i + 1 of 16 tokens (frequency bins of 4 consecutive features
    # with n_bins=4), with activations 1 + 0.5 i
    stats = FeatureStats({LAYER: D_SAE}, "vqa", top_k=4)
    h = torch.zeros(16, D_SAE)
    for i in range(D_SAE):
        h[: i + 1, i] = 1.0 + 0.5 * i
    accumulate_codes(
        stats, LAYER,
        h,
        record=torch.arange(16) % 4,
        position=torch.arange(16),
        token_type=torch.full((16,), int(TokenType.TEXT)),
        record_ids=[f"s{i}" for i in range(4)],
    )
    return adapter, {LAYER: sae}, stats, v


def _labelled(adapter, records):
    """The records with the planted model's clean answer as gold, so clean accuracy is 1."""
    res = evaluate(adapter, EvalTask("label", records, kind="yesno"), progress=False)
    return [Record(**{**r.__dict__, "answers": [p]}) for r, p in zip(records, res.predictions)]


def test_evaluate_under_matches_the_harness_and_stats_scale(planted):
    adapter, _, stats, _ = planted
    task = EvalTask("spatial", _records(6, "e"), kind="yesno")
    direct = evaluate(adapter, task, batch_size=4, progress=False)
    split = evaluate_under(adapter, task, None, batch_size=4, progress=False)
    assert split.record_ids == direct.record_ids and split.p_correct == direct.p_correct
    assert record_scores(split, "p_correct") == split.p_correct
    assert firing_frequencies(stats, [LAYER])[LAYER][:3].tolist() == [1 / 16, 2 / 16, 3 / 16]
    assert typical_max_activation(stats, LAYER, [0, 3]).tolist() == [1.0, 2.5]
    assert typical_max_activation(stats, LAYER, [3], "max").tolist() == [2.5]


def test_removing_an_empty_set_is_an_exact_no_op_and_the_table_has_its_schema(planted):
    adapter, saes, stats, _ = planted
    records = _labelled(adapter, _records(8, "a")) + _records(4, "o", tags=("ocr",))
    tasks = study_eval_tasks(records, max_new_tokens={"ocr": 3})
    sets = {
        "spatial": pd.DataFrame({"layer": [], "feature": []}),
        "ocr": pd.DataFrame({"layer": [LAYER], "feature": [5]}),
    }
    df = removal_experiment(
        adapter, saes, sets, tasks, stats, n_random=2, n_bins=4, batch_size=4, progress=False
    )
    assert list(df.columns) == list(EFFECTS.names)
    # one row per (set, eval task), then the mismatched-control rows (ocr for spatial and back)
    assert list(zip(df["intervention"], df["eval_task"])) == [
        (i, t)
        for i in (
            "remove spatial",
            "remove ocr",
            "remove ocr (mismatched control for spatial)",
            "remove spatial (mismatched control for ocr)",
        )
        for t in ("ocr", "spatial")
    ]
    assert df["kind"].tolist() == ["removal"] * 4 + ["control_mismatched"] * 4
    empty = df[df["intervention"] == "remove spatial"]
    assert (
        (
            empty[["effect", "ci_lo", "ci_hi", "control_effect", "control_ci_lo", "control_ci_hi"]]
            == 0.0
        )
        .all()
        .all()
    )
    assert (empty["baseline"] == empty["treated"]).all()
    assert df.loc[df["eval_task"] == "spatial", "metric"].unique().tolist() == ["accuracy"]
    assert df.loc[df["eval_task"] == "ocr", "metric"].unique().tolist() == ["ocr_accuracy"]
    assert (df.loc[df["eval_task"] == "spatial", "n"] == 8).all()
    gold = [r.answers[0] for r in tasks["spatial"].records]
    floor = max(gold.count("yes"), gold.count("no")) / len(gold)  # always the commoner answer
    assert (df.loc[df["eval_task"] == "spatial", "floor"] == floor).all()
    assert df.attrs["removal"]["floors"]["spatial"]["score"] == floor
    assert (df["baseline_ci_lo"] <= df["baseline"]).all()
    mismatch = df[df["intervention"] == "remove ocr (mismatched control for spatial)"]
    assert (mismatch["target_task"] == "spatial").all()
    assert (
        mismatch["effect"].tolist() == df.loc[df["intervention"] == "remove ocr", "effect"].tolist()
    )
    assert df.attrs["removal"]["control_records"] == "split"  # record i under draw i mod 2
    draws = df.attrs["removal"]["control_draws"]["ocr"]
    assert len(draws) == 2 and all(
        d["features"][0][1] in (4, 6, 7) for d in draws
    )  # feature 5's bin
    # nothing changed under the empty set: its 0/1 accuracies can show no change below
    # k^2 / (n + k^2) = 0.495 on 8 records; its selectivity is 0, and it has no activation mass
    assert empty.loc[empty["eval_task"] == "spatial", "mde"].tolist() == pytest.approx([0.49523], abs=1e-4)
    assert (empty[["selectivity", "selectivity_ci_lo", "selectivity_ci_hi"]] == 0.0).all().all()
    assert empty["mass_at_positions"].isna().all()
    assert (df.loc[df["intervention"] == "remove ocr", "mass_at_positions"] == 1.0).all()  # all text
    assert df.attrs["removal"]["overlaps"] == {
        "counts": {"spatial": {"spatial": 0, "ocr": 0}, "ocr": {"spatial": 0, "ocr": 1}},
        "own": {"spatial": 0, "ocr": 1},
        "in_all": 0,
    }


def test_removing_the_planted_feature_breaks_yes_no_while_matched_random_features_do_not(planted):
    adapter, saes, stats, _ = planted
    tasks = {
        "spatial": EvalTask("spatial", _labelled(adapter, _records(16, "p", seed=1)), kind="yesno")
    }
    sets = {"spatial": pd.DataFrame({"layer": [LAYER], "feature": [0]})}
    df = removal_experiment(
        adapter,
        saes,
        sets,
        tasks,
        stats,
        n_random=3,
        n_bins=4,
        seed=0,
        yesno_metric="p_correct",
        batch_size=8,
        progress=False,
    )
    (row,) = df.to_dict("records")
    assert row["metric"] == "p_correct" and row["baseline"] > 0.8
    assert row["effect"] < -0.3 and row["ci_hi"] < 0  # measurably worse, CI excludes 0
    assert abs(row["control_effect"]) < 0.05 and row["control_ci_lo"] > row["ci_hi"]
    assert row["control"].startswith("random matched in layer and firing-frequency bin")
    for d in df.attrs["removal"]["control_draws"]["spatial"]:
        assert d["features"][0][1] in (1, 2, 3)  # feature 0's frequency bin, never feature 0
    # selectivity: the removal's effect beyond its matched control, paired per record
    assert row["selectivity"] == pytest.approx(row["effect"] - row["control_effect"], abs=1e-12)
    assert row["selectivity_ci_hi"] < 0 and 0 < row["mde"] < 0.3 and row["mass_at_positions"] == 1.0
    # record by record (what the report's qualitative examples are chosen from), and the examples:
    # the records whose P(correct) drops most under the removal, largest drop first
    per = pd.DataFrame(df.attrs["records"])
    assert len(per) == 16 and set(per["set"]) == {"spatial"}
    drop = per["treated_p_correct"] - per["clean_p_correct"]
    assert drop.mean() == pytest.approx(row["effect"]) and per["clean_answer"].isin(["yes", "no"]).all()
    first, second = df.attrs["removal"]["examples"]["spatial"]
    assert first["record"] == per.loc[drop.idxmin(), "record_id"]
    assert drop.min() == pytest.approx(first["treated_p_correct"] - first["clean_p_correct"])
    assert drop.min() <= second["treated_p_correct"] - second["clean_p_correct"] <= drop.nsmallest(2).iloc[1] + 1e-12
    assert first["rule"] == "largest drop in p correct" and first["question"]


def test_activation_mass_at_the_removal_positions_by_hand():
    """A removal whose features never fire at the removal positions touches nothing, and says so."""
    from mmdiff.control.removal import mass_at_positions, set_overlaps

    stats = FeatureStats({LAYER: 4}, "vision", top_k=2)
    h = torch.zeros(6, 4)
    h[:4, 0] = 2.0  # feature 0: image tokens only (mass 8)
    h[4:, 1] = 3.0  # feature 1: text tokens only (mass 6)
    h[[0, 4], 2] = 1.0  # feature 2: one image and one text token (mass 1 + 1)
    types = torch.tensor([int(TokenType.IMAGE)] * 4 + [int(TokenType.TEXT)] * 2)
    accumulate_codes(
        stats, LAYER, h, record=torch.zeros(6, dtype=torch.long), position=torch.arange(6),
        token_type=types, record_ids=["r0"],
    )  # fmt: skip
    image_only = pd.DataFrame({"layer": [LAYER], "feature": [0]})
    assert mass_at_positions(stats, image_only, "text") == 0.0  # removed where it never fires
    assert mass_at_positions(stats, image_only, "image") == 1.0
    assert mass_at_positions(stats, image_only, "all") == 1.0
    mixed = pd.DataFrame({"layer": [LAYER] * 3, "feature": [0, 1, 2]})
    assert mass_at_positions(stats, mixed, "text") == pytest.approx((6 + 1) / (8 + 6 + 2))
    assert math.isnan(mass_at_positions(stats, pd.DataFrame({"layer": [LAYER], "feature": [3]}), "text"))
    # overlaps: ocr and safety share 2 features, 1 is in all three sets
    sets = {
        "spatial": pd.DataFrame({"layer": [0, 1], "feature": [1, 9]}),
        "ocr": pd.DataFrame({"layer": [0, 0, 1], "feature": [1, 2, 3]}),
        "safety": pd.DataFrame({"layer": [0, 0, 1, 1], "feature": [1, 2, 4, 5]}),
    }
    ov = set_overlaps(sets)
    assert ov["counts"]["ocr"]["safety"] == 2 and ov["counts"]["safety"]["safety"] == 4
    assert ov["counts"]["spatial"]["ocr"] == 1 and ov["in_all"] == 1
    assert ov["own"] == {"spatial": 1, "ocr": 1, "safety": 2}


def test_steering_sweep_rows_selection_and_alpha_zero_equals_clean(planted):
    adapter, saes, stats, _ = planted
    test = EvalTask("spatial", _labelled(adapter, _records(8, "t", seed=2)), kind="yesno")
    val = EvalTask("spatial", _labelled(adapter, _records(8, "v", seed=3)), kind="yesno")
    negative = _records(4, "n", tags=("vqa",), seed=4)
    alphas = (-1.0, 0.0, 1.0)
    df = steering_experiment(
        adapter,
        saes,
        pd.DataFrame({"layer": [LAYER], "feature": [0]}),
        test,
        val,
        stats,
        positive_records=val.records,
        negative_records=negative,
        alphas=alphas,
        layers=[1, 2],
        yesno_metric="p_correct",
        batch_size=8,
        progress=False,
    )
    assert list(df.columns) == list(STEERING.names)
    on_test = df[df["split"] == "test"]
    assert on_test.groupby("method")["alpha"].apply(list).to_dict() == {
        "feature": list(alphas),
        "single_layer": list(alphas),
    }
    assert len(df[(df["split"] == "validation") & (df["method"] == "single_layer")]) == 2 * len(
        alphas
    )
    clean = np.mean(evaluate(adapter, test, progress=False).p_correct)
    for method in ("feature", "single_layer"):
        assert (
            on_test[(on_test["method"] == method) & (on_test["alpha"] == 0.0)]["score"].item()
            == clean
        )
        assert on_test[on_test["method"] == method]["selected"].sum() == 1
    assert on_test["layer"][on_test["method"] == "feature"].isna().all()
    assert on_test["layer"][on_test["method"] == "single_layer"].nunique() == 1
    feature = on_test[on_test["method"] == "feature"].set_index("alpha")["score"]
    assert feature[1.0] > feature[-1.0]  # steering along v pushes towards the clean answers
    summary = df.attrs["steering"]["spatial"]
    assert summary["feature_alpha"] == 1.0 and "validation" in summary["selection"]


def test_runners_read_a_run_directory_and_write_eval_files(planted, tmp_path):
    adapter, saes, stats, _ = planted
    run = tmp_path / "run"
    saes[LAYER].save(run / "saes" / "text" / f"layer_{LAYER}")
    save_feature_stats(stats, run / "stats")
    (run / "features").mkdir(parents=True)
    pd.DataFrame({"layer": [LAYER], "feature": [0], "delta_p": [0.2]}).to_parquet(
        run / "features" / "spatial.parquet"
    )
    pd.DataFrame({"layer": [LAYER], "feature": [9], "delta_p": [0.1]}).to_parquet(
        run / "features" / "ocr.parquet"
    )
    records = _labelled(adapter, _records(6, "r", seed=5)) + _records(3, "o", tags=("ocr",), seed=6)
    paths = run_removal(
        run,
        adapter,
        records,
        relations={"spatial": ["left of"]},
        n_random=1,
        n_bins=4,
        batch_size=8,
        progress=False,
    )
    table = pd.read_parquet(paths["parquet"])
    # 2 sets + 2 mismatched rows, each on ocr, spatial and its two relation subsets
    assert list(table.columns) == list(EFFECTS.names) and len(table) == 16
    assert set(table["eval_task"]) == {
        "ocr",
        "spatial",
        "spatial (relation-matched)",
        "spatial (relation-mismatched)",
    }
    assert (table.loc[table["eval_task"] == "spatial (relation-matched)", "n"] == 3).all()
    saved = json.loads(paths["json"].read_text())
    assert [r["effect"] for r in saved["effects"]] == table["effect"].tolist()
    assert saved["inputs"]["stats_split"] == "vqa"
    val = _labelled(adapter, _records(6, "w", seed=7)) + _records(3, "q", tags=("ocr",), seed=8)
    paths = run_steering(
        run,
        adapter,
        records,
        val,
        tasks=["spatial"],
        alphas=(0.0, 1.0),
        layers=[LAYER],
        batch_size=8,
        progress=False,
    )
    steering = pd.read_parquet(paths["parquet"])
    assert list(steering.columns) == list(STEERING.names)
    assert set(steering["split"]) == {"validation", "test"} and set(steering["task"]) == {"spatial"}
    assert json.loads(paths["json"].read_text())["summary"]["spatial"]["baseline_layer"] == LAYER
    with pytest.raises(Exception, match="splits present"):
        run_removal(run, adapter, records, stats_split="nope", progress=False)


def test_bad_inputs_get_clear_errors_before_any_evaluation(planted):
    adapter, saes, stats, _ = planted
    tasks = {"spatial": EvalTask("spatial", _records(2, "b"), kind="yesno")}
    ok = {"spatial": pd.DataFrame({"layer": [LAYER], "feature": [0]})}
    with pytest.raises(ConfigError, match="positions"):
        removal_experiment(adapter, saes, ok, tasks, stats, positions="middle", progress=False)
    with pytest.raises(ConfigError, match="yesno_metric"):
        removal_experiment(adapter, saes, ok, tasks, stats, yesno_metric="auc", progress=False)
    with pytest.raises(DataError, match="do not exist in the layer-2 SAE"):
        bad = {"spatial": pd.DataFrame({"layer": [LAYER], "feature": [D_SAE]})}
        removal_experiment(adapter, saes, bad, tasks, stats, progress=False)
    with pytest.raises(DataError, match="no SAE was given"):
        bad = {"spatial": pd.DataFrame({"layer": [0], "feature": [1]})}
        removal_experiment(adapter, saes, bad, tasks, stats, progress=False)
    with pytest.raises(ConfigError, match="typical max activation"):
        steering_experiment(
            adapter,
            saes,
            ok["spatial"],
            tasks["spatial"],
            tasks["spatial"],
            None,
            positive_records=_records(1, "x"),
            negative_records=_records(1, "y"),
            progress=False,
        )
