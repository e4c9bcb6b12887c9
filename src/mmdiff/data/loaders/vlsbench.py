"""VLSBench: data.json (a list of {instruction_id, instruction, image_path, category, sub_category,
source}) beside imgs/<id>.png, as released on the Hugging Face hub (Foreshhh/vlsbench) and in
github.com/AI45Lab/VLSBench's data/data.json.

Every request is harmful only through its image ("visual leakless": the text reads benign), so the
records are tagged safety and carry no answers. The release has no image descriptions, so records
have no caption: they serve the VLM-side evaluation (attack success), not base-LM runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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


def load_vlsbench(
    path: str | Path,
    images: str | Path | None = None,
    *,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> list[Record]:
    """VLSBench records tagged safety: the benign-looking instruction with its harmful image.

    path:       data.json, a list of {"instruction_id", "instruction", "image_path" ("imgs/0.png"),
                "category", "sub_category", "source"}
    images:     the folder image_path is relative to (default: the folder holding data.json)
    categories: keep only these top-level categories (e.g. "Violent", "Privacy"); all by default
    """
    jpath = existing_file(path, "VLSBench data.json")
    root = existing_dir(images if images is not None else jpath.parent, "VLSBench image root")
    rows = expect_type(read_json(jpath), list, jpath, "the top level (a list of records)")
    parsed = []
    for i, row in enumerate(rows):
        rec = f"#{i}"
        instruction = require(row, "instruction", jpath, rec, str)
        image_path = require(row, "image_path", jpath, rec, str)
        category = require(row, "category", jpath, rec, str)
        parsed.append((str(row.get("instruction_id", i)), instruction, image_path, category, row))
    if categories is not None:
        known = {p[3] for p in parsed}
        missing = sorted(set(categories) - known)
        if missing:
            raise DataError(f"VLSBench categories {missing} not in {jpath}; found {sorted(known)}")
        parsed = [p for p in parsed if p[3] in set(categories)]
    records = []
    for qid, instruction, image_path, category, row in progress(
        subsample(parsed, limit, seed), "VLSBench records"
    ):
        image = resolve_image([root / image_path], qid, "VLSBench", check=check_images)
        records.append(
            Record(
                id=f"vlsbench/{qid}",
                question=instruction,
                answers=[],
                image=image,
                caption=None,
                tasks=("safety",),
                source="vlsbench",
                meta={
                    "instruction_id": qid,
                    "category": category,
                    "sub_category": row.get("sub_category"),
                    "origin": row.get("source"),
                    "harmful": True,
                },
            )
        )
    return records
