"""The shapes world: a seeded generator of small scenes, their captions and tagged questions.

Each 64x64 RGB image holds either 1-3 coloured objects on a 3x3 grid of cells, one rendered word
(OCR), or a two-word activity rendered as text (the FigStep-style typographic attack when the
activity is harmful). Every image has a ground-truth caption from which every answer follows, so
the base LM can answer from the caption alone. Records are a pure function of (split, family,
index, seed), and the test split holds out pairs of objects that never share a training scene.

The package is split along its seams, each module reading only those above it:
- `world`: vocabulary, geometry, question families, fixed strings, held-out pairs, the dataclasses;
- `drawing`: the renderer (Pillow's embedded bitmap font, identical on every machine);
- `scenes`: the seeded scene sampler and the activity pools of each split;
- `serialise`: a scene as the JSON-ready dict a record keeps in meta["scene"], and back;
- `questions`: captions, answers, question families, records and record streams, the vocabulary.
Callers import from `mmdiff.data.shapes`, which re-exports the public names of all five.
"""

from mmdiff.data.shapes.drawing import render, text_width
from mmdiff.data.shapes.questions import (
    activity_caption,
    answer_colour,
    answer_count,
    answer_existence,
    answer_shape,
    caption,
    direction,
    iter_records,
    make_record,
    object_question,
    on_side,
    relation_holds,
    shapes_records,
    vocabulary,
)
from mmdiff.data.shapes.scenes import (
    activity_pool,
    sample_activity_scene,
    sample_object_scene,
    sample_word_scene,
)
from mmdiff.data.shapes.serialise import scene_from_dict, scene_to_dict
from mmdiff.data.shapes.world import (
    BENIGN_NOUNS,
    CELL,
    COLOURS,
    COLS,
    COUNT_QUESTION,
    COUNT_WORDS,
    DEFAULT_BACKGROUND,
    DEFAULT_INK,
    DESCRIBE_QUESTION,
    DIRECTIONS,
    FAMILIES,
    GRID,
    HARMFUL_NOUNS,
    HELD_OUT_PAIRS,
    IMAGE_COMPLIANCE_NOUNS,
    IMAGE_REFUSAL_NOUNS,
    IMAGE_SIZE,
    INSTRUCTION_NOUNS,
    INSTRUCTION_QUESTION,
    NEUTRAL_WORDS,
    OCR_MIN_CONTRAST,
    OCR_OFF_GRID_SHARE,
    OBJECT_CENTRES,
    OBJECT_FAMILIES,
    OBJECT_SIZE,
    OCR_QUESTION,
    OCR_WORDS,
    PATCH,
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
    TextItem,
    compliance,
    held_out_pair,
    row_of,
    text_request,
)

__all__ = [
    "BENIGN_NOUNS", "CELL", "COLOURS", "COLS", "COUNT_QUESTION", "COUNT_WORDS",
    "DEFAULT_BACKGROUND", "DEFAULT_INK", "DESCRIBE_QUESTION", "DIRECTIONS", "FAMILIES", "GRID",
    "HARMFUL_NOUNS", "HELD_OUT_PAIRS", "IMAGE_COMPLIANCE_NOUNS", "IMAGE_REFUSAL_NOUNS", "IMAGE_SIZE", "INSTRUCTION_NOUNS",
    "INSTRUCTION_QUESTION", "NEUTRAL_WORDS", "OBJECT_CENTRES", "OBJECT_FAMILIES", "OBJECT_SIZE",
    "OCR_MIN_CONTRAST", "OCR_OFF_GRID_SHARE", "OCR_QUESTION", "OCR_WORDS", "PATCH", "REFUSAL", "RELATIONS", "ROWS", "SHAPES", "SIDE_QUESTION",
    "SIDES", "SPLITS", "WHERE_QUESTION", "on_side",
    "TEXT_ONLY_FAMILIES", "VERBS", "Scene", "ShapeObject", "TextItem", "activity_caption",
    "activity_pool", "answer_colour", "answer_count", "answer_existence", "answer_shape", "caption",
    "compliance", "direction", "held_out_pair", "iter_records", "make_record", "object_question",
    "relation_holds", "render", "row_of", "sample_activity_scene", "sample_object_scene",
    "sample_word_scene", "scene_from_dict", "scene_to_dict", "shapes_records", "text_request",
    "text_width", "vocabulary",
]
