"""easy-VQA (PyPI `easy-vqa`): 64x64 images of one coloured shape, template questions, 13 answers.

The package ships data/<split>/questions.json (a list of [question, answer, image_id]) and
data/<split>/images/<image_id>.png. It has no captions; each image's caption ("A blue circle.") is
read off its own questions: "what color is the shape?" -> blue, "what is the blue shape?" -> circle.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmdiff.data.loaders._common import (
    existing_dir,
    existing_file,
    expect_type,
    progress,
    read_json,
    resolve_image,
    subsample,
)
from mmdiff.data.records import Record
from mmdiff.errors import DataError

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
_WORD = r"(?P<x>\w+)"
_COLOUR_QUESTIONS = [
    re.compile(p)
    for p in (
        r"^what color is the (?:shape|\w+)\?$",
        r"^what is the color of the (?:shape|\w+)\?$",
    )
]
_SHAPE_QUESTIONS = [
    re.compile(p)
    for p in (
        r"^what shape (?:is in the image|does the image contain|is present)\?$",
        r"^what is the \w+ shape\?$",
    )
]
_COLOUR_IN_QUESTION = re.compile(rf"^what is the {_WORD} shape\?$")
_SHAPE_IN_QUESTION = re.compile(rf"^what (?:color is|is the color of) the {_WORD}\?$")
_NEGATION = re.compile(r"\b(?:not|no)\b")


def _mentioned(question: str, vocabulary: tuple[str, ...]) -> list[str]:
    return [w for w in re.findall(r"\w+", question) if w in vocabulary]


def default_root() -> Path:
    """The data folder of the installed easy-vqa package."""
    try:
        import easy_vqa
    except ImportError as exc:
        raise DataError(
            "the easy-vqa loader reads the data bundled with the `easy-vqa` package, which is not "
            "installed: pip install easy-vqa, or pass root= a folder with <split>/questions.json"
        ) from exc
    return Path(easy_vqa.__file__).parent / "data"


def easy_vqa_captions(questions: list[tuple[str, str, int]]) -> dict[int, str]:
    """{image_id: "A <colour> <shape>."} from the questions about each image (partial if one is unknown)."""
    colour: dict[int, set[str]] = {}
    shape: dict[int, set[str]] = {}
    for q, a, image_id in questions:
        if any(p.match(q) for p in _COLOUR_QUESTIONS):
            colour.setdefault(image_id, set()).add(a)
        if any(p.match(q) for p in _SHAPE_QUESTIONS):
            shape.setdefault(image_id, set()).add(a)
        if (m := _COLOUR_IN_QUESTION.match(q)) and m["x"] in COLOURS:
            colour.setdefault(image_id, set()).add(m["x"])
        if (m := _SHAPE_IN_QUESTION.match(q)) and m["x"] in SHAPES:
            shape.setdefault(image_id, set()).add(m["x"])
        if a in ("yes", "no") and (a == "yes") != bool(_NEGATION.search(q)):  # "X is present"
            for w in _mentioned(q, COLOURS):
                colour.setdefault(image_id, set()).add(w)
            for w in _mentioned(q, SHAPES):
                shape.setdefault(image_id, set()).add(w)
    out = {}
    for image_id in set(colour) | set(shape):
        c, s = colour.get(image_id, set()), shape.get(image_id, set())
        if len(c) > 1 or len(s) > 1:
            raise DataError(
                f"easy-VQA image {image_id}: its questions disagree on its colour {sorted(c)} "
                f"or shape {sorted(s)}; the data is not easy-VQA's"
            )
        words = [*c, *s] if s else [*c, "shape"]
        out[image_id] = f"A {' '.join(words)}."
    return out


def _tasks(question: str, answer: str) -> tuple[str, ...]:
    tags = ["vqa"]
    if answer in ("yes", "no"):
        tags.append("yesno")
    yes_no = answer in ("yes", "no")
    if answer in COLOURS or (yes_no and _mentioned(question, COLOURS)):
        tags.append("colour")
    if answer in SHAPES or (yes_no and _mentioned(question, SHAPES)):
        tags.append("shape")
    return tuple(tags)


def load_easy_vqa(
    split: str = "train",
    root: str | Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> list[Record]:
    """easy-VQA records of a split ("train": 38,575 questions on 4,000 images; "test": 9,673 on 1,000)."""
    if split not in ("train", "test"):
        raise DataError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    base = existing_dir(root, "easy-VQA data folder") if root is not None else default_root()
    qpath = existing_file(base / split / "questions.json", "easy-VQA questions file")
    image_dir = base / split / "images"
    rows = expect_type(read_json(qpath), list, qpath, "the top level")
    parsed = []
    for i, row in enumerate(rows):
        if not (
            isinstance(row, list)
            and len(row) == 3
            and isinstance(row[0], str)
            and isinstance(row[1], str)
            and isinstance(row[2], int)
        ):
            raise DataError(
                f"{qpath}: record [{i}] should be [question, answer, image_id], found {row!r}"
            )
        parsed.append((i, row[0], row[1], row[2]))
    captions = easy_vqa_captions([(q, a, im) for _, q, a, im in parsed])
    records = []
    for i, q, a, image_id in progress(subsample(parsed, limit, seed), "easy-VQA records"):
        candidates = [image_dir / f"{image_id}.png"]
        image = resolve_image(candidates, f"[{i}]", "easy-VQA", check=check_images)
        records.append(
            Record(
                id=f"easy_vqa/{split}/{i}",
                question=q,
                answers=[a],
                image=image,
                caption=captions.get(image_id),
                tasks=_tasks(q, a),
                source="easy_vqa",
                meta={"image_id": image_id, "split": split},
            )
        )
    return records
