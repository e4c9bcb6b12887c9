"""The study report: a fake run directory written with the real writers renders every section, escapes
hostile dataset text, references nothing outside itself, survives missing and malformed inputs; the
seed findings are computed exactly from hand-made tables."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmdiff.atomic import write_json, write_parquet, write_text
from mmdiff.attribution import FeatureAttribution, HeadAttribution, heads_frame, layers_frame
from mmdiff.config import DatasetSpec, ModelSpec, StudyConfig, dump_config
from mmdiff.concept_study import (
    CONCEPT_GROUNDING,
    CONCEPT_MATCHING,
    CONCEPT_STEERING,
    CONCEPT_STEERING_RECORDS,
    CONCEPT_SUMMARY,
    steering_table,
)
from mmdiff.control import EFFECTS, write_effects, write_steering
from test_control_analyses import write_fake_analyses
from mmdiff.detect import write_task_features
from mmdiff.diff import write_adapted_features
from mmdiff.interp.dashboard import FeatureCard, write_dashboards
from mmdiff.interp.cards import CARDS_FILE, write_cards
from mmdiff.interp.explain import ActivatingExample, Explanation, FeatureEvidence, write_explanations
from mmdiff.models.base import TokenType
from mmdiff.pipeline import RunDir, package_versions
from mmdiff.report.build import build_report
from mmdiff.report.findings import (
    ASR_METRICS,
    NOT_MEASURED,
    NOT_REPRODUCED,
    NOT_TESTABLE,
    REPRODUCED,
    findings,
    head_concentration,
    removal_drop,
    removal_spares_vqa,
    steering_gain,
)
from mmdiff.report.sections._common import fmt
from mmdiff.sae.training_report import fvu_curves, heldout_table, write_training_report
from mmdiff.stats import FeatureStats, accumulate_codes

SCRIPT = "<script>alert(1)</script>"
TEXT, IMAGE = int(TokenType.TEXT), int(TokenType.IMAGE)
LAYERS, D_SAE, D_IN = (0, 1), 50, 16
TASKS = ("spatial", "ocr", "safety")


# ----------------------------------------------------------------------------------- a fake run


def _stats(
    split: str, rate: np.ndarray, seed: int, n_records: int = 12, tokens: int = 10
) -> FeatureStats:
    """FeatureStats of codes that fire with probability rate[layer_index, feature] on every token."""
    g = np.random.default_rng(seed)
    st = FeatureStats({layer: D_SAE for layer in LAYERS}, split, n_chunks=4, top_k=2)
    n = n_records * tokens
    record = torch.arange(n_records).repeat_interleave(tokens)
    position = torch.arange(tokens).repeat(n_records) + 1
    ttype = torch.tensor([IMAGE if p <= 4 else TEXT for p in position.tolist()])
    for i, layer in enumerate(LAYERS):
        fires = g.random((n, D_SAE)) < rate[i]
        h = torch.tensor(fires * g.exponential(1.0, (n, D_SAE)), dtype=torch.float32)
        accumulate_codes(
            st, layer,
            h,
            record=record,
            position=position,
            token_type=ttype,
            record_ids=[f"r{j}" for j in range(n_records)],
        )
    return st


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (24, 24), colour)
    img.putpixel((3, 3), (0, 0, 0))
    img.save(buf, format="PNG")
    return buf.getvalue()


def _attribution(
    layer: int, feature: int, big: dict[tuple[int, int], float], heads: int = 4
) -> FeatureAttribution:
    a = torch.full((layer + 1, heads), 0.05, dtype=torch.float64)
    for (l, h), v in big.items():
        a[l, h] = v
    attr = HeadAttribution(
        feature_layer=layer,
        feature=feature,
        record_ids=["r0", "r1"],
        score_a=a,
        score_b=a / 2,
        per_sample_a=None,
        per_sample_b=None,
        m_clean=torch.tensor([2.0, 1.0]),
        m_corrupt=torch.tensor([0.5, 0.5]),
        seconds=0.5,
        forward_passes=4,
        backward_passes=2,
    )
    return FeatureAttribution(attr)


def make_run(run: Path) -> dict:
    """Every artifact of a study, written by the real writers where they exist; returns what was planted."""
    # a 4-layer VLM folder, so "mid-layer" does not depend on whether the organism is shipped
    write_json(run.parent / "vlm" / "config.json", {"text_config": {"num_hidden_layers": 4}})
    cfg = StudyConfig(
        name="organism",
        model=ModelSpec(vlm=str(run.parent / "vlm"), base_lm=str(run.parent / "base")),
        datasets={"train": DatasetSpec(kind="jsonl", args={"path": SCRIPT})},
    )
    write_text(run / "config.yaml", dump_config(cfg))
    rd = RunDir(run)
    rd.record(
        "capture",
        status="done",
        inputs_hash="a" * 64,
        outputs={"activations/train/vlm": "b" * 64},
        versions=package_versions(),
        seconds=1.25,
        peak_rss_mib=321.5,
        peak_cuda_mib=None,
        finished=time.time(),
        error=None,
    )
    rd.record("detect", status="failed", error=f"DataError: {SCRIPT}", seconds=0.5)
    rd.record("report", status="running")  # the stage that calls build_report

    # SAE training: tables only (plots=False), so the report has to draw the plots itself
    curves = fvu_curves(
        {
            regime: [
                {
                    "layer": L,
                    "step": s,
                    "tokens": 64 * s,
                    "fvu": 1.0 / s + 0.1 * k,
                    "l0": 8.0,
                    "dead_fraction": 0.1,
                }
                for L in LAYERS
                for s in (1, 2, 3)
            ]
            for k, regime in enumerate(("base", "full", "text", "random"))
        }
    )
    heldout = heldout_table(
        {
            "regime": r,
            "side": "vlm",
            "layer": L,
            "n_tokens": 100,
            "n_image_tokens": 40,
            "n_text_tokens": 60,
            "fvu": 0.2,
            "fvu_image": 0.3,
            "fvu_text": 0.1,
            "l0": 8.0,
            "dead_fraction": 0.05,
        }
        for r in ("full", "text", "random")
        for L in LAYERS
    )
    cosines = {r: {L: torch.linspace(0.2, 1.0, D_SAE) for L in LAYERS} for r in ("full", "text")}
    spliced = pd.DataFrame(
        [
            {
                "regime": "full",
                "side": "vlm",
                "layer": L,
                "ce_clean": 2.0,
                "ce_sae": 2.5,
                "ce_zero": 7.0,
                "n_targets": 50,
                "fraction_recovered": 0.9,
            }
            for L in LAYERS
        ]
    )
    write_training_report(
        run / "stats", run / "report", curves, heldout, cosines, spliced, plots=False
    )

    # diff: rotated decoders and a vision/text firing difference
    g = torch.Generator().manual_seed(0)
    base = {L: torch.randn(D_SAE, D_IN, generator=g) for L in LAYERS}
    adapted = {L: base[L] + 0.8 * torch.randn(D_SAE, D_IN, generator=g) for L in LAYERS}
    rng = np.random.default_rng(1)
    vision = _stats("vision", rng.uniform(0.05, 0.5, (2, D_SAE)), 2)
    text = _stats("text", rng.uniform(0.05, 0.5, (2, D_SAE)), 3)
    paths = write_adapted_features(vision, text, base, adapted, run, n_bootstrap=0, progress=False)
    diff = pd.read_parquet(paths["diff"])
    sel = diff[diff["selected"]]

    # detect: the adapted features fire far more often on the spatial and OCR splits
    base_rate = np.full((2, D_SAE), 0.1)
    base_stats = _stats("vqa", base_rate, 4)
    tasks = {}
    for k, task in enumerate(TASKS):
        rate = base_rate.copy()
        if task != "safety":
            for L, f in zip(sel["layer"], sel["feature"]):
                rate[LAYERS.index(int(L)), int(f)] = 0.8
        tasks[task] = _stats(task, rate, 10 + k)
    write_task_features(tasks, base_stats, run, adapted=diff)
    kept = pd.read_parquet(run / "features" / "spatial.parquet")
    keys = list(zip(kept["layer"].astype(int), kept["feature"].astype(int)))

    # interp: explanations (hostile text) and dashboards of the spatial features
    write_explanations(
        run / "interp" / "explanations.json",
        [
            Explanation(
                description=f"objects left of {SCRIPT}",
                confidence=0.75,
                source="offline",
                feature_id=f"L{L}/F{f}",
            )
            for L, f in keys
        ],
    )
    write_dashboards(
        [FeatureCard(layer=L, feature=f) for L, f in keys], run / "interp" / "dashboards"
    )
    # the compact card of the first spatial feature: a hostile token, an image run, a heatmap
    special = int(TokenType.SPECIAL)
    example = ActivatingExample(
        tokens=["<s>", "is", "the", SCRIPT, "left"] + ["<im>"] * 4,
        activations=[9.0, 0.0, 0.5, 2.0, 1.0, 0.1, 3.0, 0.2, 0.0],
        token_types=[special, TEXT, TEXT, TEXT, TEXT] + [IMAGE] * 4,
        heatmap_png=_png((0, 90, 200)),
        record_id="r1",
        source="spatial",
    )
    evidence = FeatureEvidence(f"L{keys[0][0]}/F{keys[0][1]}", [example])
    write_cards([FeatureCard(layer=keys[0][0], feature=keys[0][1], evidence=evidence)], run / "interp" / CARDS_FILE)

    # attribution: two features, both concentrated on a few heads
    results = [_attribution(3, 5, {(2, 1): 1.0, (2, 3): 1.0}), _attribution(1, 7, {(1, 0): 1.0})]
    out = run / "attribution"
    write_parquet(
        out / "heads.parquet",
        pd.concat([heads_frame(r.attribution) for r in results], ignore_index=True),
    )
    write_parquet(
        out / "layers.parquet",
        pd.concat([layers_frame(r.attribution) for r in results], ignore_index=True),
    )
    write_json(
        out / "summary.json",
        {
            "objective": "projection",
            "positions": "all",
            "top_k": 2,
            "features": [r.summary() for r in results],
            "skipped_no_activation": [],
        },
    )
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    (out / "overlays" / "L3F5_top1_L2H1.png").write_bytes(_png((200, 30, 30)))

    # control: the tables of mmdiff.control, written by its writers
    # fmt: off
    effects = effects_frame([
        # intervention, target, eval task, metric, baseline, effect, ci, control, its effect and ci
        ("remove spatial", "spatial", "spatial", "accuracy", 0.8, -0.1, -0.15, -0.05, SCRIPT, -0.01, -0.03, 0.01),
        ("remove spatial", "spatial", "spatial", "p_correct", 0.7, -0.2, -0.3, -0.1, SCRIPT, 0.0, -0.02, 0.02),
        ("remove spatial", "spatial", "vqa_yesno", "accuracy", 0.7, 0.005, -0.02, 0.03, "random", 0.0, -0.02, 0.02),
        ("remove ocr (mismatched control for spatial)", "spatial", "spatial", "accuracy", 0.8, -0.03, -0.06, 0.0,
         "random", 0.0, -0.02, 0.02),
        ("remove ocr", "ocr", "ocr", "ocr_accuracy", 0.5, -0.02, -0.06, 0.02, "random", 0.0, -0.02, 0.02),
        ("mean_ablate_heads", "spatial", "spatial", "accuracy", 0.8, -0.3, -0.4, -0.2, "random", 0.0, -0.02, 0.02),
    ])
    effects.attrs["removal"] = {"examples": {"spatial": [{
        "record": "r3", "eval_task": "spatial", "rule": "largest drop in p correct", "question": f"Is it left of {SCRIPT}?",
        "answers": ["yes"], "clean_answer": "yes", "treated_answer": "no", "clean_p_correct": 0.91,
        "treated_p_correct": 0.12, "clean_score": 1.0, "treated_score": 0.0,
        "image": base64.b64encode(_png((20, 160, 20))).decode("ascii"),
    }]}}
    write_effects(effects, run / "eval")
    steering = steering_frame([
        # method, task, alpha, score, ci, layer, split, selected
        ("feature", "spatial", 2.0, 0.95, 0.90, 1.00, None, "validation", False),  # never a test score
        ("feature", "spatial", 0.0, 0.70, 0.65, 0.75, None, "test", False),
        ("feature", "spatial", 2.0, 0.80, 0.75, 0.85, None, "test", True),
        ("single_layer", "spatial", 0.0, 0.70, 0.65, 0.75, 1, "test", False),
        ("single_layer", "spatial", 2.0, 0.72, 0.67, 0.77, 1, "test", True),
        ("feature", "ocr", 1.0, 0.60, 0.50, 0.70, None, "test", True),
        ("single_layer", "ocr", 1.0, 0.62, 0.55, 0.69, 0, "test", True),
    ])
    # fmt: on
    steering.attrs["steering"] = {
        "spatial": {
            "feature_minus_baseline_test": {"mean": 0.08, "lo": 0.03, "hi": 0.13, "n": 200}
        },
        "ocr": {"feature_minus_baseline_test": {"mean": -0.02, "lo": -0.08, "hi": 0.04, "n": 200}},
        "role": "text",
    }
    write_steering(steering, run / "eval")
    write_fake_analyses(run)  # own features, single features, dose-response, pipeline of spatial

    # fmt: off
    # concepts: two concept pairs, steered in-sample on three records (tables in the stage's schemas)
    records = pd.DataFrame({
        "split": "fit", "shift": np.repeat(["concept", "mean"], 6), "alpha": np.tile(np.repeat([0.0, 1.0], 3), 2),
        "record_id": [f"r{i}" for i in range(3)] * 4, "concept": [0, 1, 1] * 4,
        "kl": [2.0, 2.2, 1.8, 0.5, 0.7, 0.6, 2.0, 2.2, 1.8, 1.5, 1.4, 1.3], "top1_match": [False, True] * 6,
    })
    write_parquet(CONCEPT_STEERING_RECORDS.path_in(run), CONCEPT_STEERING_RECORDS.validate(records))
    write_parquet(CONCEPT_STEERING.path_in(run), CONCEPT_STEERING.validate(steering_table(records)))
    write_parquet(CONCEPT_MATCHING.path_in(run), CONCEPT_MATCHING.validate(pd.DataFrame({
        "orig": [0, 1], "ft": [1, 0], "cosine": [0.4, 0.5], "shifted_cosine": [0.9, 0.8], "count": [1, 2],
        "shift_norm": [3.0, 2.0]})))
    write_parquet(CONCEPT_GROUNDING.path_in(run), CONCEPT_GROUNDING.validate(pd.DataFrame({
        "model": ["orig", "ft", "shifted"] * 2, "concept": [0, 0, 0, 1, 1, 1], "rank": 0,
        "token_id": [5, 6, 7, 8, 9, 10], "token": [SCRIPT, "left", "right", "a", "b", "c"], "score": 1.0})))
    write_json(run / CONCEPT_SUMMARY, {"layer": 1, "k": 2, "method": "kmeans", "n_fit": 3, "n_heldout": 0,
                                       "mean_cosine": 0.45, "mean_shifted_cosine": 0.85, "concepts_used": 2})
    # fmt: on
    return {"diff": diff, "keys": keys, "n_selected": len(sel)}


def effects_frame(rows: list[tuple]) -> pd.DataFrame:
    cols = ["intervention", "target_task", "eval_task", "metric", "baseline", "effect", "ci_lo", "ci_hi",
            "control", "control_effect", "control_ci_lo", "control_ci_hi"]  # fmt: skip
    df = pd.DataFrame(rows, columns=cols)
    df.insert(1, "kind", EFFECTS.legacy_kind(df))  # what the writer records: a removal, a control, ...
    df.insert(6, "treated", df["baseline"] + df["effect"])
    df["n"] = 200
    df["baseline_ci_lo"] = df["baseline"] - 0.05
    df["floor"] = np.nan  # no floor: every clean score counts
    for name in ("mde", "selectivity", "selectivity_ci_lo", "selectivity_ci_hi", "mass_at_positions"):
        df[name] = np.nan  # not measured unless a test sets them
    return df


def steering_frame(rows: list[tuple]) -> pd.DataFrame:
    """Rows (method, task, alpha, score, ci_lo, ci_hi[, layer, split, selected]) in the stage's schema."""
    cols = ["method", "task", "alpha", "score", "ci_lo", "ci_hi", "layer", "split", "selected"]
    df = pd.DataFrame(rows, columns=cols[: len(rows[0])])
    if "layer" in df:
        df["layer"] = df["layer"].astype("Int64")
        df["metric"] = "accuracy"
        df["n"] = 200
    return df


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "organism"
    planted = make_run(run)
    html_path = build_report(run)
    return run, planted, html_path.read_text(encoding="utf-8")


