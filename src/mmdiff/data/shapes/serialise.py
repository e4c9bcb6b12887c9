"""A scene as JSON-ready values and back: what Record.meta["scene"] holds.

A record keeps its scene so its image can be redrawn and its caption and answers rechecked
(tests, grounded concept masks, follow-up questions) without resampling.
"""

from __future__ import annotations

from mmdiff.data.shapes.world import DEFAULT_BACKGROUND, DEFAULT_INK, Scene, ShapeObject, TextItem
from mmdiff.errors import DataError


def scene_to_dict(scene: Scene) -> dict:
    """Everything `render` and `caption` read from a scene, as JSON-ready values (Record.meta["scene"])."""
    return {
        "kind": scene.kind,
        "objects": [
            {"colour": o.colour, "shape": o.shape, "row": o.row, "col": o.col,
             "cx": round(o.cx, 3), "cy": round(o.cy, 3), "size": round(o.size, 3)}
            for o in scene.objects
        ],
        "texts": [{"word": t.word, "x": t.x, "y": t.y, "ink": list(t.ink)} for t in scene.texts],
        "background": list(scene.background),
    }


def scene_from_dict(data: dict) -> Scene:
    """The scene `scene_to_dict` described: render(scene_from_dict(d)) redraws the record's image.

    Scenes recorded before ink and background were kept get the defaults (black ink on the default
    background): their captions and answers are exact, their redrawn image is not.
    """
    try:
        objects = tuple(ShapeObject(o["colour"], o["shape"], o["row"], o["col"], o["cx"], o["cy"], o["size"])
                        for o in data["objects"])
        texts = tuple(TextItem(t["word"], t["x"], t["y"], tuple(t.get("ink", DEFAULT_INK))) for t in data["texts"])
        kind = data["kind"]
    except (KeyError, TypeError) as e:
        raise DataError(
            f"not a shapes scene (missing or malformed {e}); expected the dict scene_to_dict writes: "
            "kind, objects (colour, shape, row, col, cx, cy, size) and texts (word, x, y)"
        ) from e
    return Scene(kind, objects, texts, background=tuple(data.get("background", DEFAULT_BACKGROUND)))
