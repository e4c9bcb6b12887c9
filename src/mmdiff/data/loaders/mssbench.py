"""MSSBench (Multimodal Situational Safety): combine.json with a "chat" and an "embodied" list, and
the images under chat/ and embodied/ beside it, as released on the Hugging Face hub
(kzhou35/mssbench) and read by github.com/eric-ai-lab/MSSBench's inference.py.

Each entry pairs one query with a safe and an unsafe image: the same words are benign in one
situation and harmful in the other. The safe split (safe image + query) is the benign control: tag
"benign", `meta["harmful"] = False`. The unsafe split is tagged safety (`harmful = True`).

chat entries:     {"safe_image_path", "unsafe_image_path", "intent", "unsafe_image" (a description
                   of the unsafe image), "Type", "queries": [...]}; images under chat/
embodied entries: {"task", "category", "safe", "unsafe", "safe_instructions", "unsafe_instructions",
                   "observation_safe", "observation_unsafe" (descriptions)}; images under embodied/
Where the release describes an image, the description is the record's caption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from mmdiff.data.loaders._common import (
    existing_dir,
    existing_file,
    expect_type,
    progress,
    read_json,
    require,
    resolve_image,
    subsample,
)
from mmdiff.data.records import Record
from mmdiff.errors import DataError

SPLITS = ("safe", "unsafe")
SUBSETS = ("chat", "embodied")


def _chat_rows(entry: Any, path: Path, rec: str) -> list[tuple[str, str, str, str | None, str]]:
    """(split, question, image file, caption, category) of one chat entry, query by query."""
    queries = require(entry, "queries", path, rec, list)
    safe = require(entry, "safe_image_path", path, rec, str)
    unsafe = require(entry, "unsafe_image_path", path, rec, str)
    category = str(entry.get("Type", ""))
    rows = []
    for query in queries:
        if not isinstance(query, str):
            raise DataError(f"{path}: chat record {rec} has a query that is not text: {query!r}")
        rows.append(("safe", query, safe, None, category))
        rows.append(("unsafe", query, unsafe, entry.get("unsafe_image"), category))
    return rows


def _embodied_rows(entry: Any, path: Path, rec: str) -> list[tuple[str, str, str, str | None, str]]:
    safe_instr = require(entry, "safe_instructions", path, rec, list)
    unsafe_instr = require(entry, "unsafe_instructions", path, rec, list)
    safe = require(entry, "safe", path, rec, str)
    unsafe = require(entry, "unsafe", path, rec, str)
    category = str(entry.get("category", ""))
    rows = []
    for s, u in zip(safe_instr, unsafe_instr):
        rows.append(("safe", s, safe, entry.get("observation_safe"), category))
        rows.append(("unsafe", u, unsafe, entry.get("observation_unsafe"), category))
    return rows


def load_mssbench(
    path: str | Path,
    images: str | Path | None = None,
    *,
    split: Literal["safe", "unsafe", "both"] = "safe",
    subsets: Sequence[str] = SUBSETS,
    prompt: str = "",
    limit: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> list[Record]:
    """MSSBench records: by default the safe split (benign control) of chat and embodied.

    path:    combine.json ({"chat": [...], "embodied": [...]}; a bare list is read as chat entries)
    images:  the folder holding chat/ and embodied/ (default: the folder holding combine.json)
    split:   "safe", "unsafe" or "both"
    subsets: any of "chat", "embodied"
    prompt:  text put before every query (the benchmark's own runs prefix a role instruction)
    """
    jpath = existing_file(path, "MSSBench combine.json")
    root = existing_dir(images if images is not None else jpath.parent, "MSSBench image root")
    if split not in (*SPLITS, "both"):
        raise DataError(f"MSSBench split must be 'safe', 'unsafe' or 'both', got {split!r}")
    bad = [s for s in subsets if s not in SUBSETS]
    if bad or not subsets:
        raise DataError(f"MSSBench subsets must be among {list(SUBSETS)}, got {list(subsets)}")
    data = read_json(jpath)
    if isinstance(data, list):
        data = {"chat": data}
    data = expect_type(data, dict, jpath, "the top level")
    parsed = []
    for subset in subsets:
        entries = expect_type(data.get(subset, []), list, jpath, f"the {subset!r} list")
        read_rows = _chat_rows if subset == "chat" else _embodied_rows
        for i, entry in enumerate(entries):
            for j, row in enumerate(read_rows(entry, jpath, f"{subset} #{i}")):
                if split in ("both", row[0]):
                    parsed.append((subset, i, j // 2, *row))
    records = []
    for subset, i, q, which, question, image_name, caption, category in progress(
        subsample(parsed, limit, seed), "MSSBench records"
    ):
        rid = f"{subset}/{i}/{q}/{which}"
        image = resolve_image([root / subset / image_name], rid, "MSSBench", check=check_images)
        records.append(
            Record(
                id=f"mssbench/{rid}",
                question=prompt + question,
                answers=[],
                image=image,
                caption=caption if isinstance(caption, str) and caption.strip() else None,
                tasks=("safety",) if which == "unsafe" else ("benign",),
                source="mssbench",
                meta={
                    "subset": subset,
                    "entry": i,
                    "query_index": q,
                    "split": which,
                    "category": category,
                    "harmful": which == "unsafe",
                },
            )
        )
    return records
