import math

import numpy as np
import pytest
import torch

from mmdiff.evals.bootstrap import bootstrap_mean, paired_effect
from mmdiff.evals.harness import yes_no_probability


def test_yes_no_probability_sums_variants_and_normalises():
    # vocab: 0 "yes", 1 " Yes", 2 "no", 3 other
    logits = torch.log(torch.tensor([[0.2, 0.1, 0.1, 0.6]]))
    p = yes_no_probability(logits, [0, 1], [2])
    assert p.item() == pytest.approx(0.3 / 0.4)


def test_yes_no_probability_ignores_other_tokens():
    a = yes_no_probability(torch.tensor([[2.0, 0.0, 5.0]]), [0], [1])
    b = yes_no_probability(torch.tensor([[2.0, 0.0, -5.0]]), [0], [1])
    assert a.item() == pytest.approx(b.item()) == pytest.approx(1 / (1 + math.exp(-2)))


def test_bootstrap_constant_and_coverage():
    iv = bootstrap_mean([1.0] * 10)
    assert (iv.mean, iv.lo, iv.hi) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, size=400)
    iv = bootstrap_mean(x, seed=1)
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert iv.lo < 0.3 < iv.hi or abs(iv.mean - 0.3) > 2 * se
    assert iv.hi - iv.lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_paired_effect_uses_differences():
    base = [0, 1, 1, 0, 1, 1, 0, 1]
    treated = [0, 0, 1, 0, 0, 1, 0, 0]
    iv = paired_effect(treated, base)
    assert iv.mean == pytest.approx(-3 / 8)
    assert iv.hi <= 0.0
    with pytest.raises(ValueError, match="same items"):
        paired_effect([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([1.0, float("nan")])
