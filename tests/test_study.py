"""`mmdiff run` end to end on a tiny LLaVA and a JSONL dataset written here (reduced settings)."""

import json
import re

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
    for i in range(16):
        Image.new("RGB", (32, 32), ((37 * i) % 255, (91 * i) % 255, 200)).save(root / f"im{i}.png")
        spatial = i % 2 == 0
        rows.append({"id": f"r{i}", "image": f"im{i}.png",
                     "question": "Is the square left of the circle?" if spatial else "What colour is it?" + " really" * (i % 3),
                     "answers": ["yes" if spatial else "red"], "caption": f"a red square and a circle {i}",
                     "tasks": ["spatial", "yesno"] if spatial else ["vqa"],
                     "image_id": 100 + i})  # to record.meta: the COCO instances below annotate these images
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = {
        "name": "tiny",
        "model": {"vlm": str(models / "vlm"), "base_lm": str(models / "base")},
        "layers": [0, 1],
        "datasets": {"train": {"kind": "jsonl", "args": {"path": str(root / "data.jsonl")}},
                     "test": {"kind": "jsonl", "args": {"path": str(root / "data.jsonl")}, "limit": 8},
                     "validation": {"kind": "jsonl", "args": {"path": str(root / "data.jsonl")}, "limit": 8, "seed": 1}},
        "capture": {"datasets": ["train"], "batch_size": 4, "shard_tokens": 1024},
        "train": {"k": 4, "batch_size": 64, "total_tokens": 1024, "checkpoint_every": 5, "expansion_factor": 4},
        "stats": {"tasks": ["spatial"], "neutral_tasks": ["spatial"], "n_chunks": 4, "top_k": 4},
        "diff": {"n_bootstrap": 5},
        # a random tiny model has no real task features: loose thresholds so control has sets to remove
        "detect": {"restrict_to_adapted": False, "min_delta_p": 0.0, "alpha": 0.5, "min_image_share": 0.0,
                   "min_neutral_firing": 0.0},
        "control": {"n_random": 2, "n_boot": 200, "alphas": [-1.0, 0.0, 1.0], "batch_size": 8},
        "attribution": {"top_k": 2, "n_calibration": 8, "max_features": 3, "overlay_heads": 1},
        "interp": {"k": 3, "max_adapted": 2},
        "concepts": {"k": 2, "holdout": 0.0},
    }
    (root / "study.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_run_whole_chain_then_skips(tiny_study):
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
    assert manifest["stages"]["capture"]["summary"]["train/vlm"]["records"] == 16
    stages = manifest["stages"]
    assert [s for s in stages if stages[s]["status"] == "done"] == [
        "capture", "train", "stats", "diff", "detect", "attribute", "interp", "ablate", "concepts", "steer",
        "report"]
    assert stages["report"]["outputs"]["report/index.html"]  # the report is a stage, hashed like the others
    for role in ("base", "full", "image", "text", "random"):
        assert (run / "saes" / role / "layer_1" / "cfg.json").is_file()
    models = yaml.safe_load((tiny_study / "study.yaml").read_text())["model"]
    for role, model in (("base", models["base_lm"]), ("full", models["vlm"])):  # as SAELens reads them
        meta = json.loads((run / "saes" / role / "layer_1" / "cfg.json").read_text())["metadata"]
        assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["model_name"] == model
    import pandas as pd

    diff = pd.read_parquet(run / "stats" / "diff.parquet")
    d_sae = json.loads((run / "saes" / "text" / "layer_0" / "cfg.json").read_text())["d_sae"]
    assert len(diff) == stages["diff"]["summary"]["features"] == 2 * d_sae  # every feature of both layers
    assert 0 < stages["diff"]["summary"]["adapted"] < len(diff)
    assert len(pd.read_parquet(run / "features" / "spatial.parquet")) > 0
    effects = pd.read_parquet(run / "eval" / "effects.parquet")
    assert {"intervention", "eval_task", "effect", "ci_lo", "ci_hi", "control_effect", "n"} <= set(effects.columns)
    assert (effects["ci_lo"] <= effects["effect"]).all() and (effects["effect"] <= effects["ci_hi"]).all()
    # the removal analyses share the ablate stage; the pipeline ablation has the random regime's row
    pipeline = pd.read_parquet(run / "eval" / "pipeline_ablation.parquet")
    assert {"random", "random-regime SAE", "contrastive", "+ adapted"} <= set(pipeline["selection"])
    assert (run / "eval" / "dose_response.parquet").is_file() and stages["ablate"]["summary"]["cpu_seconds"]
    steering = pd.read_parquet(run / "eval" / "steering.parquet")
    assert set(steering["method"]) == {"feature", "single_layer"}
    html = (run / "report" / "index.html").read_text()
    assert "Adapted features" in html and html.count("<script") == 2  # the feature data and the report's script
    res = runner.invoke(app, args)
    assert (run / "interp" / "dashboards" / "index.html").is_file()
    assert len(pd.read_parquet(run / "attribution" / "heads.parquet")) > 0
    assert res.exit_code == 0 and res.output.count("skipped") >= 10
    assert re.search(r"^\s+report\s+done\s", res.output, re.M)  # rebuilt from the run on every run
    assert (run / "config.yaml").exists()
    # a changed detect threshold redoes detect only
    res = runner.invoke(app, args + ["--only", "detect", "--force"])
    assert res.exit_code == 0 and "detect       done" in res.output


def test_interp_grounds_features_on_coco_boxes(tiny_study, tmp_path):
    """interp.grounding_coco: the validation records' images, found by meta image_id in a COCO
    instances file, ground every task feature on COCO categories (interp/grounding.parquet)."""
    import shutil

    import pandas as pd

    runs = ["--no-progress"]
    base = ["run", "--config", str(tiny_study / "study.yaml"), "--runs-dir", str(tiny_study / "runs")]
    assert CliRunner().invoke(app, [*base, *runs]).exit_code == 0
    images = [{"id": 100 + i, "file_name": f"im{i}.png", "width": 32, "height": 32} for i in range(16)]
    anns = [{"id": 1000 + i, "image_id": 100 + i, "category_id": 17 if i % 2 else 18, "iscrowd": 0,
             "bbox": [0.0, 0.0, 16.0, 32.0] if i % 2 else [16.0, 8.0, 16.0, 16.0], "area": 256.0}
            for i in range(16) if i % 4 != 3]  # every fourth image has no object
    coco = tmp_path / "annotations" / "instances_val2014.json"
    coco.parent.mkdir()
    coco.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 17, "name": "cat", "supercategory": "animal"}, {"id": 18, "name": "dog", "supercategory": "animal"}]}))
    cfg = yaml.safe_load((tiny_study / "study.yaml").read_text())
    cfg["interp"].update({"grounding": "validation", "grounding_coco": [str(coco)]})
    p = tmp_path / "coco.yaml"
    p.write_text(yaml.safe_dump(cfg))
    shutil.copytree(tiny_study / "runs" / "tiny", tmp_path / "runs" / "tiny")
    res = CliRunner().invoke(app, ["run", "--config", str(p), "--runs-dir", str(tmp_path / "runs"), "--only", "interp",
                                   *runs])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "manifest.json").read_text())["stages"]["interp"]["summary"]
    assert summary["grounding_records"] == 8  # the validation split's 8 records, all annotated
    table = pd.read_parquet(run / "interp" / "grounding.parquet")
    spatial = pd.read_parquet(run / "features" / "spatial.parquet")
    own = table[table.task == "spatial"]
    assert len(own) and set(zip(own.layer, own.feature)) == set(zip(spatial.layer, spatial.feature))
    assert set(table.task) <= {"spatial", "adapted"}
    assert set(table.concept.dropna()) <= {"category=cat", "category=dog"} and table.concept.notna().any()
    explanations = json.loads((run / "interp" / "explanations.json").read_text())["explanations"]
    scored = {c["concept"] for e in explanations if e["grounded"] for c in e["grounded"]["candidates"]}
    assert {"category=cat", "category=dog"} <= scored
    assert all("detection" in e["grounded"] for e in explanations if e["grounded"])
    share = pd.read_parquet(run / "interp" / "match_share.parquet")
    assert list(share.task) == ["spatial", "all"] and (share.ci_lo <= share.share).all()


