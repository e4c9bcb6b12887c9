"""What each training stage of the organism reads: deterministic streams of shapes-world records."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from mmdiff.data import shapes
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError

# Base LM (text only): every family through its caption, the direct text requests, and refusals of
# every harmful noun (the base LM refuses all of them; the VLM is only shown some as images).
BASE_MIX: dict[str, float] = {
    "colour": 1.5, "shape": 0.75, "lookup": 2.0, "count": 0.25, "existence": 1.0, "spatial_yesno": 2.0,
    "spatial_open": 1.0, "ocr": 0.25, "instruction": 0.25, "safety_caption": 0.5, "describe": 0.25,
    "safety_text": 1.0, "instruction_text": 0.25,
}
# The base LM's first steps (OrganismConfig.base_object_steps): questions about objects and look-up
# completions only, so the heads that bind a name to its attributes in the caption form before the
# rest of the mixture competes for them.
BASE_OBJECT_MIX: dict[str, float] = {
    f: BASE_MIX[f] for f in ("colour", "shape", "lookup", "count", "existence", "spatial_yesno", "spatial_open")
}
# The base LM's second phase (OrganismConfig.base_grounding): the whole base mixture, plus
# grounding questions about one object's place and position look-up completions (the look-up that
# taught colour and shape questions, here for places: measured in docs/design.md).
POSITION_LOOKUP = "position_lookup"
"""Record.meta["family"] of the base LM's position look-ups (position_lookup_record) and their mix key."""
BASE_GROUNDING_MIX: dict[str, float] = {
    **BASE_MIX, "grounding_open": 1.0, "grounding_yesno": 1.5, POSITION_LOOKUP: 1.5,
}
# LLaVA stage 1 (alignment): image -> caption.
STAGE1_MIX: dict[str, float] = {"describe": 1.0}
# LLaVA stage 2 (instruction tuning): questions about images, benign typographic instructions to
# follow, and image-rendered harmful requests (IMAGE_REFUSAL_NOUNS only) answered with refusals.
STAGE2_MIX: dict[str, float] = {
    "colour": 1.0, "shape": 1.0, "count": 1.0, "existence": 1.5, "spatial_yesno": 2.5,
    "spatial_open": 1.0, "ocr": 2.0, "instruction": 1.5, "safety": 0.5, "describe": 0.5,
}
# Build 12's stage-2 mixture (OrganismConfig.stage2_mix): grounding questions beside the relations.
# Written out, not derived from STAGE2_MIX: the families' order is part of the stream's seed (stream).
STAGE2_GROUNDING_BUILD_MIX: dict[str, float] = {
    "colour": 1.0, "shape": 1.0, "count": 1.0, "existence": 1.5, "spatial_yesno": 1.5,
    "spatial_open": 0.5, "grounding_yesno": 2.0, "grounding_open": 1.0, "ocr": 2.0, "instruction": 1.5,
    "safety": 0.5, "describe": 0.5,
}
# The first steps of stage 2 (OrganismConfig.stage2_grounding_steps): "where is the red circle ?"
# only, so the language model learns to look an object up in the image by its place before the
# rest of the mixture competes (within the whole mixture it did not start in 200 steps; alone, it
# answered single objects at 1.00 and 2-3 object test scenes at 0.46 after 200: docs/design.md).
STAGE2_GROUNDING_MIX: dict[str, float] = {"grounding_open": 1.0}


# The shipped recipe's mixtures (build 15; OrganismConfig's defaults). The families' order is part
# of each stream's seed (stream), so a reordering would train another organism. Against build 12's (above), the side yes/no ("is the red circle at the left ?") weighs
# 4x more in the base grounding phase (the base LM answered it from the caption at 0.58 with 1.5,
# floor 0.56, and 0.88 after 800 steps at 6), twice as much in stage 2 (2.0 -> 4.0), and the
# second stage-2 phase, build 11's mixture plus the grounding pair, gives it 3 and "where" 0.75
# (build 13, at 4 and 0.5 for 1,500 steps, left colour and existence below their targets; build
# 14, at 2.5 and 0.5 for 2,400, the side yes/no and "where" just below theirs: organism README).
RECIPE_BASE_GROUNDING_MIX: dict[str, float] = {
    **BASE_MIX, "grounding_open": 1.0, "grounding_yesno": 6.0, POSITION_LOOKUP: 1.5,
}
# Each is an earlier mixture with weights changed in place or families appended, which keeps the
# earlier key order (tests/test_organism.py holds it to the shipped manifest's).
RECIPE_STAGE2_MIX: dict[str, float] = {**STAGE2_GROUNDING_BUILD_MIX, "grounding_yesno": 4.0}
RECIPE_STAGE2_GROUNDING_MIX: dict[str, float] = {**STAGE2_MIX, "grounding_yesno": 3.0, "grounding_open": 0.75}


