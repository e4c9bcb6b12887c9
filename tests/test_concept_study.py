"""The concept-shift study end to end on a tiny LLaVA: files, schemas, steering, determinism, errors."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmdiff.concept_study import (
    CONCEPT_GROUNDING,
    CONCEPT_MATCHING,
    CONCEPT_SAMPLES,
    CONCEPT_STEERING,
    CONCEPT_STEERING_RECORDS,
    assign_concepts,
    holdout_split,
    kl_and_top1,
    run_concept_shift,
    steered_next_token_logits,
)
from mmdiff.concepts import ConceptDecomposition, kmeans
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError, DataError, ModelError
from mmdiff.models.forward import RecordBatches, next_token_logits
from mmdiff.models.tiny import HIDDEN, load_tiny

COLOURS = ["red", "blue", "green", "yellow"]
QUESTIONS = [
    "Is the red circle left of the blue square?",
    "What colour is the square?",
    "Is the green triangle above the yellow star?",
]
N, K, LAYER, TOP_K = 8, 3, 1, 4


def _records(n: int = N) -> list[Record]:
    """Distinct records: each gets its own image (a two-colour split) and its own caption."""
    out = []
    for i in range(n):
        left, right = COLOURS[i % 4], COLOURS[(i // 4 + i + 1) % 4]
        image = Image.new("RGB", (16, 16), left)
        image.paste(Image.new("RGB", (8 + i % 8, 16), right), (0, 0))
        out.append(
            Record(
                id=f"r{i}",
                question=QUESTIONS[i % 3],
                answers=["yes"],
                image=image,
                caption=f"A {left} circle to the left of a {right} square.",
                tasks=("spatial",),
                source="test",
            )
        )
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_llava")


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return load_tiny("llava", tiny_dir)


@pytest.fixture(scope="module")
def tied(tiny_dir):
    """The tiny pair with the base LM given the VLM's language-model weights: the two models then
    differ only in what they read (caption vs image), so shifts can recover the VLM exactly."""
    a = load_tiny("llava", tiny_dir)
    a.base.model.model.load_state_dict(a.vlm.model.model.language_model.state_dict())
    a.base.model.lm_head.load_state_dict(a.vlm.model.lm_head.state_dict())
    return a


@pytest.fixture(scope="module")
def study(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    paths = run_concept_shift(
        adapter, _records(), LAYER, out, k=K, alphas=(0.0, 0.5, 1.0), batch_size=3,
        progress=False, top_k=TOP_K,
    )  # fmt: skip
    return out, paths


def test_files_and_schemas(study):
    out, paths = study
    folder = out / "concepts"
    for name in ("matching", "grounding", "samples", "steering", "steering_records"):
        assert paths[name] == folder / f"{name}.parquet" and paths[name].is_file()
    assert paths["summary"].is_file() and paths["vectors"].is_file()
    assert not list(folder.glob("*.tmp*"))  # atomic writes leave no temporaries

    matching = pd.read_parquet(paths["matching"])
    assert tuple(matching.columns) == CONCEPT_MATCHING.names and len(matching) == K
    assert sorted(matching["orig"]) == list(range(K)) == sorted(matching["ft"])  # a 1:1 pairing
    assert matching["count"].sum() == N
    assert (
        matching["cosine"].between(-1, 1).all() and matching["shifted_cosine"].between(-1, 1).all()
    )

    grounding = pd.read_parquet(paths["grounding"])
    assert tuple(grounding.columns) == CONCEPT_GROUNDING.names
    assert len(grounding) == 3 * K * TOP_K
    assert set(grounding["model"]) == {"orig", "ft", "shifted"}
    # ranks are in descending score order within each concept
    for _, g in grounding.groupby(["model", "concept"]):
        assert list(g["rank"]) == list(range(TOP_K)) and g["score"].is_monotonic_decreasing

    samples = pd.read_parquet(paths["samples"])
    assert tuple(samples.columns) == CONCEPT_SAMPLES.names and len(samples) == 2 * K * TOP_K
    by_id = {r.id: r for r in _records()}
    for row in samples.itertuples():
        assert row.question == by_id[row.record_id].question
        assert row.caption == by_id[row.record_id].caption

    steering = pd.read_parquet(paths["steering"])
    assert tuple(steering.columns) == CONCEPT_STEERING.names
    assert (steering["split"] == "fit").all()
    assert list(zip(steering["shift"], steering["alpha"])) == [
        ("concept", 0.0), ("concept", 0.5), ("concept", 1.0), ("mean", 0.0), ("mean", 0.5), ("mean", 1.0),
    ]  # fmt: skip
    assert (steering["n"] == N).all()
    assert (steering["kl"] >= 0).all() and steering["top1_agreement"].between(0, 1).all()
    assert (steering["kl_ci_lo"] <= steering["kl"]).all() and (
        steering["kl"] <= steering["kl_ci_hi"]
    ).all()

    per_record = pd.read_parquet(paths["steering_records"])
    assert tuple(per_record.columns) == CONCEPT_STEERING_RECORDS.names and len(per_record) == 2 * 3 * N
    summary = json.loads(paths["summary"].read_text())
    assert summary["layer"] == LAYER and summary["k"] == K and summary["n_records"] == N
    assert summary["method"] == "kmeans" and summary["d_model"] == HIDDEN
    assert summary["n_fit"] == N and summary["n_heldout"] == 0
    assert set(summary["steering_by_alpha"]) == {"fit/concept", "fit/mean"}
    assert set(summary["steering_by_alpha"]["fit/concept"]["kl"]) == {"0.0", "0.5", "1.0"}


def test_alpha_zero_is_the_unsteered_base_exactly(adapter, study):
    _, paths = study
    records = _records()
    per_record = pd.read_parquet(paths["steering_records"])
    zero = per_record[(per_record["alpha"] == 0.0) & (per_record["shift"] == "concept")]
    base_b = RecordBatches(adapter, records, "base", 3)
    vlm_b = RecordBatches(adapter, records, "vlm", 3)
    kls, top1s = [], []
    gen = torch.Generator().manual_seed(0)
    for chunk in base_b.chunks():
        base_inputs = base_b.inputs(chunk)
        with torch.no_grad():  # the plain base LM, no hooks at all
            plain = adapter.base.model(**base_inputs, use_cache=False).logits[:, -1].double()
            vlm = adapter.vlm.model(**vlm_b.inputs(chunk), use_cache=False).logits[:, -1].double()
        # through the steering hooks with alpha 0: bit-identical logits
        concepts = torch.arange(len(chunk)) % K
        deltas = torch.randn(K, adapter.base.d_model, dtype=torch.float64, generator=gen)
        zero_steered = steered_next_token_logits(
            adapter.base, base_inputs, LAYER, deltas, concepts, 0.0
        )
        assert torch.equal(zero_steered, next_token_logits(adapter.base, base_inputs))
        assert not torch.equal(
            steered_next_token_logits(adapter.base, base_inputs, LAYER, deltas, concepts, 1.0),
            zero_steered,
        )
        torch.testing.assert_close(zero_steered, plain, rtol=1e-6, atol=1e-6)
        log_p, log_q = vlm.log_softmax(-1), plain.log_softmax(-1)
        kls += (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
        top1s += (vlm.argmax(-1) == plain.argmax(-1)).tolist()
    assert zero["record_id"].tolist() == [r.id for r in records]
    assert zero["kl"].tolist() == pytest.approx(kls, rel=1e-5, abs=1e-9)
    assert zero["top1_match"].tolist() == top1s
    # the mean-shift control at alpha 0 is the same run
    mean_zero = per_record[(per_record["alpha"] == 0.0) & (per_record["shift"] == "mean")]
    assert mean_zero["kl"].tolist() == zero["kl"].tolist()


def test_kl_and_top1_hand_case():
    # the VLM has an extra id (index 2) outside the shared vocabulary, as real VLMs add image tokens
    vlm = torch.tensor([[0.5, 0.5, 0.3], [0.9, 0.1, 0.2]], dtype=torch.float64).log()
    base = torch.tensor([[0.75, 0.25], [0.2, 0.8]], dtype=torch.float64).log()
    kl, top1 = kl_and_top1(vlm, base, vocab=2)
    expected = [
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),
        0.9 * math.log(0.9 / 0.2) + 0.1 * math.log(0.1 / 0.8),
    ]
    assert kl.tolist() == pytest.approx(expected, rel=1e-12)
    assert top1.tolist() == [True, False]  # a tie goes to the first id on both sides


def test_one_concept_per_record_at_the_last_layer_recovers_the_vlm(tied, tmp_path):
    """With K = N every record is its own concept, so Delta_c(i) = x_ft_i - x_orig_i; at the last
    decoder layer and alpha 1 the steered base LM (same weights) then reads exactly the VLM's residual
    at the last position: KL ~ 0 and full top-1 agreement, while the global mean shift does not."""
    records = _records(6)
    last = tied.vlm.num_layers - 1
    paths = run_concept_shift(
        tied, records, last, tmp_path, k=6, alphas=(0.0, 1.0), batch_size=4, progress=False
    )
    steering = pd.read_parquet(paths["steering"]).set_index(["shift", "alpha"])
    assert steering.loc[("concept", 1.0), "kl"] < 1e-8
    assert steering.loc[("concept", 1.0), "top1_agreement"] == 1.0
    assert steering.loc[("concept", 0.0), "kl"] > 1e-4  # caption vs image: really different
    assert steering.loc[("mean", 1.0), "kl"] > 100 * steering.loc[("concept", 1.0), "kl"]
    matching = pd.read_parquet(paths["matching"])
    assert (matching["count"] == 1).all()
    # each concept is one sample, so its shift is that sample's own: x_orig + Delta_c(i) = x_ft
    vectors = load_file(str(paths["vectors"]))
    moved = vectors["x_orig"].double() + vectors["deltas"][vectors["labels_orig"]]
    torch.testing.assert_close(moved, vectors["x_ft"].double(), rtol=0, atol=1e-5)


def test_assign_concepts_hand_cases():
    x = torch.tensor(
        [[0.0, 0.1], [0.2, -0.1], [5.0, 5.0], [5.2, 4.9], [-4.0, 6.0]], dtype=torch.float64
    )
    fitted = kmeans(x, 3, seed=0)
    assert torch.equal(
        assign_concepts(fitted, x), fitted.labels
    )  # its own samples keep their labels
    new = torch.tensor([[4.0, 4.0], [-3.0, 5.0], [0.5, 0.0]], dtype=torch.float64)
    expected = torch.cdist(new, fitted.concepts).argmin(1)
    assert torch.equal(assign_concepts(fitted, new), expected)
    assert len(set(expected.tolist())) == 3
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    unused = (
        torch.zeros(1, 3, dtype=torch.float64),
        torch.zeros(1, dtype=torch.long),
    )  # acts, labels
    semi = ConceptDecomposition("semi_nmf", u[:2], *unused)
    # non-negative least squares: [2, 1] = 2 e0 + 1 e1; [-1, 3] -> g = (0, 3)
    x2 = torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    assert assign_concepts(semi, x2).tolist() == [0, 1]
    # dictionary: [3, 3] is best coded by the third atom once the l1 penalty prefers one atom
    unit = u / u.norm(dim=1, keepdim=True)
    dico = ConceptDecomposition("dictionary", unit, *unused)
    assert assign_concepts(dico, torch.tensor([[3.0, 3.0], [0.1, 2.0]]), l1=0.5).tolist() == [2, 1]
    with pytest.raises(ConfigError, match=r"expected vectors \[n, 2\]"):
        assign_concepts(fitted, torch.zeros(2, 3))


def test_holdout_split_and_heldout_steering(adapter, tmp_path):
    fit, held = holdout_split(12, 0.25, seed=3)
    assert len(held) == 3 and sorted(fit + held) == list(range(12)) and fit == sorted(fit)
    assert holdout_split(12, 0.25, seed=3) == (fit, held)
    records = _records(12)
    paths = run_concept_shift(
        adapter, records, LAYER, tmp_path, k=K, alphas=(0.0, 1.0), batch_size=4, progress=False,
        top_k=2, holdout=0.25, seed=3,
    )  # fmt: skip
    steering = pd.read_parquet(paths["steering"])
    n = steering.set_index(["split", "shift", "alpha"])["n"]
    assert n[("fit", "concept", 1.0)] == 9 and n[("heldout", "concept", 1.0)] == 3
    per_record = pd.read_parquet(paths["steering_records"])
    held_ids = set(per_record.loc[per_record["split"] == "heldout", "record_id"])
    assert held_ids == {records[i].id for i in held}
    assert held_ids.isdisjoint(pd.read_parquet(paths["samples"])["record_id"])  # not in the fit
    assert pd.read_parquet(paths["matching"])["count"].sum() == 9
    vectors = load_file(str(paths["vectors"]))
    assert vectors["heldout_index"].tolist() == held and vectors["labels_heldout"].shape == (3,)
    heldout_rows = per_record[(per_record["split"] == "heldout") & (per_record["alpha"] == 1.0)]
    assert heldout_rows["concept"].tolist()[:3] == vectors["labels_heldout"].tolist()
    with pytest.raises(DataError, match="holds out none"):
        run_concept_shift(adapter, records, LAYER, tmp_path, k=K, holdout=0.01, progress=False)
    with pytest.raises(DataError, match="got 9 after holding out 3"):
        run_concept_shift(adapter, records, LAYER, tmp_path, k=10, holdout=0.25, progress=False)


def test_determinism_by_seed(adapter, tmp_path):
    runs = [
        run_concept_shift(
            adapter, _records(), LAYER, tmp_path / name, k=K, seed=7, alphas=(0.0, 1.0),
            batch_size=4, progress=False, top_k=TOP_K,
        )
        for name in ("a", "b")
    ]  # fmt: skip
    for name in ("matching", "grounding", "samples", "steering", "steering_records"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(runs[0][name]), pd.read_parquet(runs[1][name])
        )
    assert runs[0]["summary"].read_text() == runs[1]["summary"].read_text()
    a, b = (load_file(str(r["vectors"])) for r in runs)  # (the header's key order may vary)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("method", ["semi_nmf", "dictionary_learning"])
def test_other_decompositions_run(adapter, tmp_path, method):
    paths = run_concept_shift(
        adapter, _records(), LAYER, tmp_path, k=K, method=method, alphas=(0.0,), batch_size=8,
        progress=False, top_k=2,
    )  # fmt: skip
    summary = json.loads(paths["summary"].read_text())
    assert summary["method"] == ("dictionary" if method == "dictionary_learning" else method)
    assert len(pd.read_parquet(paths["matching"])) == K


def test_clear_errors(adapter, tmp_path):
    records = _records()
    with pytest.raises(ModelError, match=r"hook points are 0\.\.2"):
        run_concept_shift(adapter, records, 3, tmp_path, k=K, progress=False)
    with pytest.raises(ModelError, match="do not exist"):
        run_concept_shift(adapter, records, -1, tmp_path, k=K, progress=False)
    with pytest.raises(DataError, match="K=20 concepts need at least 20 records.*got 8"):
        run_concept_shift(adapter, records, LAYER, tmp_path, k=20, progress=False)
    with pytest.raises(ConfigError, match="method must be one of"):
        run_concept_shift(adapter, records, LAYER, tmp_path, k=K, method="pca", progress=False)
    with pytest.raises(ConfigError, match="alphas"):
        run_concept_shift(adapter, records, LAYER, tmp_path, k=K, alphas=(), progress=False)
    no_caption = records[:-1] + [Record(id="x", question="q?", image=records[0].image)]
    with pytest.raises(DataError, match="has no caption"):
        run_concept_shift(adapter, no_caption, LAYER, tmp_path, k=K, progress=False)
    duplicate = records[:-1] + [records[0]]
    with pytest.raises(DataError, match="unique"):
        run_concept_shift(adapter, duplicate, LAYER, tmp_path, k=K, progress=False)
    assert not (tmp_path / "concepts").exists()  # nothing written on bad input


def test_report_section_shows_the_stage_honestly(study):
    """The report's concepts section: every concept pair, every (split, shift, alpha) with its
    interval, the concept-minus-mean difference paired over records, and the in-sample warning."""
    from mmdiff.report.sections.concepts import concepts_section

    out, paths = study
    section = concepts_section(out)
    assert section.status == "ok" and not section.warnings
    matching, steering = section.blocks
    assert len(matching.tables[0].rows) == K
    table = pd.read_parquet(paths["steering"])
    rows = steering.tables[0].rows
    assert len(rows) == len(table) == 2 * 3
    r = table.iloc[-1]
    # rounded to two significant digits of the interval's width (report.sections.control.interval)
    d = 1 - math.floor(math.log10(r.kl_ci_hi - r.kl_ci_lo)) if r.kl_ci_hi > r.kl_ci_lo else 3
    d = min(4, max(1, d))
    assert rows[-1][3] == f"{r.kl:.{d}f} [{r.kl_ci_lo:.{d}f}, {r.kl_ci_hi:.{d}f}]"
    assert any("every number below is in-sample" in n for n in steering.notes)
    per_record = pd.read_parquet(paths["steering_records"])
    at1 = per_record[per_record["alpha"] == 1.0].pivot(index="record_id", columns="shift", values="kl")
    paired = steering.tables[1].rows
    assert [p[1] for p in paired] == ["0.5", "1"]  # alpha 0: both shifts are the unsteered base LM
    printed = paired[-1][2].split(" [")[0]  # the mean, to the decimals its interval justifies
    decimals = len(printed.split(".")[1])
    assert printed[0] in "+-" and abs(float(printed) - (at1["concept"] - at1["mean"]).mean()) <= 0.5 * 10**-decimals + 1e-12
