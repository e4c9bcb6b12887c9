"""Residual capture of 4 layers vs a bare forward with output_hidden_states=True, one process.

The model is a small-but-not-trivial LLaVA built locally (Llama text model, hidden 256, 8 layers,
8 heads; CLIP tower on 32-pixel images, 64 image tokens), loaded through `load_adapter` like any
checkpoint. Both sides run the same padded batch under torch.inference_mode:
  bare      model(**inputs, output_hidden_states=True, use_cache=False): every hidden state + logits
  plain     model(**inputs, use_cache=False): logits only, for reference
  capture   mmdiff.capture.capture_residuals(backbone, inputs, layers): hooks on 4 decoder layers,
            forward stopped after the last hooked layer (no final norm, no lm_head)
Two layer sets: the spread set ends at the last layer (early stop saves only norm + lm_head: the
ratio measures hook overhead, target <= 1.10); the early set stops halfway.
Variants run interleaved after a warm-up; each figure is the median over the repeats.

    python benchmarks/capture.py                   # CPU, float32
    python benchmarks/capture.py --device cuda --dtype bfloat16 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

warnings.filterwarnings("ignore")

TARGET_RATIO = 1.10


def make_records(n: int, image_size: int):
    from mmdiff.data.records import Record

    rng = np.random.default_rng(0)
    questions = ["Is the red circle left of the blue square?", "What colour is the square?"]
    return [
        Record(
            id=f"b{i}",
            question=questions[i % 2] + " " + "Describe the positions of all objects." * (i % 3),
            image=Image.fromarray(
                rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
            ),
            caption="A red circle to the left of a blue square.",
        )
        for i in range(n)
    ]


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    from mmdiff.capture import capture_residuals
    from mmdiff.models import load_adapter
    from mmdiff.models.tiny import BASE_SUBDIR, VLM_SUBDIR, build_tiny

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = build_tiny(
            "llava",
            Path(tmp),
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            image_size=args.image_size,
        )
        adapter = load_adapter(
            root / VLM_SUBDIR, base_lm=root / BASE_SUBDIR, dtype=args.dtype, device=device
        )
    backbone = adapter.vlm
    inputs = adapter.vlm_inputs(make_records(args.batch, args.image_size))
    n = args.layers
    spread = sorted({n // 4 - 1, n // 2 - 1, 3 * n // 4 - 1, n - 1})
    early = list(range(min(4, n // 2)))

    variants: dict[str, Callable[[], object]] = {
        "bare forward (output_hidden_states)": lambda: backbone.model(
            **inputs, output_hidden_states=True, use_cache=False
        ),
        "plain forward (logits only)": lambda: backbone.model(**inputs, use_cache=False),
        f"capture layers {spread}": lambda: capture_residuals(backbone, inputs, spread),
        f"capture layers {early}": lambda: capture_residuals(backbone, inputs, early),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        names = list(variants)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
                times[name].append(timed(variants[name], device))

    b, t = inputs["input_ids"].shape
    print(f"device {device}, dtype {backbone.dtype}, torch threads {torch.get_num_threads()}")
    print(
        f"model: hidden {args.hidden}, {n} layers, {args.heads} heads; batch {b} x {t} tokens "
        f"({int((inputs['input_ids'] == adapter.image_token_id).sum()) // b} image tokens per row)"
    )
    # On a shared CPU, wall time includes waiting for a core; process CPU time does not (exact with
    # one thread). On a GPU only the wall figure means anything.
    ratios = {}
    for clock, index in (("wall", 0), ("cpu", 1)):
        if clock == "cpu" and device.type != "cpu":
            continue
        base = statistics.median(x[index] for x in times[names[0]])
        print(f"median {clock} time over {args.repeats} interleaved repeats:")
        for name in names:
            median = statistics.median(x[index] for x in times[name])
            print(f"  {name:<42} {median * 1e3:8.2f} ms   ratio to bare {median / base:5.3f}")
        ratios[clock] = statistics.median(x[index] for x in times[names[2]]) / base
    for clock, ratio in ratios.items():
        verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
        print(
            f"capture/bare ({clock}) with the last layer hooked: {ratio:.3f} ({verdict} the target <= {TARGET_RATIO})"
        )


if __name__ == "__main__":
    main()
