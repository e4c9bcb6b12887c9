"""COCO captions JSON (captions_{train,val}{2014,2017}.json): the caption source of COCO images."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mmdiff.data.loaders._common import existing_file, expect_type, read_json, require


def load_coco_captions(paths: str | Path | Sequence[str | Path]) -> dict[int, list[str]]:
    """{image_id: captions} from one or more COCO caption files; captions in annotation-id order.

    Format: {"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "id", "caption"}]}.
    """
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: dict[int, list[tuple[int, str]]] = {}
    for p in files:
        path = existing_file(p, "COCO captions file")
        data = expect_type(read_json(path), dict, path, "the top level")
        anns = expect_type(
            require(data, "annotations", path, "(top level)"), list, path, "'annotations'"
        )
        for i, ann in enumerate(anns):
            rec = f"annotations[{i}]"
            image_id = require(ann, "image_id", path, rec, int)
            caption = require(ann, "caption", path, rec, str)
            order = ann.get("id", i)
            found.setdefault(image_id, []).append((order, caption.strip()))
    return {k: [c for _, c in sorted(v, key=lambda t: t[0])] for k, v in found.items()}

