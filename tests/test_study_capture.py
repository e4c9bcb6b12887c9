"""The capture stage inside `mmdiff run`, on a tiny LLaVA and a JSONL dataset written here."""

import json

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from mmdiff.cli import app
from mmdiff.models.tiny import build_tiny
from mmdiff.store import ActivationStore


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    models = build_tiny("llava", root / "tiny")
    rows = []
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 0, 255 - 40 * i)).save(root / f"im{i}.png")
        rows.append({"id": f"r{i}", "image": f"im{i}.png", "question": "Is the square left of the circle?" + " really" * i,
                     "answers": ["yes"], "caption": f"a picture number {i}"})
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {
        "name": "tiny",
        "model": {"vlm": str(models / "vlm"), "base_lm": str(models / "base")},
        "layers": [0, 1],
        "datasets": {"train": {"kind": "jsonl", "args": {"path": str(root / "data.jsonl")}}},
        "capture": {"datasets": ["train"], "batch_size": 2, "shard_tokens": 1024},
    }
    (root / "study.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_run_captures_then_skips(tiny_study):
    runner = CliRunner()
    args = ["run", "--config", str(tiny_study / "study.yaml"), "--runs-dir", str(tiny_study / "runs"), "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run = tiny_study / "runs" / "tiny"
    vlm = ActivationStore(run / "activations" / "train" / "vlm")
    base = ActivationStore(run / "activations" / "train" / "base")
    assert vlm.layers == [0, 1] and base.layers == [0, 1]
    assert vlm.count_tokens([1]) > 0  # image tokens on the VLM side
    assert base.count_tokens([1]) == 0  # none on the caption side
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["capture"]["status"] == "done"
    assert manifest["stages"]["capture"]["summary"]["train/vlm"]["records"] == 5
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "skipped" in res.output
    assert (run / "config.yaml").exists()


def test_dry_run_names_missing_things(tiny_study, tmp_path):
    cfg = yaml.safe_load((tiny_study / "study.yaml").read_text())
    cfg["capture"]["datasets"] = ["nope"]
    cfg["model"]["vlm"] = str(tmp_path / "missing_model")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["run", "--config", str(p), "--dry-run"])
    assert res.exit_code == 1
    assert "'nope'" in res.output and "missing_model" in res.output
    res = CliRunner().invoke(app, ["run", "--config", str(tiny_study / "study.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