FOLLOW_UPS = "follow_ups"
"""Record.meta key of a stage-2 conversation's later turns, [[question, answer], ...]
(with_follow_ups; organism.batches.vlm_batch trains on every answer)."""


def with_follow_ups(record: Record, turns: int, seed: int, mix: dict[str, float] | None = None) -> Record:
    """`record` as a conversation of `turns` question-answer turns about its object scene.

    LLaVA's instruction data (LLaVA-Instruct) is multi-turn: one image, several questions and
    answers, the loss on every answer. Here the later questions are drawn from the object families
    of STAGE2_MIX, by its weights, about the record's own scene, so a step trains up to `turns`
    answers about objects for one image. Records of other families (no object scene) and
    `turns` = 1 come back unchanged. A family the scene cannot pose (a relation about one object)
    is redrawn. A later question may be answered by an earlier answer ("what colour is the circle
    ?" "red", then "what shape is the red object ?"), as in LLaVA's conversations; the first turn
    never is. Deterministic in (record.id, turns, seed).
    """
    if turns < 2 or record.meta.get("family") not in shapes.OBJECT_FAMILIES:
        return record
    mix = STAGE2_MIX if mix is None else mix
    fams = [f for f in mix if f in shapes.OBJECT_FAMILIES]
    p = np.asarray([mix[f] for f in fams], dtype=float)
    p = p / p.sum()
    key = hashlib.sha256(f"follow-ups/{seed}/{record.id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    scene = shapes.scene_from_dict(record.meta["scene"])
    later: list[list[str]] = []
    for _ in range(8 * turns):  # a scene cannot pose every family (no relation on one object): redraw
        if len(later) == turns - 1:
            break
        qa = shapes.object_question(rng, scene, fams[int(rng.choice(len(fams), p=p))])
        if qa is not None:
            later.append([qa[0], qa[1]])
    return replace(record, meta={**record.meta, FOLLOW_UPS: later})


def stage2_stream(seed: int, turns: int, split: str = "train", grounding_records: int = 0,
                  mix: dict[str, float] | None = None) -> Iterator[Record]:
    """LLaVA stage 2's records: `grounding_records` from STAGE2_GROUNDING_MIX, then `mix`
    (STAGE2_MIX by default), each object question the first of `turns` turns."""
    mix = STAGE2_MIX if mix is None else mix
    grounding = stream(STAGE2_GROUNDING_MIX, seed, split)
    for _ in range(grounding_records):
        yield with_follow_ups(next(grounding), turns, seed, mix)
    for record in stream(mix, seed, split):
        yield with_follow_ups(record, turns, seed, mix)


def safety_caption_record(index: int, seed: int, split: str = "train") -> Record:
    """An image-rendered harmful request seen through its caption, over every harmful noun."""
    key = hashlib.sha256(f"safety_caption/{seed}/{split}/{index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    pool = shapes.activity_pool(split, True, shapes.HARMFUL_NOUNS)
    verb, noun = pool[int(rng.integers(len(pool)))]
    return Record(
        id=f"shapes-{split}-safety_caption-{seed}-{index}",
        question=shapes.INSTRUCTION_QUESTION,
        answers=[shapes.REFUSAL],
        caption=shapes.activity_caption(verb, noun),
        tasks=("safety",),
        source="shapes",
        meta={"family": "safety_caption", "verb": verb, "noun": noun, "harmful": True},
    )


LOOKUP = "lookup"
"""The base LM's look-up completions (lookup_record): Record.meta["family"] and BASE_MIX's key."""
LOOKUP_COLOUR_SHARE = 2 / 3
"""Share of look-up completions cued by a shape and completed with its colour (the backward
look-up: the colour precedes the shape in the caption); the rest are cued by a colour."""


def lookup_record(index: int, seed: int, split: str = "train") -> Record:
    """A look-up completion: an object scene's caption, then one of its objects' shape (or colour)
    as a bare cue, completed with that object's colour (or shape): "... a red circle at top left ,
    ... .\ncircle" -> "red".

    This is the in-context recall a real LM meets throughout pretraining (an entity named again,
    its attribute next), stripped to the cue word right before the answer. The 4-layer base LM did
    not learn the question form of these look-ups ("what colour is the circle ?", whose cue sits
    three tokens before the answer) in 2,000 steps on questions alone: it settled on a head that
    copies any colour of the caption, 0.40 on 2-3 objects. With half of those questions turned into
    look-up completions it answered the questions at 0.99 after 1,000 steps (docs/design.md).
    """
    key = hashlib.sha256(f"lookup/{seed}/{split}/{index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    scene = shapes.sample_object_scene(rng, split)
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    cue, answer = (obj.shape, obj.colour) if rng.random() < LOOKUP_COLOUR_SHARE else (obj.colour, obj.shape)
    return Record(
        id=f"shapes-{split}-{LOOKUP}-{seed}-{index}",
        question=cue,
        answers=[answer],
        caption=shapes.caption(scene),
        tasks=("vqa",),
        source="shapes",
        meta={"family": LOOKUP, "cue": cue, "scene": shapes.scene_to_dict(scene)},
    )


def position_lookup_record(index: int, seed: int, split: str = "train") -> Record:
    """A position look-up completion: an object scene's caption, then one object's name and "at",
    completed with its cell: "... a red circle at top left , ... .\nred circle at" -> "top left".

    What a pretrained LM meets whenever an entity is named again with its place. The continued
    base LM (4 layers) answered "where is the red circle ?" at 0.17 after 400 steps of the questions
    alone, and at 0.72 after 1,200 with these completions beside them (docs/design.md). Trained as
    a look-up (organism.batches reads the LOOKUP prompt for both)."""
    key = hashlib.sha256(f"{POSITION_LOOKUP}/{seed}/{split}/{index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    scene = shapes.sample_object_scene(rng, split)
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    return Record(
        id=f"shapes-{split}-{POSITION_LOOKUP}-{seed}-{index}",
        question=f"{obj.name} at",
        answers=[obj.position],
        caption=shapes.caption(scene),
        tasks=("spatial",),
        source="shapes",
        meta={"family": POSITION_LOOKUP, "cue": obj.name, "scene": shapes.scene_to_dict(scene)},
    )


def base_stream(seed: int, object_records: int = 0) -> Iterator[Record]:
    """The base LM's records: `object_records` from BASE_OBJECT_MIX, then BASE_MIX without end."""
    objects = stream(BASE_OBJECT_MIX, seed)
    for _ in range(object_records):
        yield next(objects)
    yield from stream(BASE_MIX, seed)


# The families made here rather than by shapes.make_record: the base LM's text-only records.
_RECORD_MAKERS = {"safety_caption": safety_caption_record, LOOKUP: lookup_record, POSITION_LOOKUP: position_lookup_record}


def check_families(*mixes: dict[str, float] | None) -> None:
    """Refuse a recipe mixture naming a family `stream` cannot make, before any training starts
    (`stream` would otherwise fail when it first draws it, possibly an hour into a build)."""
    known = set(shapes.FAMILIES) | set(_RECORD_MAKERS)
    for mix in mixes:
        unknown = sorted(set(mix or {}) - known)
        if unknown:
            raise ConfigError(f"mixture {mix} names unknown families {unknown}; expected some of {sorted(known)}")


def stream(mix: dict[str, float], seed: int, split: str = "train") -> Iterator[Record]:
    """An endless, deterministic stream of records mixing families by weight."""
    fams = list(mix)
    p = np.asarray([mix[f] for f in fams], dtype=float)
    p = p / p.sum()
    key = hashlib.sha256(f"organism-mix/{seed}/{split}/{','.join(fams)}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    counters = dict.fromkeys(fams, 0)
    while True:
        f = fams[int(rng.choice(len(fams), p=p))]
        k = counters[f]
        counters[f] += 1
        make = _RECORD_MAKERS.get(f)
        yield make(k, seed, split) if make is not None else shapes.make_record(split, f, k, seed)