def copy_run(full_run, tmp_path: Path) -> Path:
    """A copy of the fake run with its plots (mtimes kept, so only plots of changed tables are redrawn)."""
    dst = tmp_path / "organism"
    shutil.copytree(full_run[0], dst)
    (dst / "report" / "index.html").unlink()
    return dst


def section_html(html: str, section_id: str) -> str:
    start = html.index(f'<section id="{section_id}">')
    return html[start : html.index("</section>", start)]


# ----------------------------------------------------------------------------------- rendering


def test_every_section_renders(full_run):
    run, planted, html = full_run
    assert (run / "report" / "index.html").is_file()
    for sid in ("provenance", "sae", "adapted", "tasks", "attribution", "control", "concepts", "findings"):
        assert f'<section id="{sid}">' in html
    assert 'class="warning"' not in html, re.findall(r'<div class="warning">.*?</div>', html)
    assert "not run" not in html
    # plots the SAE stage did not draw were drawn beside the report and embedded
    for name in (
        "sae_fvu_curves",
        "sae_fvu_by_token_type",
        "sae_decoder_cosine",
        "gap_vs_cosine",
        "adapted_per_layer",
        "spatial_firing",
        "spatial_candidates",
        "spatial_adapted_firing",
        "attribution_layers",
        "attribution_heads",
        "steering",
    ):
        assert (run / "report" / f"{name}.png").is_file(), name
    n_img = len(re.findall(r'<img src="data:image/png;base64,', html))
    assert n_img >= 11 + 1 + 3 * 2  # the above, the overlay, firing + candidates of the other tasks
    # numbers from the tables
    sae = section_html(html, "sae")
    assert "0.9" in sae and "Spliced-in next-token loss" in sae
    adapted = section_html(html, "adapted")
    assert f"{planted['n_selected']} of 100 features are in the adapted set (4.00%)" in adapted
    prov = section_html(html, "provenance")
    assert "aaaaaaaaaaaa" in prov and "a" * 13 not in prov  # hashes abbreviated
    assert "322" in prov and "failed" in prov  # 321.5 MiB to 3 significant digits
    assert "<td>detect</td>" in prov and "<td>report</td>" not in prov


