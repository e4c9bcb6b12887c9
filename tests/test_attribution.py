"""Attribution patching against exact activation patching on tiny random VLMs (LLaVA, Qwen2-VL)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmdiff import attribution
from mmdiff.attribution import (
    VisualMean,
    attention_overlays,
    attribute_features,
    attribution_patching,
    exact_patching,
    heads_frame,
    layers_frame,
    spearman,
    visual_embedding_mean,
)
from mmdiff.data.records import Record
from mmdiff.errors import DataError, SAEError
from mmdiff.models import load_adapter
from mmdiff.models.tiny import BASE_SUBDIR, VLM_SUBDIR, build_tiny
from mmdiff.sae import SAEConfig, build_sae

QUESTIONS = [
    "Is the red circle left of the blue square?",
    "What colour is the square?",
    "Is the green triangle above the yellow star?",
    "What word is written in the image?",
]
SIZES = [(20, 30), (40, 16), (16, 16), (24, 24)]


def make_records(n: int = 4, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [
        Record(
            id=f"r{i}",
            question=QUESTIONS[i % 4],
            answers=["yes"],
            image=Image.fromarray(rng.integers(0, 255, (*SIZES[i % 4], 3), dtype=np.uint8)),
            caption="A red circle left of a blue square.",
        )
        for i in range(n)
    ]


def make_sae(d_in: int, d_sae: int = 16, seed: int = 0):
    sae = build_sae(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae))
    sae.init_weights(seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # so that features fire on a random model
    return sae


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def load(roots, family):
    root = roots(family)
    return load_adapter(root / VLM_SUBDIR, base_lm=root / BASE_SUBDIR, dtype=torch.float32)


@pytest.fixture(scope="module")
def llava(roots):
    return load(roots, "llava")


def test_visual_mean_for_count_hand_case():
    vm = VisualMean(
        per_position=torch.tensor([[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]),
        counts=torch.tensor([2, 1, 0]),
        overall=torch.tensor([5.0, 6.0]),
    )
    # index 2 had no calibration record, index 3 lies past the table: both take the overall mean
    expected = torch.tensor([[1.0, 1.0], [2.0, 2.0], [5.0, 6.0], [5.0, 6.0]])
    assert torch.equal(vm.for_count(4), expected)
    assert torch.equal(vm.for_count(1), expected[:1])


def test_visual_embedding_mean_is_the_per_position_mean_of_layer0_inputs(llava):
    records = make_records(2)
    vm = visual_embedding_mean(llava, records, progress=False)
    inputs = llava.vlm_inputs(records)
    with torch.no_grad():
        h0 = llava.vlm.model(**inputs, output_hidden_states=True).hidden_states[0]  # input of layer 0
    mask = llava.image_token_mask(inputs["input_ids"])
    expected = (h0[0][mask[0]] + h0[1][mask[1]]) / 2  # both rows have 16 image tokens
    torch.testing.assert_close(vm.per_position, expected, rtol=1e-5, atol=1e-6)
    assert vm.counts.tolist() == [2] * 16
    torch.testing.assert_close(vm.overall, expected.mean(0), rtol=1e-5, atol=1e-6)


def test_corruption_by_the_sample_itself_changes_nothing(llava):
    """Calibrating on the one sample makes the corrupt run equal the clean run: every score is 0."""
    record = make_records(1)
    vm = visual_embedding_mean(llava, record, progress=False)
    sae = make_sae(llava.vlm.d_model)
    result = attribution_patching(llava, sae, 1, 0, record, vm)
    torch.testing.assert_close(result.m_corrupt, result.m_clean, rtol=0, atol=1e-5)
    assert result.score_a.abs().max() < 1e-5 and result.score_b.abs().max() < 1e-5


def test_linear_objective_both_methods_equal_exact_patching(roots):
    """Layer-0 MLP zeroed and the projection objective at layer 0: m is linear in the head outputs,
    so Method A equals exact noising, Method B exact denoising, and B = -A, all exactly."""
    adapter = load(roots, "llava")
    with torch.no_grad():
        adapter.vlm.layers[0].mlp.down_proj.weight.zero_()
    records = make_records(3)
    vm = visual_embedding_mean(adapter, make_records(4, seed=1), progress=False)
    sae = make_sae(adapter.vlm.d_model)
    attr = attribution_patching(adapter, sae, 0, 3, records, vm, objective="projection")
    exact = exact_patching(adapter, sae, 0, 3, records, vm, directions=("noising", "denoising"), progress=False)
    assert attr.score_a.shape == (1, adapter.vlm.num_heads)
    assert attr.score_a.abs().max() > 1e-3  # the corruption does move the objective
    torch.testing.assert_close(attr.score_a, exact.noising, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attr.score_b, exact.denoising, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attr.score_b, -attr.score_a, rtol=1e-4, atol=1e-6)
    # the layer score is the sum of its heads, and patching all heads at once is additive here
    torch.testing.assert_close(attr.layer_a, exact.layer_noising, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_rank_correlation_with_exact_patching(roots, family):
    adapter = load(roots, family)
    records = make_records(4)
    vm = visual_embedding_mean(adapter, make_records(4, seed=1), progress=False)
    sae = make_sae(adapter.vlm.d_model)
    layer = adapter.vlm.num_layers - 1
    attr = attribution_patching(adapter, sae, layer, 5, records, vm, batch_size=2)
    exact = exact_patching(
        adapter, sae, layer, 5, records, vm, directions=("noising", "denoising"), batch_size=2, progress=False
    )
    rho_a = spearman(attr.score_a, exact.noising)
    rho_b = spearman(attr.score_b, exact.denoising)
    print(f"{family}: Spearman A vs exact {rho_a:.3f}, B vs exact denoising {rho_b:.3f}")
    assert rho_a > 0.3 and rho_b > 0.3
    n_heads = (layer + 1) * adapter.vlm.num_heads
    assert exact.forward_passes == 2 * (2 + 2 * (n_heads + layer + 1))  # 2 batches
    assert attr.forward_passes == 4 and attr.backward_passes == 4


def test_two_forwards_and_one_backward_per_method(llava, monkeypatch):
    records = make_records(3)
    vm = visual_embedding_mean(llava, records, progress=False)
    sae = make_sae(llava.vlm.d_model)
    forwards = []
    handle = llava.vlm.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    backwards = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        backwards.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    try:
        for methods, n_backward in ((("a",), 1), (("b",), 1), (("a", "b"), 2)):
            forwards.clear()
            backwards.clear()
            result = attribution_patching(llava, sae, 2, 1, records, vm, methods=methods, batch_size=8)
            assert len(forwards) == 2, methods  # one clean and one corrupt pass, for all heads at once
            assert len(backwards) == n_backward, methods
            assert (result.score_a is None) == ("a" not in methods)
            assert (result.score_b is None) == ("b" not in methods)
    finally:
        handle.remove()


def test_activation_objective_and_text_positions(llava):
    records = make_records(2)
    vm = visual_embedding_mean(llava, make_records(4, seed=1), progress=False)
    sae = make_sae(llava.vlm.d_model)
    attr = attribution_patching(llava, sae, 1, 2, records, vm, objective="activation", positions="text")
    exact = exact_patching(llava, sae, 1, 2, records, vm, objective="activation", positions="text", progress=False)
    assert attr.score_a.shape == exact.noising.shape == (2, llava.vlm.num_heads)
    assert torch.isfinite(attr.score_a).all() and torch.isfinite(exact.noising).all()


def test_tables(llava):
    records = make_records(2)
    vm = visual_embedding_mean(llava, records, progress=False)
    sae = make_sae(llava.vlm.d_model)
    attr = attribution_patching(llava, sae, 1, 2, records, vm)
    heads = heads_frame(attr)
    H = llava.vlm.num_heads
    assert len(heads) == 2 * H
    assert list(heads[["layer", "head"]].itertuples(index=False, name=None)) == [(l, h) for l in range(2) for h in range(H)]
    assert np.allclose(heads["score_a"].to_numpy(), attr.score_a.flatten().numpy())
    assert heads["exact"].isna().all()
    layers = layers_frame(attr)
    assert np.allclose(layers["score_a"].to_numpy(), attr.score_a.sum(1).numpy())


def test_bad_inputs(llava):
    records = make_records(1)
    vm = visual_embedding_mean(llava, records, progress=False)
    with pytest.raises(SAEError, match="d_in"):
        attribution_patching(llava, make_sae(8), 1, 0, records, vm)
    with pytest.raises(SAEError, match="does not exist"):
        attribution_patching(llava, make_sae(llava.vlm.d_model, d_sae=4), 1, 9, records, vm)
    with pytest.raises(DataError, match="no records"):
        attribution_patching(llava, make_sae(llava.vlm.d_model), 1, 0, [], vm)
    with pytest.raises(DataError, match="d_model"):
        bad = VisualMean(torch.zeros(16, 5), torch.ones(16, dtype=torch.long), torch.zeros(5))
        attribution_patching(llava, make_sae(llava.vlm.d_model), 1, 0, records, bad)


def test_top_and_bottom_heads_are_disjoint():
    # one layer of 4 heads (a feature at layer 0), 3 asked for each list: 2 each, never shared
    scores = torch.tensor([[17.6, -0.5, 3.0, 0.1]])
    top, bottom = attribution.top_and_bottom_heads(scores, 3)
    assert top == [(0, 0, pytest.approx(17.6)), (0, 2, 3.0)]
    assert bottom == [(0, 3, pytest.approx(0.1)), (0, 1, -0.5)]  # smallest |score| first
    big = torch.arange(12.0).view(2, 6)
    top, bottom = attribution.top_and_bottom_heads(big, 3)
    assert [h for _, h, _ in top] == [5, 4, 3] and [(l, h) for l, h, _ in bottom] == [(0, 0), (0, 1), (0, 2)]
    assert attribution.top_and_bottom_heads(torch.ones(1, 1), 3) == ([], [])


def test_attention_overlays_png(llava):
    records = make_records(2)
    vm = visual_embedding_mean(llava, records, progress=False)
    sae = make_sae(llava.vlm.d_model)
    attr = attribution_patching(llava, sae, 2, 1, records, vm)
    before = llava.vlm.attention(1).config._attn_implementation
    pngs = attention_overlays(llava, sae, attr, records[0], n_heads=1, query="max")
    assert len(pngs) == 2 and {k.split("_")[0] for k in pngs} == {"top1", "bottom1"}
    assert all(png.startswith(b"\x89PNG") for png in pngs.values())
    # the attention read-out sums to at most 1 over the image tokens, and SDPA is back afterwards
    w = attribution.attention_weights(llava.vlm, llava.vlm_inputs(records[:1]), 1)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=1e-5, atol=1e-5)
    assert llava.vlm.attention(1).config._attn_implementation == before


def test_attribute_features_stage(llava, tmp_path):
    records = make_records(4)
    sae = make_sae(llava.vlm.d_model)
    saes = {1: sae, 2: make_sae(llava.vlm.d_model, seed=1)}
    features = pd.DataFrame({"layer": [1, 2], "feature": [3, 4]})
    paths = attribute_features(
        llava, saes, features, records, tmp_path / "attribution", top_k=2, exact=True, overlay_heads=1, progress=False
    )
    heads = pd.read_parquet(paths["heads"])
    H = llava.vlm.num_heads
    assert len(heads) == 2 * H + 3 * H
    assert {"feature_layer", "feature", "layer", "head", "score_a", "score_b", "exact"} <= set(heads.columns)
    assert heads["exact"].notna().all() and heads["n_samples"].eq(2).all()
    layers = pd.read_parquet(paths["layers"])
    assert len(layers) == 2 + 3
    summary = json.loads(paths["summary"].read_text())
    for entry in summary["features"]:
        assert entry["n_samples"] == 2 and entry["speed_ratio"] > 0
        assert -1 <= entry["spearman_a_vs_exact"] <= 1
    overlays = [k for k in paths if k.startswith("overlay:")]
    assert len(overlays) == 4 and all(paths[k].read_bytes().startswith(b"\x89PNG") for k in overlays)


def test_stage_with_features_that_never_fire(llava, tmp_path):
    sae = make_sae(llava.vlm.d_model)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # no latent ever fires
    features = pd.DataFrame({"layer": [1], "feature": [0]})
    paths = attribute_features(llava, {1: sae}, features, make_records(2), tmp_path, top_k=2, progress=False)
    heads = pd.read_parquet(paths["heads"])
    assert heads.empty and {"feature_layer", "feature", "layer", "head", "score_a"} <= set(heads.columns)
    assert json.loads(paths["summary"].read_text())["skipped_no_activation"] == ["L1F0"]
