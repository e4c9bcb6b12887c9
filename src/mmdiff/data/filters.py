"""Task splits by question text and annotations: VQAv2 yes/no, spatial questions, OCR questions.

Cue matching is whole-word and case-insensitive; a multiword cue ("in front of") matches with any
whitespace between its words. These are the heuristic splits of docs/method.md#task-features, not a parser: the
cue lists are public constants so that a study can report exactly what selected its task sets.
"""

from __future__ import annotations

import re
from typing import Iterable

from mmdiff.data.records import Record
from mmdiff.errors import DataError

SPATIAL_CUES: tuple[str, ...] = (
    "left",
    "right",
    "above",
    "below",
    "behind",
    "in front of",
    "next to",
    "on top of",
    "under",
    "underneath",
    "beneath",
    "between",
    "near",
    "nearby",
    "beside",
    "adjacent to",
    "across from",
    "opposite",
    "far from",
    "close to",
    "closest to",
    "farthest from",
    "in the middle of",
    "at the bottom of",
    "at the top of",
    "inside",
    "outside of",
    "on the side of",
    "leftmost",
    "rightmost",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)
"""Words and phrases that make a question spatial (relations between objects or positions)."""

# Frequent non-spatial senses of spatial words, removed before matching.
SPATIAL_FALSE_FRIENDS: tuple[str, ...] = (
    "right now",
    "all right",
    "right or wrong",
    "is this right",
    "is that right",
    "left over",
    "left behind",
    "any left",
    "near future",
)

OCR_CUES: tuple[str, ...] = (
    "written",
    "write",
    "writing",
    "text",
    "say",
    "says",
    "said",
    "read",
    "reads",
    "word",
    "words",
    "letter",
    "letters",
    "spell",
    "spelled",
    "brand",
    "logo",
    "label",
    "title",
    "headline",
    "caption",
    "slogan",
    "printed",
    "inscription",
    "sign say",
    "license plate",
    "jersey number",
    "what number",
    "number on",
    "numbers on",
    "name of the",
    "name on",
    "street name",
    "price",
    "phone number",
    "website",
    "url",
    "author",
    "page number",
    "digits",
)
"""Words and phrases that make a question a text-reading (OCR) question."""


def _cue_pattern(cues: Iterable[str]) -> re.Pattern[str]:
    alts = sorted({c.strip().lower() for c in cues}, key=len, reverse=True)  # longest first
    body = "|".join(r"\s+".join(map(re.escape, c.split())) for c in alts)
    return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE)


_SPATIAL = _cue_pattern(SPATIAL_CUES)
_SPATIAL_FALSE = _cue_pattern(SPATIAL_FALSE_FRIENDS)
_OCR = _cue_pattern(OCR_CUES)


def find_cues(text: str, cues: Iterable[str]) -> list[str]:
    """The cues (lower-case, single-spaced) that occur in `text` as whole words, in text order."""
    return [" ".join(m.group(0).lower().split()) for m in _cue_pattern(cues).finditer(text)]


def spatial_cues(question: str) -> list[str]:
    """The spatial cues in a question, after removing non-spatial idioms ("right now", ...)."""
    cleaned = _SPATIAL_FALSE.sub(" ", question)
    return [" ".join(m.group(0).lower().split()) for m in _SPATIAL.finditer(cleaned)]


def is_spatial_question(question: str) -> bool:
    return _SPATIAL.search(_SPATIAL_FALSE.sub(" ", question)) is not None


def ocr_cues(question: str) -> list[str]:
    """The text-reading cues in a question ("what does the sign say" -> ["sign say"])."""
    return [" ".join(m.group(0).lower().split()) for m in _OCR.finditer(question)]


def is_ocr_question(question: str) -> bool:
    return _OCR.search(question) is not None


def question_tasks(question: str) -> tuple[str, ...]:
    """Task tags a question earns from its wording alone: ("spatial",), ("ocr",), both or none."""
    tags = []
    if is_spatial_question(question):
        tags.append("spatial")
    if is_ocr_question(question):
        tags.append("ocr")
    return tuple(tags)


def yes_no_subset(records: Iterable[Record]) -> list[Record]:
    """VQAv2 records whose annotated answer_type is "yes/no" (record.meta["answer_type"])."""
    out = []
    for r in records:
        if "answer_type" not in r.meta:
            raise DataError(
                f"record {r.id!r} ({r.source or 'unknown source'}) has no meta['answer_type']; the "
                "yes/no subset is defined by VQAv2's annotations: load the records with the vqav2 "
                "loader, or select by the 'yesno' task tag instead"
            )
        if r.meta["answer_type"] == "yes/no":
            out.append(r)
    return out


def spatial_subset(records: Iterable[Record]) -> list[Record]:
    """Records whose question has a spatial cue."""
    return [r for r in records if is_spatial_question(r.question)]


def ocr_subset(records: Iterable[Record]) -> list[Record]:
    """Records whose question asks to read text."""
    return [r for r in records if is_ocr_question(r.question)]


def with_task(records: Iterable[Record], task: str) -> list[Record]:
    """Records tagged with `task` (by their loader)."""
    return [r for r in records if task in r.tasks]


def relation_subset(records: Iterable[Record], relations: Iterable[str]) -> list[Record]:
    """VSR records whose annotated spatial relation (record.meta["relation"]) is one of `relations`.

    The relation-matched evaluation of a spatial feature (ablate a "left of" feature, score on "left
    of" items) and its relation-mismatched control both select items this way.
    """
    wanted = {r.strip().lower() for r in relations}
    out = []
    for r in records:
        if "relation" not in r.meta:
            raise DataError(
                f"record {r.id!r} ({r.source or 'unknown source'}) has no meta['relation']; relation "
                "subsets need VSR records (load them with the vsr loader)"
            )
        if str(r.meta["relation"]).strip().lower() in wanted:
            out.append(r)
    return out
