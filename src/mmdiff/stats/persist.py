"""Saving and loading `FeatureStats`: the run's stats/ folder, three files per split.

- `{split}.parquet`: `feature_summary` (one row per layer and feature), for reading;
- `{split}.topk.parquet`: `top_examples` (columns `TOP_EXAMPLE_COLUMNS`), for reading;
- `{split}.toprecords.parquet`: `top_records` (the same columns, each record once per feature), the
  records the interp stage shows;
- `{split}.state.safetensors`: the complete state, tensors `layer{L}.{name}` for every name in
  `LayerState.TENSORS` and JSON metadata under "mmdiff" (format "mmdiff.feature_stats", version,
  split, top_k, n_chunks, histogram, d_sae, n_records, records). `load_feature_stats` restores it
  exactly, so saved statistics can be merged and bootstrapped later. Only the records the top-k
  lists point to are stored (renumbered); "n_records" keeps the original count. Version 1 files
  (before the top-k records were kept) load with empty top-k record lists.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

import torch
from safetensors import safe_open

from mmdiff.activations import ActivationBatch
from mmdiff.atomic import save_safetensors, write_parquet
from mmdiff.errors import ConfigError, StoreError
from mmdiff.stats.accumulate import collect_feature_stats_by_split
from mmdiff.stats.histogram import LogHistogram
from mmdiff.stats.state import FeatureStats, LayerState, SAELike
from mmdiff.stats.tables import feature_summary, top_examples, top_records

STATS_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 has no top-k records (rec_* tensors)


def stats_paths(directory: str | Path, split: str) -> dict[str, Path]:
    """{"summary", "topk", "toprecords", "state"} -> the files of `split` under `directory` (a run's stats/)."""
    directory = Path(directory)
    return {
        "summary": directory / f"{split}.parquet",
        "topk": directory / f"{split}.topk.parquet",
        "toprecords": directory / f"{split}.toprecords.parquet",
        "state": directory / f"{split}.state.safetensors",
    }


def save_feature_stats(stats: FeatureStats, directory: str | Path) -> dict[str, Path]:
    """Write the three files of `stats.split` under `directory`; returns `stats_paths`."""
    paths = stats_paths(directory, stats.split)
    if not stats.states:
        stats.init_states(torch.device("cpu"))
    # Keep only the records the top-k tables point to, renumbered.
    used = sorted({i for st in stats.states.values() for t in (st.top_record, st.rec_record)
                   for i in t.unique().tolist() if i >= 0})
    renum = torch.full((len(stats.record_ids) + 1,), -1, dtype=torch.long)
    renum[torch.tensor(used, dtype=torch.long)] = torch.arange(len(used))
    tensors: dict[str, torch.Tensor] = {}
    for layer, st in stats.states.items():
        for name in LayerState.TENSORS:
            t = getattr(st, name).cpu()
            if name in ("top_record", "rec_record"):
                t = renum[t.long()].to(torch.int32)
            tensors[f"layer{layer}.{name}"] = t
    meta = {
        "format": "mmdiff.feature_stats",
        "version": STATS_FORMAT_VERSION,
        "split": stats.split,
        "top_k": stats.top_k,
        "n_chunks": stats.n_chunks,
        "histogram": asdict(stats.histogram),
        "d_sae": {str(k): v for k, v in stats.d_sae_by_layer.items()},
        "n_records": stats.n_records,
        "records": [stats.record_ids[i] for i in used],
    }
    write_parquet(paths["summary"], feature_summary(stats))
    write_parquet(paths["topk"], top_examples(stats))
    write_parquet(paths["toprecords"], top_records(stats))
    save_safetensors(paths["state"], tensors, metadata={"mmdiff": json.dumps(meta)})
    return paths


def load_feature_stats(path: str | Path, split: str | None = None) -> FeatureStats:
    """Statistics saved by `save_feature_stats`: a `.state.safetensors` file, or a directory and a split.

    Only the records that the top-k tables point to are stored, so after loading `record_ids`
    lists those (the file's metadata keeps the original count as "n_records").
    """
    path = Path(path)
    if path.is_dir():
        if split is None:
            raise ConfigError(f"{path} is a directory: pass split= to pick {{split}}.state.safetensors in it")
        path = stats_paths(path, split)["state"]
    if not path.is_file():
        raise StoreError(f"no feature statistics at {path}; run the statistics stage first")
    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("mmdiff")
        if raw is None:
            raise StoreError(f"{path} is not an mmdiff feature-statistics file (no 'mmdiff' metadata)")
        meta = json.loads(raw)
        if meta.get("format") != "mmdiff.feature_stats" or meta.get("version") not in _READABLE_VERSIONS:
            raise StoreError(
                f"{path}: format {meta.get('format')} v{meta.get('version')}, expected "
                f"mmdiff.feature_stats v{STATS_FORMAT_VERSION}; recompute the statistics"
            )
        stats = FeatureStats(
            {int(k): v for k, v in meta["d_sae"].items()},
            meta["split"],
            top_k=meta["top_k"],
            n_chunks=meta["n_chunks"],
            histogram=LogHistogram(**meta["histogram"]),
            device="cpu",
        )
        stats.index_records(meta["records"])
        stored = set(fh.keys())
        for layer, st in stats.states.items():
            for name in LayerState.TENSORS:
                if f"layer{layer}.{name}" in stored or meta["version"] == STATS_FORMAT_VERSION:
                    setattr(st, name, fh.get_tensor(f"layer{layer}.{name}"))
    return stats


def write_feature_stats(
    batches: Iterable[ActivationBatch],
    saes: Mapping[int, SAELike],
    splits: str | Mapping[str, Collection[str] | None],
    out_dir: str | Path,
    **kwargs: Any,
) -> dict[str, dict[str, Path]]:
    """One pass, then the three files of each split under `out_dir` (the run's stats/).

    `splits` is a split name (all records) or split name -> record ids (None = all records).
    Keyword arguments go to `collect_feature_stats_by_split`.
    """
    if isinstance(splits, str):
        splits = {splits: None}
    stats = collect_feature_stats_by_split(batches, saes, splits, **kwargs)
    return {name: save_feature_stats(st, out_dir) for name, st in stats.items()}
