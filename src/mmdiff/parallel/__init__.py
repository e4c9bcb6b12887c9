"""Multi-GPU / multi-node mmdiff on torch.distributed (torchrun): data-parallel capture into rank
stores, all-reduced statistics, SAE training with layers sharded across ranks or plain data
parallel, and a pinned-memory prefetcher for the GPU fast path. See docs/distributed.md."""

from mmdiff.parallel.capture import capture_store_distributed, merge_rank_stores
from mmdiff.parallel.prefetch import Prefetcher
from mmdiff.parallel.stats import collect_feature_stats_distributed, write_feature_stats_distributed
from mmdiff.parallel.train import (
    DataParallel,
    LayerSharded,
    layer_owners,
    shard_source,
    train_saes_distributed,
    training_strategy,
)

__all__ = [
    "DataParallel",
    "LayerSharded",
    "Prefetcher",
    "capture_store_distributed",
    "collect_feature_stats_distributed",
    "layer_owners",
    "merge_rank_stores",
    "shard_source",
    "train_saes_distributed",
    "training_strategy",
    "write_feature_stats_distributed",
]
