"""Drawing a scene: a Scene becomes a 64x64 RGB PIL image.

Text is drawn with Pillow's embedded bitmap font, never a system font, so the same scene gives the
same pixels on every machine (records are a pure function of their arguments).
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from mmdiff.data.shapes.world import COLOURS, IMAGE_SIZE, SHAPES, Scene, ShapeObject
from mmdiff.errors import DataError

_FONT = ImageFont.load_default_imagefont()  # Pillow's embedded bitmap font: identical everywhere


def text_width(word: str) -> int:
    return int(_FONT.getbbox(word.upper())[2])


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    fill = COLOURS[obj.colour]
    h = obj.size / 2
    cx, cy = obj.cx, obj.cy
    if obj.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif obj.shape == "square":
        s = h * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    elif obj.shape == "cross":
        t = obj.size / 6
        draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=fill)
    else:
        raise DataError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB PIL image."""
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(im)
    for obj in scene.objects:
        _draw_object(draw, obj)
    for t in scene.texts:
        draw.text((t.x, t.y), t.word.upper(), font=_FONT, fill=t.ink)
    return im
