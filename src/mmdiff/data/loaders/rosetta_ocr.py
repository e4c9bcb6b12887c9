"""OCR tokens of the TextVQA / TextCaps images (Rosetta), and the "text" concept they ground.

Format of TextVQA_Rosetta_OCR_v0.2_{train,val,test}.json (textvqa.org; TextCaps uses the same
images and files): {"data": [{"image_id": "<OpenImages id>", "ocr_tokens": [...],
"ocr_info": [{"word": "...", "bounding_box": {"top_left_x", "top_left_y", "width", "height",
"rotation", "roll", "pitch", "yaw"}}, ...]}, ...]}. Box coordinates are fractions of the image's
width and height (multiply by the image size for pixels; MMF's readers also accept "topLeftX" /
"topLeftY", and so does this one). The box is taken axis-aligned: rotation and the 3-D angles are
ignored, as MMF's own box reader does. An image whose "ocr_info" is empty is one where Rosetta
found no text: "text" is absent there, which gives the detection score its negatives.

OCRBench (`loaders.ocrbench`) carries no boxes; every one of its images shows text, so its records
hold "text" without a region (`interp.grounded.PRESENT`): they count for detection, not for IoU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmdiff.data.loaders._common import existing_file, expect_type, read_json, require
from mmdiff.data.records import Record
from mmdiff.data.regions import MIN_COVER, Grid, box_cover
from mmdiff.errors import DataError

TEXT = "text"  # the concept: the image shows text (TASK_CONCEPT_KINDS of ocr and safety include it)
_SLACK = 0.01  # normalised boxes overhang [0, 1] by rounding only


@dataclass(frozen=True)
class OcrToken:
    """One OCR token: its word and axis-aligned box (x, y, w, h) in fractions of the image."""

    word: str
    box: tuple[float, float, float, float]


def _number(box: Mapping[str, object], keys: Sequence[str], path: Path, rec: str) -> float:
    for key in keys:
        value = box.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise DataError(f"{path}: {rec}, 'bounding_box' should hold a number under {' or '.join(map(repr, keys))}, "
                    f"found {dict(box)!r}")


def _box(value: object, path: Path, rec: str) -> tuple[float, float, float, float]:
    if not isinstance(value, dict):
        raise DataError(f"{path}: {rec}, field 'bounding_box' should be an object with top_left_x, top_left_y, "
                        f"width and height, found {value!r}")
    x = _number(value, ("top_left_x", "topLeftX"), path, rec)
    y = _number(value, ("top_left_y", "topLeftY"), path, rec)
    w, h = _number(value, ("width",), path, rec), _number(value, ("height",), path, rec)
    if w < 0 or h < 0:
        raise DataError(f"{path}: {rec} has a box of negative size {value!r}")
    if x < -_SLACK or y < -_SLACK or x + w > 1 + _SLACK or y + h > 1 + _SLACK:
        raise DataError(
            f"{path}: {rec} box {value!r} reaches outside [0, 1]: Rosetta boxes are fractions of the image's "
            "width and height; are these pixels (another OCR file's format)?"
        )
    return x, y, w, h


def load_rosetta_ocr(paths: str | Path | Sequence[str | Path]) -> dict[str, tuple[OcrToken, ...]]:
    """{image_id: its OCR tokens in file order} from one or more Rosetta OCR files; images where no
    text was found map to ()."""
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: dict[str, tuple[OcrToken, ...]] = {}
    for p in files:
        path = existing_file(p, "TextVQA Rosetta OCR file (TextVQA_Rosetta_OCR_v0.2_<split>.json)")
        data = expect_type(read_json(path), dict, path, "the top level")
        rows = expect_type(require(data, "data", path, "(top level)"), list, path, "'data'")
        for i, row in enumerate(rows):
            rec = f"data[{i}]"
            image_id = require(row, "image_id", path, rec, str)
            infos = require(row, "ocr_info", path, f"{rec} (image_id={image_id})", list)
            tokens = []
            for j, info in enumerate(infos):
                where = f"{rec} (image_id={image_id}), ocr_info[{j}]"
                word = require(info, "word", path, where, str)
                tokens.append(OcrToken(word, _box(require(info, "bounding_box", path, where), path, where)))
            out[image_id] = tuple(tokens)
    return out


def text_region(tokens: Sequence[OcrToken], grid: Grid, min_cover: float = MIN_COVER) -> np.ndarray:
    """Bool region [rows, cols] of the patches showing OCR text: each token's patches covered at
    least `min_cover` (`data.regions`), or, for a token smaller than that on every patch, the patch
    it covers most (a word too small to reach the threshold is still somewhere)."""
    rows, cols = (int(v) for v in grid)
    out = np.zeros((rows, cols), dtype=bool)
    for token in tokens:
        cover = box_cover(token.box, (1.0, 1.0), grid)  # normalised boxes on a unit image
        hit = cover >= min_cover
        if not hit.any() and cover.max() > 0.0:
            hit = cover == cover.max()
        out |= hit
    return out


@dataclass(frozen=True)
class OcrConcepts:
    """The grounded explainer's concept source for OCR sets: the image-side concept "text".

    TextVQA / TextCaps records (meta "image_id" found in `images`, from `load_rosetta_ocr`): "text"
    is the union of the OCR tokens' boxes on the patch grid, absent where Rosetta found none.
    OCRBench records (source "ocrbench"): "text" is present, with no region. Other records are not
    covered. Only the "text" kind is annotated (`known`), so mixed with other sources no record is
    counted as showing no text merely because its source does not say.
    """

    images: Mapping[str, tuple[OcrToken, ...]]
    min_cover: float = MIN_COVER

    def covers(self, record: Record) -> bool:
        """Whether the record's image has OCR annotations here (or is an OCRBench image)."""
        image_id = (record.meta or {}).get("image_id")
        return record.source == "ocrbench" or (isinstance(image_id, str) and image_id in self.images)

    def known(self, record: Record) -> frozenset[str]:
        return frozenset({TEXT})

    def __call__(self, record: Record, grid: Grid | None, tokens: Sequence[str]) -> dict[str, dict[str, np.ndarray | None]]:
        if grid is None or not self.covers(record):
            return {"image": {}, "text": {}}
        if record.source == "ocrbench":
            return {"image": {TEXT: None}, "text": {}}  # interp.grounded.PRESENT: text, boxes not given
        found = self.images[(record.meta or {})["image_id"]]
        return {"image": {TEXT: text_region(found, grid, self.min_cover)} if found else {}, "text": {}}
