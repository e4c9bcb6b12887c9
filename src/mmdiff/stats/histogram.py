"""Log-spaced histogram bins for positive activations, and quantiles read from them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from mmdiff.errors import ConfigError


@dataclass(frozen=True)
class LogHistogram:
    """Fixed log-spaced bins for the positive activations of every feature.

    Bin 0 holds (0, low), bins 1..n hold [edge_i, edge_{i+1}) with n = decades * bins_per_decade
    log-spaced edges between `low` and `high`, bin n+1 holds [high, inf). A quantile is found by
    locating the bin holding the requested rank in the cumulative counts and interpolating
    geometrically inside it; the open ends use the feature's exact smallest positive value and
    largest value. The estimate therefore lies in the same bin as the exact order statistic
    (numpy's "inverted_cdf" quantile): its relative error is below the bin ratio
    10 ** (1 / bins_per_decade) (1.33 for the default 8 bins per decade) inside [low, high].
    """

    low: float = 1e-3
    """Lower edge of the first log-spaced bin; positive values below it share the underflow bin."""
    high: float = 1e4
    """Upper edge of the last log-spaced bin; values above it share the overflow bin."""
    bins_per_decade: int = 8
    """Resolution: bins per factor of 10."""

    def __post_init__(self) -> None:
        if not (0 < self.low < self.high) or self.bins_per_decade < 1:
            raise ConfigError(
                f"LogHistogram needs 0 < low < high and bins_per_decade >= 1, found low={self.low}, "
                f"high={self.high}, bins_per_decade={self.bins_per_decade}"
            )

    @property
    def n_log_bins(self) -> int:
        return max(1, round(math.log10(self.high / self.low) * self.bins_per_decade))

    @property
    def n_bins(self) -> int:
        """Total bins including underflow and overflow."""
        return self.n_log_bins + 2

    def edges(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[n_log_bins + 1] float64 bin edges from low to high."""
        return torch.logspace(
            math.log10(self.low), math.log10(self.high), self.n_log_bins + 1, dtype=torch.float64, device=device
        )

    def quantiles(
        self, hist: torch.Tensor, min_pos: torch.Tensor, max_value: torch.Tensor, qs: Sequence[float]
    ) -> torch.Tensor:
        """[len(qs), F] quantiles of each row of `hist` [F, n_bins] (NaN for an empty row).

        `min_pos` and `max_value` ([F] each) are the exact smallest positive and largest values,
        which bound the open end bins.
        """
        hist = hist.cpu().double()  # [F, bins]
        total = hist.sum(1)  # [F]
        cum = hist.cumsum(1)
        edges = self.edges().double()
        lo_edges = torch.cat([torch.zeros(1, dtype=torch.float64), edges])  # [bins] lower edge per bin
        hi_edges = torch.cat([edges, torch.full((1,), math.inf, dtype=torch.float64)])
        mn = min_pos.cpu().double()
        mx = max_value.cpu().double()
        out = torch.full((len(qs), hist.shape[0]), math.nan, dtype=torch.float64)
        fired = total > 0
        for i, q in enumerate(qs):
            if not 0.0 <= q <= 1.0:
                raise ConfigError(f"quantile levels must be in [0, 1], found {q}")
            target = (q * total).clamp_min(1e-12).unsqueeze(1)  # rank of the order statistic
            j = torch.searchsorted(cum, target).clamp_max(hist.shape[1] - 1).squeeze(1)  # [F]
            below = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0).unsqueeze(1)).squeeze(1), torch.zeros_like(total))
            in_bin = hist.gather(1, j.unsqueeze(1)).squeeze(1)
            frac = ((target.squeeze(1) - below) / in_bin.clamp_min(1)).clamp(0, 1)
            lo = torch.maximum(lo_edges[j], mn)
            hi = torch.minimum(hi_edges[j], mx)
            lo = torch.minimum(lo, hi)
            est = lo * (hi / lo) ** frac
            out[i] = torch.where(fired, est, out[i])
        return out
