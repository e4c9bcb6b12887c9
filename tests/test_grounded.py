"""Grounded explanations: IoU / AUROC on hand-made maps, the organism's scene concepts, COCO boxes."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mmdiff.data import shapes
from mmdiff.data.loaders.coco_instances import coco_concepts, load_coco_instances
from mmdiff.data.loaders.scene_concepts import record_concepts, scene_concepts
from mmdiff.data.regions import box_cover, mask_cover, region, text_regions
from mmdiff.errors import DataError
from mmdiff.interp.grounded import (
    GROUNDING,
    MATCH_SHARE,
    NO_CONCEPT,
    Observation,
    active_region,
    auroc,
    ground_feature,
    iou,
    score_concept,
    grounding_table,
    match_share_table,
    score_side,
    wilson_interval,
)

# -- scores on hand-made maps ---------------------------------------------------------------------


def test_iou_and_active_region_on_a_non_square_map():
    acts = np.zeros((2, 3))
    acts[0, 0], acts[0, 1], acts[1, 2] = 4.0, 2.0, 1.0  # half of the max (2.0) is in, 1.0 is out
    assert active_region(acts).tolist() == [[True, True, False], [False, False, False]]
    concept = np.array([[True, False, False], [True, False, False]])
    assert iou(active_region(acts), concept) == pytest.approx(1 / 3)  # 1 shared of 3 in the union
    assert active_region(np.zeros((2, 3))).sum() == 0  # a feature that never fires has no region
    assert math.isnan(iou(np.zeros(4, bool), np.zeros(4, bool)))
    with pytest.raises(DataError, match="share one grid"):
        iou(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_auroc_known_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auroc([1, 2, 3], [False, True, True]) == 1.0
    assert auroc([3, 2, 1], [False, True, True]) == 0.0
    assert auroc([1, 1, 1, 1], [False, True, False, True]) == 0.5  # ties count half
    assert math.isnan(auroc([1, 2], [True, True]))


def test_score_concept_counts_iou_only_where_the_concept_is_and_the_feature_fires():
    here = np.array([[True, False], [False, False]])
    obs = [
        Observation(np.array([[3.0, 0.0], [0.0, 0.0]]), {"red": here}),  # IoU 1
        Observation(np.array([[2.0, 2.0], [0.0, 0.0]]), {"red": here}),  # IoU 1/2
        Observation(np.zeros((2, 2)), {"red": here}),  # present, silent: detection miss, no IoU
        Observation(np.array([[0.0, 0.0], [0.0, 1.0]]), {}),  # absent, fires: a false alarm
        Observation(np.zeros((2, 2)), {}),
    ]
    s = score_concept("red", "image", obs)
    assert (s.n_present, s.n_absent, s.n_iou) == (3, 2, 2)
    assert s.iou == pytest.approx(0.75)
    # maxima present [3, 2, 0], absent [1, 0]: pairs won 2 + 2 + 0.5 of 6
    assert s.auroc == pytest.approx(4.5 / 6)
    assert s.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s.grounding_score == pytest.approx(min(0.75, 2 * 4.5 / 6 - 1))


def test_vectorised_scores_equal_the_per_record_definition():
    """score_side (all features and concepts at once) gives score_concept's numbers: ties in the
    maxima, silent records, records of different sizes, concepts absent from some records."""
    rng = np.random.default_rng(7)
    n_feat, acts, regions = 5, [], []
    for r in range(30):
        shape = (3, 4) if r % 3 else (2, 5)
        a = np.round(rng.random((*shape, n_feat)) * 3, 0) - 1.0  # ties and zeros
        a[..., 1] = 0.0 if r % 2 else a[..., 1]  # a feature silent on half the records
        a = np.clip(a, 0.0, None)
        reg = {}
        for name, p in (("red", 0.3), ("cube", 0.5), ("rare", 0.05)):
            if rng.random() < 0.6:
                reg[name] = rng.random(shape) < p
        acts.append(a)
        regions.append(reg)
    fast = score_side("image", acts, regions)
    for f in range(n_feat):
        obs = [Observation(a[..., f], reg) for a, reg in zip(acts, regions)]
        for got in fast[f]:
            want = score_concept(got.concept, "image", obs)
            for field in ("iou", "auroc", "balanced_accuracy"):
                assert getattr(got, field) == pytest.approx(getattr(want, field), nan_ok=True, abs=1e-12), field
            assert (got.n_present, got.n_absent, got.n_iou) == (want.n_present, want.n_absent, want.n_iou)
    assert [c.concept for c in fast[0]] == ["cube", "rare", "red"]


def test_region_shape_mismatch_is_named():
    with pytest.raises(DataError, match="same patch grid"):
        Observation(np.zeros((2, 3)), {"red": np.zeros((3, 2), bool)})


def test_no_concept_above_threshold_says_so():
    rng = np.random.default_rng(0)
    obs = [Observation(rng.random((4, 4)), {"red": rng.random((4, 4)) > 0.7} if i % 2 else {})
           for i in range(20)]
    g = ground_feature({"image": obs})
    assert not g.found and g.concepts == ()
    assert g.text.startswith(NO_CONCEPT) and "red" in g.text  # the best candidate's scores stay
    assert g.to_dict()["found"] is False
    assert ground_feature({"image": []}).text == f"{NO_CONCEPT} (no concept could be scored)"


def test_token_side_concepts_are_scored_on_text_positions():
    records = [["is", "the", "red", "circle", "left", "of", "the", "blue", "square", "?"],
               ["what", "colour", "is", "the", "cross", "?"],
               ["is", "the", "green", "square", "above", "the", "red", "circle", "?"]]
    obs = []
    for toks in records:
        regions = text_regions(toks, {"relation=left of": "left of", "relation=above": "above"})
        acts = regions.get("relation=left of", np.zeros(len(toks), bool)).astype(float)
        obs.append(Observation(acts, regions))
    assert obs[0].regions["relation=left of"].nonzero()[0].tolist() == [4, 5]
    assert not ground_feature({"text": obs}).found  # one record holding it is too few by default (MIN_RECORDS)
    g = ground_feature({"text": obs}, min_records=1)
    best = g.concepts[0]
    assert (best.concept, best.side, best.iou, best.auroc) == ("relation=left of", "text", 1.0, 1.0)
    assert [c.concept for c in g.concepts] == ["relation=left of"]


# -- regions on patch grids -----------------------------------------------------------------------


def test_box_and_mask_cover_are_exact_on_grids_that_do_not_divide_the_image():
    cover = box_cover((0, 0, 320, 480), (640, 480), (17, 23))  # left half of the image, 11.5 columns
    assert cover.shape == (17, 23)
    assert cover[:, :11].min() == pytest.approx(1.0) and cover[:, 11] == pytest.approx(0.5)
    assert cover[:, 12:].max() == 0.0
    mask = np.zeros((6, 9), bool)
    mask[:, :3] = True  # the left third
    assert mask_cover(mask, (2, 2))[:, 0] == pytest.approx([2 / 3, 2 / 3])
    assert mask_cover(mask, (2, 2))[:, 1] == pytest.approx([0, 0])
    with pytest.raises(DataError, match="positive"):
        box_cover((0, 0, 1, 1), (10, 10), (0, 3))


def _organism_records(n: int = 40) -> list:
    return [shapes.make_record("train", fam, i) for fam in ("colour", "shape") for i in range(n // 2)]


def test_scene_concepts_cover_each_object_on_its_patches():
    rec = next(r for r in _organism_records() if len(r.meta["scene"]["objects"]) >= 2)
    regions = record_concepts(rec, (8, 8))  # the organism's 8-pixel patches on a 64-pixel image
    for o in rec.meta["scene"]["objects"]:
        block = regions[f"object={o['colour']} {o['shape']}"]
        assert block.sum() == 4  # every object covers a 2x2 block of patches (shapes.OBJECT_CENTRES)
        assert regions[f"colour={o['colour']}"][block].all()
        assert regions[f"cell={shapes.ROWS[o['row']]} {shapes.COLS[o['col']]}"][block].all()
    assert not any(k.startswith("word=") for k in regions)
    word = shapes.make_record("train", "ocr", 0)
    concepts = scene_concepts(word.meta["scene"], (8, 8))
    assert set(concepts) == {f"word={word.answers[0]}", "text"} and concepts["text"].any()
    with pytest.raises(DataError, match="no meta\\['scene'\\]"):
        record_concepts(shapes.make_record("train", "safety_text", 0), (8, 8))


def test_planted_red_feature_is_explained_as_red_with_iou_one():
    """A feature that fires on the patches holding red pixels of the rendered image (not the
    scene metadata) is grounded as colour=red with IoU 1 and AUROC 1."""
    obs = []
    for rec in _organism_records():
        pixels = np.asarray(rec.load_image())  # [64, 64, 3]
        red = (pixels == np.array(shapes.COLOURS["red"])).all(-1)
        acts = region(mask_cover(red, (8, 8))).astype(float) * 5.0  # [8, 8]
        obs.append(Observation(acts, record_concepts(rec, (8, 8))))
    assert 0 < sum(o.acts.any() for o in obs) < len(obs)  # red and non-red scenes both held out
    g = ground_feature({"image": obs})
    best = g.concepts[0]
    assert best.concept == "colour=red"
    assert (best.iou, best.auroc, best.balanced_accuracy) == (1.0, 1.0, 1.0)
    assert "colour=red (image: IoU 1.00, AUROC 1.00" in g.text


# -- COCO instances ---------------------------------------------------------------------------------

# Qwen2-VL's smart_resize (factor 28 = patch 14 x merge 2, default pixel bounds) maps 640x480 to
# 644x476 and 500x375 to 504x364: patch grids of 17x23 and 13x18 after the 2x2 merge.
QWEN_GRIDS = {1: (17, 23), 2: (13, 18)}


def write_coco_instances(path, annotations=None) -> None:
    data = {
        "info": {"description": "COCO 2014 Dataset"},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "width": 640, "height": 480,
             "license": 3, "coco_url": "", "date_captured": "", "flickr_url": ""},
            {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "width": 500, "height": 375},
            {"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "width": 427, "height": 640},
        ],
        "annotations": annotations if annotations is not None else [
            {"id": 12, "image_id": 1, "category_id": 17, "bbox": [0.0, 0.0, 320.0, 480.0],
             "area": 153600.0, "iscrowd": 0, "segmentation": [[0, 0, 320, 0, 320, 480]]},
            {"id": 11, "image_id": 1, "category_id": 18, "bbox": [480.0, 240.0, 160.0, 240.0],
             "area": 38400.0, "iscrowd": 0, "segmentation": []},
            {"id": 13, "image_id": 2, "category_id": 17, "bbox": [250.0, 0.0, 250.0, 375.0],
             "area": 93750.0, "iscrowd": 1, "segmentation": {"counts": [0], "size": [375, 500]}},
        ],
        "categories": [{"supercategory": "animal", "id": 17, "name": "cat"},
                       {"supercategory": "animal", "id": 18, "name": "dog"}],
    }
    path.write_text(json.dumps(data))


def test_coco_instances_boxes_on_qwen2vl_grids(tmp_path):
    path = tmp_path / "annotations" / "instances_val2014.json"
    path.parent.mkdir()
    write_coco_instances(path)
    images = load_coco_instances(path)
    assert sorted(images) == [1, 2, 3] and images[3].instances == ()
    one = images[1]
    assert (one.width, one.height) == (640, 480)
    assert [(i.category, i.bbox) for i in one.instances] == [
        ("dog", (480.0, 240.0, 160.0, 240.0)), ("cat", (0.0, 0.0, 320.0, 480.0))]  # annotation-id order
    cat = coco_concepts(one, QWEN_GRIDS[1])["category=cat"]
    assert cat.shape == (17, 23) and cat[:, :12].all() and not cat[:, 12:].any()  # 11.5 columns, 0.5 >= 10%
    dog = coco_concepts(one, QWEN_GRIDS[1])["category=dog"]
    assert dog.nonzero()[0].min() == 8 and dog.nonzero()[1].min() == 17  # 8.5 rows down, 17.25 cols across
    two = coco_concepts(images[2], QWEN_GRIDS[2])
    assert set(two) == {"category=cat"} and two["category=cat"][:, 9:].all()  # right half of 18 columns
    assert not two["category=cat"][:, :9].any()


def test_coco_box_tracking_feature_is_grounded(tmp_path):
    path = tmp_path / "instances_val2017.json"
    write_coco_instances(path)
    images = load_coco_instances(path)
    obs = []
    for image_id, grid in QWEN_GRIDS.items():
        regions = coco_concepts(images[image_id], grid)
        obs.append(Observation(regions.get("category=dog", np.zeros(grid, bool)) * 1.0, regions))
    best = ground_feature({"image": obs}, min_records=1).concepts[0]  # two images: one with a dog
    assert (best.concept, best.iou, best.auroc) == ("category=dog", 1.0, 1.0)


@pytest.mark.parametrize(
    "annotations, message",
    [
        ([{"id": 1, "image_id": 9, "category_id": 17, "bbox": [0, 0, 1, 1]}], "image_id 9"),
        ([{"id": 1, "image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1]}], "category_id 99"),
        ([{"id": 1, "image_id": 1, "category_id": 17, "bbox": [0, 0, 1]}], "four numbers"),
        ([{"id": 1, "image_id": 1, "category_id": 17, "bbox": [10, 10, 0, 5]}], "empty box"),
        ([{"id": 1, "image_id": 1, "category_id": 17, "bbox": [400, 300, 700, 500]}], "x1, y1, x2, y2"),
        ([{"id": 1, "image_id": 1, "category_id": 17}], "no field 'bbox'"),
    ],
)
def test_coco_instances_errors_name_the_record(tmp_path, annotations, message):
    path = tmp_path / "instances_train2014.json"
    write_coco_instances(path, annotations)
    with pytest.raises(DataError, match=message):
        load_coco_instances(path)


def test_coco_instances_missing_and_truncated_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_coco_instances(tmp_path / "instances_val2014.json")
    bad = tmp_path / "instances_val2017.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco_instances(bad)


# -- the interp stage: explanations carry grounded scores ----------------------------------------


def test_write_interp_grounds_explanations_on_organism_records(tmp_path):
    import pandas as pd
    import torch

    from mmdiff.data.loaders.scene_concepts import organism_concepts
    from mmdiff.interp.dashboard import write_interp
    from mmdiff.models import load_adapter
    from mmdiff.models.tiny import BASE_SUBDIR, VLM_SUBDIR, build_tiny
    from mmdiff.sae import SAEConfig, build_sae

    root = build_tiny("llava", tmp_path / "llava")
    adapter = load_adapter(root / VLM_SUBDIR, base_lm=root / BASE_SUBDIR, dtype=torch.float32)
    sae = build_sae(SAEConfig(architecture="relu", d_in=adapter.vlm.d_model, d_sae=8))
    sae.init_weights(seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    records = [shapes.make_record("train", fam, i) for fam in ("colour", "spatial_yesno", "ocr") for i in range(2)]
    features = pd.DataFrame({"layer": [1, 1], "feature": [0, 3]})
    tasks = pd.DataFrame({"layer": [1, 1, 1], "feature": [0, 3, 3], "task": ["ocr", "ocr", "spatial"]})
    from mmdiff.interp.explain import OfflineExplainer

    class Recorder(OfflineExplainer):  # stands in for the LLM explainer: what context did it get?
        seen: list = []

        def explain(self, evidence):
            self.seen.append(evidence.grounded)
            return super().explain(evidence)

    paths = write_interp(adapter, {1: sae}, features, {"organism": records[:3]}, tmp_path / "interp", k=2,
                         grounding=organism_concepts, grounding_records=records, task_features=tasks,
                         explainer=Recorder(), progress=False)
    assert Recorder.seen and all(g and ("IoU" in g or g.startswith(NO_CONCEPT)) for g in Recorder.seen)
    # every (task, feature) pair is grounded and judged; the share table reads it back
    table = GROUNDING.read(tmp_path).table
    assert list(zip(table.task, table.feature)) == [("ocr", 0), ("ocr", 3), ("spatial", 3)]
    share = MATCH_SHARE.read(tmp_path).table
    assert list(share.task) == ["ocr", "spatial", "all"] and list(share.features) == [2, 1, 3]
    assert share.matched.tolist() == [int(table[table.task == t].matches.sum()) for t in ("ocr", "spatial")] + [
        int(table.matches.sum())]
    explanations = json.loads(paths["explanations"].read_text())["explanations"]
    assert explanations
    for e in explanations:
        g = e["grounded"]
        assert g["found"] == bool(g["concepts"]) and (g["found"] or g["text"].startswith(NO_CONCEPT))
        sides = {c["side"] for c in g["candidates"]}
        assert sides == {"image", "text"}  # patch maps on the tiny model's grid and question tokens
        names = {c["concept"] for c in g["candidates"]}
        assert any(n.startswith("shape=") for n in names) and any(n.startswith("word=") for n in names)
    page = (tmp_path / "interp" / "dashboards" / f"L1_F{explanations[0]['feature_id'].split('F')[1]}.html")
    assert "grounded: " in page.read_text()


def test_grounding_source_reads_held_out_organism_records(tmp_path):
    from mmdiff.config import default_config
    from mmdiff.data.loaders.scene_concepts import organism_concepts
    from mmdiff.pipeline import StageContext
    from mmdiff.study import grounding_source, study_stages

    cfg = default_config()
    stage = next(s for s in study_stages(cfg) if s.name == "interp")
    assert "validation" in stage.datasets  # the grounding records are part of the stage's inputs
    concepts, records = grounding_source(StageContext(tmp_path, cfg, stage))
    assert concepts is organism_concepts and 0 < len(records) <= cfg.interp.grounding_records
    assert {r.meta["split"] for r in records} == {"validation"} and all("scene" in r.meta for r in records)
    assert len({r.meta["family"] for r in records}) >= 8  # evenly spaced, not the first families only
    off = cfg.model_copy(update={"interp": cfg.interp.model_copy(update={"grounding": None})})
    assert grounding_source(StageContext(tmp_path, off, stage)) == (None, [])
    # with COCO instances, the grounding dataset's records whose image they annotate
    from mmdiff.data.loaders.coco_instances import CocoConcepts
    from mmdiff.data.records import Record

    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg", "width": 10, "height": 10}],
                                "annotations": [], "categories": []}))
    coco = cfg.model_copy(update={"interp": cfg.interp.model_copy(update={"grounding_coco": [str(path)]})})
    ctx = StageContext(tmp_path, coco, stage)
    ctx.cache["records:validation"] = [Record(f"v{i}", "What?", meta={"image_id": 7 if i % 2 else 8}) for i in range(6)]
    source, held_out = grounding_source(ctx)
    assert isinstance(source, CocoConcepts) and [r.id for r in held_out] == ["v1", "v3", "v5"]


def test_matches_task_by_concept_kind():
    def grounded(*concepts):
        return {"concepts": [{"concept": c} for c in concepts]}

    from mmdiff.interp.grounded import matches_task

    assert matches_task(grounded("word=apple", "colour=red"), "ocr") is True
    assert matches_task(grounded("colour=red"), "ocr") is False and matches_task(grounded(), "ocr") is False
    assert matches_task(grounded("relation=left of"), "spatial") is True
    assert matches_task(grounded("text"), "adapted") is None  # no prediction for the adapted set


def test_first_screen_reads_the_match_share_table(tmp_path):
    """Answer 5 prints the counts and intervals of interp/match_share.parquet, the table the "Task
    features" section shows: one computation, so the two can never disagree (they once did: 0/11
    on the first screen against 1/48 in the table, from a second tally over explained features)."""
    from mmdiff.atomic import write_parquet
    from mmdiff.interp.explain import Explanation
    from mmdiff.interp.grounded import MATCH_SHARE
    from mmdiff.report.sections._common import Section
    from mmdiff.report.summary import what_they_mean

    share = MATCH_SHARE.validate(pd.DataFrame([
        {"task": t, "features": n, "matched": k, "share": k / n, "ci_lo": wilson_interval(k, n)[0],
         "ci_hi": wilson_interval(k, n)[1], "found": k, "auroc_q25": 0.5, "auroc_q50": 0.5, "auroc_q75": 0.5,
         "score_q25": 0.0, "score_q50": 0.0, "score_q75": 0.0}
        for t, k, n in (("ocr", 2, 56), ("safety", 1, 48), ("all", 3, 104))]))
    write_parquet(tmp_path / MATCH_SHARE.path, share)
    exps = {"L0.F1": Explanation("x", feature_id="L0.F1", grounded={"concepts": [{"concept": "text"}], "found": True}),
            "L0.F2": Explanation("y", feature_id="L0.F2", grounded={"concepts": [], "found": False})}
    line = what_they_mean(tmp_path, exps, Section("summary", "summary"))
    lo, hi = wilson_interval(1, 48)
    assert "2 features explained; 1 of 2 grounded" in line
    assert "ocr 2/56" in line and f"safety 1/48 [{lo:.2f}, {hi:.2f}]" in line and "all" not in line.split("kind:")[1]
    (tmp_path / MATCH_SHARE.path).unlink()  # no table: no per-task counts, and no made-up ones
    assert "kind" not in what_they_mean(tmp_path, exps, Section("summary", "summary"))


def test_grounding_and_match_share_tables_by_hand():
    import pandas as pd

    from mmdiff.interp.grounded import ConceptScore, GroundedExplanation

    def score(concept, iou, auc):
        return ConceptScore(concept, "image", iou, auc, 0.9, 10, 10, 10)

    word, cell, red = score("word=apple", 0.8, 0.95), score("cell=0,0", 0.6, 0.9), score("colour=red", 0.3, 0.6)
    grounded = {
        (0, 1): GroundedExplanation((word,), (word, cell, red), 0.5),  # OCR feature reading a word: a match
        (0, 2): GroundedExplanation((), (red,), 0.5),  # nothing grounded: no match, best candidate kept
        (0, 3): GroundedExplanation((cell,), (cell, word), 0.5),  # spatial: a cell matches; as OCR it does not
    }
    tasks = pd.DataFrame({"layer": [0, 0, 0, 0, 0], "feature": [1, 2, 3, 3, 1],
                          "task": ["ocr", "ocr", "spatial", "ocr", "adapted"]})
    table = grounding_table(tasks, grounded)
    assert table.matches.iloc[:4].tolist() == [True, False, True, False] and table.matches.isna().tolist()[-1]
    assert table.concept.tolist() == ["word=apple", "colour=red", "cell=0,0", "cell=0,0", "word=apple"]
    assert table.found.tolist() == [True, False, True, True, True]
    assert table.task_concept.fillna("").iloc[:4].tolist() == ["word=apple", "", "cell=0,0", "word=apple"]
    assert table.grounding_score.iloc[0] == pytest.approx(0.8)  # min(0.8, 2 * 0.95 - 1)
    share = match_share_table(table).set_index("task")
    assert share.loc["ocr", ["features", "matched", "found"]].tolist() == [3, 1, 2]
    assert share.loc["all", ["features", "matched"]].tolist() == [4, 2]
    assert (share.loc["ocr", "ci_lo"], share.loc["ocr", "ci_hi"]) == pytest.approx(wilson_interval(1, 3))
    assert share.loc["spatial", "auroc_q50"] == pytest.approx(0.9)
    assert "adapted" not in share.index


def test_wilson_interval_known_values():
    # 5 of 10: 0.5 +- 1.96 sqrt(0.25 / 10 + 1.96^2 / 400) / (1 + 1.96^2 / 10)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_coco_concepts_of_vsr_and_vqav2_records_by_image_id(tmp_path):
    from mmdiff.data.loaders.coco_instances import CocoConcepts
    from mmdiff.data.records import Record

    images = [{"id": 1, "file_name": "000000000001.jpg", "width": 640, "height": 480},
              {"id": 2, "file_name": "000000000002.jpg", "width": 300, "height": 600}]
    anns = [{"id": 10, "image_id": 1, "category_id": 17, "bbox": [0, 0, 320, 480], "iscrowd": 0},  # cat: left half
            {"id": 11, "image_id": 1, "category_id": 18, "bbox": [320, 0, 320, 480], "iscrowd": 0},  # dog: right half
            {"id": 12, "image_id": 2, "category_id": 6, "bbox": [0, 300, 300, 300], "iscrowd": 0}]  # bus: bottom half
    cats = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}, {"id": 6, "name": "bus"}]
    path = tmp_path / "instances_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    source = CocoConcepts(load_coco_instances(path))
    vsr = Record("vsr/0", "Is the cat left of the dog?",
                 meta={"image_id": 1, "relation": "left of", "subject": "cat", "object": "dog"})
    vqa = Record("vqa/0", "What colour is the bus?", meta={"image_id": 2, "question_id": 5})
    elsewhere = Record("vqa/1", "What?", meta={"image_id": 99})
    assert source.covers(vsr) and source.covers(vqa) and not source.covers(elsewhere)
    tokens = ["is", "the", "cat", "left", "of", "the", "dog", "?"]
    got = source(vsr, (4, 6), tokens)
    assert got["image"]["subject"][:, :3].all() and not got["image"]["subject"][:, 3:].any()
    assert (got["image"]["related"] == got["image"]["category=dog"]).all()
    assert got["text"]["relation=left of"].nonzero()[0].tolist() == [3, 4]
    assert got["text"]["subject"].nonzero()[0].tolist() == [2] and got["text"]["related"].nonzero()[0].tolist() == [6]
    bus = source(vqa, (6, 3), ["what", "colour", "is", "the", "bus", "?"])  # a tall image on a 6 x 3 grid
    assert bus["image"]["category=bus"][3:].all() and not bus["image"]["category=bus"][:3].any()
    assert bus["text"]["category=bus"].nonzero()[0].tolist() == [4] and "subject" not in bus["image"]
    assert source(elsewhere, (2, 2), ["what", "?"]) == {"image": {}, "text": {}}
    assert source(vsr, None, tokens)["image"] == {}  # a record without image tokens: the text side only


# -- OCR sets: "text present" -------------------------------------------------------------------


def write_rosetta_ocr(path, rows=None) -> None:
    """A TextVQA_Rosetta_OCR_v0.2 file: normalised boxes with Rosetta's rotation / 3-D angle fields."""

    def box(x, y, w, h):
        return {"width": w, "height": h, "rotation": 0.0, "roll": 0.0, "pitch": 0.0, "yaw": 0.0,
                "top_left_x": x, "top_left_y": y}

    data = rows if rows is not None else [
        {"image_id": "0054c91397f2fe05", "set_name": "val", "ocr_tokens": ["STOP", "ahead"],
         "ocr_info": [{"word": "STOP", "bounding_box": box(0.0, 0.0, 0.5, 0.25)},
                      {"word": "ahead", "bounding_box": box(0.75, 0.75, 0.25, 0.25)}]},
        {"image_id": "00aa1b2c3d4e5f60", "set_name": "val", "ocr_tokens": [], "ocr_info": []},
        {"image_id": "0123456789abcdef", "set_name": "val", "ocr_tokens": ["a"],  # MMF's camel-case spelling
         "ocr_info": [{"word": "a", "bounding_box": {"topLeftX": 0.5, "topLeftY": 0.5, "width": 0.01,
                                                      "height": 0.01}}]},
    ]
    path.write_text(json.dumps({"dataset_type": "test", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                "data": data}))


