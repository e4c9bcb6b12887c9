"""How small an effect an evaluation can detect: the minimum detectable effect (MDE) of a paired design.

An intervention and its baseline score the same n records, so an effect is the mean of the n
per-record differences d_i = treated_i - clean_i. A two-sided test at level alpha detects a true
mean difference delta with probability `power` when

    |delta| >= (z_{1 - alpha/2} + z_{power}) * sd(d) / sqrt(n)          (normal approximation)

which at alpha = 0.05 and 80% power is 2.80 sd(d) / sqrt(n): the MDE printed beside each effect.

Scores that are 0 or 1 per record (accuracy, exact match, attack success) have a floor the formula
misses when few records change: a mean change of delta needs at least a share |delta| of records
to change, all in one direction at best, so sd(d)^2 >= |delta| (1 - |delta|) and the detectable
|delta| solves delta = k sqrt(delta (1 - delta) / n), i.e. delta = k^2 / (n + k^2) with
k = z_{1 - alpha/2} + z_{power}. That is the smallest effect a task of n records can show at all
(0.038 at n = 200, 0.197 at n = 32); `binary_mde_floor` gives it per task, and `paired_mde` never
reports less for 0/1 scores.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def power_multiplier(alpha: float = 0.05, power: float = 0.8) -> float:
    """k = z_{1 - alpha/2} + z_{power}: 2.80 at alpha 0.05 and 80% power."""
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power are probabilities in (0, 1), got {alpha} and {power}")
    z = NormalDist().inv_cdf
    return z(1 - alpha / 2) + z(power)


def binary_mde_floor(n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean change of 0/1 per-record scores that n paired records can detect:
    k^2 / (n + k^2), every changed record moving the same way (module docstring)."""
    if n < 1:
        raise ValueError(f"a minimum detectable effect needs at least one record, got n={n}")
    k2 = power_multiplier(alpha, power) ** 2
    return k2 / (n + k2)


def paired_mde(
    treated, baseline, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """MDE of a paired effect: k sd(treated - baseline) / sqrt(n) (sample sd, ddof 1), and never
    below `binary_mde_floor(n)` when every score is 0 or 1. n = 1 gives NaN (no spread to read)."""
    t = np.asarray(treated, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if t.shape != b.shape or t.ndim != 1 or t.size == 0:
        raise ValueError(
            f"a paired MDE needs the same non-empty 1-D items on both sides: {t.shape} vs {b.shape}"
        )
    n = t.size
    if n < 2:
        return math.nan
    d = t - b
    mde = power_multiplier(alpha, power) * float(d.std(ddof=1)) / math.sqrt(n)
    binary = bool(np.isin(t, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    return max(mde, binary_mde_floor(n, alpha=alpha, power=power)) if binary else mde
