"""VQAv2: questions JSON + annotations JSON, COCO images, COCO captions as the caption source."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

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
from mmdiff.data.loaders.coco_captions import load_coco_captions
from mmdiff.data.records import Record
from mmdiff.errors import DataError

COCO_SUBTYPES = ("val2014", "train2014", "test2015")


def coco_image_candidates(images: Path, image_id: int, subtype: str | None) -> Iterator[Path]:
    """Where a COCO image may lie: COCO_<subtype>_%012d.jpg (2014 names) or %012d.jpg (2017 names),
    directly in `images` or in its <subtype> subfolder; most likely first, built lazily."""
    subtypes = [subtype] if subtype else list(COCO_SUBTYPES)
    names = [f"COCO_{s}_{image_id:012d}.jpg" for s in subtypes] + [f"{image_id:012d}.jpg"]
    for folder in [images] + [images / s for s in subtypes]:
        for name in names:
            yield folder / name


def load_vqav2(
    questions: str | Path,
    images: str | Path,
    annotations: str | Path | None = None,
    captions: str | Path | Sequence[str | Path] | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> list[Record]:
    """VQAv2 records: 10 human answers each, tagged vqa (+ yesno by answer_type, + spatial / ocr by cue).

    questions:   v2_OpenEnded_mscoco_<subtype>_questions.json, {"questions": [{"image_id", "question",
                 "question_id"}], "data_subtype": ...}
    annotations: v2_mscoco_<subtype>_annotations.json, {"annotations": [{"question_id", "answer_type",
                 "answers": [{"answer", ...}] x 10, "multiple_choice_answer", ...}]}; None for test splits
    images:      folder of COCO images, COCO_<subtype>_%012d.jpg or %012d.jpg
    captions:    COCO captions JSON(s); the first caption (lowest annotation id) becomes record.caption
    """
    qpath = existing_file(questions, "VQAv2 questions file")
    image_root = existing_dir(images, "COCO image folder")
    qdata = expect_type(read_json(qpath), dict, qpath, "the top level")
    qs = expect_type(require(qdata, "questions", qpath, "(top level)"), list, qpath, "'questions'")
    subtype = qdata.get("data_subtype") if isinstance(qdata.get("data_subtype"), str) else None

    anns: dict[int, dict] = {}
    apath = None
    if annotations is not None:
        apath = existing_file(annotations, "VQAv2 annotations file")
        adata = expect_type(read_json(apath), dict, apath, "the top level")
        alist = expect_type(
            require(adata, "annotations", apath, "(top level)"), list, apath, "'annotations'"
        )
        for i, ann in enumerate(alist):
            anns[require(ann, "question_id", apath, f"annotations[{i}]", int)] = ann
    caps = load_coco_captions(captions) if captions is not None else {}

    parsed = []
    for i, q in enumerate(qs):
        rec = f"questions[{i}]"
        parsed.append(
            (
                require(q, "question_id", qpath, rec, int),
                require(q, "image_id", qpath, rec, int),
                require(q, "question", qpath, rec, str),
            )
        )
    records = []
    for qid, image_id, question in progress(subsample(parsed, limit, seed), "VQAv2 records"):
        rec = f"question_id={qid}"
        meta: dict = {"question_id": qid, "image_id": image_id}
        answers: list[str] = []
        tasks: list[str] = ["vqa"]
        if apath is not None:
            if qid not in anns:
                raise DataError(
                    f"{apath}: no annotation for question_id {qid} of {qpath}: are the questions and "
                    "annotations files of the same split?"
                )
            ann = anns[qid]
            answer_type = require(ann, "answer_type", apath, rec, str)
            raw = require(ann, "answers", apath, rec, list)
            try:  # fast path; the checked one below names the bad entry
                answers = [a["answer"] for a in raw if isinstance(a["answer"], str)]
            except (KeyError, TypeError):
                answers = []
            if len(answers) != len(raw):
                answers = [
                    require(a, "answer", apath, f"{rec} answers[{j}]", str)
                    for j, a in enumerate(raw)
                ]
            meta |= {
                "answer_type": answer_type,
                "multiple_choice_answer": require(ann, "multiple_choice_answer", apath, rec, str),
                "question_type": ann.get("question_type"),
            }
            if answer_type == "yes/no":
                tasks.append("yesno")
        if image_id in caps:
            meta["captions"] = caps[image_id]
        candidates = coco_image_candidates(image_root, image_id, subtype)
        image = resolve_image(candidates, rec, "VQAv2", check=check_images)
        records.append(
            Record(
                id=f"vqav2/{qid}",
                question=question,
                answers=answers,
                image=image,
                caption=caps[image_id][0] if image_id in caps else None,
                tasks=merge_tasks(tasks, question_tasks(question)),
                source="vqav2",
                meta=meta,
            )
        )
    return records
