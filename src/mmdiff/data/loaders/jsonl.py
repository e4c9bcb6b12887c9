"""Generic JSONL: one record per line, {"id", "image", "question", "answers", "caption", "tasks"}."""

from __future__ import annotations

from pathlib import Path

from mmdiff.data.filters import question_tasks
from mmdiff.data.loaders._common import (
    existing_dir,
    existing_file,
    merge_tasks,
    progress,
    read_jsonl,
    require,
    resolve_image,
    subsample,
)
from mmdiff.data.records import Record
from mmdiff.errors import DataError

FIELDS = ("id", "image", "question", "answers", "caption", "tasks")


def load_jsonl(
    path: str | Path,
    images: str | Path | None = None,
    *,
    source: str | None = None,
    tag_from_question: bool = False,
    limit: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> list[Record]:
    """Records from a JSONL file; required: id, question; optional: image, answers, caption, tasks.

    image is a path relative to `images` (default: the JSONL's folder) or absolute; null for a
    text-only record. answers is a string or a list of strings; tasks a list of tags. Any other
    field goes to record.meta. With tag_from_question, spatial/ocr tags are added by cue words.
    """
    jpath = existing_file(path, "JSONL dataset file")
    image_root = existing_dir(images, "image folder") if images is not None else jpath.parent
    rows = read_jsonl(jpath)
    seen: dict[str, int] = {}
    parsed = []
    for i, row in enumerate(rows):
        rec = f"line {i + 1}"
        rid = str(require(row, "id", jpath, rec, (str, int)))
        if rid in seen:
            raise DataError(
                f"{jpath}: line {i + 1} repeats id {rid!r} of line {seen[rid]}; ids must be unique"
            )
        seen[rid] = i + 1
        rec = f"line {i + 1} (id={rid!r})"
        question = require(row, "question", jpath, rec, str)
        answers = row.get("answers") or []
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(
                f"{jpath}: record {rec}, field 'answers' should be a string or a list of strings, found {answers!r}"
            )
        tasks = row.get("tasks") or []
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise DataError(
                f"{jpath}: record {rec}, field 'tasks' should be a list of strings, found {tasks!r}"
            )
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError(
                f"{jpath}: record {rec}, field 'image' should be a path string or null, found {image!r}"
            )
        caption = row.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise DataError(
                f"{jpath}: record {rec}, field 'caption' should be a string or null, found {caption!r}"
            )
        meta = {k: v for k, v in row.items() if k not in FIELDS}
        parsed.append((rec, rid, question, answers, image, caption, tasks, meta))
    records = []
    for rec, rid, question, answers, image, caption, tasks, meta in progress(
        subsample(parsed, limit, seed), "JSONL records"
    ):
        image_path = None
        if image is not None:
            candidates = [image_root / image]
            image_path = resolve_image(candidates, rec, f"JSONL {jpath.name}", check=check_images)
        records.append(
            Record(
                id=rid,
                question=question,
                answers=answers,
                image=image_path,
                caption=caption,
                tasks=merge_tasks(tasks, question_tasks(question) if tag_from_question else ()),
                source=source or jpath.stem,
                meta=meta,
            )
        )
    return records
