"""Loaders of the public datasets from local files, and `load_dataset(kind, ...)` over all of them.

Every loader returns a list of `Record`s (images as paths, opened lazily by `Record.load_image`),
takes `limit` and `seed` for a deterministic subsample kept in file order, and raises `DataError`
naming the file, the record and the field when something is missing or malformed. Nothing reads
from the network.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from mmdiff.data.loaders.coco_captions import load_coco_captions
from mmdiff.data.loaders.coco_instances import load_coco_instances
from mmdiff.data.loaders.easy_vqa import load_easy_vqa
from mmdiff.data.loaders.figstep import FIGSTEP_PROMPT, load_figstep
from mmdiff.data.loaders.jsonl import load_jsonl
from mmdiff.data.loaders.mm_safetybench import load_mm_safetybench
from mmdiff.data.loaders.mssbench import load_mssbench
from mmdiff.data.loaders.ocrbench import load_ocrbench
from mmdiff.data.loaders.textvqa import load_textvqa
from mmdiff.data.loaders.vlsbench import load_vlsbench
from mmdiff.data.loaders.vqav2 import load_vqav2
from mmdiff.data.loaders.vsr import load_vsr, vsr_question
from mmdiff.data.records import Record
from mmdiff.errors import DataError

LOADERS: dict[str, Callable[..., list[Record]]] = {}


def register_loader(
    kind: str,
) -> Callable[[Callable[..., list[Record]]], Callable[..., list[Record]]]:
    """Make a loader available to `load_dataset(kind, ...)` (and so to study configs)."""

    def wrap(fn: Callable[..., list[Record]]) -> Callable[..., list[Record]]:
        if kind in LOADERS and LOADERS[kind] is not fn:
            raise ValueError(
                f"a dataset loader is already registered as {kind!r}: {LOADERS[kind].__qualname__}"
            )
        LOADERS[kind] = fn
        return fn

    return wrap


for _kind, _fn in {
    "vqav2": load_vqav2,
    "vsr": load_vsr,
    "textvqa": load_textvqa,
    "ocrbench": load_ocrbench,
    "mm_safetybench": load_mm_safetybench,
    "figstep": load_figstep,
    "vlsbench": load_vlsbench,
    "mssbench": load_mssbench,
    "easy_vqa": load_easy_vqa,
    "jsonl": load_jsonl,
}.items():
    register_loader(_kind)(_fn)


def load_dataset(kind: str, **kwargs: Any) -> list[Record]:
    """Records of dataset `kind` ("vqav2", "vsr", ...) from the paths and options in kwargs."""
    key = kind.lower().replace("-", "_")
    if key not in LOADERS:
        raise DataError(f"unknown dataset kind {kind!r}; known kinds: {sorted(LOADERS)}")
    fn = LOADERS[key]
    params = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in params]
    missing = [
        n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
    ]
    if unknown or missing:
        raise DataError(
            f"dataset kind {kind!r} takes {list(params)} "
            f"(required: {[n for n, p in params.items() if p.default is inspect.Parameter.empty]}); "
            + (f"unknown: {unknown}" if unknown else "")
            + ("; " if unknown and missing else "")
            + (f"missing: {missing}" if missing else "")
        )
    return fn(**kwargs)


__all__ = [
    "FIGSTEP_PROMPT",
    "LOADERS",
    "load_coco_captions",
    "load_coco_instances",
    "load_dataset",
    "load_easy_vqa",
    "load_figstep",
    "load_jsonl",
    "load_mm_safetybench",
    "load_mssbench",
    "load_ocrbench",
    "load_textvqa",
    "load_vlsbench",
    "load_vqav2",
    "load_vsr",
    "register_loader",
    "vsr_question",
]
