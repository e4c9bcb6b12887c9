"""TextVQA: {"data": [{"question", "image_id", "answers", "question_id", ...}]}, images <image_id>.jpg."""

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


def load_textcaps(path: str | Path) -> dict[str, str]:
    """{image_id: first caption} from a TextCaps JSON ({"data": [{"image_id", "caption_str"}]})."""
    cpath = existing_file(path, "TextCaps captions file")
    data = expect_type(read_json(cpath), dict, cpath, "the top level")
    rows = expect_type(require(data, "data", cpath, "(top level)"), list, cpath, "'data'")
    out: dict[str, str] = {}
    for i, row in enumerate(rows):
        image_id = require(row, "image_id", cpath, f"data[{i}]", str)
        out.setdefault(image_id, require(row, "caption_str", cpath, f"data[{i}]", str))
    return out


def load_textvqa(
    path: str | Path,
    images: str | Path,
    captions: str | Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> list[Record]:
    """TextVQA records tagged (vqa, ocr), 10 answers each (none on the test split).

    path:     TextVQA_0.5.1_<split>.json
    images:   the folder holding <image_id>.jpg (train_images/ for train and val, test_images/ for test)
    captions: TextCaps_0.1_<split>.json for record.caption (same image ids), optional
    """
    jpath = existing_file(path, "TextVQA json file")
    image_root = existing_dir(images, "TextVQA image folder")
    data = expect_type(read_json(jpath), dict, jpath, "the top level")
    rows = expect_type(require(data, "data", jpath, "(top level)"), list, jpath, "'data'")
    parsed = []
    for i, row in enumerate(rows):
        rec = f"data[{i}]"
        question = require(row, "question", jpath, rec, str)
        image_id = require(row, "image_id", jpath, rec, str)
        qid = row.get("question_id", i)
        if row.get("set_name") == "test" and "answers" not in row:
            answers: list[str] = []
        else:
            answers = require(row, "answers", jpath, f"{rec} (question_id={qid})", list)
        parsed.append((qid, question, image_id, [str(a) for a in answers], row.get("set_name")))
    caps = load_textcaps(captions) if captions is not None else {}
    records = []
    for qid, question, image_id, answers, set_name in progress(
        subsample(parsed, limit, seed), "TextVQA records"
    ):
        candidates = [image_root / f"{image_id}.jpg"]
        image = resolve_image(candidates, f"question_id={qid}", "TextVQA", check=check_images)
        records.append(
            Record(
                id=f"textvqa/{qid}",
                question=question,
                answers=answers,
                image=image,
                caption=caps.get(image_id),
                tasks=merge_tasks(["vqa", "ocr"], question_tasks(question)),
                source="textvqa",
                meta={"question_id": qid, "image_id": image_id, "set_name": set_name},
            )
        )
    return records
