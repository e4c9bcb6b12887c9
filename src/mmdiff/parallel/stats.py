"""Per-feature statistics over ranks: each rank accumulates its records, then one all-reduce.

Sums, counts and histograms add, minima take the minimum and top-k lists merge, so the reduced
statistics equal those of one process that saw every rank's records (as `mmdiff.stats.merge_stats`
gives in one process). Rank 0 writes the tables.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmdiff.activations import ActivationBatch
from mmdiff.distributed import context, on_main
from mmdiff.errors import ConfigError
from mmdiff.stats import FeatureStats, LayerState, SAELike, collect_feature_stats_by_split, save_feature_stats


@torch.no_grad()
def all_reduce_stats(stats: FeatureStats, group: Any = None) -> FeatureStats:
    """Reduce `stats` over the ranks of torch.distributed (in place) and return it.

    Afterwards every rank holds the statistics of all ranks' streams, as `merge_stats` would give.
    Sums, counts and histograms are all-reduced, minima with MIN, the top-k lists and record ids
    are gathered and merged. Works with gloo (CPU) and NCCL (state on the rank's GPU).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("all_reduce needs an initialised torch.distributed process group (torchrun)")
    world = dist.get_world_size(group)
    if not stats.states:
        nccl = dist.get_backend(group) == "nccl"
        stats.init_states(torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
    settings = (stats.split, sorted(stats.d_sae_by_layer.items()), stats.top_k, stats.n_chunks, asdict(stats.histogram))
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (settings, stats.record_ids), group=group)
    if any(s != settings for s, _ in everyone):
        raise ConfigError(
            f"ranks collected statistics with different settings: {[s for s, _ in everyone]}; "
            "use the same split, SAEs, top_k, n_chunks and histogram on every rank"
        )
    me = dist.get_rank(group)
    remaps = [torch.tensor(stats.index_records(ids) + [-1], dtype=torch.long) for _, ids in everyone]
    for layer in stats.layers:
        st = stats.states[layer]
        for name in LayerState.ADDITIVE:
            dist.all_reduce(getattr(st, name), op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(st.min_pos, op=dist.ReduceOp.MIN, group=group)
        for which in LayerState.TOP_LISTS:
            gathered = {}
            for part in ("value", "record", "position", "type"):
                name = f"{which}_{part}"
                parts = [torch.empty_like(getattr(st, name)) for _ in range(world)]
                dist.all_gather(parts, getattr(st, name).contiguous(), group=group)
                gathered[part] = parts
            for rank in range(world):
                if rank == me:
                    continue
                rec = remaps[rank].to(st.hist.device)[gathered["record"][rank].long()]
                st.merge_top(gathered["value"][rank], rec, gathered["position"][rank], gathered["type"][rank], which)
    return stats


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
            all_reduce_stats(stats[name])
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
    return on_main(lambda: {name: save_feature_stats(st, out_dir) for name, st in stats.items()})
