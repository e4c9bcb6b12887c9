"""Per-feature statistics over ranks: each rank accumulates its records, then one all-reduce.

Sums, counts and histograms add, minima take the minimum and top-k lists merge, so the reduced
statistics equal those of one process that saw every rank's records (`FeatureStats.merge` /
`FeatureStats.all_reduce`). Rank 0 writes the tables.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from mmdiff.activations import ActivationBatch
from mmdiff.distributed import context, on_main
from mmdiff.stats import FeatureStats, SAELike, collect_feature_stats_by_split


def collect_feature_stats_distributed(
    batches: Iterable[ActivationBatch],
    saes: Mapping[int, SAELike],
    splits: str | Mapping[str, Collection[str] | None],
    **kwargs: Any,
) -> dict[str, FeatureStats]:
    """The statistics of every rank's `batches` (this rank's records), reduced over all ranks.

    Every rank passes its own batches (e.g. `iter_activations` over `shard_records(records)`) and
    the same SAEs and splits; every rank gets the reduced statistics. Keyword arguments go to
    `mmdiff.stats.collect_feature_stats_by_split` (the progress bar shows on rank 0 only).
    """
    ctx = context()
    if isinstance(splits, str):
        splits = {splits: None}
    kwargs["progress"] = bool(kwargs.get("progress", True)) and ctx.is_main
    stats = collect_feature_stats_by_split(batches, saes, splits, **kwargs)
    if ctx.distributed:
        for name in splits:  # same order on every rank: the collectives pair up
            stats[name].all_reduce()
    return stats


def write_feature_stats_distributed(
    batches: Iterable[ActivationBatch],
    saes: Mapping[int, SAELike],
    splits: str | Mapping[str, Collection[str] | None],
    out_dir: str | Path,
    **kwargs: Any,
) -> dict[str, dict[str, Path]] | None:
    """`mmdiff.stats.write_feature_stats` over ranks: reduce, then rank 0 writes the files.

    Returns the written paths on rank 0, None on the other ranks (which wait until the files exist).
    """
    stats = collect_feature_stats_distributed(batches, saes, splits, **kwargs)
    return on_main(lambda: {name: st.save(out_dir) for name, st in stats.items()})
