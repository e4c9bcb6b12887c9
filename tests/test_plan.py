"""`mmdiff plan`: the organism's predicted tokens against the real encoding, real-size warnings, the CLI."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mmdiff.cli import app
from mmdiff.config import DatasetSpec, ModelSpec, StudyConfig, default_config
from mmdiff.data.selection import load_records
from mmdiff.models import load_adapter
from mmdiff.plan import DEVICES, GIB, PLAN_COLUMNS, plan_rows, plan_study
from mmdiff.study import resolve_model_paths


@pytest.fixture(scope="module")
def organism_plan():
    return plan_study(default_config(), DEVICES["h100"])


def test_organism_tokens_and_disk_match_the_encoded_records(organism_plan):
    """The plan samples 64 records; every record of the train set, encoded, is within 3%."""
    cfg = default_config()
    vlm, base = resolve_model_paths(cfg)
    adapter = load_adapter(vlm, base_lm=base, dtype=torch.float32)
    records = load_records(cfg.datasets["train"])
    exact = 0
    for side in ("vlm", "base"):
        make = adapter.vlm_inputs if side == "vlm" else adapter.base_inputs
        for s in range(0, len(records), 64):
            exact += int(make(records[s : s + 64])["attention_mask"].sum())
    capture = organism_plan.stages[0]
    assert capture.stage == "capture"
    assert capture.tokens == pytest.approx(exact, rel=0.03)
    # the stores hold tokens x layers x d_model float32 values
    assert capture.disk_bytes == pytest.approx(capture.tokens * 4 * 128 * 4)
    assert organism_plan.datasets["train"].image_tokens == 64  # (64 / 8)^2 patches, no CLS
    names = [s.stage for s in organism_plan.stages]
    assert names == ["capture", "train", "stats", "diff", "detect", "attribute", "interp",
                     "concepts", "ablate", "steer"]
    assert all(s.seconds > 0 for s in organism_plan.stages)
    assert organism_plan.warnings == []
    rows = plan_rows(organism_plan)
    assert len(rows) == len(names) + 1 and all(len(r) == len(PLAN_COLUMNS) for r in rows)


def _llava_more(layers: list[int], capture: bool = False) -> StudyConfig:
    """LLaVA-MORE from its published config (no files here), 50k VQAv2 records assumed."""
    spec = DatasetSpec(kind="vqav2", args={"questions": "/absent/q.json", "images": "/absent"},
                       limit=50_000)
    cfg = StudyConfig(
        name="llava_more", layers=layers,
        model=ModelSpec(vlm="/models/LLaVA_MORE-llama_3_1-8B-finetuning", base_lm="/models/Llama-3.1-8B",
                        dtype="bfloat16", device="cuda"),
        datasets={"train": spec, "test": spec.model_copy(update={"limit": 1000})},
    )
    cfg.train.base_saes = "/sae/L{layer}"
    cfg.train.batch_size = 4096
    cfg.train.total_tokens = 50_000_000
    cfg.capture.datasets = ["train"] if capture else []
    cfg.capture.dtype = "bfloat16"
    return cfg


@pytest.mark.slow
def test_all_32_layers_of_an_8b_model_do_not_fit_one_80gb_gpu():
    few = plan_study(_llava_more([8, 16, 24]), DEVICES["h100"])
    assert few.warnings == [], few.warnings
    assert few.params["vlm"] == pytest.approx(8.36e9, rel=0.01)
    train = next(s for s in few.stages if s.stage == "train")
    # runtime 1 GiB + weights (8.4B + 8.0B params in bf16) + 3 layers x (268M SAE params x 16 bytes
    # + 3 x 4096 tokens x 32768 latents x 4 bytes)
    expected = 16.39e9 * 2 + 3 * (268.5e6 * 16 + 3 * 4096 * 32768 * 4)
    assert train.peak_bytes / GIB == pytest.approx(expected / GIB + 1, rel=0.02)
    full = plan_study(_llava_more(list(range(32)), capture=True), DEVICES["h100"])
    text = "\n".join(full.warnings)
    assert "train: 32 layers' SAEs with Adam state" in text
    assert "layers per rank under torchrun (torchrun --nproc-per-node" in text
    assert "capture: the activation stores take" in text and "capture.datasets: []" in text
    assert any("not readable here" in a for a in full.assumptions)


def test_cli_plan_and_dry_run_print_the_table():
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--device", "a100"])
    assert result.exit_code == 0, result.output
    assert "plan of 'organism' on A100 80 GB" in result.output
    for stage in ("capture", "train", "steer", "total"):
        assert stage in result.output
    bad = runner.invoke(app, ["plan", "--device", "tpu"])
    assert bad.exit_code != 0 and "unknown device 'tpu'" in str(bad.exception)


def test_plan_against_a_run_divides_measured_by_predicted(organism_plan, tmp_path):
    """Hand-made manifest: ratios are measured / predicted; on CUDA the runtime allowance is taken
    off the prediction (the allocator's peak holds no CUDA context); unfinished stages are '-'."""
    from mmdiff.config import dump_config
    from mmdiff.plan import check_against_run, check_text

    by = {s.stage: s for s in organism_plan.stages}
    runtime = organism_plan.device.runtime_bytes
    manifest = {"stages": {
        "capture": {"status": "done", "seconds": 2 * by["capture"].seconds,
                    "peak_cuda_mib": (by["capture"].peak_bytes - runtime) / 2**20},
        "train": {"status": "failed", "seconds": 1.0, "peak_cuda_mib": 1.0},
    }}
    checks = {c.stage: c for c in check_against_run(organism_plan, manifest)}
    assert checks["capture"].time_ratio == pytest.approx(2.0)
    assert checks["capture"].peak_ratio == pytest.approx(1.0)
    assert checks["capture"].peak_kind == "cuda allocated"
    assert checks["train"].time_ratio is None and checks["train"].peak_ratio is None
    assert checks["steer"].measured_s is None
    text = check_text(organism_plan, list(checks.values()))
    assert any(line.startswith("time: measured / predicted from 2.00x to 2.00x over 1 stages") for line in text)

    run = tmp_path / "run"
    run.mkdir()
    import json

    (run / "manifest.json").write_text(json.dumps(manifest))
    cfg = default_config()
    cfg.model.device = "cuda"
    (run / "config.yaml").write_text(dump_config(cfg))
    result = CliRunner().invoke(app, ["plan", "--against", str(run), "--device", "h100"])
    assert result.exit_code == 0, result.output
    assert "against the run" in result.output and "2.00x" in result.output
    missing = CliRunner().invoke(app, ["plan", "--against", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "does not exist" in str(missing.exception)


def test_control_evaluations_count_what_an_organism_run_evaluated(organism_plan):
    """The ablate stage's evaluations per analysis, as the organism run of 2026-12-04 recorded them
    (eval/<analysis>.json "evaluations": set variants 57, dose-response 60, pipeline ablation 28);
    the removal experiment: clean + 3 sets + their split random controls on all 1,600 records."""
    from mmdiff.plan import control_evaluations

    test = organism_plan.datasets["eval"]
    assert test.tasks == {"vqa": 600, "existence": 200, "spatial": 200, "spatial_open": 200, "ocr": 200,
                          "safety": 200}
    counts = control_evaluations(default_config(), test)
    assert counts["removal"][:2] == (42, 7 * 1600)
    assert {k: counts[k][0] for k in ("set_variants", "dose_response", "pipeline_ablation")} == {
        "set_variants": 57, "dose_response": 60, "pipeline_ablation": 28}
    # decode steps: safety's 48 tokens per batch dominate; yes/no tasks decode nothing
    assert counts["removal"][2] > 0
    ablate = next(s for s in organism_plan.stages if s.stage == "ablate")
    assert ablate.records == pytest.approx(sum(r for _, r, _ in counts.values()) + 320)  # + the regime's pass
