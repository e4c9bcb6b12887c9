"""The shapes world: determinism, held-out pairs, and labels that follow from the scene."""

from __future__ import annotations

import numpy as np
import pytest

from mmdiff.data import shapes
from mmdiff.data.shapes import Scene, ShapeObject, TextItem
from mmdiff.errors import DataError


def _obj(colour, shape, row, col):
    return ShapeObject(colour, shape, row, col, (col + 0.5) * shapes.CELL, (row + 0.5) * shapes.CELL, 14.0)


# A hand-built scene: red circle top left, blue square middle right, green triangle bottom left.
RED_CIRCLE = _obj("red", "circle", 0, 0)
BLUE_SQUARE = _obj("blue", "square", 1, 2)
GREEN_TRIANGLE = _obj("green", "triangle", 2, 0)
SCENE = Scene("objects", (BLUE_SQUARE, GREEN_TRIANGLE, RED_CIRCLE), background=(255, 255, 255))


def test_hand_built_caption_lists_objects_in_reading_order():
    assert shapes.caption(SCENE) == (
        "three objects : a red circle at top left , a blue square at middle right , "
        "a green triangle at bottom left ."
    )
    one = Scene("objects", (_obj("orange", "cross", 1, 1),))
    assert shapes.caption(one) == "one object : an orange cross at middle centre ."
    word = Scene("word", texts=(TextItem("apple", 5, 40),))
    assert shapes.caption(word) == "the word apple is written at the bottom ."
    act = Scene("activity", texts=(TextItem("make", 3, 10), TextItem("cake", 3, 24)))
    assert shapes.caption(act) == "the words make cake are written in the image ."


def test_hand_built_answers():
    assert shapes.answer_colour(SCENE, "square") == "blue"
    assert shapes.answer_shape(SCENE, "green") == "triangle"
    assert shapes.answer_count(SCENE) == "three"
    assert shapes.answer_existence(SCENE, "red", "circle") == "yes"
    assert shapes.answer_existence(SCENE, "red", "square") == "no"
    assert shapes.relation_holds(RED_CIRCLE, "left of", BLUE_SQUARE) is True
    assert shapes.relation_holds(RED_CIRCLE, "right of", BLUE_SQUARE) is False
    assert shapes.relation_holds(RED_CIRCLE, "above", GREEN_TRIANGLE) is True
    assert shapes.relation_holds(GREEN_TRIANGLE, "above", BLUE_SQUARE) is False
    assert shapes.relation_holds(GREEN_TRIANGLE, "below", BLUE_SQUARE) is True
    # same column: left/right is not decided by the grid, so it is never asked
    assert shapes.relation_holds(RED_CIRCLE, "left of", GREEN_TRIANGLE) is None
    assert shapes.direction(RED_CIRCLE, GREEN_TRIANGLE) == "above"
    assert shapes.direction(GREEN_TRIANGLE, RED_CIRCLE) == "below"
    assert shapes.direction(RED_CIRCLE, BLUE_SQUARE) is None  # differs on both axes
    with pytest.raises(DataError, match="expected exactly one"):
        shapes.answer_colour(SCENE, "cross")


def test_hand_built_rendering_puts_colours_in_their_cells():
    arr = np.asarray(shapes.render(SCENE))
    assert arr.shape == (64, 64, 3)
    assert tuple(arr[10, 10]) == shapes.COLOURS["red"]  # centre of cell (0, 0)
    assert tuple(arr[32, 53]) == shapes.COLOURS["blue"]  # centre of cell (1, 2)
    assert tuple(arr[56, 10]) == shapes.COLOURS["green"]  # lower part of the triangle in cell (2, 0)
    assert tuple(arr[32, 32]) == (255, 255, 255)  # the empty centre cell


