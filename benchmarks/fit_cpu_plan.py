"""Refit the planner's CPU rates (mmdiff.plan.CPU_*) from the manifests of real runs on the CPU host.

For each run directory given, the plan of its own config.yaml gives each stage's work counts (forward
FLOPs, SAE FLOPs, record passes, SAE steps, statistics updates, decode steps x layers); the manifest
gives the stage's measured seconds. The rates are the non-negative least-squares solution of
seconds = counts . costs over every (run, stage) pair, each row divided by its measured seconds, so
a 10 s stage weighs as much as a 500 s one (relative error). Stages the plan does not model from
work counts are left out: diff and detect (a constant), interp (dashboards and heatmaps: Python,
not forwards) and report (not planned).

    python benchmarks/fit_cpu_plan.py RUN_DIR [RUN_DIR ...]      # prints the rates and each stage's fit
    python benchmarks/fit_cpu_plan.py --fix 2=0.001 --fix 5=3e-4 --fix 6=0.11 /tmp/fresh/runs/organism
                                                  # how mmdiff.plan's CPU_* were fitted

Use runs of the current code on a quiet host: a loaded host or spinning OpenMP threads scale some
stages and not others, which no set of rates fits.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from mmdiff.config import load_config
from mmdiff.plan import CPU, TABLE_STAGES, model_facts, plan_study

LEFT_OUT = (*TABLE_STAGES, "interp", "report")
COSTS = ("1 / forward FLOP/s", "1 / SAE FLOP/s", "s per record pass", "s per SAE step",
         "s per statistics update", "s per decode step and layer", "s per figure")


def work_rows(run_dir: Path) -> list[tuple[str, np.ndarray, float]]:
    """[(stage, work counts in COSTS order, measured seconds)] of one run."""
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    cfg = load_config(run_dir / "config.yaml")
    plan = plan_study(cfg, replace(CPU, runtime_bytes=0.0))
    n_layers = model_facts(cfg).n_layers
    out = []
    for s in plan.stages:
        m = manifest.get(s.stage) or {}
        if s.stage in LEFT_OUT or m.get("status") != "done" or not m.get("seconds"):
            continue
        counts = np.array([s.forward_flops, s.sae_flops, s.records, s.sae_steps, s.feature_stats,
                           s.generated * n_layers, s.figures], dtype=np.float64)
        out.append((f"{run_dir.name}/{s.stage}", counts, float(m["seconds"])))
    return out


def fit(rows: list[tuple[str, np.ndarray, float]], fixed: dict[int, float] | None = None) -> np.ndarray:
    """Non-negative costs minimising the relative squared error of the stages' seconds; `fixed`
    {index in COSTS: value} holds some costs at measured values (one model size cannot separate the
    per-record cost from the FLOP rate: both grow with the records)."""
    fixed = dict(fixed or {})
    a = np.stack([counts / seconds for _, counts, seconds in rows])
    b = np.ones(len(rows)) - sum(a[:, i] * v for i, v in fixed.items())
    free = [i for i in range(a.shape[1]) if i not in fixed]
    sub = a[:, free]
    scale = sub.max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = nnls(sub / scale, b)
    out = np.zeros(a.shape[1])
    out[free] = x / scale
    for i, v in fixed.items():
        out[i] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (manifest.json + config.yaml)")
    ap.add_argument("--fix", action="append", default=[], metavar="INDEX=VALUE",
                    help="hold cost INDEX (0-6, the order printed) at VALUE, e.g. 2=0.001 for a measured "
                    "per-record preprocessing cost")
    args = ap.parse_args(argv)
    rows = [r for run in args.runs for r in work_rows(run)]
    fixed = {int(k): float(v) for k, v in (f.split("=", 1) for f in args.fix)}
    costs = fit(rows, fixed)
    print("fitted costs:")
    for name, value in zip(COSTS, costs):
        shown = f"{1 / value:.3g}" if name.startswith("1 /") and value > 0 else f"{value:.3g}"
        print(f"  {name:28s} {shown}" + ("  (rate)" if name.startswith("1 /") else ""))
    print(f"{'stage':24s} {'measured':>9s} {'fitted':>9s} {'ratio':>6s}")
    for name, counts, seconds in rows:
        pred = float(counts @ costs)
        print(f"{name:24s} {seconds:9.1f} {pred:9.1f} {seconds / pred if pred else float('nan'):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
