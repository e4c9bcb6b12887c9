"""Per-feature SAE statistics from one streaming pass over activations (docs/method.md#adapted-features, docs/method.md#task-features).

One module per job:

- `state`: `FeatureStats`, the running sums of one split, and its read-outs (`firing_frequency`,
  `mean_sq`, `chunk_sums`, `quantiles`, ...);
- `accumulate`: filling it from SAE codes (`accumulate_batch`, `collect_feature_stats`);
- `reduce`: `merge_stats` of shards (over ranks: `mmdiff.parallel.stats`);
- `tables`: `feature_summary`, `top_examples` and `top_records`;
- `persist`: the run's stats/ files (`save_feature_stats`, `load_feature_stats`, `stats_paths`);
- `histogram`: `LogHistogram`, the bins of the quantile estimates.

`merge_stats` of two accumulators equals one accumulator over both streams, so shards of a
dataset (or ranks of a distributed run) can be reduced. Nothing kept grows with the number of
tokens: per layer the state holds

- per chunk c, token type t (TEXT, IMAGE) and feature f: sum h_f^2 and the firing count
  #{h_f > 0}, plus the token count per (c, t); totals are sums over chunks. Per (t, f): sum h_f
  (the activation mass, for the image-token share). A record's chunk is
  crc32(record_id) mod n_chunks, so the same record lands in the same chunk in every run (the vision
  and the text run of the diff are resampled in pairs by the bootstrap in `mmdiff.diff`);
- a fixed log-spaced histogram of the strictly positive activations of each feature (see
  `LogHistogram`), with the exact smallest positive value and the largest value, for quantiles;
- the top-k activating tokens of each feature: value, record, position, token type; and its top-k
  records by max activation (each record once), with the position and type of that max, so the
  interp stage re-runs only the records it shows.

Memory per layer is about d_sae * (24 * n_chunks + 8 * n_bins + 26 * top_k + 20) bytes: 116 MB for
d_sae = 65536 with the defaults (32 chunks, 58 bins, top 20). Besides, the list of record ids seen
(one string per record).
"""

from mmdiff.stats.accumulate import (
    accumulate_batch,
    accumulate_codes,
    accumulate_splits,
    collect_feature_stats,
    collect_feature_stats_by_split,
)
from mmdiff.stats.histogram import LogHistogram
from mmdiff.stats.persist import (
    STATS_FORMAT_VERSION,
    load_feature_stats,
    save_feature_stats,
    stats_paths,
    write_feature_stats,
)
from mmdiff.stats.reduce import merge_stats
from mmdiff.stats.state import COUNTED_TYPES, FeatureStats, LayerState, SAELike, chunk_of
from mmdiff.stats.tables import TOP_EXAMPLE_COLUMNS, feature_summary, top_examples, top_records

__all__ = [
    "COUNTED_TYPES",
    "STATS_FORMAT_VERSION",
    "TOP_EXAMPLE_COLUMNS",
    "FeatureStats",
    "LayerState",
    "LogHistogram",
    "SAELike",
    "accumulate_batch",
    "accumulate_codes",
    "accumulate_splits",
    "chunk_of",
    "collect_feature_stats",
    "collect_feature_stats_by_split",
    "feature_summary",
    "load_feature_stats",
    "merge_stats",
    "save_feature_stats",
    "stats_paths",
    "top_examples",
    "top_records",
    "write_feature_stats",
]