def test_rosetta_ocr_text_region_on_a_non_square_grid(tmp_path):
    from mmdiff.data.loaders.rosetta_ocr import load_rosetta_ocr, text_region

    path = tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json"
    write_rosetta_ocr(path)
    images = load_rosetta_ocr(path)
    assert [t.word for t in images["0054c91397f2fe05"]] == ["STOP", "ahead"] and images["00aa1b2c3d4e5f60"] == ()
    got = text_region(images["0054c91397f2fe05"], (4, 6))  # 4 rows x 6 columns
    want = np.zeros((4, 6), bool)
    want[0, :3] = True  # the top quarter's left half
    want[3, 4:] = True  # the bottom-right quarter's last row: columns 4.5-6 reach 4 and 5
    assert (got == want).all()
    tiny = text_region(images["0123456789abcdef"], (4, 6))  # 1% of a side: no patch reaches 10%
    assert tiny.sum() == 1 and tiny[2, 3]  # the patch it covers most is still marked


@pytest.mark.parametrize(
    "info, message",
    [
        ({"word": "x"}, "no field 'bounding_box'"),
        ({"word": "x", "bounding_box": [0, 0, 1, 1]}, "an object with top_left_x"),
        ({"word": "x", "bounding_box": {"top_left_x": 0.1, "width": 0.1, "height": 0.1}}, "'top_left_y' or 'topLeftY'"),
        ({"word": "x", "bounding_box": {"top_left_x": 120, "top_left_y": 40, "width": 30, "height": 10}}, "pixels"),
        ({"bounding_box": {"top_left_x": 0.1, "top_left_y": 0.1, "width": 0.1, "height": 0.1}}, "no field 'word'"),
    ],
)
def test_rosetta_ocr_errors_name_the_record(tmp_path, info, message):
    from mmdiff.data.loaders.rosetta_ocr import load_rosetta_ocr

    path = tmp_path / "TextVQA_Rosetta_OCR_v0.2_train.json"
    write_rosetta_ocr(path, [{"image_id": "ab12", "ocr_tokens": ["x"], "ocr_info": [info]}])
    with pytest.raises(DataError, match=message) as err:
        load_rosetta_ocr(path)
    assert "image_id=ab12" in str(err.value) or "no field 'word'" in message
    write_rosetta_ocr(path, [{"image_id": "ab12"}])
    with pytest.raises(DataError, match="no field 'ocr_info'"):
        load_rosetta_ocr(path)
    with pytest.raises(DataError, match="does not exist"):
        load_rosetta_ocr(tmp_path / "TextVQA_Rosetta_OCR_v0.2_test.json")


