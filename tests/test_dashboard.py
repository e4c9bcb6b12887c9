"""Feature dashboards: escaping of hostile dataset text, self-contained pages, the interp stage."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmdiff.data.records import Record
from mmdiff.errors import DataError
from mmdiff.interp.dashboard import (
    FeatureCard,
    feature_row,
    render_feature_page,
    render_index,
    write_dashboards,
    write_interp,
)
from mmdiff.interp.explain import ActivatingExample, Explanation, FeatureEvidence, OfflineExplainer
from mmdiff.models import load_adapter
from mmdiff.models.tiny import BASE_SUBDIR, VLM_SUBDIR, build_tiny
from mmdiff.sae import SAEConfig, build_sae

SCRIPT = "<script>alert(1)</script>"
ONERROR = '"><img src=x onerror=alert(1)>'
PNG = b"\x89PNG\r\n\x1a\nfake"


def hostile_card() -> FeatureCard:
    record = Record(id="evil", question=f"Is it {SCRIPT}?", caption=f"A cat {ONERROR}", source="VQAv2")
    example = ActivatingExample(
        tokens=["<s>", "Is", " it", f" {SCRIPT}", "<image>", "<image>", "?"],
        activations=[9.0, 0.0, 1.0, 2.0, 0.5, 0.25, 0.0],
        token_types=[2, 0, 0, 0, 1, 1, 0],
        heatmap_png=PNG,
        record_id="evil",
        source=ONERROR,
    )
    evidence = FeatureEvidence("L1/F2", [example], promoted_tokens=[(SCRIPT, 1.5)], image_share=0.2)
    explanation = Explanation(
        description=f"Fires on {SCRIPT}", confidence=0.5, patterns=[ONERROR], cue_counts={SCRIPT: 1}, source="offline"
    )
    heads = pd.DataFrame({"feature_layer": [1, 1], "feature": [2, 2], "layer": [0, 1], "head": [3, 1],
                          "score_a": [0.1, -0.4], "score_b": [0.2, 0.3], "exact": [np.nan, 0.5]})
    return FeatureCard(
        layer=1, feature=2, evidence=evidence, explanation=explanation,
        detection={"balanced_accuracy": 0.75, SCRIPT: 1},
        tables={"selection": {"variance_gap": 1.25, "note": ONERROR}},
        activations=np.array([0.0, 1.0, 2.0, 2.5]), heads=heads, overlays={"top1_L1H1": PNG},
        records={"evil": record},
    )


def assert_escaped(html: str) -> None:
    assert SCRIPT not in html and "<script" not in html.lower()
    assert ONERROR not in html and "<img src=x" not in html and "onerror=alert(1)>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_hostile_text_is_escaped():
    html = render_feature_page(hostile_card())
    assert_escaped(html)
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html  # the caption, escaped
    assert "question: Is it &lt;script&gt;" in html
    index = render_index([hostile_card()])
    assert_escaped(index)


def test_page_content_and_highlighting():
    html = render_feature_page(hostile_card())
    # images inline: two heatmap / overlay PNGs and the histogram, no external sources
    uris = re.findall(r'src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 3
    assert not re.search(r'src="(?!data:)', html)
    # background alpha = activation / peak over non-special tokens (peak 2.0; BOS's 9.0 does not count)
    assert "rgba(255, 99, 0, 0.500)" in html and "rgba(255, 99, 0, 1.000)" in html
    assert "&lt;image x2&gt;" in html  # the image-token run, collapsed
    # heads sorted by |score_a|: L1H1 (-0.4) before L0H3 (0.1)
    assert html.index("<td>-0.4</td>") < html.index("<td>0.1</td>")
    assert "balanced_accuracy 0.75" in html and "variance_gap" in html


def test_feature_row_and_firing_by_token_type():
    table = pd.DataFrame({"layer": [1, 1], "feature": [2, 3], "fires_text": [3, 0], "tokens_text": [12, 12],
                          "fires_image": [5, 1], "tokens_image": [20, 20], "split": ["vqa", "vqa"]})
    row = feature_row(table, (1, 2))
    assert row["firing_frequency_text"] == 0.25 and row["firing_frequency_image"] == 0.25
    assert row["split"] == "vqa" and "layer" not in row
    assert feature_row(table, (4, 4)) == {}
    with pytest.raises(DataError, match="layer and feature"):
        feature_row(pd.DataFrame({"x": [1]}), (1, 2))


def test_write_dashboards(tmp_path):
    cards = [hostile_card(), FeatureCard(layer=2, feature=0)]
    paths = write_dashboards(cards, tmp_path)
    assert paths["L1/F2"].name == "L1_F2.html" and paths["L2/F0"].is_file()
    index = paths["index"].read_text()
    assert 'href="L1_F2.html"' in index and 'href="L2_F0.html"' in index
    assert "did not fire" in paths["L2/F0"].read_text()
    with pytest.raises(DataError):
        write_dashboards([], tmp_path)


def test_interp_stage_on_tiny_llava(tmp_path):
    root = build_tiny("llava", tmp_path / "llava")
    adapter = load_adapter(root / VLM_SUBDIR, base_lm=root / BASE_SUBDIR, dtype=torch.float32)
    rng = np.random.default_rng(0)

    def record(i: int, question: str, caption: str | None = None) -> Record:
        image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        return Record(id=f"q{i}", question=question, caption=caption, image=image)

    vqa = [record(0, f"What is {SCRIPT}?", f"caption {ONERROR}"), record(1, "What colour is the square?")]
    vsr = [record(2, "Is the red circle left of the blue square?")]
    sae = build_sae(SAEConfig(architecture="relu", d_in=adapter.vlm.d_model, d_sae=8))
    sae.init_weights(seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    features = pd.DataFrame({"layer": [1, 1], "feature": [0, 3], "variance_gap": [0.5, 0.25]})

    class BatchExplainer:  # stands in for the LLM explainer: requests go out as one batch
        def __init__(self) -> None:
            self.calls: list[int] = []

        def explain_many(self, evidences, progress=True):
            self.calls.append(len(evidences))
            return [OfflineExplainer().explain(ev) for ev in evidences]

    explainer = BatchExplainer()
    paths = write_interp(
        adapter, {1: sae}, features, {"VQAv2": vqa, "VSR": vsr}, tmp_path / "interp", k=2, explainer=explainer,
        detections={"L1/F0": {"balanced_accuracy": 0.8}}, progress=False,
    )
    assert explainer.calls == [2]
    maxima = pd.read_parquet(paths["examples"])
    assert len(maxima) == 2 * 3 and set(maxima["source"]) == {"VQAv2", "VSR"}
    explanations = json.loads(paths["explanations"].read_text())["explanations"]
    assert {e["feature_id"] for e in explanations} <= {"L1/F0", "L1/F3"}
    pages = sorted((tmp_path / "interp" / "dashboards").glob("*.html"))
    assert [p.name for p in pages] == ["L1_F0.html", "L1_F3.html", "index.html"]
    texts = [page.read_text() for page in pages]
    for text in texts:
        assert_escaped_or_absent(text)
    # the hostile record is among the examples, and its question and caption are shown escaped
    assert any("question: What is &lt;script&gt;alert(1)&lt;/script&gt;?" in t for t in texts)
    assert any("caption: caption &#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in t for t in texts)
    html = (tmp_path / "interp" / "dashboards" / "L1_F0.html").read_text()
    assert "variance_gap" in html and "data:image/png;base64," in html and "balanced_accuracy 0.8" in html


def assert_escaped_or_absent(html: str) -> None:
    assert SCRIPT not in html and ONERROR not in html and "<script" not in html.lower()
