"""What every loader shares: reading JSON/JSONL/CSV with clear errors, required fields, subsampling."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

from mmdiff.errors import DataError

T = TypeVar("T")


def existing_file(path: str | Path | None, what: str) -> Path:
    """`path` as a Path, or a DataError naming the missing file and what it should hold."""
    if path is None:
        raise DataError(f"no path given for the {what}: pass the file's location")
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist (or is not a file): check the path")
    return path


def existing_dir(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise DataError(f"no path given for the {what}: pass the folder's location")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist (or is not a folder): check the path")
    return path


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; "
            "is the file complete (not truncated by a failed download)?"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); is it the right file?") from exc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})"
                ) from exc
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} line {lineno}: expected a JSON object, found {type(row).__name__}"
                )
            rows.append(row)
    return rows


def read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: CSV header lacks column(s) {missing}; expected columns {list(columns)}, "
                f"found {reader.fieldnames}"
            )
        return list(reader)


def expect_type(obj: Any, typ: type | tuple[type, ...], path: Path, where: str) -> Any:
    if not isinstance(obj, typ):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise DataError(f"{path}: {where} should be a {names}, found {type(obj).__name__}")
    return obj


def require(
    row: Any, key: str, path: Path, record: str, typ: type | tuple[type, ...] | None = None
) -> Any:
    """row[key], or a DataError naming the file, the record and the missing field."""
    if not isinstance(row, dict):
        raise DataError(
            f"{path}: record {record} should be a JSON object, found {type(row).__name__}"
        )
    if key not in row or row[key] is None:
        raise DataError(f"{path}: record {record} has no field {key!r} (fields: {sorted(row)})")
    value = row[key]
    if typ is not None and not isinstance(value, typ):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise DataError(
            f"{path}: record {record}, field {key!r} should be a {names}, found {value!r}"
        )
    return value


def subsample(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """All items, or `limit` of them drawn by `seed` (deterministic), kept in their file order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise DataError(f"limit must be a non-negative number of records, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def resolve_image(candidates: Iterable[Path], record: str, source: str, check: bool = True) -> Path:
    """The first existing candidate path, or a DataError listing every path tried.

    Candidates are looked at lazily (a generator costs nothing past the hit). With check=False
    nothing is looked up: the first candidate is returned, and a missing file surfaces only when
    `Record.load_image` opens it (fast loading of huge sets).
    """
    tried = []
    for p in candidates:
        if not check or p.is_file():
            return p
        tried.append(p)
    raise DataError(
        f"{source} record {record}: image not found; tried {', '.join(map(str, tried))}. "
        "Check the image folder you passed"
    )


def merge_tasks(*groups: Iterable[str]) -> tuple[str, ...]:
    """Task tags in first-seen order without duplicates."""
    out: list[str] = []
    for g in groups:
        for t in g:
            if t not in out:
                out.append(t)
    return tuple(out)


def progress(items: Sequence[T], description: str, min_items: int = 20_000) -> Iterable[T]:
    """Iterate with a transient rich progress bar when there are many items (image checks on big sets)."""
    if len(items) < min_items:
        return items
    from rich.progress import track

    return track(items, description=description, total=len(items), transient=True)
