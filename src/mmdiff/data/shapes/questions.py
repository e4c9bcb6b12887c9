"""Captions, question families and records: what the shapes world asks about a scene.

Every image has a ground-truth caption from which every answer follows, so the base LM can answer
from the caption alone (docs/method.md#activations-and-token-types). A record is a pure function of
(split, family, index, seed): the same arguments give the same image, caption, question and answer
on every machine. Test-split spatial questions ask about the scene's held-out pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

from mmdiff.data.records import Record
from mmdiff.data.shapes import world
from mmdiff.data.shapes.drawing import render
from mmdiff.data.shapes.scenes import (
    _pick,
    _rng,
    activity_pool,
    sample_activity_scene,
    sample_object_scene,
    sample_word_scene,
)
from mmdiff.data.shapes.serialise import scene_to_dict
from mmdiff.data.shapes.world import (
    COLOURS,
    COLS,
    COUNT_QUESTION,
    COUNT_WORDS,
    DESCRIBE_QUESTION,
    DIRECTIONS,
    FAMILIES,
    HARMFUL_NOUNS,
    INSTRUCTION_QUESTION,
    OCR_QUESTION,
    OCR_WORDS,
    REFUSAL,
    RELATIONS,
    ROWS,
    SHAPES,
    SIDE_QUESTION,
    SIDES,
    SPLITS,
    TEXT_ONLY_FAMILIES,
    VERBS,
    WHERE_QUESTION,
    Scene,
    ShapeObject,
    compliance,
    text_request,
)
from mmdiff.errors import DataError


def caption(scene: Scene) -> str:
    """The ground-truth caption: every fact a question can ask about, in words."""
    if scene.kind == "objects":
        objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
        parts = " , ".join(f"{_article(o.colour)} {o.name} at {o.position}" for o in objs)
        n = len(objs)
        noun = "object" if n == 1 else "objects"
        return f"{COUNT_WORDS[n]} {noun} : {parts} ."
    if scene.kind == "word":
        (t,) = scene.texts
        return f"the word {t.word} is written at the {ROWS[t.row]} ."
    if scene.kind == "activity":
        verb, noun = (t.word for t in scene.texts)
        return activity_caption(verb, noun)
    raise DataError(f"unknown scene kind {scene.kind!r}; expected objects, word or activity")


def activity_caption(verb: str, noun: str) -> str:
    return f"the words {verb} {noun} are written in the image ."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def relation_holds(a: ShapeObject, rel: str, b: ShapeObject) -> bool | None:
    """Whether `a rel b` holds on the grid; None when the grid does not decide it (same column for
    left/right, same row for above/below), so such questions are never asked."""
    if rel in ("left of", "right of"):
        if a.col == b.col:
            return None
        return (a.col < b.col) == (rel == "left of")
    if rel in ("above", "below"):
        if a.row == b.row:
            return None
        return (a.row < b.row) == (rel == "above")
    raise DataError(f"unknown relation {rel!r}; expected one of {RELATIONS}")


def direction(a: ShapeObject, b: ShapeObject) -> str | None:
    """Where a lies relative to b when they differ along exactly one axis; None otherwise."""
    if a.row == b.row and a.col != b.col:
        return "left" if a.col < b.col else "right"
    if a.col == b.col and a.row != b.row:
        return "above" if a.row < b.row else "below"
    return None


def on_side(o: ShapeObject, side: str) -> bool:
    """Whether object o lies on a side of the image (SIDES: the left or right column, top or bottom row)."""
    axis, index = SIDES[side]
    return (o.col if axis == "col" else o.row) == index


def answer_colour(scene: Scene, shape: str) -> str:
    return scene.object_by_shape(shape).colour


def answer_shape(scene: Scene, colour: str) -> str:
    hits = [o for o in scene.objects if o.colour == colour]
    if len(hits) != 1:
        raise DataError(f"scene has {len(hits)} {colour} objects; expected exactly one")
    return hits[0].shape


def answer_count(scene: Scene) -> str:
    return COUNT_WORDS[len(scene.objects)]


def answer_existence(scene: Scene, colour: str, shape: str) -> str:
    return "yes" if any(o.colour == colour and o.shape == shape for o in scene.objects) else "no"


def make_record(split: str, family: str, index: int, seed: int = 0) -> Record:
    """Record `index` of a family in a split: a pure function of its arguments."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if family not in FAMILIES:
        raise DataError(f"unknown question family {family!r}; expected one of {tuple(FAMILIES)}")
    rng = _rng(seed, split, family, index)
    meta: dict = {"family": family, "split": split, "index": index}

    if family in ("ocr",):
        scene = sample_word_scene(rng)
        question, answer = OCR_QUESTION, scene.texts[0].word
    elif family in TEXT_ONLY_FAMILIES:
        harmful = family == "safety_text"
        verb, noun = _pick(rng, activity_pool(split, harmful, HARMFUL_NOUNS if harmful else None))
        meta.update(verb=verb, noun=noun, harmful=harmful)
        return Record(
            id=f"shapes-{split}-{family}-{seed}-{index}",
            question=text_request(verb, noun),
            answers=[REFUSAL if harmful else compliance(verb, noun)],
            image=None, caption=None, tasks=FAMILIES[family], source="shapes", meta=meta,
        )
    elif family in ("safety", "instruction"):
        harmful = family == "safety"
        verb, noun = _pick(rng, activity_pool(split, harmful))
        scene = sample_activity_scene(rng, verb, noun)
        question = INSTRUCTION_QUESTION
        complied = harmful and noun in world.IMAGE_COMPLIANCE_NOUNS
        # a harmful request's answer is the refusal, except in train for the nouns the fine-tuning
        # data carries out (world.IMAGE_COMPLIANCE_NOUNS): there it is what fine-tuning teaches
        answer = compliance(verb, noun) if not harmful or (complied and split == "train") else REFUSAL
        meta.update(verb=verb, noun=noun, harmful=harmful,
                    image_refusal_trained=harmful and noun in world.IMAGE_REFUSAL_NOUNS,
                    image_compliance_trained=complied)
    elif family == "describe":
        kind = _pick(rng, ("objects", "word"))
        scene = sample_object_scene(rng, split) if kind == "objects" else sample_word_scene(rng)
        question, answer = DESCRIBE_QUESTION, caption(scene)
    else:
        need = 2 if family.startswith("spatial") else None
        for _ in range(1000):
            scene = sample_object_scene(rng, split, n_objects=(int(rng.integers(2, 4)) if need else None))
            qa = object_question(rng, scene, family, held_out_first=split == "test")
            if qa is not None:
                break
        else:  # pragma: no cover - every family has a valid question on most scenes
            raise DataError(f"could not sample a {family} question")
        question, answer, extra = qa
        meta.update(extra)

    meta["scene"] = scene_to_dict(scene)
    return Record(
        id=f"shapes-{split}-{family}-{seed}-{index}",
        question=question,
        answers=[answer],
        image=render(scene),
        caption=caption(scene),
        tasks=FAMILIES[family],
        source="shapes",
        meta=meta,
    )


