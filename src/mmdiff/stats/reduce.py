"""Reducing `FeatureStats` of shards: `merge_stats(into, other)` equals one pass over both streams.

Sums, counts and histograms add, minima take the minimum, top-k lists are the k largest of
both (each record once in the top-k records). The same reduction over the ranks of
torch.distributed is `mmdiff.parallel.stats`.
"""

from __future__ import annotations

import torch

from mmdiff.errors import ConfigError
from mmdiff.stats.state import FeatureStats, LayerState


def merge_stats(into: FeatureStats, other: FeatureStats) -> FeatureStats:
    """Add `other`'s statistics into `into` (in place) and return `into`."""
    if not isinstance(other, FeatureStats):
        raise TypeError(f"can only merge FeatureStats, got {type(other).__name__}")
    if into.settings != other.settings:
        raise ConfigError(
            "cannot merge statistics collected with different settings: (split, d_sae, top_k, n_chunks, "
            f"histogram) = {into.settings} vs {other.settings}; collect both with the same settings"
        )
    if not other.states:
        return into
    if not into.states:
        into.init_states(other.device)
    remap = torch.tensor(into.index_records(other.record_ids) + [-1], dtype=torch.long)
    for layer in into.layers:
        a, b = into.states[layer], other.states[layer]
        dev = a.hist.device

        def theirs(name: str) -> torch.Tensor:
            return getattr(b, name).to(dev)

        for name in LayerState.ADDITIVE:
            setattr(a, name, getattr(a, name) + theirs(name))
        a.min_pos = torch.minimum(a.min_pos, theirs("min_pos"))
        # index -1 (an empty top-k slot) maps to -1 through the appended last entry of remap
        for which in LayerState.TOP_LISTS:
            rec = remap.to(dev)[theirs(f"{which}_record").long()]
            a.merge_top(theirs(f"{which}_value"), rec, theirs(f"{which}_position"), theirs(f"{which}_type"), which)
    return into
