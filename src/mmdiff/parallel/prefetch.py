"""Read ahead in a background thread into pinned memory, so the GPU never waits on disk.

`Prefetcher(iterable)` runs the iterable in a thread and keeps up to `depth` items ready, their
tensors copied to page-locked (pinned) memory, from which `.to("cuda", non_blocking=True)` is an
asynchronous DMA. Wrapping `ActivationStore.iter_batches` (or a whole store with `PrefetchingStore`)
overlaps reading and decoding the next shard with the training step.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

_DONE = object()


def pin_tensors(item: Any) -> Any:
    """The same structure with every CPU tensor in pinned memory (dicts, lists, tuples, dataclasses).

    Pinning needs a CUDA runtime; without one the item is returned unchanged.
    """
    if not torch.cuda.is_available():
        return item
    if isinstance(item, torch.Tensor):
        return item.pin_memory() if item.device.type == "cpu" else item
    if isinstance(item, dict):
        return {k: pin_tensors(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return type(item)(pin_tensors(v) for v in item)
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.replace(
            item,
            **{
                f.name: pin_tensors(getattr(item, f.name))
                for f in dataclasses.fields(item)
                if f.init
            },
        )
    return item


class Prefetcher:
    """Iterate `iterable` in a daemon thread, `depth` items ahead, tensors pinned.

    Exceptions in the thread are re-raised in the consumer. Iterate once; `close()` (or leaving a
    `with` block) stops the thread early.
    """

    def __init__(self, iterable: Iterable[Any], depth: int = 2, pin_memory: bool = True) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher depth must be >= 1, found {depth}")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pin = pin_memory
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                if not self._put(pin_tensors(item) if self._pin else item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(("__error__", exc))
            return
        self._put(_DONE)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._stop.set()
            raise StopIteration
        if isinstance(item, tuple) and len(item) == 2 and item[0] == "__error__":
            self._stop.set()
            raise item[1]
        return item

    def close(self) -> None:
        self._stop.set()

    def __del__(self) -> None:  # an abandoned prefetcher stops its thread
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def __enter__(self) -> Prefetcher:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PrefetchingStore:
    """An ActivationStore whose `iter_batches` reads ahead through a `Prefetcher`.

    Everything else (count_tokens, layers, root, ...) is the wrapped store's, so the SAE trainer
    and the statistics take it where they take a store.
    """

    def __init__(self, store: Any, depth: int = 2, pin_memory: bool = True) -> None:
        self.store, self.depth, self.pin_memory = store, depth, pin_memory

    def iter_batches(self, *args: Any, **kwargs: Any) -> Prefetcher:
        return Prefetcher(self.store.iter_batches(*args, **kwargs), self.depth, self.pin_memory)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)