def test_text_present_is_detected_and_located_on_ocr_records(tmp_path):
    """A feature firing on the OCR boxes is grounded as "text" with IoU 1 and AUROC 1 over TextVQA
    records (present where Rosetta found text, absent where it found none); OCRBench records add
    presence without a region (detection only); a COCO record says nothing about text."""
    from mmdiff.data.loaders.coco_instances import CocoConcepts
    from mmdiff.data.loaders.rosetta_ocr import OcrConcepts, load_rosetta_ocr
    from mmdiff.data.records import Record
    from mmdiff.interp.grounded import PRESENT, ConceptSources

    path = tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json"
    write_rosetta_ocr(path)
    ocr = OcrConcepts(load_rosetta_ocr(path))
    textvqa = [Record(f"textvqa/{i}", "What does the sign say?", source="textvqa",
                      meta={"image_id": image_id}) for i, image_id in enumerate(["0054c91397f2fe05", "00aa1b2c3d4e5f60"])]
    bench = Record("ocrbench/0", "What is written?", source="ocrbench", meta={"type": "Scene Text-centric VQA"})
    coco_path = tmp_path / "instances_val2014.json"
    write_coco_instances(coco_path)
    coco = CocoConcepts(load_coco_instances(coco_path))
    vqa = Record("vqa/0", "What animal?", source="vqav2", meta={"image_id": 1})
    both = ConceptSources((coco, ocr))
    assert all(both.covers(r) for r in [*textvqa, bench, vqa])
    assert not ocr.covers(vqa) and not coco.covers(textvqa[0])
    assert ocr(bench, (4, 6), [])["image"] == {"text": PRESENT} and ocr(textvqa[1], (4, 6), [])["image"] == {}
    assert both.known(vqa) == coco.known(vqa) and "text" not in both.known(vqa) and both.known(textvqa[0]) == {"text"}

    grid = (4, 6)
    obs = []
    for i in range(12):  # 6 with text, 6 without; then 4 OCRBench (text, no boxes), 4 COCO images (silent)
        record = textvqa[i % 2]
        regions = both(record, grid, [])["image"]
        acts = regions.get("text", np.zeros(grid, bool)).astype(float) * 2.0
        obs.append(Observation(acts, regions, known=both.known(record)))
    for _ in range(4):
        obs.append(Observation(np.full(grid, 3.0), both(bench, grid, [])["image"], known=both.known(bench)))
        coco_regions = both(vqa, grid, [])["image"]
        obs.append(Observation(np.zeros(grid), coco_regions, known=both.known(vqa)))
    g = ground_feature({"image": obs})
    text = next(c for c in g.candidates if c.concept == "text")
    # present: 6 TextVQA + 4 OCRBench; absent: the 6 TextVQA images without OCR tokens, not the COCO ones
    assert (text.n_present, text.n_absent, text.n_iou) == (10, 6, 6)
    assert (text.iou, text.auroc, text.balanced_accuracy) == (1.0, 1.0, 1.0)
    assert g.concepts[0].concept == "text"
    cat = next(c for c in g.candidates if c.concept == "category=cat")
    assert cat.n_present + cat.n_absent == 4  # the COCO records only
    # the vectorised path and the per-record definition agree with partial annotation
    fast = {c.concept: c for c in score_side("image", [o.acts[..., None] for o in obs], [o.regions for o in obs],
                                             known=[o.known for o in obs])[0]}
    for name, got in fast.items():
        want = score_concept(name, "image", obs)
        assert (got.n_present, got.n_absent, got.n_iou) == (want.n_present, want.n_absent, want.n_iou)
        for field in ("iou", "auroc", "balanced_accuracy"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), nan_ok=True), (name, field)
    # OCRBench alone: detection scores, no IoU, so no grounded concept (it must localise too)
    only_bench = [Observation(np.full(grid, float(i % 2)), {"text": PRESENT} if i % 2 else {}) for i in range(12)]
    alone = ground_feature({"image": only_bench})
    (score,) = alone.candidates
    assert score.auroc == 1.0 and math.isnan(score.iou) and not alone.found
    assert "IoU n/a" in alone.text


