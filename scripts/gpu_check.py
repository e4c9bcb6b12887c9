"""`make gpu-check`: what only a CUDA GPU can check, unattended, start to finish within 10 minutes.

Steps, each under its own time limit and all within `BUDGET_S` (8 minutes):
  tests      pytest -m cuda: bf16 autocast SAE training, the sparse TopK kernels on CUDA against the
             dense reference, single-GPU capture (no process group), interventions' KV-cache equality,
             the certified selection on CUDA (every candidate product against the definition, the
             split product's bound on tensor cores)
  sae_train  benchmarks/sae_train.py --device cuda: ours vs eai-sparsify vs SAE-Lens at D=4096,
             F=32768, k=50, with each step's share of the dense-matmul roofline
  scale      benchmarks/scale.py at real shapes (LLaVA-MORE-shaped 8B VLM in bf16, 32k-latent SAEs):
             capture and training tokens/s against eai-sparsify (the capacity search is skipped: it
             alone takes minutes)
  organism   the organism study on the GPU (model.device = cuda) in a fresh run directory, with
             `mmdiff plan`'s prediction for the same config beside the measured seconds per stage
Writes one file, gpu-check/summary.json (GPU, per step: status, seconds, limit, the output's last
lines; the organism's measured and predicted seconds per stage), and prints it. A step that runs
past its limit is stopped and recorded as "timeout"; the others still run. Exits 1 when any step
did not pass, and at once, saying so, on a machine without CUDA.

`make gpu-check` builds the pinned venv first, which needs the package index. On a GPU machine with
no network, run `python3 scripts/gpu_check.py` under a Python whose torch has CUDA and which can
import mmdiff's dependencies and the peers (e.g. wheels installed with `pip install --no-index
--target DIR` and DIR on PYTHONPATH); the script puts this checkout's `src/` first on the path.
The first run (H200, 2026-12-04) took 276 s of the budget; its figures are in mmdiff/plan.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "gpu-check"
BUDGET_S = 480
TAIL_LINES = 40


def steps(python: str, config: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds), in the order they run."""
    return [
        ("tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs",
                   "tests/test_cuda.py", "tests/test_sae_selection.py"], 90),
        ("sae_train", [python, "benchmarks/sae_train.py", "--device", "cuda", "--steps", "15"], 90),
        ("scale", [python, "benchmarks/scale.py", "--repeats", "2", "--steps", "5",
                   "--skip", "capacity", "--json", str(OUT / "scale.json")], 90),
        ("organism", [python, "-m", "mmdiff", "run", "--config", str(config),
                      "--runs-dir", str(OUT / "runs"), "--force", "--no-progress"], 300),
    ]


def run_step(name: str, command: list[str], limit: float) -> dict:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status = "timeout"
        output = "".join(
            x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
            for x in (exc.stdout, exc.stderr)
        )
    seconds = time.perf_counter() - started
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s (limit {limit:.0f} s)", flush=True)
    return {"step": name, "status": status, "seconds": round(seconds, 1), "limit_s": round(limit),
            "command": " ".join(command), "output_tail": output.splitlines()[-TAIL_LINES:]}


def organism_config() -> Path:
    """The organism study with the model on the GPU, written where the run can read it."""
    from mmdiff.config import default_config, dump_config

    cfg = default_config()
    cfg.name = "organism_cuda"
    cfg.model.device = "cuda"
    path = OUT / "organism_cuda.yaml"
    path.write_text(dump_config(cfg))
    return path


def plan_against_run(config: Path, gpu_name: str) -> dict:
    """`mmdiff plan`'s seconds and peak memory per stage for the organism on this GPU beside the
    run's manifest (`mmdiff.plan.check_against_run`, as `mmdiff plan --against` prints it)."""
    from mmdiff.config import load_config
    from mmdiff.plan import DEVICES, check_against_run, check_text, plan_study

    key = next((k for k in DEVICES if k.split("-")[0] in gpu_name.lower()), "h100")
    plan = plan_study(load_config(config), DEVICES[key])
    manifest = OUT / "runs" / "organism_cuda" / "manifest.json"
    checks = check_against_run(plan, json.loads(manifest.read_text()) if manifest.is_file() else {})
    return {"device_table_entry": key, "table": check_text(plan, checks),
            "stages": {c.stage: {"predicted_s": round(c.predicted_s, 2), "measured_s": c.measured_s,
                                 "predicted_peak_mib": round(c.predicted_peak_bytes / 2**20, 1),
                                 "measured_peak_mib": None if c.measured_peak_bytes is None
                                 else round(c.measured_peak_bytes / 2**20, 1)}
                       for c in checks}}


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch "
              f"{torch.__version__}, cuda {torch.version.cuda}): it checks what only a GPU can "
              "(bf16 autocast, CUDA kernels, GPU capture, GPU benchmarks). Run `make gpu-check` "
              "on a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    summary = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
               "budget_s": BUDGET_S, "steps": []}
    config = organism_config()
    deadline = time.perf_counter() + BUDGET_S
    for name, command, limit in steps(sys.executable, config):
        left = deadline - time.perf_counter()
        if left < 10:
            summary["steps"].append({"step": name, "status": "skipped (budget spent)"})
            continue
        summary["steps"].append(run_step(name, command, min(limit, left)))
    try:
        summary["organism_plan_vs_run"] = plan_against_run(config, gpu)
    except Exception as exc:  # the summary is written whatever the planner thinks
        summary["organism_plan_vs_run"] = {"error": repr(exc)}
    summary["seconds"] = round(BUDGET_S - (deadline - time.perf_counter()), 1)
    path = OUT / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"[gpu-check] summary: {path}")
    return 0 if all(s["status"] == "passed" for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
