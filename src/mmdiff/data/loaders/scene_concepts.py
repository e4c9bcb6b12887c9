"""The organism's scene metadata (Record.meta["scene"]) -> concept regions on a patch grid.

The shapes world knows every object and word pixel for pixel: each object or word is redrawn alone
on the scene's background (`shapes.render`), its changed pixels are its mask, and the mask is
mapped onto the model's patch grid (`data.regions`). Concepts, named "<kind>=<value>":

- colour=red, shape=circle, object=red circle: the pixels of the objects with that colour / shape;
- cell=top left, row=top, col=left: the pixels of the objects in that grid cell / row / column
  (a position concept is "an object there", so its region is the object, not the empty cell);
- word=apple: the pixels of that rendered word; text: every rendered word.

Concepts a scene does not hold are left out (the grounded explainer reads them as absent). The
question's tokens give the text side's concepts (`question_concepts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmdiff.data import shapes
from mmdiff.data.records import Record
from mmdiff.data.regions import MIN_COVER, Grid, mask_cover, region, text_regions, union_regions
from mmdiff.errors import DataError


def _pixels(scene: shapes.Scene, objects: tuple = (), texts: tuple = ()) -> np.ndarray:
    """Bool mask [height, width] of what `objects` and `texts` draw over the scene's background."""
    alone = shapes.Scene(scene.kind, objects, texts, background=scene.background)
    drawn = np.asarray(shapes.render(alone))  # [height, width, 3]
    return (drawn != np.asarray(scene.background, dtype=drawn.dtype)).any(-1)


def scene_concepts(scene: shapes.Scene | Mapping[str, Any], grid: Grid,
                   min_cover: float = MIN_COVER) -> dict[str, np.ndarray]:
    """concept -> bool region [rows, cols] of one organism scene on a patch grid."""
    if not isinstance(scene, shapes.Scene):
        scene = shapes.scene_from_dict(dict(scene))
    parts: dict[str, list[np.ndarray]] = {}
    for obj in scene.objects:
        patches = region(mask_cover(_pixels(scene, objects=(obj,)), grid), min_cover)
        for name in (f"colour={obj.colour}", f"shape={obj.shape}", f"object={obj.name}",
                     f"cell={obj.position}", f"row={shapes.ROWS[obj.row]}", f"col={shapes.COLS[obj.col]}"):
            parts.setdefault(name, []).append(patches)
    for text in scene.texts:
        patches = region(mask_cover(_pixels(scene, texts=(text,)), grid), min_cover)
        parts.setdefault(f"word={text.word}", []).append(patches)
        parts.setdefault("text", []).append(patches)
    return union_regions(parts)


def record_concepts(record: Record, grid: Grid, min_cover: float = MIN_COVER) -> dict[str, np.ndarray]:
    """concept -> bool region [rows, cols] of an organism record (its meta["scene"]); a DataError
    for records of other sources or text-only records."""
    scene = (record.meta or {}).get("scene")
    if scene is None:
        raise DataError(
            f"record {record.id!r} (source {record.source!r}) has no meta['scene']: only image records "
            "of the organism's shapes world carry scene metadata (shapes.make_record)"
        )
    return scene_concepts(scene, grid, min_cover)


def question_concepts(record: Record, tokens: Sequence[str]) -> dict[str, np.ndarray]:
    """Token-side concepts of an organism question: concept -> bool mask [len(tokens)] of the text
    positions spelling it. "relation=<r>" the relation a spatial question asks about, "subject=<o>"
    and "related=<o>" its two objects, "said=<w>" every colour and shape word."""
    meta = record.meta or {}
    phrases = {f"said={w}": w for w in (*shapes.COLOURS, *shapes.SHAPES)}
    for field, name in (("relation", "relation"), ("subject", "subject"), ("object", "related")):
        if isinstance(meta.get(field), str):
            phrases[f"{name}={meta[field]}"] = meta[field]
    return text_regions(tokens, phrases)


def organism_concepts(record: Record, grid: Grid | None, tokens: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Both sides' concepts of an organism record (the grounded explainer's concept source): "image"
    from its scene on `grid` (none without an image or scene), "text" from its question tokens."""
    scene = (record.meta or {}).get("scene")
    image = scene_concepts(scene, grid) if grid is not None and scene is not None else {}
    return {"image": image, "text": question_concepts(record, tokens)}