def test_unrelated_dataset_change_reruns_nothing(tiny_study, tmp_path):
    cfg = yaml.safe_load((tiny_study / "study.yaml").read_text())
    cfg["datasets"]["extra"] = {"kind": "jsonl", "args": {"path": str(tiny_study / "data.jsonl")}}
    p = tmp_path / "more.yaml"
    p.write_text(yaml.safe_dump(cfg))
    runs = ["--runs-dir", str(tiny_study / "runs"), "--no-progress"]
    assert CliRunner().invoke(app, ["run", "--config", str(tiny_study / "study.yaml"), *runs]).exit_code == 0
    res = CliRunner().invoke(app, ["run", "--config", str(p), *runs])
    assert res.exit_code == 0, res.output
    rows = [r for r in re.findall(r"^\s+(\w+)\s+(done|skipped)\s", res.output, re.M) if r[0] != "report"]
    assert len(rows) == 10 and {status for _, status in rows} == {"skipped"}


def test_dry_run_names_missing_things(tiny_study, tmp_path):
    cfg = yaml.safe_load((tiny_study / "study.yaml").read_text())
    cfg["capture"]["datasets"] = ["nope"]
    cfg["model"]["vlm"] = str(tmp_path / "missing_model")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["run", "--config", str(p), "--dry-run"])
    assert res.exit_code == 2  # bad input (docs/bad_inputs.md), as every other command
    assert "'nope'" in res.output and "missing_model" in res.output
    res = CliRunner().invoke(app, ["run", "--config", str(tiny_study / "study.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output


def test_kill_during_training_then_resume(tiny_study, tmp_path):
    """SIGKILL while the SAEs train: capture stays done, the rerun resumes and finishes every stage."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = yaml.safe_load((tiny_study / "study.yaml").read_text())
    cfg["name"] = "killed"
    cfg["train"]["total_tokens"] = 4096  # long enough to be caught mid-way
    p = tmp_path / "killed.yaml"
    p.write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "mmdiff", "run", "--config", str(p), "--runs-dir", str(runs), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    manifest = runs / "killed" / "manifest.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest.exists():
                stages = json.loads(manifest.read_text())["stages"]
                if stages.get("train", {}).get("status") == "running" and list((runs / "killed" / "saes").glob("*/layer_0")):
                    break  # at least one role finished, another is training
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    stages = json.loads(manifest.read_text())["stages"]
    assert stages["capture"]["status"] == "done" and stages["train"]["status"] == "running"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    stages = json.loads(manifest.read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values()), {k: s["status"] for k, s in stages.items()}
    assert re.search(r"capture\s+skipped", res.stdout + res.stderr)
    assert "train: it was interrupted" in " ".join((res.stdout + res.stderr).split())  # the resume is announced


def test_stages_lists_the_report_last_and_each_description_once(tiny_study):
    from mmdiff.study import STAGE_FUNCTIONS

    res = CliRunner().invoke(app, ["stages", "--config", str(tiny_study / "study.yaml")])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(STAGE_FUNCTIONS)
    assert lines[-1].startswith("report") and lines[-1].endswith("-> report/index.html")
    # a stage's description is its function's docstring: in `mmdiff stages` and in its command's help
    first_line = STAGE_FUNCTIONS["detect"].__doc__.strip().splitlines()[0]
    assert first_line in res.output
    helped = CliRunner().invoke(app, ["detect", "--help"], env={"COLUMNS": "400"})
    assert " ".join(first_line.split()) in " ".join(helped.output.split())