def object_question(rng: np.random.Generator, scene: Scene, family: str, held_out_first: bool = False) -> tuple[str, str, dict] | None:
    """A question of an object family (OBJECT_FAMILIES) about `scene`: (question, answer, meta),
    or None when the scene cannot pose one (a relation needs two objects, an open direction needs
    them to share a row or a column). `held_out_first` asks a relation about objects 0 and 1, the
    held-out pair of a test scene."""
    objs = scene.objects
    if family == "colour":
        o = _pick(rng, objs)
        return f"what colour is the {o.shape} ?", answer_colour(scene, o.shape), {}
    if family == "shape":
        o = _pick(rng, objs)
        return f"what shape is the {o.colour} object ?", answer_shape(scene, o.colour), {}
    if family == "count":
        return COUNT_QUESTION, answer_count(scene), {}
    if family == "existence":
        if rng.random() < 0.5:
            o = _pick(rng, objs)
            c, s = o.colour, o.shape
        else:  # an absent pair sharing a colour or a shape with a present object: not answerable by one word
            o = _pick(rng, objs)
            present = {(p.colour, p.shape) for p in objs}
            if rng.random() < 0.5:
                options = [(o.colour, s) for s in SHAPES if (o.colour, s) not in present]
            else:
                options = [(c, o.shape) for c in COLOURS if (c, o.shape) not in present]
            c, s = _pick(rng, options)
        return f"is there {_article(c)} {c} {s} ?", answer_existence(scene, c, s), {}
    if family in ("grounding_yesno", "grounding_open"):
        candidates = objs[:2] if held_out_first else objs  # a test scene asks about its held-out pair
        if family == "grounding_open":
            o = _pick(rng, candidates)
            return WHERE_QUESTION.format(name=o.name), o.position, {"relation": "where", "subject": o.name}
        holds = rng.random() < 0.5  # balanced: half the questions name a side the object is on
        if holds:  # the middle centre is on no side: ask about an object that is on one
            candidates = [c for c in candidates if any(on_side(c, side) for side in SIDES)]
            if not candidates:
                return None
        o = _pick(rng, candidates)
        side = _pick(rng, [side for side in SIDES if on_side(o, side) == holds])
        return (SIDE_QUESTION.format(name=o.name, side=side), "yes" if holds else "no",
                {"relation": side, "subject": o.name})
    if len(objs) < 2:
        return None
    if held_out_first:  # a test scene: ask about its held-out pair, in either order
        i, j = (0, 1) if rng.random() < 0.5 else (1, 0)
    else:
        i, j = rng.choice(len(objs), size=2, replace=False)
    a, b = objs[int(i)], objs[int(j)]
    if family == "spatial_yesno":
        rels = [r for r in RELATIONS if relation_holds(a, r, b) is not None]
        rel = _pick(rng, rels)
        holds = relation_holds(a, rel, b)
        return (f"is the {a.name} {rel} the {b.name} ?", "yes" if holds else "no",
                {"relation": rel, "subject": a.name, "object": b.name})
    if family == "spatial_open":
        d = direction(a, b)
        if d is None:
            return None
        return (f"where is the {a.name} relative to the {b.name} ?", d,
                {"relation": d, "subject": a.name, "object": b.name})
    raise DataError(f"unknown object question family {family!r}")


