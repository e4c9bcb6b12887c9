"""Bootstrap confidence intervals for task scores and for paired intervention effects.

Effects are paired: the same records are scored with and without the intervention, so the
interval is taken over resampled records of the per-record difference, which is much tighter (and
more honest) than differencing two independent intervals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


def bootstrap_mean(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of `values` [n] with a percentile bootstrap interval over resampled items."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D array of per-item scores, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap got NaN or infinite scores; check the metric inputs")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(x.mean()), float(lo), float(hi), int(x.size), level)


def paired_effect(treated, baseline, **kw) -> Interval:
    """Mean of treated - baseline per item, with a bootstrap interval over items."""
    t = np.asarray(treated, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if t.shape != b.shape:
        raise ValueError(f"paired effect needs the same items on both sides: {t.shape} vs {b.shape}")
    return bootstrap_mean(t - b, **kw)
