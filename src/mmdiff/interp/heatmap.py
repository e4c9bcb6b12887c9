"""Image-patch heatmaps on the model's real patch grid: per-image-token values -> a continuous map.

An adapter's `patch_grid(inputs, row)` lists the image tiles of one batch row in token order, each
(rows, cols, newline): LLaVA-1.5 one square grid, LLaVA-NeXT the base grid then the anyres grid
whose rows end in an `image_newline` token, Qwen2-VL a non-square (h / 2) x (w / 2) grid per
temporal patch, PaliGemma one square grid. Every tile views the whole image, so each tile's map is
upsampled bilinearly to the image size and the maps are averaged (1x1 tiles such as a CLS token
only count when nothing finer exists). Newline tokens carry no patch and are dropped.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmdiff.errors import DataError, ModelError

Tile = tuple[int, int, bool]  # (rows, cols, newline): a grid of patches, newline = one extra token per row



# zlib level of the PNGs the dashboards inline. Measured on the organism study's 2,192 dashboard
# images: level 1 -> 6 shrinks the heatmaps by 13% (6.08 -> 5.30 MB, +0.4 ms each) and the
# attention overlays by 31% (3.88 -> 2.69 MB, +16 ms each); level 9 costs 5-10x the time of 6
# for 5% less.
PNG_COMPRESS_LEVEL = 6

def patch_grid(adapter: Any, inputs: dict[str, torch.Tensor], row: int) -> list[Tile]:
    """The image tiles of batch row `row` in token order, from the adapter's `patch_grid`.

    Adapters without one fall back to a single square grid when the row's image-token count is a
    perfect square; otherwise a ModelError says to add `patch_grid` to the adapter.
    """
    method = getattr(adapter, "patch_grid", None)
    if method is not None:
        return [(int(r), int(c), bool(nl)) for r, c, nl in method(inputs, row)]
    n = int(adapter.image_token_mask(inputs["input_ids"][row : row + 1]).sum())
    side = round(n**0.5)
    if n == 0 or side * side != n:
        raise ModelError(
            f"{type(adapter).__name__} has no patch_grid method and row {row} has {n} image tokens, "
            "not a square grid: add patch_grid(inputs, row) to the family's adapter"
        )
    return [(side, side, False)]


def tile_token_count(tiles: Sequence[Tile]) -> int:
    """How many image tokens the tiles take: rows * (cols + newline) summed over tiles."""
    return sum(r * (c + int(nl)) for r, c, nl in tiles)


def patch_maps(values: torch.Tensor | Sequence[float], tiles: Sequence[Tile]) -> list[torch.Tensor]:
    """Per-image-token values [n_image] (token order) -> one [rows, cols] map per tile, newlines dropped."""
    v = torch.as_tensor(values, dtype=torch.float32).flatten().cpu()  # [n_image]
    expected = tile_token_count(tiles)
    if v.numel() != expected:
        raise DataError(
            f"got {v.numel()} image-token values but the patch grid {list(tiles)} holds {expected} image "
            "tokens: pass the values of this row's image tokens, in token order"
        )
    maps, start = [], 0
    for rows, cols, newline in tiles:
        width = cols + int(newline)
        block = v[start : start + rows * width].reshape(rows, width)
        maps.append(block[:, :cols])  # [rows, cols]
        start += rows * width
    return maps


def upsampled_heatmap(
    values: torch.Tensor | Sequence[float], tiles: Sequence[Tile], size: tuple[int, int]
) -> np.ndarray:
    """A continuous heatmap [height, width] over an image of `size` = (width, height), PIL order.

    Each tile's map is upsampled bilinearly (align_corners=False, so each patch value sits at its
    patch centre) and the maps of the finest tiles are averaged.
    """
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise DataError(f"image size must be positive (width, height), got {size}")
    maps = patch_maps(values, tiles)
    spatial = [m for m in maps if m.numel() > 1] or maps
    out = torch.zeros(height, width)
    for m in spatial:
        up = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)
        out += up[0, 0]
    return (out / len(spatial)).numpy()


def overlay_png(
    image: Image.Image,
    values: torch.Tensor | Sequence[float],
    tiles: Sequence[Tile],
    *,
    title: str | None = None,
    vmax: float | None = None,
    alpha: float = 0.55,
    cmap: str = "inferno",
    max_side: int = 336,
    enlarge: bool = True,
) -> bytes:
    """PNG bytes: the image with the heatmap of `values` overlaid (colour bar, optional title).

    The colour scale runs from 0 to `vmax` (default: the largest value; negative values clip to 0).
    The image is shown with its longer side at `max_side` pixels (smaller images only when
    `enlarge`: the interp stage draws thousands at their own size, the page scales them). Drawn
    with PIL (a colour lookup, an alpha blend, a bar and two labels): a matplotlib figure per
    example cost ~0.3 s, 98% of the interp stage's time on the organism.
    """
    from PIL import ImageDraw

    image = image.convert("RGB")
    scale = max_side / max(image.size)  # shown with the longer side at max_side, small images enlarged
    if scale > 1.0 and not enlarge:
        scale = 1.0
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    heat = upsampled_heatmap(values, tiles, image.size)
    top = float(vmax) if vmax is not None else float(max(heat.max(), 0.0))
    top = top if top > 0 else 1.0
    lut = colour_table(cmap)  # [256, 3] uint8
    level = np.clip(np.nan_to_num(heat / top), 0.0, 1.0)
    colour = lut[np.round(level * 255).astype(np.int64)].astype(np.float32)  # [H, W, 3]
    blended = (1.0 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colour
    shown = Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))
    pad, bar, label_w, title_h = 4, 10, 44, (14 if title else 0)
    title = printable(title) if title else None
    font = _font()
    text_w = int(ImageDraw.Draw(shown).textlength(title, font=font)) + 2 * pad if title else 0
    canvas = Image.new("RGB", (max(shown.width + 2 * pad + bar + label_w, text_w), shown.height + 2 * pad + title_h),
                       "white")
    canvas.paste(shown, (pad, pad + title_h))
    ramp = lut[np.linspace(255, 0, shown.height).round().astype(np.int64)]  # top = vmax
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None], bar, axis=1)), (shown.width + 2 * pad, pad + title_h))
    x = shown.width + 2 * pad + bar + 2
    canvas.paste(_label(f"{top:.3g}"), (x, pad + title_h))
    canvas.paste(_label("0"), (x, pad + title_h + max(shown.height - 11, 11)))
    if title:
        ImageDraw.Draw(canvas).text((pad, 1), title, fill="black", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def printable(text: str) -> str:
    """`text` in the characters PIL's default bitmap font can draw (others become '?')."""
    return text.encode("latin-1", "replace").decode("latin-1")


@functools.lru_cache(maxsize=1)
def _font() -> Any:
    """PIL's default font, loaded once (loading it decodes an embedded font every time)."""
    from PIL import ImageFont

    return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _label(text: str) -> Image.Image:
    """`text` in black on white, drawn once per distinct text (the colour bar's ends repeat)."""
    from PIL import ImageDraw

    font = _font()
    width = max(1, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)) + 1)
    image = Image.new("RGB", (width, 12), "white")
    ImageDraw.Draw(image).text((0, 0), text, fill="black", font=font)
    return image


_COLOUR_TABLES: dict[str, np.ndarray] = {}


def colour_table(cmap: str) -> np.ndarray:
    """[256, 3] uint8 the matplotlib colour map's colours (looked up once)."""
    if cmap not in _COLOUR_TABLES:
        import matplotlib

        _COLOUR_TABLES[cmap] = (np.asarray(matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256)))[:, :3] * 255
                                ).round().astype(np.uint8)
    return _COLOUR_TABLES[cmap]
