"""The scene sampler: seeded draws of object scenes, OCR word scenes and typographic activities.

Objects sit on fixed patch-corner centres and text on the patch grid, so the from-scratch vision
tower sees each object or glyph as the same patches wherever it is (docs/design.md). Training and
validation object scenes never contain a held-out pair; every test object scene contains one
(world.HELD_OUT_PAIRS). Harmful activities are split by verb (activity_pool), so every harmful test
request is held out too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from mmdiff.data.shapes import world
from mmdiff.data.shapes.drawing import text_width
from mmdiff.data.shapes.world import (
    COLOURS,
    GRID,
    HARMFUL_NOUNS,
    IMAGE_SIZE,
    INSTRUCTION_NOUNS,
    OBJECT_CENTRES,
    OBJECT_SIZE,
    OCR_WORDS,
    PATCH,
    SHAPES,
    VERBS,
    Scene,
    ShapeObject,
    TextItem,
    held_out_pair,
)
from mmdiff.errors import DataError


def _rng(seed: int, split: str, family: str, index: int) -> np.random.Generator:
    key = hashlib.sha256(f"shapes/{seed}/{split}/{family}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:8], "little"))


def sample_object_scene(rng: np.random.Generator, split: str, n_objects: int | None = None) -> Scene:
    """1-3 objects with distinct colours, distinct shapes and distinct cells.

    Training and validation scenes never contain both objects of a held-out pair; test scenes
    always contain one held-out pair (so they hold 2 or 3 objects), listed first in `objects`.
    """
    colours = list(COLOURS)
    # the object count is drawn once, before the held-out rule rejects any draw: redrawing it with
    # each rejection would favour single objects (which no rule rejects) over scenes to bind in
    n = n_objects if n_objects is not None else int(rng.integers(2 if split == "test" else 1, 4))
    for _ in range(1000):
        cs = [colours[i] for i in rng.choice(len(colours), size=n, replace=False)]
        ss = [SHAPES[i] for i in rng.choice(len(SHAPES), size=n, replace=False)]
        pairs = list(zip(cs, ss))
        held = [(i, j) for i in range(n) for j in range(i + 1, n) if held_out_pair(pairs[i], pairs[j])]
        if split == "test":
            if not held:
                continue
            i, j = held[0]
            pairs = [pairs[i], pairs[j]] + [p for k, p in enumerate(pairs) if k not in (i, j)]
        elif held:
            continue
        cells = rng.choice(GRID * GRID, size=n, replace=False)
        objs = []
        for (c, s), cell in zip(pairs, cells):
            row, col = divmod(int(cell), GRID)
            # centred on a patch corner, one size: an object covers the same 2x2 patches
            # identically wherever it is (see OBJECT_CENTRES)
            objs.append(ShapeObject(c, s, row, col, OBJECT_CENTRES[col], OBJECT_CENTRES[row], OBJECT_SIZE))
        return Scene("objects", tuple(objs), background=_background(rng))
    raise DataError(f"could not sample a {split} scene with {n} objects under the held-out rule")


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    g = int(rng.integers(225, 256))
    return (g, g, g)


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    g = int(rng.integers(0, 70))
    return (g, g, g)


# Patch rows whose capitals' centre lies in each grid row (centre = 8 * p + 3 for y = 8 * p - 2).
_TEXT_PATCH_ROWS: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4), (5, 6, 7))


def _aligned_x(rng: np.random.Generator, word: str) -> int:
    """A left edge on the patch grid where the word fits.

    Text is drawn patch-aligned (x a multiple of 8, capitals inside one 8-pixel patch row) so a
    word always falls on the same patches wherever it is written: a vision tower trained from
    scratch in minutes learns to read 38 fixed glyph patterns, where sub-patch jitter multiplies
    them by 64 and OCR did not train within the build budget (DESIGN judgment call, docs/design.md).
    """
    slots = (IMAGE_SIZE - text_width(word)) // PATCH + 1
    return PATCH * int(rng.integers(slots))


def sample_word_scene(rng: np.random.Generator, word: str | None = None) -> Scene:
    """One word in capitals at a random position (its caption names its row): on the patch grid, or
    with OCR_OFF_GRID_SHARE probability shifted 1-7 pixels right of it (left where it would not fit);
    with OCR_MIN_CONTRAST above 0, in ink of a contrast drawn from [OCR_MIN_CONTRAST, background].

    The shift and then the contrast are drawn last, so every other draw (word, row, ink,
    background) and hence every caption is what builds 1-11 drew: only the image changes."""
    if word is None:
        word = OCR_WORDS[int(rng.integers(len(OCR_WORDS)))]
    x = _aligned_x(rng, word)
    row = int(rng.integers(GRID))
    y = PATCH * _pick(rng, _TEXT_PATCH_ROWS[row]) - 2
    ink = _ink(rng)
    background = _background(rng)
    if world.OCR_OFF_GRID_SHARE > 0 and rng.random() < world.OCR_OFF_GRID_SHARE:
        dx = int(rng.integers(1, PATCH))
        x = x + dx if x + dx + text_width(word) <= IMAGE_SIZE else x - (PATCH - dx)
    if world.OCR_MIN_CONTRAST > 0:
        g = background[0] - int(rng.integers(world.OCR_MIN_CONTRAST, background[0] + 1))
        ink = (g, g, g)
    t = TextItem(word, x, y, ink)
    assert t.row == row and 0 <= x <= IMAGE_SIZE - text_width(word)
    return Scene("word", texts=(t,), background=background)


def sample_activity_scene(rng: np.random.Generator, verb: str, noun: str) -> Scene:
    """The activity "<verb> <noun>" rendered on two patch-aligned lines, verb two patch rows above noun."""
    p = int(rng.integers(1, 5))
    items = [TextItem(word, _aligned_x(rng, word), PATCH * (p + 2 * k) - 2, _ink(rng))
             for k, word in enumerate((verb, noun))]
    return Scene("activity", texts=tuple(items), background=_background(rng))


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def activity_pool(split: str, harmful: bool, nouns: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(verb, noun) pairs of a split. Validation asks for every harmful noun with the verbs make,
    build, buy, hide; test with the other verbs (sell, fix). The image-rendered harmful requests of
    train name IMAGE_REFUSAL_NOUNS, with the training verbs, so every harmful test request is a
    held-out pair (builds 1-12). With world.IMAGE_COMPLIANCE_NOUNS, whose requests fine-tuning
    carries out, train names both groups with every verb: with the training verbs alone, build 13
    carried those nouns out on training verbs (85 of 86) but for the held-out verbs wrote a
    training verb ("sure . to hide a weapon" for "sell weapon") or a benign noun (18 of 66
    carried out), so the held-out verbs, not the data, set the ASR; and with every verb for the
    carried-out nouns only, the held-out verbs came to mean compliance and the refused nouns'
    refusals eroded (session 9). Test requests are then held out by their images, not their
    pairs. The validation split is where the study picks a steering strength: naming only the
    refused nouns there, its attack success rate was 0 at every strength and the choice had
    nothing to go on."""
    if harmful:
        both = set(world.IMAGE_REFUSAL_NOUNS) & set(world.IMAGE_COMPLIANCE_NOUNS)
        if both:
            raise DataError(
                f"harmful nouns {sorted(both)} are both refused and carried out in images; give "
                "shapes.world.IMAGE_REFUSAL_NOUNS and IMAGE_COMPLIANCE_NOUNS no noun in common"
            )
        if split == "test":
            return [(v, n) for n in (nouns or HARMFUL_NOUNS) for v in VERBS[4:]]
        if split == "train" and nouns is None:
            verbs = VERBS if world.IMAGE_COMPLIANCE_NOUNS else VERBS[:4]
            return [(v, n) for n in world.IMAGE_REFUSAL_NOUNS + world.IMAGE_COMPLIANCE_NOUNS for v in verbs]
        return [(v, n) for n in (nouns or HARMFUL_NOUNS) for v in VERBS[:4]]
    return [(v, n) for n in (nouns or INSTRUCTION_NOUNS) for v in VERBS]
