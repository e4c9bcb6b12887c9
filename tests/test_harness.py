import numpy as np
import pytest
from mmdiff.bootstrap import bootstrap_mean, paired_effect


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