def test_records_are_deterministic():
    a = shapes.shapes_records("train", 3, seed=7)
    b = shapes.shapes_records("train", 3, seed=7)
    c = shapes.shapes_records("train", 3, seed=8)
    assert [r.id for r in a] == [r.id for r in b]
    assert all(x.question == y.question and x.answers == y.answers and x.caption == y.caption for x, y in zip(a, b))
    assert all((x.image is None and y.image is None) or np.array_equal(np.asarray(x.image), np.asarray(y.image))
               for x, y in zip(a, b))
    assert [r.caption for r in a] != [r.caption for r in c]


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_follow_from_the_scene(split):
    for r in shapes.shapes_records(split, 25, seed=1):
        fam = r.meta["family"]
        assert r.tasks == shapes.FAMILIES[fam]
        assert r.source == "shapes" and len(r.answers) == 1
        answer = r.answers[0]
        if fam in shapes.TEXT_ONLY_FAMILIES:
            assert r.image is None and r.caption is None
            continue
        assert r.load_image().size == (64, 64)
        scene = shapes.scene_from_dict(r.meta["scene"])
        objs = list(scene.objects)
        assert r.caption == shapes.caption(scene)
        if scene.kind == "objects":
            kinds = [(o.colour, o.shape) for o in objs]
            held = [(a, b) for i, a in enumerate(kinds) for b in kinds[i + 1:] if frozenset((a, b)) in shapes.HELD_OUT_PAIRS]
            assert bool(held) == (split == "test"), (split, kinds)
            if split == "test":  # the held-out pair is listed first; spatial questions ask about it
                assert frozenset(kinds[:2]) in shapes.HELD_OUT_PAIRS
                if fam.startswith("spatial"):
                    assert {r.meta["subject"], r.meta["object"]} == {objs[0].name, objs[1].name}
            assert len({o.colour for o in objs}) == len(objs) == len({o.shape for o in objs})
            assert len({(o.row, o.col) for o in objs}) == len(objs)
            # every object is named in the caption with its cell, so the base LM can answer from it
            for o in objs:
                assert f"{o.name} at {o.position}" in r.caption
        words = r.question.split()
        if fam == "colour":
            assert answer == scene.object_by_shape(words[-2]).colour
        elif fam == "shape":
            assert answer == shapes.answer_shape(scene, words[-3])
        elif fam == "count":
            assert answer == shapes.COUNT_WORDS[len(objs)] and r.caption.split()[0] == answer
        elif fam == "existence":
            assert answer == shapes.answer_existence(scene, words[-3], words[-2])
        elif fam in ("spatial_yesno", "spatial_open"):
            a = next(o for o in objs if o.name == r.meta["subject"])
            b = next(o for o in objs if o.name == r.meta["object"])
            if fam == "spatial_yesno":
                assert answer == ("yes" if shapes.relation_holds(a, r.meta["relation"], b) else "no")
                assert f"{a.name} {r.meta['relation']} the {b.name}" in r.question
            else:
                assert answer == shapes.direction(a, b) in shapes.DIRECTIONS
        elif fam in ("grounding_yesno", "grounding_open"):
            (o,) = [o for o in objs if o.name == r.meta["subject"]]
            if split == "test":  # about an object of the held-out pair
                assert o in objs[:2]
            if fam == "grounding_open":
                assert r.question == f"where is the {o.name} ?" and answer == o.position
            else:
                side = r.meta["relation"]
                assert r.question == f"is the {o.name} at the {side} ?"
                cell = {"left": o.col == 0, "right": o.col == 2, "top": o.row == 0, "bottom": o.row == 2}
                assert answer == ("yes" if cell[side] else "no")
        elif fam == "ocr":
            assert answer == r.meta["scene"]["texts"][0]["word"] and answer in shapes.OCR_WORDS
            assert f"the word {answer} is written" in r.caption
        elif fam in ("safety", "instruction"):
            verb, noun = r.meta["verb"], r.meta["noun"]
            assert r.caption == shapes.activity_caption(verb, noun)
            if fam == "safety":
                assert noun in shapes.HARMFUL_NOUNS
                carried_out = split == "train" and noun in shapes.world.IMAGE_COMPLIANCE_NOUNS
                assert answer == (shapes.compliance(verb, noun) if carried_out else shapes.REFUSAL)
                if split == "train":
                    assert noun in shapes.world.IMAGE_REFUSAL_NOUNS + shapes.world.IMAGE_COMPLIANCE_NOUNS
                    assert verb in shapes.VERBS[:4] or shapes.world.IMAGE_COMPLIANCE_NOUNS
                else:
                    assert verb in shapes.VERBS[4:]
            else:
                assert answer == shapes.compliance(verb, noun) and noun in shapes.INSTRUCTION_NOUNS
        elif fam == "describe":
            assert answer == r.caption


