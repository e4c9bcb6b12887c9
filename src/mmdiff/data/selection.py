"""Choosing records: a configured dataset's records, the task splits the statistics contrast, and
the neutral-instruction copies of the lexical filter.

`load_records` takes anything shaped like the config's `DatasetSpec` (kind, args, tasks, limit,
seed), so the data package does not depend on the config package.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any, Callable, Mapping, Protocol, Sequence

from mmdiff.data.loaders import LOADERS, load_dataset
from mmdiff.data.loaders._common import subsample
from mmdiff.data.records import Record
from mmdiff.data.shapes import shapes_records
from mmdiff.errors import ConfigError


class DatasetSource(Protocol):
    """Where a dataset's records come from and which of them to keep (the config's DatasetSpec)."""

    kind: str  # "shapes" or a registered loader ("jsonl", "vqav2", ...)
    args: Mapping[str, Any]  # the loader's arguments
    tasks: Sequence[str] | None  # keep records carrying any of these task tags (None: all)
    limit: int | None  # keep this many, drawn by `seed` (None: all)
    seed: int


def dataset_loader(kind: str) -> Callable[..., Any] | None:
    """The function that reads dataset `kind` ("shapes" or a registered loader), None if unknown."""
    if kind == "shapes":
        return shapes_records
    return LOADERS.get(kind.lower().replace("-", "_"))


def load_records(spec: DatasetSource) -> list[Record]:
    """Records of one configured dataset, filtered by task tags and subsampled (seeded)."""
    if spec.kind == "shapes":
        records = list(shapes_records(**spec.args))
    else:
        args = dict(spec.args)
        fn = dataset_loader(spec.kind)
        params = inspect.signature(fn).parameters if fn is not None else {}
        if spec.tasks is None and spec.limit is not None and {"limit", "seed"} <= set(params):
            # the loaders subsample with the same seeded rule, without building every record first
            args.setdefault("limit", spec.limit)
            args.setdefault("seed", spec.seed)
        records = list(load_dataset(spec.kind, **args))
    if spec.tasks is not None:
        wanted = set(spec.tasks)
        records = [r for r in records if wanted.intersection(r.tasks)]
    return subsample(records, spec.limit, spec.seed)


def task_splits(records: list[Record], base_tag: str, tasks: list[str]) -> dict[str, list[str]]:
    """Record ids per split: each task's tagged records, and the base split without any task tag."""
    splits = {t: [r.id for r in records if t in r.tasks] for t in tasks}
    task_set = set(tasks)
    splits[base_tag] = [r.id for r in records if base_tag in r.tasks and not task_set.intersection(r.tasks)]
    empty = [k for k, v in splits.items() if not v]
    if empty:
        raise ConfigError(
            f"no records carry the task tags {empty} in the analysis dataset; check stats.tasks / "
            "stats.base_split against the dataset's tags"
        )
    return splits


def neutral_records(records: list[Record], instruction: str) -> list[Record]:
    """The same images with the question replaced by the neutral instruction (lexical filter)."""
    return [replace(r, question=instruction) for r in records if r.image is not None]
