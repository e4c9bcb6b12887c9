"""Minimum detectable effects of a paired design, on hand-computed cases and by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmdiff.evals.power import binary_mde_floor, paired_mde, power_multiplier

K = 1.959964 + 0.841621  # z_0.975 + z_0.80


def test_power_multiplier_and_binary_floor_by_hand():
    assert power_multiplier() == pytest.approx(K, abs=1e-6)
    assert power_multiplier(0.01, 0.9) == pytest.approx(2.575829 + 1.281552, abs=1e-6)
    # k^2 / (n + k^2): 7.849 / 207.849 at n = 200, 7.849 / 39.849 at the old 32 records per task
    assert binary_mde_floor(200) == pytest.approx(K**2 / (200 + K**2), rel=1e-6)
    assert binary_mde_floor(200) == pytest.approx(0.03776, abs=1e-5)
    assert binary_mde_floor(32) == pytest.approx(0.19697, abs=1e-5)
    with pytest.raises(ValueError, match="at least one record"):
        binary_mde_floor(0)
    with pytest.raises(ValueError, match="probabilities"):
        power_multiplier(0.05, 1.0)


def test_paired_mde_on_a_known_paired_design():
    # 0/1 accuracies of 8 records: d = [0, 1, 0, -1, 0, -1, 0, 0], mean -1/8
    treated = [1, 1, 0, 0, 1, 0, 1, 1]
    clean = [1, 0, 0, 1, 1, 1, 1, 1]
    sd = math.sqrt((3 - 8 * (1 / 8) ** 2) / 7)  # 0.64087
    assert paired_mde(treated, clean) == pytest.approx(K * sd / math.sqrt(8), rel=1e-6)  # 0.6348
    assert paired_mde(treated, clean) == pytest.approx(0.63479, abs=1e-4)
    # P(correct) of 4 records: d = [0.1, -0.1, 0.1, 0.2], sd 0.12583 -> 2.8016 * 0.12583 / 2
    assert paired_mde([0.9, 0.7, 0.6, 0.8], [0.8, 0.8, 0.5, 0.6]) == pytest.approx(0.17626, abs=1e-4)
    # nothing changed on 200 0/1 records: no spread, yet no effect under 0.038 could have shown
    same = np.r_[np.ones(150), np.zeros(50)]
    assert paired_mde(same, same) == pytest.approx(binary_mde_floor(200))
    # one record of 200 flipped: the sd formula says 0.014, the floor (one-way changes) 0.038
    flipped = same.copy()
    flipped[0] = 0
    assert K * np.std(flipped - same, ddof=1) / math.sqrt(200) < 0.015
    assert paired_mde(flipped, same) == pytest.approx(binary_mde_floor(200))
    assert math.isnan(paired_mde([1.0], [0.0]))
    with pytest.raises(ValueError, match="same non-empty"):
        paired_mde([1, 0], [1, 0, 1])


def test_an_effect_of_one_mde_is_detected_four_times_in_five():
    """Simulated paired designs at the MDE: a two-sided test at 5% rejects in about 80% of them."""
    rng = np.random.default_rng(0)
    n, reps, hits = 200, 2000, 0
    for _ in range(reps):
        base = rng.normal(0.0, 1.0, n)
        noise = rng.normal(0.0, 0.5, n)
        mde = K * 0.5 / math.sqrt(n)  # the planned MDE at the true sd(d) = 0.5
        d = base + noise + mde - base
        z = d.mean() / (d.std(ddof=1) / math.sqrt(n))
        hits += abs(z) > 1.959964
    assert hits / reps == pytest.approx(0.80, abs=0.03)