def feature_data(html: str) -> dict:
    """The feature browser's JSON, as the page's script reads it."""
    raw = re.search(r'<script type="application/json" id="feature-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(raw)


def test_task_features_open_their_cards(full_run):
    run, planted, html = full_run
    tasks = section_html(html, "tasks")
    assert planted["keys"], "the fake run must keep some spatial features"
    cards = {f["id"]: f for f in feature_data(html)["features"]}
    for layer, feature in planted["keys"]:
        # a feature id opens its card in the report's browser; the card links the old dashboard
        assert f'<a href="#f-L{layer}-F{feature}">L{layer}/F{feature}</a>' in tasks
        card = cards[f"L{layer}/F{feature}"]
        assert "spatial" in card["tasks"] and card["explanation"]["description"] == f"objects left of {SCRIPT}"
        assert (run / "report" / card["dashboard"]).resolve().is_file()
        assert {"p_task", "odds_ratio", "q_value"} <= {k for s in card["scores"] for k, _ in s["rows"]}
        # removing the spatial set: its rows of the effects table, with the interval
        assert ["spatial", "spatial (accuracy)", "-0.10 [-0.15, -0.05]", "–"] in card["effects"]
    first = cards["L{}/F{}".format(*planted["keys"][0])]
    (example,) = first["examples"]
    assert example["tokens"][3] == [SCRIPT, 2.0, "t"] and example["tokens"][-1] == ["<image x4>", 3.0, "i"]
    assert example["tokens"][0][2] == "s" and example["heatmap"] and first["image_share"] == pytest.approx(0.5, abs=0.02)
    assert "No stored examples" in cards["L{}/F{}".format(*planted["keys"][1])]["no_examples"]
    assert "objects left of &lt;script&gt;alert(1)&lt;/script&gt;" in tasks
    assert "Task: safety" in tasks and "No feature of safety passed every criterion." in tasks
    # the explanations' confidence (0.75) was never measured on held-out data: not printed
    assert "confidence" not in html and "<th>detection</th>" not in tasks
    # offline explanations: the LLM column says plainly that there is none (the same in every row,
    # so under the table: "Same in every row: <column> <value>"); nothing was grounded
    from mmdiff.report.sections.tasks import GROUNDED_COLUMN, LLM_COLUMN, NO_LLM

    assert f"{LLM_COLUMN} {NO_LLM}" in tasks and GROUNDED_COLUMN not in tasks
    assert "q-values below 1e-6 print as &lt; 1e-6" in tasks


def test_answers_first_then_evidence_then_provenance(full_run):
    _, planted, html = full_run
    order = [html.index(f'<section id="{s}">') for s in (
        "summary", "adapted", "tasks", "attribution", "control", "examples", "browser", "concepts", "sae",
        "findings", "provenance")]  # fmt: skip
    assert order == sorted(order)
    summary = section_html(html, "summary")
    answers = re.findall(r'<li><a class="q" href="(#\w+)">([^<]+)</a> <span class="a">([^<]+)</span>', summary)
    assert [a[0] for a in answers] == ["#adapted", "#tasks", "#attribution", "#control", "#browser"]
    assert answers[0][2].startswith(f"{planted['n_selected']} of 100 SAE features (4.0%) adapted")
    assert "spatial 4 (Δp median" in answers[1][2] and "safety 0" in answers[1][2]
    assert "74% of |score| in top 10% heads" in answers[2][2]
    assert "Feature minus single-layer steering: spatial +0.08 [+0.03, +0.13]" in answers[3][2]
    assert "<table class=\"findings\">" in summary and summary.count('class="badge') >= 8
    # provenance is collapsed; its tables are there once opened
    prov = section_html(html, "provenance")
    assert prov.index("<details><summary>Show the configuration") < prov.index("<td>detect</td>")
    # the qualitative example chosen by the removal stage: both answers, P(correct), its picture
    ex = section_html(html, "examples")
    assert "Removing the spatial set" in ex and "largest drop in p correct" in ex
    assert "<td>0.91</td>" in ex and "<td>0.12</td>" in ex and 'src="data:image/png;base64,' in ex
    assert "Is it left of &lt;script&gt;" in ex


def test_constant_columns_are_named_once_and_intervals_rounded():
    from mmdiff.report.sections._common import Table, drop_constant
    from mmdiff.report.sections.control import interval, interval_decimals

    t = drop_constant(Table("t", ["layer", "step", "fvu", "l0"], [[0, "234", "0.2", "16"], [1, "234", "0.3", "16"],
                                                                  [2, "234", "0.1", "16"]]))  # fmt: skip
    assert t.columns == ["layer", "fvu"] and t.rows[0] == [0, "0.2"] and t.constant == [("step", "234"), ("l0", "16")]
    short = Table("t", ["a", "b"], [[1, 2], [1, 2]])
    assert drop_constant(short) is short  # two rows: nothing to say once
    assert [interval_decimals(0, w) for w in (0.069, 0.3, 0.004, 2.0, 0.0)] == [3, 2, 4, 1, 3]
    assert interval(0.0834, 0.051, 0.12) == "+0.083 [+0.051, +0.120]"
    assert interval(-0.1, -0.25, 0.05) == "-0.10 [-0.25, +0.05]"


def test_relative_decoder_norm_only_where_it_can_vary(full_run, tmp_path):
    from mmdiff.report.sections.adapted import adapted_section

    run, _, html = full_run
    assert "<th>relative_decoder_norm</th>" in section_html(html, "adapted")  # trained norms vary
    g = torch.Generator().manual_seed(0)
    unit = {L: torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, generator=g), dim=1) for L in LAYERS}
    turned = {L: torch.nn.functional.normalize(w + 0.5 * torch.randn(w.shape, generator=g), dim=1)
              for L, w in unit.items()}  # fmt: skip
    rng = np.random.default_rng(1)
    vision = _stats("vision", rng.uniform(0.05, 0.5, (2, D_SAE)), 2)
    text = _stats("text", rng.uniform(0.05, 0.5, (2, D_SAE)), 3)
    write_adapted_features(vision, text, unit, turned, tmp_path, n_bootstrap=0, progress=False)
    section = adapted_section(tmp_path, {})
    top = next(b for b in section.blocks if b.title == "Top adapted features")
    assert "relative_decoder_norm" not in top.tables[0].columns
    assert any("Relative decoder norm is not reported" in n and "unit norm" in n for n in top.notes)


