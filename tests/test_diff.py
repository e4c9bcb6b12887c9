"""Adapted features: hand-computed scores, and a planted set that the selection must return exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmdiff.activations import ActivationBatch
from mmdiff.diff import (
    adapted_counts_per_layer,
    adapted_features,
    decoder_cosine,
    relative_decoder_norm,
    relative_norm_absence,
    two_stage_selection,
    variance_gap,
    write_adapted_features,
)
from mmdiff.errors import ConfigError, SAEError
from mmdiff.models.base import TokenType
from mmdiff.stats import FeatureStats, accumulate_codes, collect_feature_stats

TEXT, IMAGE, SPECIAL = int(TokenType.TEXT), int(TokenType.IMAGE), int(TokenType.SPECIAL)


class TiedReluSAE:
    """ReLU SAE with W_enc = W_dec^T and no bias: with orthonormal decoder rows, encode(a @ W_dec) = a."""

    def __init__(self, W_dec: torch.Tensor) -> None:
        self.W_dec = W_dec.float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.double() @ self.W_dec.double().T).float()


def test_decoder_scores_by_hand():
    wb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    wa = torch.tensor([[1.0, 1.0], [0.0, -1.0], [6.0, 8.0], [0.0, 0.0]])
    cos = decoder_cosine(wb, wa)
    assert cos[:3].tolist() == pytest.approx([1 / math.sqrt(2), -1.0, 1.0])
    assert math.isnan(cos[3])
    rel = relative_decoder_norm(wb, wa)
    assert rel[:3].tolist() == pytest.approx([math.sqrt(2) / (1 + math.sqrt(2)), 1 / 3, 10 / 15])
    assert math.isnan(rel[3])


def test_relative_norm_is_reported_only_where_it_can_vary():
    ones = torch.ones(4)
    assert "unit norm" in relative_norm_absence(ones, ones + 1e-7)
    assert "unit norm" in relative_norm_absence(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert "0.5" in relative_norm_absence(torch.full((3,), 2.0), torch.full((3,), 2.0))
    assert "zero" in relative_norm_absence(torch.zeros(2), ones[:2])
    assert relative_norm_absence(ones, torch.tensor([1.0, 2.0, 1.0, 1.0])) is None


def test_two_stage_selection_by_hand():
    # 10 pooled features. Top 50% by gap: features 0, 2, 4, 6 and 8/9 tie at 1.0 -> pooled order keeps 8.
    gap = torch.tensor([5.0, 0.0, 4.0, 0.0, 3.0, 0.0, 2.0, 0.0, 1.0, 1.0])
    cos = torch.tensor([0.9, 0.0, 0.1, 0.0, 0.5, 0.0, float("nan"), 0.0, 0.2, 0.0])
    stage1, selected = two_stage_selection(gap, cos, p_gap=0.5, p_cos=0.4)
    assert stage1.nonzero().squeeze(1).tolist() == [0, 2, 4, 6, 8]
    # bottom ceil(0.4 * 5) = 2 by cosine among them: 2 (0.1) and 8 (0.2); NaN is never kept
    assert selected.nonzero().squeeze(1).tolist() == [2, 8]
    # 20% of 100 is 20, not 21 (no float round-up)
    s1, sel = two_stage_selection(torch.arange(100.0), torch.arange(100.0), 0.2, 0.2)
    assert int(s1.sum()) == 20 and int(sel.sum()) == 4 and sel.nonzero().squeeze(1).tolist() == [80, 81, 82, 83]
    with pytest.raises(ConfigError, match="p_gap"):
        two_stage_selection(gap, cos, p_gap=20, p_cos=0.2)


def test_variance_gap_token_types_by_hand():
    vision = FeatureStats({0: 2}, "vision", n_chunks=1)
    accumulate_codes(
        vision, 0, torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]]), record=torch.tensor([0, 0, 0]),
        position=torch.tensor([1, 2, 3]), token_type=torch.tensor([IMAGE, IMAGE, TEXT]), record_ids=["r"],
    )
    text = FeatureStats({0: 2}, "text", n_chunks=1)
    accumulate_codes(
        text, 0, torch.tensor([[2.0, 1.0], [0.0, 1.0]]), record=torch.tensor([0, 0]),
        position=torch.tensor([1, 2]), token_type=torch.tensor([TEXT, TEXT]), record_ids=["r"],
    )
    # all non-special tokens: E_vision = [10/3, 20/3], E_text = [2, 1]
    assert variance_gap(vision, text, 0).tolist() == pytest.approx([10 / 3 - 2, 20 / 3 - 1])
    # image tokens only on the vision side: E = [5, 2]
    assert variance_gap(vision, text, 0, vision_token_types=(IMAGE,)).tolist() == pytest.approx([3.0, 1.0])


LAYERS = (2, 5)
D_IN, D_SAE = 128, 50
PLANTED = {2: [7, 31], 5: [0, 44]}  # rotated and vision-preferring: the adapted set
BOOSTED = {2: [1, 3, 10, 12, 20, 25, 40, 49], 5: [2, 5, 9, 15, 22, 30, 38, 47]}  # vision-preferring, not rotated
DISTRACTORS = {2: [8, 9], 5: [11, 12]}  # rotated, no preference: rejected at the gap stage


def planted_world(n_records: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base, adapted = {}, {}
    for layer in LAYERS:
        q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
        e, u = q.T[:D_SAE], q.T[D_SAE : 2 * D_SAE]  # orthonormal directions, u_i orthogonal to every e_j
        theta = torch.rand(D_SAE, generator=g, dtype=torch.float64) * math.radians(25)
        theta[DISTRACTORS[layer]] = math.radians(85)
        theta[PLANTED[layer]] = math.radians(70)
        base[layer] = TiedReluSAE(e)
        adapted[layer] = TiedReluSAE(torch.cos(theta)[:, None] * e + torch.sin(theta)[:, None] * u)

    def codes(n_tok: int, boost: bool, layer: int) -> torch.Tensor:
        a = (torch.rand(n_tok, D_SAE, generator=g) < 0.3) * torch.empty(n_tok, D_SAE).exponential_(generator=g)
        if boost:
            a[:, PLANTED[layer] + BOOSTED[layer]] *= 3.0
        return a  # [n_tok, d_sae]

    def batches(vision: bool, batch: int = 8, seq: int = 14):
        out = []
        for start in range(0, n_records, batch):
            ids = [f"r{i}" for i in range(start, start + batch)]
            tt = torch.full((batch, seq), SPECIAL, dtype=torch.int8)
            mask = torch.zeros(batch, seq, dtype=torch.bool)
            for r in range(batch):
                length = 10 + r % 4
                mask[r, :length] = True
                if vision:
                    tt[r, 1:6] = IMAGE
                    tt[r, 6:length] = TEXT
                else:
                    tt[r, 1:length] = TEXT
            acts = {}
            for layer in LAYERS:
                W = (adapted if vision else base)[layer].W_dec.double()
                x = codes(batch * seq, vision, layer).double() @ W
                acts[layer] = x.view(batch, seq, D_IN).float()
                acts[layer][tt == SPECIAL] = 50.0  # BOS and padding: must not count
            out.append(ActivationBatch(acts=acts, token_types=tt, attention_mask=mask, record_ids=ids))
        return out

    vision = collect_feature_stats(batches(True), adapted, "vision", n_chunks=16, top_k=2, progress=False)
    text = collect_feature_stats(batches(False), base, "text", n_chunks=16, top_k=2, progress=False)
    return vision, text, base, adapted


@pytest.fixture(scope="module")
def world():
    return planted_world()


def test_planted_adapted_set(world):
    vision, text, base, adapted = world
    df = adapted_features(vision, text, base, adapted, n_bootstrap=40, progress=False)
    assert len(df) == len(LAYERS) * D_SAE
    got = sorted(zip(df.layer[df.selected], df.feature[df.selected]))
    assert got == sorted((layer, f) for layer, fs in PLANTED.items() for f in fs)
    passed = sorted(zip(df.layer[df.passed_gap], df.feature[df.passed_gap]))
    assert passed == sorted((layer, f) for layer in LAYERS for f in PLANTED[layer] + BOOSTED[layer])
    for layer, fs in DISTRACTORS.items():
        rows = df[(df.layer == layer) & df.feature.isin(fs)]
        assert (rows.rejected_at == "variance_gap").all()
        assert (rows.decoder_cosine < 0.1).all()
    assert (df.rejected_at[df.passed_gap & ~df.selected] == "decoder_cosine").all()
    assert df.rejected_at[df.selected].isna().all()
    planted = df[df.selected]
    assert planted.decoder_cosine.to_numpy() == pytest.approx(np.full(4, math.cos(math.radians(70))), abs=1e-5)
    # unit-norm decoders on both sides: the relative norm would be 0.5 everywhere, so it is absent
    assert df.decoder_norm_base.to_numpy() == pytest.approx(np.ones(len(df)), abs=1e-6)
    assert df.relative_decoder_norm.isna().all()
    assert "unit norm" in df.attrs["relative_decoder_norm_absent"]
    # E[h^2] of the planted latents is about 9x larger on the vision side
    assert (planted.mean_sq_vision / planted.mean_sq_text).between(6, 12).all()
    assert (planted.stability >= 0.9).all()
    assert df.stability[~df.passed_gap].max() == 0.0
    per_layer = adapted_counts_per_layer(df)
    assert per_layer.n_adapted.tolist() == [2, 2]
    assert per_layer.n_passed_gap.tolist() == [10, 10]
    assert per_layer.mean_cosine_adapted.to_numpy() == pytest.approx(np.full(2, math.cos(math.radians(70))), abs=1e-5)
    assert df.attrs["n_selected"] == 4 and df.attrs["n_passed_gap"] == 20


def test_write_adapted_features(world, tmp_path):
    vision, text, base, adapted = world
    paths = write_adapted_features(vision, text, base, adapted, tmp_path, n_bootstrap=0, progress=False)
    import pandas as pd

    assert len(pd.read_parquet(paths["diff"])) == 100
    sel = pd.read_parquet(paths["adapted"])
    assert sorted(zip(sel.layer, sel.feature)) == [(2, 7), (2, 31), (5, 0), (5, 44)]
    assert sel.stability.isna().all()
    assert pd.read_parquet(paths["per_layer"]).layer.tolist() == [2, 5]


def test_mismatched_inputs(world):
    vision, text, base, adapted = world
    with pytest.raises(SAEError, match="no adapted SAE for layer 5"):
        adapted_features(vision, text, base, {2: adapted[2]}, n_bootstrap=0)
    small = {2: base[2].W_dec[:10], 5: base[5].W_dec}
    with pytest.raises(SAEError, match="index-aligned"):
        adapted_features(vision, text, small, adapted, n_bootstrap=0)
    other = FeatureStats({2: D_SAE}, "text")
    with pytest.raises(ConfigError, match="same hook points"):
        adapted_features(vision, other, base, adapted, n_bootstrap=0)


def test_plots_of_the_diff(world, tmp_path):
    from PIL import Image

    from mmdiff.errors import DataError
    from mmdiff.report.feature_plots import plot_adapted_per_layer, plot_gap_vs_cosine

    vision, text, base, adapted = world
    df = adapted_features(vision, text, base, adapted, n_bootstrap=0, progress=False)
    task = df[["layer", "feature"]].assign(kept=df.selected & (df.layer == 2))
    p1 = plot_gap_vs_cosine(df, tmp_path / "gap_vs_cosine.png", {"spatial": task})
    p2 = plot_adapted_per_layer(adapted_counts_per_layer(df), tmp_path / "per_layer.svg")
    assert Image.open(p1).size[0] > 300
    assert p2.read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gap_vs_cosine.png", "per_layer.svg"]  # no temp files
    with pytest.raises(DataError, match="decoder_cosine"):
        plot_gap_vs_cosine(df.drop(columns="decoder_cosine"), tmp_path / "x.png")