def test_grounding_source_reads_ocr_and_coco_records_together(tmp_path):
    from mmdiff.config import default_config
    from mmdiff.data.loaders.rosetta_ocr import OcrConcepts
    from mmdiff.data.records import Record
    from mmdiff.interp.grounded import ConceptSources
    from mmdiff.pipeline import StageContext
    from mmdiff.study import grounding_source, study_stages

    ocr_path, coco_path = tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json", tmp_path / "instances_val2014.json"
    write_rosetta_ocr(ocr_path)
    write_coco_instances(coco_path)
    cfg = default_config()
    it = cfg.interp.model_copy(update={"grounding": ["textvqa", "ocrbench", "vqav2"], "grounding_ocr": [str(ocr_path)]})
    ocr_cfg = cfg.model_copy(update={"interp": it})
    stage = next(s for s in study_stages(ocr_cfg) if s.name == "interp")
    assert {"textvqa", "ocrbench", "vqav2"} <= set(stage.datasets)
    records = {
        "textvqa": [Record("t0", "?", source="textvqa", meta={"image_id": "0054c91397f2fe05"}),
                    Record("t1", "?", source="textvqa", meta={"image_id": "not-in-the-ocr-file"})],
        "ocrbench": [Record("o0", "?", source="ocrbench", meta={"type": "Handwriting Recognition"})],
        "vqav2": [Record("v0", "?", source="vqav2", meta={"image_id": 1})],
    }

    def held_out(config):
        ctx = StageContext(tmp_path, config, stage)
        for name, recs in records.items():
            ctx.cache[f"records:{name}"] = recs
        return grounding_source(ctx)

    source, got = held_out(ocr_cfg)
    assert isinstance(source, OcrConcepts) and [r.id for r in got] == ["t0", "o0"]
    both = ocr_cfg.model_copy(update={"interp": it.model_copy(update={"grounding_coco": [str(coco_path)]})})
    source, got = held_out(both)
    assert isinstance(source, ConceptSources) and [r.id for r in got] == ["t0", "o0", "v0"]
    bench_only = ocr_cfg.model_copy(update={"interp": it.model_copy(update={"grounding_ocr": []})})
    source, got = held_out(bench_only)
    assert [r.id for r in got] == ["o0"]