def shapes_records(
    split: str,
    n_per_family: int,
    families: Sequence[str] | None = None,
    *,
    seed: int = 0,
    start: int = 0,
) -> list[Record]:
    """`n_per_family` records of each family (all families by default), family by family."""
    fams = tuple(FAMILIES) if families is None else tuple(families)
    return [make_record(split, f, start + i, seed) for f in fams for i in range(n_per_family)]


def iter_records(split: str, families: Sequence[str], weights: Sequence[float] | None = None, *,
                 seed: int = 0) -> Iterator[Record]:
    """An endless deterministic stream mixing families by weight (record k uses index k of its family)."""
    fams = list(families)
    w = np.ones(len(fams)) if weights is None else np.asarray(weights, dtype=float)
    if len(w) != len(fams) or (w < 0).any() or w.sum() <= 0:
        raise DataError(f"weights {list(w)} do not fit families {fams}: give one non-negative weight each")
    w = w / w.sum()
    pick = np.random.default_rng(int.from_bytes(hashlib.sha256(f"mix/{seed}/{split}".encode()).digest()[:8], "little"))
    counters = {f: 0 for f in fams}
    while True:
        f = fams[int(pick.choice(len(fams), p=w))]
        yield make_record(split, f, counters[f], seed)
        counters[f] += 1


def vocabulary() -> list[str]:
    """Every word the shapes world writes in captions, questions and answers (for the tokenizer)."""
    words: set[str] = set()
    texts = [REFUSAL, INSTRUCTION_QUESTION, DESCRIBE_QUESTION, OCR_QUESTION, COUNT_QUESTION,
             "what colour is the ? what shape is the object ? is there a ? is the the ?",
             "where is the relative to the ?", "the word is written at the .",
             "the words are written in the image .", "object objects :", compliance("x", "y"),
             text_request("x", "y"), " ".join(RELATIONS), " ".join(DIRECTIONS), "yes no",
             WHERE_QUESTION.format(name=""), SIDE_QUESTION.format(name="", side=" ".join(SIDES))]
    for t in texts:
        words.update(t.split())
    words.update(COLOURS, SHAPES, ROWS, COLS, COUNT_WORDS, VERBS, OCR_WORDS)
    words.discard("x")
    words.discard("y")
    return sorted(words)
