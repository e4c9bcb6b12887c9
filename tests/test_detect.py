"""Task features: hand-computed firing statistics, BH, and a planted case through every filter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from mmdiff.detect import (
    benjamini_hochberg,
    contrastive_firing,
    fisher_exact_pvalues,
    odds_ratio,
    task_features,
    write_task_features,
)
from mmdiff.errors import ConfigError
from mmdiff.models.base import TokenType
from mmdiff.stats import FeatureStats, accumulate_codes

TEXT, IMAGE = int(TokenType.TEXT), int(TokenType.IMAGE)


def test_odds_ratio_and_delta_p_by_hand():
    a, n_t = np.array([6, 2, 0]), 10
    c, n_b = np.array([4, 4, 0]), 20
    # (a+.5)(d+.5) / ((b+.5)(c+.5)) with b = 10 - a, d = 20 - c
    assert odds_ratio(a, n_t, c, n_b) == pytest.approx([6.5 * 16.5 / (4.5 * 4.5), 2.5 * 16.5 / (8.5 * 4.5), 0.5 * 20.5 / (10.5 * 0.5)])
    with pytest.raises(ConfigError, match="exceeds its token count"):
        odds_ratio([11], 10, [0], 5)


def test_fisher_exact_by_hand_and_against_scipy():
    # [[3, 0], [0, 3]]: the only table at least as extreme has probability 1 / C(6, 3) = 1 / 20
    assert fisher_exact_pvalues([3], 3, [0], 3)[0] == pytest.approx(0.05)
    assert fisher_exact_pvalues([3], 3, [0], 3, "two-sided")[0] == pytest.approx(0.10)
    assert fisher_exact_pvalues([0], 3, [3], 3)[0] == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    a, c = rng.integers(0, 30, 40), rng.integers(0, 50, 40)
    n_t, n_b = 30, 50
    p = fisher_exact_pvalues(a, n_t, c, n_b)
    want = [scipy.stats.fisher_exact([[x, n_t - x], [y, n_b - y]], alternative="greater").pvalue for x, y in zip(a, c)]
    np.testing.assert_allclose(p, want, rtol=1e-9)
    # two-sided "central" p-value: doubled smaller tail, never below scipy's minimum-likelihood one
    p2 = fisher_exact_pvalues(a, n_t, c, n_b, "two-sided")
    less = [scipy.stats.fisher_exact([[x, n_t - x], [y, n_b - y]], alternative="less").pvalue for x, y in zip(a, c)]
    np.testing.assert_allclose(p2, np.minimum(1, 2 * np.minimum(want, less)), rtol=1e-9)
    scipy_two = [scipy.stats.fisher_exact([[x, n_t - x], [y, n_b - y]]).pvalue for x, y in zip(a, c)]
    assert np.all(p2 >= np.array(scipy_two) - 1e-12)


def test_benjamini_hochberg_by_hand_and_against_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted .005 .01 .03 .04 .5 -> m p / rank = .025 .025 .05 .05 .5 -> running min from the top
    assert benjamini_hochberg(p) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.5])
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = np.concatenate([rng.uniform(size=50), rng.uniform(0, 1e-3, size=10), [1.0, 1.0]])
        np.testing.assert_allclose(benjamini_hochberg(p), scipy.stats.false_discovery_control(p), rtol=1e-12)
    with pytest.raises(ConfigError, match="no NaN"):
        benjamini_hochberg([0.1, float("nan")])


def stats_from_counts(split: str, fires: dict[int, list[tuple[int, int]]], n_text: int, n_image: int) -> FeatureStats:
    """Statistics whose feature f fires (value 1) on fires[layer][f] = (text, image) tokens."""
    d = {layer: len(v) for layer, v in fires.items()}
    stats = FeatureStats(d, split, n_chunks=2, top_k=1)
    n = n_text + n_image
    types = torch.tensor([TEXT] * n_text + [IMAGE] * n_image)
    for layer, per_feature in fires.items():
        h = torch.zeros(n, len(per_feature))
        for f, (ft, fi) in enumerate(per_feature):
            h[:ft, f] = 1.0
            h[n_text : n_text + fi, f] = 1.0
        accumulate_codes(stats, layer, h, record=torch.arange(n) % 4, position=torch.arange(n), token_type=types,
                           record_ids=["a", "b", "c", "d"])
    return stats


# 40 tokens per split (20 text + 20 image). Layer 0, by design:
#   f0 spatial, adapted, image-dominated in the neutral run -> kept
#   f1 spatial, adapted, fires on text only in the neutral run -> not image-dominated
#   f2 spatial, adapted, silent in the neutral run -> inactive
#   f3 spatial, not adapted -> not adapted
#   f4 same firing in both splits -> delta p below threshold
#   f5 a little more in the task split, not significant (6/40 vs 4/40)
# Layer 1: f0 fires less in the task split; f1 never fires.
TASK = {0: [(8, 12), (8, 12), (8, 12), (8, 12), (5, 5), (3, 3)], 1: [(1, 1), (0, 0)]}
BASE = {0: [(1, 1), (1, 1), (1, 1), (1, 1), (5, 5), (2, 2)], 1: [(5, 5), (0, 0)]}
NEUTRAL = {0: [(0, 6), (6, 0), (0, 0), (0, 6), (2, 2), (1, 1)], 1: [(1, 1), (0, 0)]}
ADAPTED = [(0, 0), (0, 1), (0, 2), (0, 4), (0, 5), (1, 0)]


@pytest.fixture(scope="module")
def splits():
    return (
        stats_from_counts("spatial", TASK, 20, 20),
        stats_from_counts("vqa", BASE, 20, 20),
        stats_from_counts("spatial_neutral", NEUTRAL, 20, 20),
    )


def test_contrastive_firing_counts(splits):
    task, base, _ = splits
    df = contrastive_firing(task, base)
    row = df[(df.layer == 0) & (df.feature == 0)].iloc[0]
    assert (row.fires_task, row.tokens_task, row.fires_base, row.tokens_base) == (20, 40, 2, 40)
    assert row.p_task == 0.5 and row.p_base == 0.05 and row.delta_p == pytest.approx(0.45)
    assert row.odds_ratio == pytest.approx(20.5 * 38.5 / (20.5 * 2.5))
    assert row.p_value == pytest.approx(scipy.stats.fisher_exact([[20, 20], [2, 38]], alternative="greater").pvalue)
    np.testing.assert_allclose(df.q_value, scipy.stats.false_discovery_control(df.p_value))
    # image tokens only: f0 fires on 12 of 20 task image tokens
    img = contrastive_firing(task, base, token_types=(IMAGE,))
    assert img.loc[0, "p_task"] == 0.6 and img.loc[0, "tokens_task"] == 20


def test_task_features_reasons(splits):
    task, base, neutral = splits
    df = task_features(task, base, adapted=ADAPTED, neutral=neutral, min_delta_p=0.02, alpha=0.05,
                       min_neutral_firing=0.05, min_image_share=0.5)
    reasons = dict(zip(zip(df.layer, df.feature), df.reason))
    assert reasons == {
        (0, 0): "kept",
        (0, 1): "not_image_dominated_in_neutral_run",
        (0, 2): "inactive_in_neutral_run",
        (0, 3): "not_adapted",
        (0, 4): "delta_p_below_threshold",
        (0, 5): "not_significant",
        (1, 0): "delta_p_below_threshold",
        (1, 1): "delta_p_below_threshold",
    }
    assert df.kept.tolist() == [r == "kept" for r in df.reason]
    assert df.task.unique().tolist() == ["spatial"]
    row = df[(df.layer == 0) & (df.feature == 1)].iloc[0]
    assert row.neutral_image_share == 0.0 and row.neutral_firing_frequency == pytest.approx(6 / 40)
    # without the adapted set and the neutral run those filters are skipped and their columns NA
    loose = task_features(task, base, min_delta_p=0.02)
    assert loose[loose.kept].feature.tolist() == [0, 1, 2, 3] and loose.in_adapted_set.isna().all()
    assert loose.neutral_image_share.isna().all() and not loose.attrs["lexical_filter"]


def test_write_task_features(splits, tmp_path):
    task, base, neutral = splits
    adapted = pd.DataFrame({"layer": [0, 0, 0, 1], "feature": [0, 1, 3, 0], "selected": [True, True, False, True]})
    paths = write_task_features({"spatial": task}, base, tmp_path, adapted=adapted, neutral={"spatial": neutral},
                                min_delta_p=0.02, min_neutral_firing=0.05)
    kept = pd.read_parquet(paths["spatial"]["features"])
    assert list(zip(kept.layer, kept.feature)) == [(0, 0)]
    scores = pd.read_parquet(paths["spatial"]["scores"])
    assert scores.set_index(["layer", "feature"]).loc[(0, 3), "reason"] == "not_adapted"


def test_mismatched_splits(splits):
    task, _, _ = splits
    other = stats_from_counts("vqa", {0: [(1, 1)]}, 5, 5)
    with pytest.raises(ConfigError, match="same SAEs"):
        contrastive_firing(task, other)
    with pytest.raises(ConfigError, match="'greater' or 'two-sided'"):
        fisher_exact_pvalues([1], 2, [1], 2, "less")


def test_write_feature_plots_from_a_run_directory(splits, tmp_path):
    from mmdiff.errors import DataError
    from mmdiff.report.feature_plots import write_feature_plots

    task, base, neutral = splits
    write_task_features({"spatial": task}, base, tmp_path, adapted=ADAPTED, neutral={"spatial": neutral},
                        min_delta_p=0.02, min_neutral_firing=0.05)
    written = write_feature_plots(tmp_path)
    assert sorted(written) == ["spatial_adapted_firing", "spatial_candidates", "spatial_firing"]
    from PIL import Image

    assert all(p.parent == tmp_path / "report" and Image.open(p).size[0] > 300 for p in written.values())
    from mmdiff.report.feature_plots import plot_adapted_firing

    with pytest.raises(DataError, match="adapted set"):
        plot_adapted_firing(task_features(task, base), tmp_path / "y.png")
    with pytest.raises(DataError, match="run the diff and detect stages"):
        write_feature_plots(tmp_path / "empty")
