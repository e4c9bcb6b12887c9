"""VSR (Visual Spatial Reasoning): jsonl of (image, caption, label, relation); a yes/no question per line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from mmdiff.data.loaders._common import (
    existing_dir,
    existing_file,
    progress,
    read_jsonl,
    require,
    resolve_image,
    subsample,
)
from mmdiff.data.loaders.coco_captions import load_coco_captions
from mmdiff.data.records import Record
from mmdiff.errors import DataError

_COPULA = re.compile(
    r"^the\s+(?P<subject>.+?)\s+(?P<verb>is|are)\s+(?P<rest>.+?)[.\s]*$", re.IGNORECASE
)


def vsr_question(statement: str) -> str:
    """A yes/no question asking whether a VSR statement holds.

    "The cat is under the table." -> "Is the cat under the table?"; a statement not of the form
    "The <subject> is/are <relation> ..." becomes "Is it true that <statement>?".
    """
    s = " ".join(statement.split())
    m = _COPULA.match(s)
    if m:
        return f"{m['verb'].capitalize()} the {m['subject']} {m['rest']}?"
    body = s.rstrip(" .")
    return f"Is it true that {body[:1].lower()}{body[1:]}?"


def _label(value: object, path: Path, rec: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "0", "1"):
        return value.lower() in ("true", "1")
    raise DataError(
        f"{path}: record {rec}, field 'label' should be 0/1 or true/false, found {value!r}"
    )


def load_vsr(
    path: str | Path,
    images: str | Path,
    captions: str | Path | Sequence[str | Path] | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> list[Record]:
    """VSR records tagged (yesno, spatial): question from the statement, answers ["yes"] or ["no"].

    path:     a VSR split jsonl, lines {"image", "caption", "label", "relation", ...}; the optional
              "subj" and "obj" (the two related objects) go to meta "subject" / "object"
    images:   folder of the COCO 2017 images (the file named by "image", directly or under
              train2017/ or val2017/)
    captions: COCO 2017 caption JSON(s). VSR's own "caption" is a claim that may be false, so it never
              stands in for the image; record.caption comes from COCO (None without this argument).
    """
    jpath = existing_file(path, "VSR jsonl file")
    image_root = existing_dir(images, "VSR/COCO image folder")
    rows = read_jsonl(jpath)
    parsed = []
    for i, row in enumerate(rows):
        rec = f"line {i + 1}"
        parsed.append(
            (
                i,
                require(row, "image", jpath, rec, str),
                require(row, "caption", jpath, rec, str),
                _label(require(row, "label", jpath, rec), jpath, rec),
                require(row, "relation", jpath, rec, str),
                row.get("subj") if isinstance(row.get("subj"), str) else None,
                row.get("obj") if isinstance(row.get("obj"), str) else None,
            )
        )
    caps = load_coco_captions(captions) if captions is not None else {}
    records = []
    for i, image_name, statement, label, relation, subject, obj in progress(
        subsample(parsed, limit, seed), "VSR records"
    ):
        rec = f"line {i + 1} ({image_name})"
        candidates = [
            image_root / image_name,
            image_root / "train2017" / image_name,
            image_root / "val2017" / image_name,
        ]
        image = resolve_image(candidates, rec, "VSR", check=check_images)
        stem = Path(image_name).stem
        image_id = int(stem) if stem.isdigit() else None
        records.append(
            Record(
                id=f"vsr/{jpath.stem}/{i}",
                question=vsr_question(statement),
                answers=["yes" if label else "no"],
                image=image,
                caption=caps[image_id][0] if image_id in caps else None,
                tasks=("yesno", "spatial"),
                source="vsr",
                meta={
                    "statement": statement,
                    "label": label,
                    "relation": relation,
                    "image_id": image_id,
                    "subject": subject,  # the two related objects (COCO category names), when given
                    "object": obj,
                },
            )
        )
    return records