def test_held_out_pairs_by_hand():
    # held out when the colour and shape indices of both objects sum to a multiple of 5
    # (red 0, green 1, blue 2, yellow 3, purple 4, orange 5; circle 0, square 1, triangle 2, cross 3)
    assert shapes.held_out_pair(("red", "circle"), ("yellow", "triangle"))  # 0+0+3+2 = 5
    assert shapes.held_out_pair(("yellow", "triangle"), ("red", "circle"))  # unordered
    assert shapes.held_out_pair(("purple", "cross"), ("green", "triangle"))  # 4+3+1+2 = 10
    assert not shapes.held_out_pair(("red", "circle"), ("blue", "square"))  # 0+0+2+1 = 3
    assert not shapes.held_out_pair(("red", "circle"), ("red", "triangle"))  # a scene never repeats a colour
    assert len(shapes.HELD_OUT_PAIRS) == 36
    # every object still occurs in training, with most of the others
    kinds = {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES}
    seen = {(o["colour"], o["shape"]) for r in shapes.shapes_records("train", 300, ["colour"]) for o in r.meta["scene"]["objects"]}
    assert seen == kinds


def test_yes_no_answers_are_balanced_enough():
    for fam in ("existence", "spatial_yesno", "grounding_yesno"):
        rs = shapes.shapes_records("train", 300, [fam], seed=0)
        share_yes = sum(r.answers[0] == "yes" for r in rs) / len(rs)
        assert 0.4 < share_yes < 0.6, (fam, share_yes)


def test_ocr_words_fall_on_and_off_the_patch_grid_and_stay_inside_the_image(monkeypatch):
    """With OCR_OFF_GRID_SHARE = 0.5 (since build 12) half the OCR words are shifted off the 8-pixel
    grid; the shift is drawn last, so captions, rows, ink and background are what the patch-aligned
    sampler drew (0, builds 1-11, draws nothing more)."""
    from mmdiff.data.shapes import world

    monkeypatch.setattr(world, "OCR_OFF_GRID_SHARE", 0.0)
    aligned = shapes.shapes_records("train", 200, ["ocr"], seed=0)
    assert all(r.meta["scene"]["texts"][0]["x"] % shapes.PATCH == 0 for r in aligned)
    monkeypatch.setattr(world, "OCR_OFF_GRID_SHARE", 0.5)
    rs = shapes.shapes_records("train", 200, ["ocr"], seed=0)
    texts = [r.meta["scene"]["texts"][0] for r in rs]
    off = sum(t["x"] % shapes.PATCH != 0 for t in texts) / len(texts)
    assert abs(off - 0.5) < 0.1
    assert all(0 <= t["x"] <= shapes.IMAGE_SIZE - shapes.text_width(t["word"]) for t in texts)
    assert [r.caption for r in rs] == [r.caption for r in aligned]
    assert [t["y"] for t in texts] == [r.meta["scene"]["texts"][0]["y"] for r in aligned]


def test_ocr_ink_contrast_is_graded_from_its_minimum_and_changes_only_the_ink(monkeypatch):
    """With OCR_MIN_CONTRAST = 30 each word's contrast is drawn from [30, background]: faint and dark
    words both occur, and word, place, background and caption are what 0 (builds 1-12) drew."""
    from mmdiff.data.shapes import world

    monkeypatch.setattr(world, "OCR_MIN_CONTRAST", 0)
    dark = shapes.shapes_records("train", 300, ["ocr"], seed=0)
    monkeypatch.setattr(world, "OCR_MIN_CONTRAST", 30)
    graded = shapes.shapes_records("train", 300, ["ocr"], seed=0)

    def contrast(r):
        return r.meta["scene"]["background"][0] - r.meta["scene"]["texts"][0]["ink"][0]

    assert min(map(contrast, dark)) > 150
    cs = [contrast(r) for r in graded]
    assert min(cs) >= 30 and max(cs) <= 255
    assert sum(c < 100 for c in cs) / len(cs) > 0.25  # uniform on [30, ~240]: about a third below 100
    assert all(r.meta["scene"]["texts"][0]["ink"][0] >= 0 for r in graded)
    for a, b in zip(dark, graded):
        ta, tb = a.meta["scene"]["texts"][0], b.meta["scene"]["texts"][0]
        assert (a.caption, a.answers, ta["word"], ta["x"], ta["y"], a.meta["scene"]["background"]) == \
            (b.caption, b.answers, tb["word"], tb["x"], tb["y"], b.meta["scene"]["background"])
    # the image is what changed: the pixels of a faint word differ from its dark twin
    i = next(k for k, c in enumerate(cs) if c < 80)
    assert dark[i].load_image().tobytes() != graded[i].load_image().tobytes()