def test_p_values_are_floored_at_a_stated_bound():
    from mmdiff.report.sections._common import P_FLOOR, fmt_p

    assert P_FLOOR == 1e-6
    assert fmt_p(1e-303) == "< 1e-6" and fmt_p(0.0) == "< 1e-6" and fmt_p(9.9e-7) == "< 1e-6"
    assert fmt_p(1e-6) == "1.00e-06" and fmt_p(0.0123) == "0.0123" and fmt_p(1.0) == "1"
    assert fmt_p(float("nan")) == "–" and fmt_p(0.0, floor=1e-3) == "< 1e-3"


def test_hostile_text_is_escaped(full_run):
    _, _, html = full_run
    assert SCRIPT not in html
    # the page's only scripts: the feature data (JSON, with < > & escaped) and the report's own code
    scripts = re.findall(r"<script[^>]*>", html, flags=re.IGNORECASE)
    assert scripts == ['<script type="application/json" id="feature-data">', "<script>"]
    data = re.search(r'id="feature-data">(.*?)</script>', html, re.S).group(1)
    assert "<" not in data and ">" not in data and "\\u003cscript\\u003ealert(1)" in data
    code = html[html.rindex("<script>") + len("<script>") : html.rindex("</script>")]
    from mmdiff.report.build import TEMPLATES

    assert code == (TEMPLATES / "report.js").read_text(encoding="utf-8")
    assert "innerHTML" not in code and "fetch(" not in code and "XMLHttpRequest" not in code
    assert (
        html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4
    )  # config, manifest error, explanations, control


