"""Top examples, token-level activations, heatmaps on each family's real patch grid, evidence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmdiff.capture import capture_residuals
from mmdiff.data.records import Record
from mmdiff.errors import DataError, SAEError
from mmdiff.interp.examples import (
    collect_evidence,
    feature_maxima,
    feature_promoted_tokens,
    token_activations,
    top_records,
)
from mmdiff.interp.explain import OfflineExplainer
from mmdiff.interp.heatmap import (
    overlay_png,
    patch_grid,
    patch_maps,
    tile_token_count,
    upsampled_heatmap,
)
from mmdiff.models import TokenType, load_adapter
from mmdiff.models.tiny import BASE_SUBDIR, VLM_SUBDIR, build_tiny
from mmdiff.sae import SAEConfig, build_sae

SIZES = [(20, 30), (40, 16), (16, 16)]  # (height, width)


def make_records(n: int = 3, seed: int = 0, prefix: str = "r") -> list[Record]:
    rng = np.random.default_rng(seed)
    questions = ["Is the red circle left of the blue square?", "What colour is the square?", "What?"]
    return [
        Record(
            id=f"{prefix}{i}",
            question=questions[i % 3],
            image=Image.fromarray(rng.integers(0, 255, (*SIZES[i % 3], 3), dtype=np.uint8)),
        )
        for i in range(n)
    ]


def make_sae(d_in: int, d_sae: int = 16, seed: int = 0):
    sae = build_sae(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae))
    sae.init_weights(seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            root = build_tiny(family, tmp_path_factory.mktemp(family))
            cache[family] = load_adapter(root / VLM_SUBDIR, base_lm=root / BASE_SUBDIR, dtype=torch.float32)
        return cache[family]

    return get


# ---- heatmap math on hand-made grids ------------------------------------------------------------


def test_patch_maps_drop_newlines_in_token_order():
    # a 2x2 base grid, then a 2x3 grid whose rows end in a newline token (LLaVA-NeXT layout)
    tiles = [(2, 2, False), (2, 3, True)]
    assert tile_token_count(tiles) == 4 + 8
    maps = patch_maps(torch.arange(12.0), tiles)
    assert torch.equal(maps[0], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(maps[1], torch.tensor([[4.0, 5.0, 6.0], [8.0, 9.0, 10.0]]))  # 7 and 11 are newlines
    with pytest.raises(DataError, match="holds 12 image tokens"):
        patch_maps(torch.arange(11.0), tiles)


def test_bilinear_upsampling_hand_case():
    # one row [0, 1] over 4 pixels: patch centres at x = 0.5 and 2.5 (align_corners=False)
    heat = upsampled_heatmap([0.0, 1.0], [(1, 2, False)], size=(4, 1))
    np.testing.assert_allclose(heat, [[0.0, 0.25, 0.75, 1.0]], atol=1e-6)
    # tiles are averaged; a 1x1 tile (CLS) counts only when nothing finer exists
    heat = upsampled_heatmap([7.0, 0.0, 1.0], [(1, 1, False), (1, 2, False)], size=(4, 1))
    np.testing.assert_allclose(heat, [[0.0, 0.25, 0.75, 1.0]], atol=1e-6)
    np.testing.assert_allclose(upsampled_heatmap([3.0], [(1, 1, False)], size=(2, 3)), np.full((3, 2), 3.0))


@pytest.mark.parametrize(
    "family, expected",
    [
        ("llava", [[(4, 4, False)]] * 3),
        # Qwen2-VL: (h / 2, w / 2) from image_grid_thw, not square for non-square images
        ("qwen2_vl", [[(2, 4, False)], [(5, 2, False)], [(2, 2, False)]]),
        ("llava_next", [[(4, 4, False), (6, 8, True)], [(4, 4, False), (8, 4, True)], [(4, 4, False), (4, 4, True)]]),
    ],
)
def test_patch_grid_matches_the_image_tokens(adapter, family, expected):
    a = adapter(family)
    inputs = a.vlm_inputs(make_records())
    counts = a.image_token_mask(inputs["input_ids"]).sum(1).tolist()
    for row in range(3):
        tiles = patch_grid(a, inputs, row)
        assert tiles == expected[row]
        assert tile_token_count(tiles) == counts[row]


def test_heatmap_png_on_qwen_grid(adapter):
    a = adapter("qwen2_vl")
    record = make_records(1)[0]
    inputs = a.vlm_inputs([record])
    tiles = patch_grid(a, inputs, 0)
    n = tile_token_count(tiles)
    image = record.load_image()  # 30 wide, 20 high
    heat = upsampled_heatmap(torch.arange(float(n)), tiles, image.size)
    assert heat.shape == (20, 30)
    # token order is row-major over the (2, 4) grid: the top-left is low, the bottom-right high
    assert heat[0, 0] < heat[0, -1] < heat[-1, 0] < heat[-1, -1]
    png = overlay_png(image, torch.arange(float(n)), tiles, title="<x>")
    assert png.startswith(b"\x89PNG")


# ---- activations through the VLM and the SAE ----------------------------------------------------


def test_feature_maxima_hand_check(adapter):
    a = adapter("llava")
    records = make_records(3)
    saes = {1: make_sae(a.vlm.d_model)}
    table = feature_maxima(a, saes, records, [(1, 2), (1, 5)], batch_size=2, progress=False)
    assert len(table) == 6
    for record in records:
        inputs = a.vlm_inputs([record])
        with torch.no_grad():
            h = saes[1].encode(capture_residuals(a.vlm, inputs, [1])[1])[0]  # [seq, d_sae]
        types = a.token_types(inputs)[0]
        keep = types != TokenType.SPECIAL
        for f in (2, 5):
            row = table[(table["record_id"] == record.id) & (table["feature"] == f)].iloc[0]
            values = h[:, f]
            assert row["max_activation"] == pytest.approx(float(values[keep].max().clamp_min(0)), abs=1e-5)
            assert row["total_mass"] == pytest.approx(float(values[keep].clamp_min(0).sum()), abs=1e-4)
            image = types == TokenType.IMAGE
            assert row["image_mass"] == pytest.approx(float(values[image].clamp_min(0).sum()), abs=1e-4)
            assert int(row["position"]) == int(torch.where(keep, values, -torch.inf).argmax())
    best = top_records(table, 2)
    for key, ids in best.items():
        sub = table[table["feature"] == key[1]].sort_values("max_activation", ascending=False)
        assert ids == list(sub["record_id"].head(2))


def test_token_activations_cover_every_token(adapter):
    a = adapter("llava_next")
    records = make_records(3)
    saes = {2: make_sae(a.vlm.d_model)}
    out = token_activations(a, saes, records, [(2, 1)], batch_size=3, progress=False)
    for acts, record in zip(out, records):
        single = a.vlm_inputs([record])
        assert torch.equal(acts.input_ids, single["input_ids"][0])  # padding removed
        assert acts.activations[(2, 1)].shape == acts.input_ids.shape
        assert acts.image_values((2, 1)).numel() == tile_token_count(acts.tiles)


def test_collect_evidence_two_sources(adapter):
    a = adapter("qwen2_vl")
    saes = {0: make_sae(a.vlm.d_model), 2: make_sae(a.vlm.d_model, seed=1)}
    sources = {"VQAv2": make_records(3, prefix="v"), "VSR": make_records(2, seed=1, prefix="s")}
    result = collect_evidence(a, saes, pd.DataFrame({"layer": [0, 2], "feature": [3, 4]}), sources, k=2, progress=False)
    for key, ev in result.evidence.items():
        assert ev.feature_id == f"L{key[0]}/F{key[1]}"
        assert [e.source for e in ev.examples] == ["VQAv2", "VQAv2", "VSR", "VSR"]
        assert all(e.heatmap_png.startswith(b"\x89PNG") for e in ev.examples)
        rows = result.maxima[(result.maxima["layer"] == key[0]) & (result.maxima["feature"] == key[1])]
        assert ev.image_share == pytest.approx(rows["image_mass"].sum() / rows["total_mass"].sum())
        assert len(ev.promoted_tokens) == 10
        explanation = OfflineExplainer().explain(ev)
        assert explanation.feature_id == ev.feature_id and explanation.description
    assert set(result.maxima["source"]) == {"VQAv2", "VSR"} and len(result.maxima) == 2 * 5


def test_examples_from_the_statistics_top_records_equal_a_brute_force_pass(adapter):
    """The interp stage's shortcut: the statistics stage's top records (one streaming pass, token
    blocks that split records) name the same records, maxima and positions as scanning every record
    again, and the examples and image share built from them are the same."""
    from mmdiff.capture import iter_activations
    from mmdiff.stats import collect_feature_stats_by_split, feature_summary
    from mmdiff.stats import top_records as stats_top_records

    a = adapter("llava")
    saes = {1: make_sae(a.vlm.d_model, seed=3), 2: make_sae(a.vlm.d_model, seed=4)}
    records = make_records(7, seed=2)
    sources = {"all": records, "part": records[2:6]}
    keys = [(1, f) for f in range(16)] + [(2, 0), (2, 9)]
    batches = list(iter_activations(a, records, [1, 2], "vlm", batch_size=3, progress=False))
    stats = collect_feature_stats_by_split(batches, saes, {"all": None, "part": [r.id for r in records[2:6]]},
                                           top_k=4, token_block=7, progress=False)
    brute = collect_evidence(a, saes, keys, sources, k=3, heatmaps=False, progress=False)
    mass = pd.concat([feature_summary(st) for st in stats.values()])
    mass = mass.assign(image_mass=mass.sum_h_image, total_mass=mass.sum_h_image + mass.sum_h_text)
    kept = collect_evidence(a, saes, keys, sources, k=3, heatmaps=False, progress=False, mass=mass,
                            top={name: stats_top_records(st) for name, st in stats.items()})
    for name in sources:
        table = stats_top_records(stats[name])
        scanned = brute.maxima[brute.maxima["source"] == name]
        for key in keys:
            rows = scanned[(scanned.layer == key[0]) & (scanned.feature == key[1]) & (scanned.max_activation > 0)]
            want = rows.sort_values("max_activation", ascending=False).head(4)
            got = table[(table.layer == key[0]) & (table.feature == key[1])].sort_values("rank")
            np.testing.assert_allclose(got.value, want.max_activation, rtol=1e-5)
            # records tie (identical prompt prefixes), so each kept record is checked against its own scan
            assert got.record_id.is_unique
            scan = rows.set_index("record_id").loc[list(got.record_id)]
            np.testing.assert_allclose(got.value, scan.max_activation, rtol=1e-5)
            assert list(got.position) == list(scan.position) and list(got.token_type) == list(scan.token_type)
    assert any(brute.evidence[key].examples for key in keys)
    for key in keys:
        mine, theirs = kept.evidence[key], brute.evidence[key]
        assert [e.source for e in mine.examples] == [e.source for e in theirs.examples]
        assert [e.max_activation for e in mine.examples] == pytest.approx([e.max_activation for e in theirs.examples])
        for e in mine.examples:
            scanned = brute.maxima[(brute.maxima.layer == key[0]) & (brute.maxima.feature == key[1])
                                   & (brute.maxima.record_id == e.record_id)]
            assert e.max_activation == pytest.approx(float(scanned.max_activation.iloc[0]), rel=1e-5)
        assert mine.image_share == pytest.approx(theirs.image_share, rel=1e-5)
    shown = kept.maxima
    assert len(shown) == sum(len(ev.examples) for ev in kept.evidence.values())
    with pytest.raises(DataError, match="mass="):
        collect_evidence(a, saes, keys, sources, k=3, progress=False, top={"all": stats_top_records(stats["all"])})
    stray = stats_top_records(stats["all"]).assign(record_id="elsewhere")
    with pytest.raises(DataError, match="does not hold"):
        collect_evidence(a, saes, keys, {"all": records}, k=3, progress=False, top={"all": stray}, mass=mass)


def test_promoted_tokens_follow_the_decoder_direction(adapter):
    a = adapter("llava")
    sae = make_sae(a.vlm.d_model)
    W_U = a.vlm.unembedding_matrix().detach()
    t = int(W_U.norm(dim=1).argmax())  # W_U[j] . W_U[t] <= |W_U[t]|^2 for every j: t must come first
    with torch.no_grad():
        sae.W_dec[0] = a.vlm.final_norm.weight.detach().reciprocal() * W_U[t]  # undo the norm's weights
    top = feature_promoted_tokens(a, sae, 0, k=1)
    assert top[0][0] == a.tokenizer.decode([t])


def test_bad_features(adapter):
    a = adapter("llava")
    with pytest.raises(SAEError, match="no SAE"):
        feature_maxima(a, {1: make_sae(a.vlm.d_model)}, make_records(1), [(2, 0)], progress=False)
    with pytest.raises(SAEError, match="does not exist"):
        feature_maxima(a, {1: make_sae(a.vlm.d_model, d_sae=4)}, make_records(1), [(1, 7)], progress=False)
    with pytest.raises(DataError, match="layer and feature"):
        feature_maxima(a, {1: make_sae(a.vlm.d_model)}, make_records(1), pd.DataFrame({"f": [1]}), progress=False)
