"""OCRBench: OCRBench.json, a list of {"image_path", "question", "answers", "type", "dataset_name"}."""

from __future__ import annotations

from pathlib import Path

from mmdiff.data.filters import question_tasks
from mmdiff.data.loaders._common import (
    existing_dir,
    existing_file,
    expect_type,
    merge_tasks,
    progress,
    read_json,
    require,
    resolve_image,
    subsample,
)
from mmdiff.data.records import Record
from mmdiff.errors import DataError


def load_ocrbench(
    path: str | Path,
    images: str | Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> list[Record]:
    """OCRBench records tagged ocr; answers is a list (OCRBench gives a string or a list).

    path:   OCRBench.json
    images: the OCRBench_Images folder; "image_path" is relative to it
    """
    jpath = existing_file(path, "OCRBench json file")
    image_root = existing_dir(images, "OCRBench image folder")
    rows = expect_type(read_json(jpath), list, jpath, "the top level")
    parsed = []
    for i, row in enumerate(rows):
        rec = f"[{i}]"
        answers = require(row, "answers", jpath, rec, (str, list))
        answers = [answers] if isinstance(answers, str) else answers
        if not all(isinstance(a, (str, int, float)) for a in answers) or not answers:
            raise DataError(
                f"{jpath}: record {rec}, field 'answers' should be a string or a list of strings, found {answers!r}"
            )
        parsed.append(
            (
                row.get("id", i),
                require(row, "image_path", jpath, rec, str),
                require(row, "question", jpath, rec, str),
                [str(a) for a in answers],
                require(row, "type", jpath, rec, str),
                require(row, "dataset_name", jpath, rec, str),
            )
        )
    records = []
    for rid, image_path, question, answers, qtype, dataset_name in progress(
        subsample(parsed, limit, seed), "OCRBench records"
    ):
        candidates = [image_root / image_path.removeprefix("./")]
        image = resolve_image(candidates, f"id={rid}", "OCRBench", check=check_images)
        records.append(
            Record(
                id=f"ocrbench/{rid}",
                question=question,
                answers=answers,
                image=image,
                caption=None,
                tasks=merge_tasks(["ocr"], question_tasks(question)),
                source="ocrbench",
                meta={"type": qtype, "dataset_name": dataset_name, "image_path": image_path},
            )
        )
    return records
