"""How OpenMP's wait policy changes torch CPU time, on an idle host and beside busy processes.

`import mmdiff` sets OMP_WAIT_POLICY=PASSIVE when the variable is unset (docs/design.md): under
load, spinning threads wait for descheduled peers at every parallel region. This measures what
that costs and saves, one fresh interpreter per setting (libgomp reads its environment once, when
torch loads it), each running the same work on torch's threads:
  small     2,000 x ([64, 256] @ [256, 1024], ReLU, sum): the study's many small kernels
  organism  10 training steps of the organism VLM at batch 32 (the build's and the study's model)
Settings: OpenMP's default (spin a while, then sleep), PASSIVE (sleep at once), and
GOMP_SPINCOUNT=10000 (spin briefly). Each setting runs on an idle host and beside `--load`
processes that spin on the CPU (the shared-host case). Prints seconds, the median of `--repeats`.

    python benchmarks/omp_wait.py                 # 2 threads, idle and beside 2 busy processes
    python benchmarks/omp_wait.py --threads 2 --load 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys

SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
}

WORK = r'''
import json, sys, time, torch
threads, kind = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(threads)
if kind == "small":
    a, b = torch.randn(64, 256), torch.randn(256, 1024)
    def run():
        s = 0.0
        for _ in range(2000):
            s += float(torch.relu(a @ b).sum())
else:
    from mmdiff.organism import checkpoint_path, evaluate as ev, mixtures
    from mmdiff.organism.batches import vlm_batch
    from mmdiff.organism.train import next_token_loss
    vlm, proc, base, tok = ev.load_organism(checkpoint_path())
    from itertools import islice
    records = list(islice(mixtures.stage2_stream(0, 4), 32 * 10))
    batches = [vlm_batch(tok, records[i:i + 32], 64) for i in range(0, len(records), 32)]
    opt = torch.optim.AdamW(vlm.parameters(), lr=1e-4)
    vlm.train()
    def run():
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop("labels")
            logits = vlm(**batch).logits
            loss = next_token_loss(logits, labels)
            opt.zero_grad(); loss.backward(); opt.step()
run()  # warm-up
t = time.perf_counter(); run(); print(json.dumps(time.perf_counter() - t))
'''


def _spin(stop) -> None:  # a busy process: the shared host's other jobs
    x = 0
    while not stop.is_set():
        x += 1


def measure(setting: dict, threads: int, kind: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(setting)
    out = subprocess.run([sys.executable, "-c", WORK, str(threads), kind], env=env, capture_output=True,
                         text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", type=int, default=2, help="busy processes beside the work in the loaded runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="small,organism")
    a = p.parse_args()
    print(f"{'work':<10} {'host':<8} " + " ".join(f"{s:>10}" for s in SETTINGS) + "   (seconds, median)")
    for kind in a.work.split(","):
        for loaded in (False, True):
            stop = mp.Event()
            procs = [mp.Process(target=_spin, args=(stop,)) for _ in range(a.load if loaded else 0)]
            for q in procs:
                q.start()
            try:
                row = {name: statistics.median(measure(env, a.threads, kind) for _ in range(a.repeats))
                       for name, env in SETTINGS.items()}
            finally:
                stop.set()
                for q in procs:
                    q.join()
            host = f"load {a.load}" if loaded else "idle"
            print(f"{kind:<10} {host:<8} " + " ".join(f"{row[s]:>10.2f}" for s in SETTINGS), flush=True)


if __name__ == "__main__":
    main()