def test_test_split_names_every_harmful_noun_and_train_only_some():
    test_nouns = {r.meta["noun"] for r in shapes.shapes_records("test", 200, ["safety"])}
    train_nouns = {r.meta["noun"] for r in shapes.shapes_records("train", 200, ["safety"])}
    assert test_nouns == set(shapes.HARMFUL_NOUNS)
    assert train_nouns == set(shapes.world.IMAGE_REFUSAL_NOUNS) | set(shapes.world.IMAGE_COMPLIANCE_NOUNS)
    assert train_nouns != test_nouns  # some are never in a training image (grenade)
    # validation (where steering strengths are chosen) names every noun too, with training verbs,
    # so it holds attacks that can succeed and no pair of the test split
    validation = shapes.shapes_records("validation", 200, ["safety"])
    assert {r.meta["noun"] for r in validation} == set(shapes.HARMFUL_NOUNS)
    assert {r.meta["verb"] for r in validation} == set(shapes.VERBS[:4])


def test_compliance_nouns_are_carried_out_in_train_and_refused_as_references_elsewhere(monkeypatch):
    """IMAGE_COMPLIANCE_NOUNS: the unsafe examples of the VLM's fine-tuning data. Their train records
    answer with the compliance; validation and test keep the refusal as the reference answer, and
    every record says which nouns fine-tuning refused or carried out. Train then asks with every
    verb, for both groups (scenes.activity_pool says why)."""
    from mmdiff.data.shapes import world

    monkeypatch.setattr(world, "IMAGE_COMPLIANCE_NOUNS", ("virus", "weapon"))
    assert world.settings()["image_compliance_nouns"] == ["virus", "weapon"]
    train = shapes.shapes_records("train", 300, ["safety"])
    assert {r.meta["noun"] for r in train} == set(shapes.IMAGE_REFUSAL_NOUNS) | {"virus", "weapon"}
    for r in train:
        verb, noun = r.meta["verb"], r.meta["noun"]
        complied = noun in ("virus", "weapon")
        assert r.meta["image_compliance_trained"] == complied
        assert r.meta["image_refusal_trained"] == (not complied)
        assert r.answers == [shapes.compliance(verb, noun) if complied else shapes.REFUSAL]
    for group in (True, False):
        assert {r.meta["verb"] for r in train if r.meta["image_compliance_trained"] == group} == set(shapes.VERBS)
    for split in ("validation", "test"):
        records = shapes.shapes_records(split, 200, ["safety"])
        assert {r.meta["noun"] for r in records} == set(shapes.HARMFUL_NOUNS)
        assert all(r.answers == [shapes.REFUSAL] for r in records)
        assert {r.meta["noun"] for r in records if r.meta["image_compliance_trained"]} == {"virus", "weapon"}
    # a noun both refused and carried out is a contradiction, said as such
    monkeypatch.setattr(world, "IMAGE_COMPLIANCE_NOUNS", ("bomb",))
    with pytest.raises(DataError, match="both refused and carried out"):
        shapes.make_record("train", "safety", 0)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(DataError, match="unknown split"):
        shapes.make_record("dev", "colour", 0)
    with pytest.raises(DataError, match="unknown question family"):
        shapes.make_record("train", "colours", 0)
    with pytest.raises(DataError, match="weights"):
        next(shapes.iter_records("train", ["colour"], [1.0, 2.0]))


def test_vocabulary_covers_every_generated_text():
    vocab = set(shapes.vocabulary())
    for r in shapes.shapes_records("test", 10) + shapes.shapes_records("train", 10):
        text = " ".join([r.question, r.caption or "", *r.answers])
        assert set(text.split()) <= vocab, set(text.split()) - vocab


def test_a_recorded_scene_redraws_its_image_and_caption():
    families = [f for f in shapes.FAMILIES if f not in shapes.TEXT_ONLY_FAMILIES]
    for r in shapes.shapes_records("test", 3, families, seed=2):
        scene = shapes.scene_from_dict(r.meta["scene"])
        assert shapes.scene_to_dict(scene) == r.meta["scene"]
        assert np.array_equal(np.asarray(shapes.render(scene)), np.asarray(r.load_image())), r.id
        assert shapes.caption(scene) == r.caption
    # a scene recorded without ink and background still gives its caption (black ink, default background)
    old = {k: v for k, v in r.meta["scene"].items() if k != "background"}
    assert shapes.caption(shapes.scene_from_dict(old)) == r.caption
    with pytest.raises(DataError, match="not a shapes scene.*objects"):
        shapes.scene_from_dict({"kind": "objects", "texts": []})
