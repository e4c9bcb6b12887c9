"""Concept regions on a model's patch grid: pixel masks and boxes -> bool masks [rows, cols].

Every VLM adapter in mmdiff resizes the whole image onto its patch grid (no crop, no padding:
LLaVA-1.5 and PaliGemma a square grid, Qwen2-VL a (h / 28) x (w / 28) grid after smart_resize,
each LLaVA-NeXT tile a grid over the whole image; `interp.heatmap.patch_grid`), so patch (i, j) of
a rows x cols grid sees the pixel span [i * H / rows, (i + 1) * H / rows) x [j * W / cols, ...).
A patch belongs to a concept's region when the concept covers at least `MIN_COVER` of that span.
The cover is exact (fractional pixel overlaps), so image sizes that do not divide the grid and
non-square grids are handled alike (docs/method.md#grounded-explanations).

Why 10%: patches are large next to small objects. An organism object covers a 2x2 block of its
8-pixel patches, between ~19% (the tip of a triangle) and ~60% (a circle) of each; a rule of half
the patch would cut triangles and crosses in pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mmdiff.errors import DataError

MIN_COVER = 0.1
Grid = tuple[int, int]  # (rows, cols) of one patch grid


def _check_grid(grid: Grid) -> tuple[int, int]:
    rows, cols = (int(v) for v in grid)
    if rows < 1 or cols < 1:
        raise DataError(f"a patch grid is (rows, cols) of positive sizes, got {tuple(grid)}")
    return rows, cols


def _span_overlap(lo: float, hi: float, extent: float, n: int) -> np.ndarray:
    """Share of each of n equal cells over [0, extent) covered by the interval [lo, hi): [n]."""
    edges = np.arange(n + 1) * (extent / n)
    covered = np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0.0, None)
    return covered / (extent / n)


def box_cover(box: Sequence[float], image_size: tuple[int, int], grid: Grid) -> np.ndarray:
    """Share of each patch [rows, cols] covered by a box (x, y, w, h) in pixels of an image of
    `image_size` = (width, height) (COCO's bbox convention)."""
    rows, cols = _check_grid(grid)
    width, height = (float(v) for v in image_size)
    x, y, w, h = (float(v) for v in box)
    if width <= 0 or height <= 0:
        raise DataError(f"image size must be positive (width, height), got {image_size}")
    oy = _span_overlap(y, y + h, height, rows)  # [rows]
    ox = _span_overlap(x, x + w, width, cols)  # [cols]
    return np.outer(oy, ox)


def mask_cover(mask: np.ndarray, grid: Grid) -> np.ndarray:
    """Share of each patch [rows, cols] covered by a pixel mask [height, width]."""
    rows, cols = _check_grid(grid)
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise DataError(f"a pixel mask is [height, width], got shape {m.shape}")
    height, width = m.shape
    wy = np.stack([_span_overlap(p, p + 1, height, rows) for p in range(height)], 1)  # [rows, height]
    wx = np.stack([_span_overlap(p, p + 1, width, cols) for p in range(width)], 1)  # [cols, width]
    return wy @ m @ wx.T


def region(cover: np.ndarray, min_cover: float = MIN_COVER) -> np.ndarray:
    """The patches [rows, cols] a concept covers at least `min_cover` of (bool)."""
    return np.asarray(cover) >= min_cover


def union_regions(parts: Mapping[str, Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
    """concept -> the union of its instances' bool regions (a concept with several objects)."""
    return {name: np.logical_or.reduce([np.asarray(p, dtype=bool) for p in masks])
            for name, masks in parts.items() if masks}


def text_regions(tokens: Sequence[str], phrases: Mapping[str, str]) -> dict[str, np.ndarray]:
    """concept -> bool mask [n_tokens] of the positions spelling its phrase (lower-cased words,
    tokenizer marks such as "Ġ" and "▁" stripped); concepts whose phrase does not occur are left out."""
    words = [t.replace("Ġ", " ").replace("▁", " ").strip().lower() for t in tokens]
    out: dict[str, np.ndarray] = {}
    for name, phrase in phrases.items():
        target = phrase.lower().split()
        if not target:
            continue
        mask = np.zeros(len(words), dtype=bool)
        for i in range(len(words) - len(target) + 1):
            if words[i : i + len(target)] == target:
                mask[i : i + len(target)] = True
        if mask.any():
            out[name] = mask
    return out
