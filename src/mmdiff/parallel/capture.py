"""Data-parallel capture: each rank captures its records into its own store, rank 0 lists them all.

Layout of a store captured by N > 1 ranks:

    <store>/rank_<r>/manifest.json, shard_*.safetensors   rank r's store (a plain activation store)
    <store>/manifest.json                                  written by rank 0 once every rank is done:
                                                           every rank's shards, file = rank_<r>/shard_...

so `mmdiff.store.ActivationStore(<store>)` reads the whole capture, and each rank store stays a store
of its own (resumed by its rank after a kill). Records are sharded with `shard_records`; a rank store
remembers the world size it was written with, and a resume with another world size is refused (the
records would land on other ranks and be captured twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmdiff.atomic import write_json
from mmdiff.distributed import barrier, check_same_everywhere, context, on_main, shard_records
from mmdiff.errors import StoreError

MERGED_KEY = "merged_rank_stores"


def rank_dir(root: str | Path, rank: int) -> Path:
    """Where rank `rank` writes its store under a data-parallel capture's root."""
    return Path(root) / f"rank_{rank}"


def merge_rank_stores(root: str | Path, world_size: int) -> Path:
    """Write root/manifest.json listing the shards of root/rank_0 ... rank_<world_size - 1>.

    Every rank store must exist and agree on layers, d_model, dtype and input_ids; the merged store
    is complete when all of them are. Returns the manifest path. Run on one rank (rank 0).
    """
    from mmdiff.store import MANIFEST, _read_manifest

    root = Path(root)
    parts = []
    for r in range(world_size):
        path = rank_dir(root, r)
        if not (path / MANIFEST).is_file():
            raise StoreError(
                f"rank store {path} is missing: the capture of rank {r} never started; re-run the "
                f"capture with {world_size} ranks"
            )
        parts.append(_read_manifest(path))
    keys = ("layers", "d_model", "dtype", "input_ids")
    first = {k: parts[0].get(k) for k in keys}
    for r, m in enumerate(parts):
        mine = {k: m.get(k) for k in keys}
        if mine != first:
            raise StoreError(
                f"rank store {rank_dir(root, r)} holds {mine}, rank 0's holds {first}: the ranks "
                "captured different things; delete the store and capture again"
            )
    shards = [
        {**entry, "file": f"{rank_dir(root, r).name}/{entry['file']}"}
        for r, m in enumerate(parts)
        for entry in m["shards"]
    ]
    manifest = {
        **{k: v for k, v in parts[0].items() if k != "shards"},
        "complete": all(m["complete"] for m in parts),
        "meta": {**parts[0].get("meta", {}), MERGED_KEY: world_size},
        "shards": shards,
    }
    manifest["meta"].pop("rank", None)
    path = root / MANIFEST
    write_json(path, manifest, indent=None)
    return path


def _check_layout(root: Path, world: int) -> None:
    """Refuse to mix a single-process store with rank stores, or rank stores of another world size."""
    import json

    from mmdiff.store import MANIFEST

    top = root / MANIFEST
    if world > 1 and top.is_file():
        meta = json.loads(top.read_text()).get("meta", {})
        if MERGED_KEY not in meta:
            raise StoreError(
                f"{root} holds a store written by a single process; a {world}-rank capture writes "
                "rank stores: use another directory, or delete this one to capture again"
            )
        if int(meta[MERGED_KEY]) != world:
            raise StoreError(
                f"{root} was captured by {meta[MERGED_KEY]} ranks, this run has {world}: resume "
                "with the same number of ranks, or delete the directory to capture again"
            )
    if world == 1 and (root / "rank_0").is_dir():
        raise StoreError(
            f"{root} holds rank stores of a multi-rank capture; a single process writes a plain "
            "store: resume with torchrun and the same number of ranks, or use another directory"
        )


def capture_store_distributed(
    adapter: Any,
    records: Sequence[Any],
    layers: Sequence[int],
    root: str | Path,
    side: str = "vlm",
    *,
    dtype: str | torch.dtype = "float16",
    shard_tokens: int = 1 << 14,
    batch_size: int = 8,
    input_ids: bool = False,
    progress: bool = True,
) -> Path:
    """Capture `records` at `layers` into the activation store at `root`, data-parallel over ranks.

    Every rank passes the same record list; rank r captures `shard_records(records)` into
    root/rank_<r>/ and rank 0 writes the merged root/manifest.json (see the module docstring).
    In a single process it writes a plain store at root. A killed capture resumes: each rank skips
    the records its store already holds. Returns root; open it with `ActivationStore(root)`.
    """
    from mmdiff.capture import iter_activations
    from mmdiff.store import ActivationStoreWriter

    ctx = context()
    root = Path(root)
    ids = [str(r.id) for r in records]
    if len(set(ids)) != len(ids):
        raise StoreError("record ids must be unique for a capture (the store skips ids it holds)")
    check_same_everywhere(ids, "record ids")
    _check_layout(root, ctx.world_size)
    barrier()  # nobody writes before every rank checked the layout
    mine = shard_records(records, ctx.rank, ctx.world_size)
    out = rank_dir(root, ctx.rank) if ctx.distributed else root
    d_model = adapter.backbone(side).d_model
    meta = {"side": side, "rank": ctx.rank, "world_size": ctx.world_size}
    writer = ActivationStoreWriter(
        out, layers, d_model, dtype=dtype, shard_tokens=shard_tokens, input_ids=input_ids, meta=meta
    )
    with writer:
        todo = [r for r in mine if not writer.has_record(r.id)]
        for batch in iter_activations(
            adapter,
            todo,
            layers,
            side=side,
            batch_size=batch_size,
            progress=progress and ctx.is_main,
        ):
            writer.add(batch)
    if ctx.distributed:
        barrier()  # every rank store is closed before rank 0 lists them
        on_main(merge_rank_stores, root, ctx.world_size)
    return root
