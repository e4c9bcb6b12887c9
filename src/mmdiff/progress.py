"""The rich progress display that every long loop of mmdiff reports to."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress_bar(enabled: bool = True) -> Progress:
    """A transient bar (description, bar, done/total, elapsed); silent when `enabled` is False."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not enabled, transient=True,
    )


def iterate(items: Iterable[T], description: str, enabled: bool) -> Iterator[T]:
    """The items, lazily, with a progress bar when `enabled` (a total when `items` has a length)."""
    if not enabled:
        yield from items
        return
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with progress_bar(True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


__all__ = ["iterate", "progress_bar"]