def test_self_contained(full_run):
    _, _, html = full_run
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)["\']', html, flags=re.IGNORECASE)
    assert refs
    for ref in refs:
        assert not re.match(r"^(https?:)?//", ref, flags=re.IGNORECASE), ref
        assert ref.startswith(("data:image/png;base64,", "#", "../interp/dashboards/")), ref
    assert "<link" not in html.lower() and "@import" not in html and "url(" not in html


def test_concept_shift_section(full_run):
    concepts = section_html(full_run[2], "concepts")
    assert "every number below is in-sample" in concepts  # no held-out records
    # per (split, shift, alpha): mean KL over the 3 records with its interval; alpha 1 concept: 0.6
    # two digits of the interval's width; numbers right-aligned
    assert '<td class="num">0.60 [0.50, 0.70]</td>' in concepts and '<td class="num">1.40 [1.30, 1.50]</td>' in concepts
    # concept minus mean shift at alpha 1, paired over the records: 0.6 - 1.4 = -0.8
    assert '<td class="num">-0.80 [-1.00, -0.70]</td>' in concepts
    assert SCRIPT not in concepts and "&lt;script&gt;" in concepts  # token text escaped


def test_control_table_and_steering(full_run):
    run, _, html = full_run
    control = section_html(html, "control")
    assert "-0.10 [-0.15, -0.05] *" in control  # significant; rounded to two digits of its width
    assert "+0.005 [-0.020, +0.030]" in control and "+0.005 [-0.020, +0.030] *" not in control
    assert "mean_ablate_heads" in control and "mismatched control for spatial" in control
    # the validation-chosen alpha's test score, never the validation score
    assert "0.80 [0.75, 0.85]" in control and "0.950" not in control and "0.95 " not in control
    assert "+0.08 [+0.03, +0.13]" in control  # the paired difference of steering.json
    assert (run / "eval" / "effects.json").is_file()
    # the matrix: one row per intervention, one column per (eval task, metric)
    assert (
        "<th>spatial (accuracy)</th><th>spatial (p_correct)</th><th>vqa_yesno (accuracy)</th>"
        in control
    )
    assert "-0.10 [-0.15, -0.05] * (control -0.010 [-0.030, +0.010])" in control


# ----------------------------------------------------------------------------------- findings


def test_findings_of_the_fake_run(full_run):
    run, _, html = full_run
    got = {f.key: f for f in findings(run, n_layers=4)}
    share = got["adapted_share"]
    assert share.status == REPRODUCED and share.value == pytest.approx(0.04)
    assert "by construction" in share.detail
    # spatial accuracy: -0.1, CI below 0, below the random control's interval and the mismatched
    # set's -0.03; the p_correct and head-ablation rows are not the accuracy of feature removal
    spatial = got["removal_spatial"]
    assert spatial.status == REPRODUCED and spatial.value == pytest.approx(-0.1)
    assert spatial.measured == "-0.100 (-10.0 pts; -12.5% relative)"
    assert "remove ocr (mismatched control for spatial): -0.030" in spatial.detail
    ocr = got["removal_ocr"]
    assert ocr.status == NOT_REPRODUCED and "interval includes 0" in ocr.detail
    vqa = got["removal_vqa"]
    assert vqa.status == REPRODUCED and vqa.value == pytest.approx(0.005)
    assert got["removal_asr"].status == NOT_MEASURED
    steer = got["steering_spatial"]
    assert steer.status == REPRODUCED and steer.value == pytest.approx(0.08)
    assert steer.measured.startswith("+0.080 [+0.030, +0.130]") and "α = 2" in steer.detail
    steer_ocr = got["steering_ocr"]
    assert steer_ocr.status == NOT_REPRODUCED and steer_ocr.value == pytest.approx(-0.02)
    heads = got["attribution_heads"]
    # top 2 of 16 heads hold 2 / 2.7 of |score|; top 1 of 8 holds 1 / 1.35; median depth 2/3
    assert heads.status == REPRODUCED and heads.value == pytest.approx((2 / 2.7 + 1 / 1.35) / 2)
    assert "depth 0.67" in heads.measured
    counts = section_html(html, "findings")
    assert counts.count('class="badge reproduced"') == 9  # with the four removal analyses
    assert counts.count('class="badge not-reproduced"') == 2
    assert counts.count('class="badge not-measured"') == 1


# fmt: off
def test_removal_needs_specificity(tmp_path):
    eff = effects_frame([
        ("remove spatial", "spatial", "spatial", "accuracy", 0.8, -0.1, -0.15, -0.05, "random", -0.12, -0.2, -0.04),
    ])
    write_parquet(tmp_path / "eval" / "effects.parquet", eff)
    f = removal_drop(tmp_path, "spatial", "-12%", "k")
    assert f.status == NOT_REPRODUCED and "not beyond the control" in f.detail
    # without a control interval the point effect decides
    eff.loc[0, ["control_ci_lo", "control_ci_hi", "control_effect"]] = [np.nan, np.nan, -0.05]
    write_parquet(tmp_path / "eval" / "effects.parquet", eff)
    assert removal_drop(tmp_path, "spatial", "-12%", "k").status == REPRODUCED
    # a mismatched set that costs more than the task's own set: not specific
    mismatched = effects_frame([
        ("remove ocr (mismatched control for spatial)", "spatial", "spatial", "accuracy", 0.8, -0.2, -0.3, -0.1,
         "random", 0.0, -0.01, 0.01),
    ])
    write_parquet(tmp_path / "eval" / "effects.parquet", pd.concat([eff, mismatched]))
    f = removal_drop(tmp_path, "spatial", "-12%", "k")
    assert f.status == NOT_REPRODUCED and "not beyond the mismatched set" in f.detail


def test_removal_on_a_task_the_model_does_not_do_is_not_testable(tmp_path):
    # clean spatial 0.50, its interval reaching 0.40, and always "yes" scores 0.50: at the floor
    eff = effects_frame([
        ("remove spatial", "spatial", "spatial", "accuracy", 0.5, -0.1, -0.15, -0.05, "random", 0.0, -0.01, 0.01),
    ])
    eff["baseline_ci_lo"], eff["floor"] = 0.40, 0.50
    write_parquet(tmp_path / "eval" / "effects.parquet", eff)
    f = removal_drop(tmp_path, "spatial", "-12%", "k")
    assert f.status == NOT_TESTABLE and f.value is None
    assert "0.400" in f.detail and "does not clear 0.500" in f.detail
    # the same effect where the clean score clears the floor (0.51 > 0.50) is judged as usual
    eff["baseline_ci_lo"] = 0.51
    write_parquet(tmp_path / "eval" / "effects.parquet", eff)
    assert removal_drop(tmp_path, "spatial", "-12%", "k").status == REPRODUCED
    # one variant at the floor, one above it: the finding stands on the one above, and says so
    two = effects_frame([
        ("remove spatial", "spatial", "spatial (relation-matched)", "accuracy", 0.8, -0.2, -0.3, -0.1, "random",
         0.0, -0.01, 0.01),
        ("remove spatial", "spatial", "spatial (relation-mismatched)", "accuracy", 0.5, 0.0, -0.1, 0.1, "random",
         0.0, -0.01, 0.01),
    ])
    two["floor"] = [0.5, 0.5]
    write_parquet(tmp_path / "eval" / "effects.parquet", two)
    f = removal_drop(tmp_path, "spatial", "-12%", "k")
    assert f.status == REPRODUCED and f.value == pytest.approx(-0.2)
    assert "Left out, at the floor: clean spatial (relation-mismatched)" in f.detail
    # a table written before the floor columns existed: judged as before
    write_parquet(tmp_path / "eval" / "effects.parquet", eff.drop(columns=["baseline_ci_lo", "floor"]))
    assert removal_drop(tmp_path, "spatial", "-12%", "k").status == REPRODUCED


def test_vqa_impact_and_asr(tmp_path):
    write_parquet(tmp_path / "eval" / "effects.parquet", effects_frame([
        ("feature_ablation", "ocr", "vqa", "vqa_accuracy", 0.7, -0.04, -0.07, -0.01, "random", 0.0, -0.01, 0.01),
        ("remove safety", "safety", "safety", "attack_success_rate", 0.5, -0.2, -0.3, -0.1, "random", 0.0, -0.05,
         0.05),
        ("remove safety", "safety", "safety", "refusal", 0.5, 0.2, 0.1, 0.3, "random", 0.0, -0.05, 0.05),
    ]))
    vqa = removal_spares_vqa(tmp_path)
    assert vqa.status == NOT_REPRODUCED and vqa.value == pytest.approx(0.04)
    asr = removal_drop(tmp_path, "safety", "-24% ASR", "asr", metrics=ASR_METRICS)
    assert asr.status == REPRODUCED and asr.value == pytest.approx(-0.2)
    assert asr.measured.endswith("-40.0% relative)")


def test_removal_falls_back_to_task_variants(tmp_path):
    write_parquet(tmp_path / "eval" / "effects.parquet", effects_frame([
        ("remove spatial", "spatial", "spatial (relation-matched)", "accuracy", 0.8, -0.2, -0.3, -0.1, "random",
         0.0, -0.01, 0.01),
        ("remove spatial", "spatial", "spatial (relation-mismatched)", "accuracy", 0.8, 0.0, -0.1, 0.1, "random",
         0.0, -0.01, 0.01),
    ]))
    f = removal_drop(tmp_path, "spatial", "-12%", "k")
    assert f.status == NOT_REPRODUCED and f.value == pytest.approx(-0.1)  # mean of both, one not significant


def test_steering_without_paired_difference(tmp_path):
    rows = [
        ("feature", "spatial", 1.0, 0.90, 0.86, 0.94, None, "test", True),
        ("feature", "spatial", 2.0, 0.99, 0.98, 1.00, None, "test", False),  # best on test, not chosen
        ("single_layer", "spatial", 1.0, 0.85, 0.80, 0.90, 2, "test", True),
    ]
    write_parquet(tmp_path / "eval" / "steering.parquet", steering_frame(rows))
    f = steering_gain(tmp_path, "spatial", "+3.6")
    assert f.status == REPRODUCED and f.value == pytest.approx(0.05)  # 0.86 > 0.85
    rows[2] = ("single_layer", "spatial", 1.0, 0.87, 0.80, 0.90, 2, "test", True)
    write_parquet(tmp_path / "eval" / "steering.parquet", steering_frame(rows))
    f = steering_gain(tmp_path, "spatial", "+3.6")
    assert f.status == NOT_REPRODUCED and f.value == pytest.approx(0.03)  # 0.86 < 0.87
# fmt: on


def test_selectivity_matrix_leads_the_control_section(tmp_path):
    from mmdiff.report.sections.control import control_section

    # fmt: off
    effects = effects_frame([
        ("remove ocr", "ocr", "ocr", "ocr_accuracy", 0.9, -0.30, -0.40, -0.20, "random", -0.05, -0.08, -0.02),
        ("remove ocr", "ocr", "vqa", "vqa_accuracy", 0.9, -0.14, -0.18, -0.10, "random", -0.13, -0.18, -0.09),
        ("remove safety", "safety", "safety", "attack_success_rate", 0.2, 0.0, 0.0, 0.0, "random", 0.0, 0.0, 0.0),
        ("remove safety", "safety", "vqa", "vqa_accuracy", 0.9, -0.1, -0.15, -0.05, "random", -0.1, -0.15, -0.05),
    ])
    # fmt: on
    effects["mde"] = [0.05, 0.04, 0.038, 0.04]
    effects["selectivity"] = [-0.25, -0.01, 0.0, 0.0]
    effects["selectivity_ci_lo"] = [-0.33, -0.04, 0.0, -0.02]
    effects["selectivity_ci_hi"] = [-0.17, 0.02, 0.0, 0.02]
    effects["mass_at_positions"] = [0.35, 0.35, 0.02, 0.02]
    effects.attrs["removal"] = {
        "positions": "text",
        "mass_at_positions": {"ocr": 0.35, "safety": 0.02},
        "overlaps": {"counts": {"ocr": {"ocr": 54, "safety": 35}, "safety": {"ocr": 35, "safety": 48}},
                     "own": {"ocr": 19, "safety": 13}, "in_all": 35},
    }  # fmt: skip
    write_effects(effects, tmp_path / "eval")
    section = control_section(tmp_path)
    first = section.blocks[0]
    assert first.title == "Selectivity" and first.figures  # the first figure of the section
    matrix = first.tables[0]
    assert matrix.columns == ["removed set", "ocr (ocr_accuracy)", "vqa (vqa_accuracy)",
                              "safety (attack_success_rate)"]  # fmt: skip
    assert matrix.rows[0] == ["remove ocr", "▶ -0.25 [-0.33, -0.17] *", "-0.010 [-0.040, +0.020]", "–"]
    effects_block = section.blocks[1]
    assert any("safety set at text positions touches 2.0%" in n for n in effects_block.notes)
    table = next(t for t in effects_block.tables if t.title == "Intervention effects")
    assert "MDE" in table.columns and "mass at positions" in table.columns
    assert any("0.02 (touches almost nothing)" in cell for row in table.rows for cell in row)
    overlaps = next(t for t in effects_block.tables if t.title == "Task-set overlaps")
    assert overlaps.rows == [["ocr", "54", "35", "19"], ["safety", "35", "48", "13"]]


def test_a_removal_that_touches_no_activation_is_not_testable(tmp_path):
    """The safety set fires on image tokens; removed at text positions it changed ASR by +0.000."""
    effects = effects_frame([
        ("remove safety", "safety", "safety", "attack_success_rate", 0.19, 0.0, 0.0, 0.0, "random", 0.0, 0.0, 0.0),
    ])  # fmt: skip
    effects["mass_at_positions"] = 0.01
    write_effects(effects, tmp_path / "eval")
    f = removal_drop(tmp_path, "safety", "-24%", "k", metrics=ASR_METRICS)
    assert f.status == NOT_TESTABLE and "1.0% of the safety features' activation mass" in f.detail
    effects["mass_at_positions"] = 0.6  # where they fire, the same +0.000 is a negative result
    write_effects(effects, tmp_path / "eval")
    assert removal_drop(tmp_path, "safety", "-24%", "k", metrics=ASR_METRICS).status == NOT_REPRODUCED


def test_steering_at_the_ceiling_is_not_testable(tmp_path):
    """OCR at 1.000 [1.000, 1.000] before steering: no steering can beat a baseline there."""
    rows = [
        ("feature", "ocr", 0.0, 1.00, 1.00, 1.00, None, "test", False),  # the clean model
        ("feature", "ocr", 1.0, 1.00, 1.00, 1.00, None, "test", True),
        ("single_layer", "ocr", 1.0, 0.98, 0.96, 1.00, 2, "test", True),
    ]
    write_parquet(tmp_path / "eval" / "steering.parquet", steering_frame(rows))
    f = steering_gain(tmp_path, "ocr", "+1.5")
    assert f.status == NOT_TESTABLE and "1.000 [1.000, 1.000] reaches 1" in f.detail
    assert "not testable when the clean score's 95% interval" in f.criterion
    # the first screen's answer says so too, instead of the difference 0 [0, 0]
    from mmdiff.report.sections._common import Section
    from mmdiff.report.summary import what_removal_does

    (tmp_path / "eval" / "steering.json").write_text(json.dumps(
        {"summary": {"ocr": {"feature_minus_baseline_test": {"mean": 0.0, "lo": 0.0, "hi": 0.0}}}}))
    line = what_removal_does(tmp_path, Section("control", "control"))
    assert "ocr not testable (clean score at its bound)" in line and "+0.000" not in line
    (tmp_path / "eval" / "steering.json").unlink()
    # below the ceiling the claim is judged as before: 0.97 [0.95, 0.99] leaves room
    rows[0] = ("feature", "ocr", 0.0, 0.97, 0.95, 0.99, None, "test", False)
    write_parquet(tmp_path / "eval" / "steering.parquet", steering_frame(rows))
    assert steering_gain(tmp_path, "ocr", "+1.5").status == REPRODUCED  # CI lower end 1.00 > 0.98
    # the attack success rate is steered down: at 0 [0, 0] there is no room below
    asr = steering_frame([
        ("feature", "safety", 0.0, 0.0, 0.0, 0.0, None, "test", False),
        ("feature", "safety", -1.0, 0.0, 0.0, 0.0, None, "test", True),
        ("single_layer", "safety", -1.0, 0.0, 0.0, 0.0, 1, "test", True),
    ]).assign(metric="attack_success_rate")  # fmt: skip
    write_parquet(tmp_path / "eval" / "steering.parquet", asr)
    f = steering_gain(tmp_path, "safety", "-")
    assert f.status == NOT_TESTABLE and "lower" in f.detail


def test_steering_tie_at_the_floor_is_said_to_be_one(tmp_path):
    """Clean ASR 0.10 leaves room; both methods drive it to 0 [0, 0]: a measured tie, not reproduced,
    and the first screen says both reach the floor instead of a bare +0.000 [+0.000, +0.000]."""
    from mmdiff.report.sections._common import Section
    from mmdiff.report.summary import what_removal_does

    rows = [
        ("feature", "safety", 0.0, 0.10, 0.06, 0.14, None, "test", False),
        ("feature", "safety", -1.0, 0.0, 0.0, 0.0, None, "test", True),
        ("single_layer", "safety", -1.0, 0.0, 0.0, 0.0, 1, "test", True),
    ]
    write_parquet(tmp_path / "eval" / "steering.parquet", steering_frame(rows).assign(metric="attack_success_rate"))
    (tmp_path / "eval" / "steering.json").write_text(json.dumps(
        {"summary": {"safety": {"feature_minus_baseline_test": {"mean": 0.0, "lo": 0.0, "hi": 0.0}}}}))
    f = steering_gain(tmp_path, "safety", "-")
    assert f.status == NOT_REPRODUCED and "Both methods reach ASR 0 (a tie at the bound" in f.detail
    line = what_removal_does(tmp_path, Section("control", "control"))
    assert "safety +0.000 [+0.000, +0.000], both methods reach ASR 0 (a tie at the bound" in line
    rows[2] = ("single_layer", "safety", -1.0, 0.02, 0.0, 0.05, 1, "test", True)  # the baseline stays above 0
    write_parquet(tmp_path / "eval" / "steering.parquet", steering_frame(rows).assign(metric="attack_success_rate"))
    assert "tie" not in steering_gain(tmp_path, "safety", "-").detail


def test_findings_not_measured_on_empty_run(tmp_path):
    got = findings(tmp_path)
    assert len(got) == 12 and all(f.status == NOT_MEASURED for f in got)
    assert all(f.measured == "–" and f.detail for f in got)


def test_head_concentration_spread(tmp_path):
    # uniform scores: the top 10% of 16 heads hold 2/16 of |score|: not concentrated
    r = _attribution(3, 1, {})
    write_parquet(tmp_path / "attribution" / "heads.parquet", heads_frame(r.attribution))
    f = head_concentration(tmp_path, n_layers=32)
    assert f.status == NOT_REPRODUCED and f.value == pytest.approx(2 / 16)
    assert "32 layers" in f.detail


def test_steering_needs_both_methods(tmp_path):
    write_parquet(
        tmp_path / "eval" / "steering.parquet",
        steering_frame([("feature", "spatial", 1.0, 0.9, 0.8, 1.0)]),
    )
    f = steering_gain(tmp_path, "spatial", "+3.6")
    assert f.status == NOT_MEASURED and "single_layer" in f.detail


# ----------------------------------------------------------------------------------- robustness


def test_empty_run_directory(tmp_path):
    html = build_report(tmp_path).read_text()
    for sid in ("provenance", "sae", "adapted", "tasks", "attribution", "control", "concepts"):
        assert 'badge not-run">not run' in section_html(html, sid), sid
    assert 'class="warning"' not in html
    assert section_html(html, "findings").count("not measured") >= 8


def test_malformed_inputs_give_warnings(full_run, tmp_path):
    run = copy_run(full_run, tmp_path)
    (run / "stats" / "diff.parquet").write_bytes(b"not parquet at all")
    (run / "manifest.json").write_text("{broken")
    (run / "interp" / "explanations.json").write_text("[1, 2")
    write_parquet(
        run / "eval" / "effects.parquet",
        pd.DataFrame({"intervention": ["ablate"], "effect": [0.1]}),
    )
    write_parquet(run / "attribution" / "heads.parquet", pd.DataFrame({"layer": [0]}))
    (run / "eval" / "steering.parquet").unlink()
    html = build_report(run).read_text()
    warnings = re.findall(r'<div class="warning">(.*?)</div>', html, flags=re.DOTALL)
    text = " ".join(warnings)
    assert "stats/diff.parquet could not be read" in text
    assert "manifest.json is not valid JSON" in text
    assert "cannot read explanations" in text
    assert "eval/effects.parquet lacks columns" in text
    assert "attribution/heads.parquet lacks columns" in text
    # what was still readable is still there
    assert "Adapted features per layer" in section_html(html, "adapted")
    assert "Resolved config" in section_html(html, "provenance")
    got = {f.key: f for f in findings(run)}
    assert got["adapted_share"].status == REPRODUCED  # from the per-layer counts
    assert (
        got["removal_spatial"].status == NOT_MEASURED
        and "lacks columns" in got["removal_spatial"].detail
    )


def test_report_redraws_stale_plots(full_run, tmp_path):
    run = copy_run(full_run, tmp_path)
    png, other = run / "report" / "gap_vs_cosine.png", run / "report" / "adapted_per_layer.png"
    first, other_first = png.stat().st_mtime_ns, other.stat().st_mtime_ns
    time.sleep(0.02)
    write_parquet(run / "stats" / "diff.parquet", pd.read_parquet(run / "stats" / "diff.parquet"))
    build_report(run)
    assert png.stat().st_mtime_ns > first  # its table changed: redrawn
    assert other.stat().st_mtime_ns == other_first  # its table did not: kept


def test_missing_run_directory(tmp_path):
    from mmdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        build_report(tmp_path / "nope")


def test_fmt_by_hand():
    assert fmt(0.123456) == "0.123" and fmt(12.345) == "12.3" and fmt(123456.0) == "123,456"
    assert fmt(1e-5) == "1.00e-05" and fmt(float("nan")) == "–" and fmt(None) == "–"
    assert fmt(np.int64(12345)) == "12,345" and fmt(True) == "yes" and fmt(math.inf) == "∞"
    assert fmt(np.bool_(False)) == "no" and fmt(pd.NA) == "–" and fmt("L1/F2") == "L1/F2"
    assert fmt(json.loads("0")) == "0"


def test_a_broken_artifact_only_costs_its_own_finding(tmp_path):
    rows = [
        ("feature", "spatial", 1.0, "high", 0.8, 1.0),
        ("single_layer", "spatial", 1.0, "low", 0.8, 1.0),
    ]
    write_parquet(tmp_path / "eval" / "steering.parquet", steering_frame(rows))
    got = {f.key: f for f in findings(tmp_path)}
    assert got["steering_spatial"].status == NOT_MEASURED
    assert "could not be computed (ValueError" in got["steering_spatial"].detail
    assert (
        got["steering_ocr"].status == NOT_MEASURED
        and "no feature and single_layer" in got["steering_ocr"].detail
    )
    html = build_report(tmp_path).read_text()
    assert "could not be computed" in section_html(html, "findings")


def test_model_depth_from_the_vlm_config(tmp_path):
    from mmdiff.report.build import model_depth

    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 32}}))
    cfg = StudyConfig(model=ModelSpec(vlm=str(vlm), base_lm=str(tmp_path / "base")))
    assert model_depth(tmp_path, cfg) == 32
    (vlm / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    assert model_depth(tmp_path, cfg) == 6
    assert model_depth(tmp_path, StudyConfig(model=ModelSpec(vlm="owner/model"))) is None
    assert model_depth(tmp_path / "empty", None) is None  # no config.yaml


def test_feature_cards_are_compact():
    """interp.cards: examples strongest first, image runs collapsed, heatmap thumbnails on the top two only."""
    from mmdiff.interp.cards import MAX_HEATMAPS, THUMB_SIDE, card_record

    big = io.BytesIO()
    Image.new("RGB", (400, 300), (10, 200, 30)).save(big, format="PNG")
    examples = [
        ActivatingExample(tokens=["a", "<im>", "<im>", "b"], activations=[0.0, peak, peak / 2, 1.23456],
                          token_types=[TEXT, IMAGE, IMAGE, TEXT], heatmap_png=big.getvalue(), record_id=f"r{i}")
        for i, peak in enumerate([1.0, 5.0, 3.0, 4.0])
    ]  # fmt: skip
    card = card_record(FeatureCard(layer=2, feature=9, evidence=FeatureEvidence("L2/F9", examples)))
    assert card["id"] == "L2/F9" and [e["record"] for e in card["examples"]] == ["r1", "r3", "r2", "r0"]
    assert card["examples"][0]["tokens"] == [["a", 0.0, "t"], ["<image x2>", 5.0, "i"], ["b", 1.23, "t"]]
    with_heat = [e for e in card["examples"] if "heatmap" in e]
    assert len(with_heat) == MAX_HEATMAPS and with_heat == card["examples"][:MAX_HEATMAPS]
    thumb = Image.open(io.BytesIO(base64.b64decode(with_heat[0]["heatmap"])))
    assert max(thumb.size) == THUMB_SIDE and len(with_heat[0]["heatmap"]) < 4000
