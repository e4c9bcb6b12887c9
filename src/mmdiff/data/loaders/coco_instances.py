"""COCO instances JSON (annotations/instances_{train,val}{2014,2017}.json): object boxes per image,
and their concept regions on a model's patch grid.

Format: {"images": [{"id", "file_name", "width", "height", ...}],
"annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h], "iscrowd", ...}],
"categories": [{"id", "name", "supercategory"}]}. Boxes are in pixels of the original image,
(x, y) its top-left corner. Crowd boxes (iscrowd = 1) are kept: they still mark where the category
is. The VQAv2 and VSR images are COCO images, so their records' image ids find their boxes here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmdiff.data.loaders._common import existing_file, expect_type, read_json, require
from mmdiff.data.records import Record
from mmdiff.data.regions import MIN_COVER, Grid, box_cover, region, text_regions, union_regions
from mmdiff.errors import DataError


@dataclass(frozen=True)
class CocoInstance:
    """One annotated object: its category name and box (x, y, w, h) in pixels."""

    category: str
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class CocoImage:
    """One COCO image: its file, size (width, height) and annotated objects in annotation-id order."""

    image_id: int
    file_name: str
    width: int
    height: int
    instances: tuple[CocoInstance, ...]


def _bbox(value: object, path: Path, rec: str, width: int, height: int) -> tuple[float, float, float, float]:
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise DataError(f"{path}: {rec}, field 'bbox' should be four numbers [x, y, w, h], found {value!r}")
    x, y, w, h = (float(v) for v in value)
    if w <= 0 or h <= 0:
        raise DataError(f"{path}: {rec} has an empty box {value!r} (w and h must be positive)")
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:  # COCO boxes overhang by rounding only
        raise DataError(
            f"{path}: {rec} box {value!r} lies outside its {width}x{height} image: is this "
            "[x, y, w, h] (COCO) rather than [x1, y1, x2, y2]?"
        )
    return x, y, w, h


def load_coco_instances(paths: str | Path | Sequence[str | Path]) -> dict[int, CocoImage]:
    """{image_id: CocoImage} from one or more COCO instances files; images without boxes included."""
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: dict[int, CocoImage] = {}
    for p in files:
        path = existing_file(p, "COCO instances file")
        data = expect_type(read_json(path), dict, path, "the top level")
        top = "(top level)"
        categories = {}
        for i, cat in enumerate(expect_type(require(data, "categories", path, top), list, path, "'categories'")):
            categories[require(cat, "id", path, f"categories[{i}]", int)] = require(
                cat, "name", path, f"categories[{i}]", str)
        images: dict[int, tuple[str, int, int]] = {}
        for i, img in enumerate(expect_type(require(data, "images", path, top), list, path, "'images'")):
            rec = f"images[{i}]"
            images[require(img, "id", path, rec, int)] = (
                require(img, "file_name", path, rec, str),
                require(img, "width", path, rec, int), require(img, "height", path, rec, int))
        found: dict[int, list[tuple[int, CocoInstance]]] = {k: [] for k in images}
        anns = expect_type(require(data, "annotations", path, top), list, path, "'annotations'")
        for i, ann in enumerate(anns):
            rec = f"annotations[{i}]"
            image_id = require(ann, "image_id", path, rec, int)
            if image_id not in images:
                raise DataError(f"{path}: {rec} refers to image_id {image_id}, which 'images' does not list")
            category_id = require(ann, "category_id", path, rec, int)
            if category_id not in categories:
                raise DataError(
                    f"{path}: {rec} has category_id {category_id}, which 'categories' does not list "
                    f"(known ids: {sorted(categories)[:10]}...)"
                )
            _, width, height = images[image_id]
            box = _bbox(require(ann, "bbox", path, rec), path, rec, width, height)
            found[image_id].append((ann.get("id", i), CocoInstance(categories[category_id], box)))
        for image_id, (file_name, width, height) in images.items():
            ordered = tuple(inst for _, inst in sorted(found[image_id], key=lambda t: t[0]))
            out[image_id] = CocoImage(image_id, file_name, width, height, ordered)
    return out


def coco_concepts(image: CocoImage, grid: Grid, min_cover: float = MIN_COVER) -> dict[str, np.ndarray]:
    """concept -> bool region [rows, cols] of one COCO image on a patch grid: "category=<name>",
    the union of that category's boxes. The whole image is resized onto the grid (data.regions)."""
    parts: dict[str, list[np.ndarray]] = {}
    for inst in image.instances:
        cover = box_cover(inst.bbox, (image.width, image.height), grid)
        parts.setdefault(f"category={inst.category}", []).append(region(cover, min_cover))
    return union_regions(parts)


@dataclass(frozen=True)
class CocoConcepts:
    """The grounded explainer's concept source for records of COCO images (VQAv2, VSR), found by
    their meta "image_id" in `images` (`load_coco_instances`).

    Image side: one "category=<name>" region per annotated category (`coco_concepts`), and for a
    VSR record (meta "subject" / "object", its two related objects) "subject" and "related", the
    regions of those categories. Text side: the asked relation ("relation=<phrase>", meta
    "relation"), "subject" / "related" where the question names them, and "category=<name>" for each
    of the image's categories the question names. A record whose image is not in `images` has none.
    """

    images: Mapping[int, CocoImage]
    min_cover: float = MIN_COVER

    def covers(self, record: Record) -> bool:
        """Whether the record's image has annotations here."""
        return (record.meta or {}).get("image_id") in self.images

    def known(self, record: Record) -> frozenset[str]:
        """The concept kinds COCO annotates (a COCO image says nothing about text, for one)."""
        return frozenset({"category", "subject", "related", "relation"})

    def __call__(self, record: Record, grid: Grid | None, tokens: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
        meta = record.meta or {}
        image = self.images.get(meta.get("image_id"))  # type: ignore[arg-type]
        if image is None:
            return {"image": {}, "text": {}}
        regions = coco_concepts(image, grid, self.min_cover) if grid is not None else {}
        names = {inst.category for inst in image.instances}
        phrases = {f"category={name}": name for name in sorted(names)}
        for role, field_name in (("subject", "subject"), ("related", "object")):
            name = meta.get(field_name)
            if isinstance(name, str) and name:
                phrases[role] = name
                if f"category={name}" in regions:
                    regions[role] = regions[f"category={name}"]
        if isinstance(meta.get("relation"), str) and meta["relation"]:
            phrases[f"relation={meta['relation']}"] = meta["relation"]
        return {"image": regions, "text": text_regions(tokens, phrases)}
