"""Scale benchmark at real sizes with random weights: a LLaVA-MORE-shaped VLM (Llama-3.1-8B text
model + CLIP ViT-L/336 tower, built from configs, nothing downloaded) in bf16, and 32k-latent SAEs.

Measures, in one process on one GPU:
  capture    tokens/s of `mmdiff.capture.capture_residuals` with 8 and with 32 decoder layers hooked
             (the 8 spread so that the whole forward runs), on the GPU and with the copy to pinned
             host memory the activation store needs; peak GPU memory.
  train      SAE training tokens/s at D=4096, F=32768, k=50: mmdiff's `train_step` (the trainer's
             step: TopK fast path, AuxK, dead-latent counters, decoder constraint, Adam) against
             eai-sparsify's SparseCoder step on the same batches in the same run; peak memory;
             mmdiff's certified selection: share of tokens per level, ms per step of each phase.
  capacity   the largest number of layers whose SAEs train at once on this GPU: the memory of one
             more SAE measured (peak with 2 SAEs - peak with 1), the count computed from the
             device's memory, then verified by training that many SAEs together (and one more,
             which must not fit) — and the count for an 80 GB GPU.

It needs CUDA and refuses to run without it. `--cpu-smoke` runs the same code path on CPU with
small dimensions (a Llama/CLIP LLaVA of hidden 64), to check the script itself; its figures say
nothing about real speed.

    python benchmarks/scale.py                       # GPU, ~10 minutes, needs ~60 GB free
    python benchmarks/scale.py --cpu-smoke           # CPU, seconds
    python benchmarks/scale.py --json out.json       # also write the figures as JSON
    torchrun --nproc_per_node 8 benchmarks/scale.py --mode layers   # 32 layers' SAEs over 8 GPUs
    torchrun --nproc_per_node 2 benchmarks/scale.py --cpu-smoke     # the same on CPU with gloo

Under torchrun only the distributed SAE training is measured: `train_saes_distributed` with the
given --mode on every layer (or --layers), effective-batch tokens/s and each rank's peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

warnings.filterwarnings("ignore")
GiB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    """Model and SAE dimensions of one benchmark run."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    image_size: int
    patch: int
    text_tokens: int
    batch: int
    d_sae: int
    k: int
    sae_batch: int
    hooked: tuple[int, int]  # layer counts to hook in the capture benchmark


REAL = Sizes(
    hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256, vision_hidden=1024,
    vision_layers=24, vision_heads=16, vision_ffn=4096, image_size=336, patch=14, text_tokens=64,
    batch=8, d_sae=32768, k=50, sae_batch=4096, hooked=(8, 32),
)  # fmt: skip
SMOKE = Sizes(
    hidden=64, layers=4, heads=4, kv_heads=2, ffn=128, vocab=512, vision_hidden=32,
    vision_layers=2, vision_heads=2, vision_ffn=64, image_size=56, patch=14, text_tokens=12,
    batch=2, d_sae=512, k=8, sae_batch=256, hooked=(2, 4),
)  # fmt: skip


# ---------------------------------------------------------------------------------- the model
def llava_config(s: Sizes) -> Any:
    """LLaVA-MORE's architecture (Llama-3.1-8B + CLIP ViT-L/336-shaped tower) at sizes `s`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=s.vision_hidden, intermediate_size=s.vision_ffn,
        num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
        image_size=s.image_size, patch_size=s.patch, projection_dim=768,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=s.vocab - 1,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )  # fmt: skip


def build_vlm(s: Sizes, device: torch.device) -> Any:
    """Random-init LlavaForConditionalGeneration in bf16, built directly on `device`."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava_config(s), dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def vlm_inputs(s: Sizes, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of BOS + image tokens (one per patch, CLS dropped) + text tokens, and pixels."""
    g = torch.Generator().manual_seed(seed)
    n_image = (s.image_size // s.patch) ** 2
    image_id = s.vocab - 1
    text = torch.randint(1, s.vocab - 2, (s.batch, s.text_tokens), generator=g)
    ids = torch.cat(
        [torch.zeros(s.batch, 1, dtype=torch.long), torch.full((s.batch, n_image), image_id), text],
        1,
    )
    pixels = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, torch.bfloat16),
    }


# ---------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_median(fn: Any, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def spread_layers(n_layers: int, n_hooked: int) -> list[int]:
    """n_hooked layers spread evenly, always including the last (so the whole forward runs)."""
    step = n_layers / n_hooked
    return sorted({min(n_layers - 1, round((i + 1) * step) - 1) for i in range(n_hooked)})


# ---------------------------------------------------------------------------------- capture
def bench_capture(s: Sizes, device: torch.device, repeats: int) -> dict[str, Any]:
    from mmdiff.capture import capture_residuals
    from mmdiff.models.base import Backbone

    model = build_vlm(s, device)
    backbone = Backbone.from_causal_lm(model)
    inputs = vlm_inputs(s, device)
    tokens = int(inputs["input_ids"].numel())
    out: dict[str, Any] = {"tokens_per_batch": tokens, "batch": s.batch,
                           "params_b": sum(p.numel() for p in model.parameters()) / 1e9}  # fmt: skip

    def bare() -> None:
        with torch.inference_mode():
            model(**inputs, use_cache=False)

    reset_peak(device)
    t = timed_median(bare, device, repeats)
    out["forward"] = {"tokens_per_s": tokens / t, "peak_gib": peak_bytes(device) / GiB}
    for n in s.hooked:
        layers = spread_layers(s.layers, n)
        pinned: dict[int, torch.Tensor] = {}

        def run(to_host: bool, layers: list[int] = layers, pinned: dict = pinned) -> None:
            with torch.inference_mode():
                acts = capture_residuals(backbone, inputs, layers)  # layer -> [B, T, d] bf16
                if to_host:
                    for L, a in acts.items():
                        if L not in pinned:
                            pinned[L] = torch.empty(
                                a.shape, dtype=a.dtype, pin_memory=device.type == "cuda"
                            )
                        pinned[L].copy_(a, non_blocking=True)

        reset_peak(device)
        t_dev = timed_median(lambda: run(False), device, repeats)
        peak = peak_bytes(device)
        t_host = timed_median(lambda: run(True), device, repeats)
        out[f"capture_{n}_layers"] = {
            "layers": layers, "tokens_per_s": tokens / t_dev, "tokens_per_s_to_host": tokens / t_host,
            "vs_forward": t_dev / (tokens / out["forward"]["tokens_per_s"]), "peak_gib": peak / GiB,
        }  # fmt: skip
    return out  # the model is freed with this frame; the next part resets the peak


# ---------------------------------------------------------------------------------- SAE training
def synthetic_batch(n: int, d: int, step: int, device: torch.device) -> torch.Tensor:
    """Residual-like tokens: a few hundred random directions with heavy-tailed weights, bf16."""
    g = torch.Generator().manual_seed(1_000_003 + step)
    atoms = torch.nn.functional.normalize(
        torch.randn(512, d, generator=torch.Generator().manual_seed(7)), dim=1
    )
    idx = torch.randint(0, 512, (n, 16), generator=g)
    coef = torch.randn(n, 16, generator=g).abs() * 4
    x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")
    return (x + 0.1 * torch.randn(n, d, generator=g)).to(device, torch.bfloat16)


class OursTrainer:
    """n_saes TopK SAEs (one per layer) trained by the SAE trainer's own `train_step`."""

    def __init__(self, n_saes: int, d: int, s: Sizes, device: torch.device) -> None:
        from mmdiff.sae.loss import DeadLatents
        from mmdiff.sae.trainer import TrainConfig, default_lr
        from mmdiff.sae.warm_start import random_sae

        self.cfg = TrainConfig(
            k=s.k, batch_size=s.sae_batch, d_sae=s.d_sae, bf16=True, device=str(device)
        )
        self.saes = {L: random_sae(d, s.d_sae, s.k, L, 0, str(device)) for L in range(n_saes)}
        self.lrs = {L: default_lr(s.d_sae) for L in self.saes}
        self.opt = torch.optim.Adam(
            [{"params": list(m.parameters()), "lr": self.lrs[L]} for L, m in self.saes.items()]
        )
        self.dead = DeadLatents(
            {L: torch.zeros(s.d_sae, dtype=torch.long, device=device) for L in self.saes},
            self.cfg.dead_tokens_threshold,
        )
        self.device, self.i = device, 0

    def step(self, x: torch.Tensor) -> None:
        from mmdiff.sae.stream import TokenBatch
        from mmdiff.sae.trainer import train_step

        batch = TokenBatch({L: x for L in self.saes}, torch.zeros(x.shape[0], dtype=torch.int8))
        train_step(
            self.saes,
            self.opt,
            self.dead,
            batch,
            self.cfg,
            self.i,
            self.lrs,
            self.device,
            log=False,
        )
        self.i += 1


class SparsifyTrainer:
    """eai-sparsify's SparseCoder with its own FVU + AuxK loss and decoder constraint, Adam."""

    def __init__(self, d: int, s: Sizes, device: torch.device) -> None:
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=s.d_sae, k=s.k), device=device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=2e-4 / math.sqrt(s.d_sae / 2**14))
        self.dead = torch.zeros(s.d_sae, dtype=torch.long, device=device)

    def step(self, x: torch.Tensor) -> None:
        self.sae.set_decoder_norm_to_unit_norm()
        out = self.sae(x.float(), dead_mask=self.dead > 10_000_000)  # it autocasts to bf16 on CUDA
        (out.fvu + out.auxk_loss / 32).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.dead += x.shape[0]
        self.dead[out.latent_indices.flatten()] = 0


def selection_summary(log: Any, steps: int) -> dict[str, Any]:
    """mmdiff's certified selection over the timed steps: the share of tokens per level (0 first
    candidates, 1 second try, 2 all keys), mean ms per step of each phase ("total" is the whole
    call, CUDA events), and keys computed per token."""
    tokens = max(1, sum(len(lv) for lv in log.levels))
    return {
        "level_shares": [round(v, 5) for v in log.level_shares()],
        "ms_per_step": {name: round(t / steps * 1e3, 3) for name, t in log.seconds().items()},
        "keys_per_token": {what: round(c / tokens, 2) for what, c in log.keys.items()},
    }


def bench_train(s: Sizes, device: torch.device, steps: int) -> dict[str, Any]:
    d = s.hidden
    batches = [synthetic_batch(s.sae_batch, d, i, device) for i in range(4)]
    impls: dict[str, Any] = {"mmdiff": OursTrainer(1, d, s, device)}
    try:
        impls["sparsify"] = SparsifyTrainer(d, s, device)
    except ImportError as exc:
        print(f"sparsify skipped: {exc}", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in impls}
    peaks: dict[str, int] = {}
    for name, impl in impls.items():  # warm-up (kernel selection, allocator)
        reset_peak(device)
        impl.step(batches[0])
        impl.step(batches[1])
        sync(device)
        peaks[name] = peak_bytes(device)
    from mmdiff.sae.selection import SelectionLog, recording

    log = SelectionLog()  # mmdiff's selection during the timed steps: levels, phases
    for i in range(steps):  # interleaved, so that any outside load falls on both alike
        for name, impl in impls.items():
            sync(device)
            t0 = time.perf_counter()
            with recording(log) if name == "mmdiff" else contextlib.nullcontext():
                impl.step(batches[i % len(batches)])
            sync(device)
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"d_in": d, "d_sae": s.d_sae, "k": s.k, "batch_tokens": s.sae_batch}
    for name, t in times.items():
        med = sorted(t)[len(t) // 2]
        out[name] = {
            "tokens_per_s": s.sae_batch / med,
            "step_ms": med * 1e3,
            "peak_gib": peaks[name] / GiB,
        }
    if "mmdiff" in out and steps:
        out["mmdiff"]["selection"] = selection_summary(log, steps)
    if "sparsify" in out:
        out["mmdiff_over_sparsify"] = (
            out["mmdiff"]["tokens_per_s"] / out["sparsify"]["tokens_per_s"]
        )
    del impls
    reset_peak(device)
    return out


def trains_with(n: int, s: Sizes, device: torch.device) -> tuple[bool, int]:
    """(whether n SAEs train together for 2 steps without running out of memory, peak bytes)."""
    reset_peak(device)
    x = synthetic_batch(s.sae_batch, s.hidden, 0, device)
    try:
        t = OursTrainer(n, s.hidden, s, device)
        t.step(x)
        t.step(x)
        sync(device)
        return True, peak_bytes(device)
    except torch.OutOfMemoryError:
        return False, peak_bytes(device)
    finally:
        t = None  # drop the SAEs before the next probe
        reset_peak(device)


def bench_capacity(s: Sizes, device: torch.device, budget: int | None) -> dict[str, Any]:
    """Per-SAE memory measured, the layer count that fits computed, then verified."""
    params = s.d_sae * s.hidden * 2 + s.d_sae + s.hidden
    analytic = params * 4 * 4  # fp32 weights, gradients, Adam m and v
    ok1, p1 = trains_with(1, s, device)
    ok2, p2 = trains_with(2, s, device)
    if not (ok1 and ok2):
        return {"error": "two SAEs do not fit at once"}
    if device.type == "cuda":
        per_sae, fixed, source = p2 - p1, 2 * p1 - p2, "measured: peak(2 SAEs) - peak(1 SAE)"
    else:  # peak RSS never goes down: no per-SAE difference to measure on CPU
        per_sae, fixed, source = analytic, 0, "analytic (CPU smoke: no allocator statistics)"
    total = budget if budget is not None else torch.cuda.get_device_properties(device).total_memory
    usable = int(total * 0.97)  # allocator fragmentation and the CUDA context
    n_fit = max(0, (usable - fixed) // per_sae)
    out: dict[str, Any] = {
        "per_sae_gib": per_sae / GiB, "per_sae_source": source, "analytic_state_gib": analytic / GiB, "fixed_gib": fixed / GiB,
        "device_gib": total / GiB, "computed_layers": int(n_fit),
        "computed_layers_80gb": int(max(0, (int(80e9 * 0.97) - fixed) // per_sae)),
    }  # fmt: skip
    if device.type == "cuda":  # a CPU smoke has no allocator limit to verify against
        ok, peak = trains_with(n_fit, s, device)
        over, _ = trains_with(n_fit + 1, s, device)
        out |= {"verified": ok, "verified_peak_gib": peak / GiB, "one_more_fits": over}
    else:
        ok, peak = trains_with(min(n_fit, 3), s, device)
        out |= {"verified": ok, "verified_peak_gib": peak / GiB, "one_more_fits": None}
    return out


# ---------------------------------------------------------------------------------- torchrun
def bench_train_distributed(
    s: Sizes, steps: int, mode: str, n_layers: int, tmp: str
) -> dict[str, Any] | None:
    """SAE training of `n_layers` layers over the ranks of torchrun (`train_saes_distributed`):
    effective-batch tokens/s and per-rank peak memory. Each rank feeds its own synthetic slice
    (presharded), so the figure is the training's, not a data loader's. Rank 0's result, else None.
    """
    from mmdiff.distributed import all_gather_object, init_distributed
    from mmdiff.parallel import train_saes_distributed
    from mmdiff.sae.trainer import TrainConfig

    ctx = init_distributed()
    device = ctx.device
    local = s.sae_batch // ctx.world_size
    data = [
        {
            "acts": {L: synthetic_batch(local, s.hidden, 97 * ctx.rank + i + L, device) for L in range(n_layers)},
            "token_types": torch.zeros(local, dtype=torch.int8, device=device),
        }
        for i in range(2)
    ]  # fmt: skip
    cfg = TrainConfig(
        k=s.k, batch_size=s.sae_batch, total_tokens=s.sae_batch * (steps + 2), d_sae=s.d_sae,
        buffer_tokens=s.sae_batch, checkpoint_every=0, log_every=10**9, device=str(device),
    )  # fmt: skip
    stamps: list[float] = []

    def on_step(step: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    reset_peak(device)
    train_saes_distributed(
        None, data, list(range(n_layers)), cfg, f"{tmp}/{mode}", mode=mode, presharded=True,
        progress=False, on_step=on_step,
    )  # fmt: skip
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps[2:]))  # after 2 warm-up steps
    step_s = gaps[len(gaps) // 2] if gaps else float("nan")
    peaks = all_gather_object(peak_bytes(device) / GiB)
    if not ctx.is_main:
        return None
    return {
        "mode": mode, "world_size": ctx.world_size, "layers": n_layers, "d_sae": s.d_sae,
        "batch_tokens": s.sae_batch, "step_ms": step_s * 1e3,
        "tokens_per_s": s.sae_batch / step_s, "layer_tokens_per_s": s.sae_batch * n_layers / step_s,
        "peak_gib_per_rank": peaks,
    }  # fmt: skip


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--cpu-smoke", action="store_true", help="small dims on CPU: checks the script, not speed"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed capture passes (median)")
    p.add_argument(
        "--steps", type=int, default=20, help="timed SAE steps per implementation (median)"
    )
    p.add_argument("--skip", default="", help="comma list of parts to skip: capture,train,capacity")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument(
        "--mode",
        default="layers",
        choices=["layers", "ddp"],
        help="under torchrun: the distributed training mode to measure",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="under torchrun: layers trained together (default: all of the model's)",
    )
    a = p.parse_args(argv)

    if a.cpu_smoke:
        s, device = SMOKE, torch.device("cpu")
        torch.set_num_threads(1)
        a.repeats, a.steps = min(a.repeats, 2), min(a.steps, 3)
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "benchmarks/scale.py measures real sizes (an 8B VLM in bf16, 32k-latent SAEs) and "
                "needs a CUDA GPU with about 60 GB free; torch sees none here. Run it on a GPU "
                "machine, or pass --cpu-smoke to check the script on CPU at small sizes."
            )
        s, device = REAL, torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    skip = set(filter(None, a.skip.split(",")))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the distributed training only
        with tempfile.TemporaryDirectory() as tmp:
            from mmdiff.distributed import broadcast_object, init_distributed

            init_distributed("gloo" if device.type == "cpu" else None)
            tmp = broadcast_object(tmp)  # one output folder for all ranks (a shared filesystem)
            out = bench_train_distributed(s, a.steps, a.mode, a.layers or s.layers, tmp)
        if out is not None:
            print(json.dumps({"train_distributed": out}, indent=1), flush=True)
            if a.json:
                from mmdiff.atomic import write_json

                write_json(a.json, {"train_distributed": out})
        return out or {}
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "sizes": dataclasses.asdict(s),
    }  # fmt: skip
    if "capture" not in skip:
        results["capture"] = bench_capture(s, device, a.repeats)
        print(json.dumps({"capture": results["capture"]}, indent=1), flush=True)
    if "train" not in skip:
        results["train"] = bench_train(s, device, a.steps)
        print(json.dumps({"train": results["train"]}, indent=1), flush=True)
    if "capacity" not in skip:
        budget = None if device.type == "cuda" else 64 * (1 << 20)  # smoke: a pretend 64 MiB device
        results["capacity"] = bench_capacity(s, device, budget)
        print(json.dumps({"capacity": results["capacity"]}, indent=1), flush=True)
    if a.json:
        from mmdiff.atomic import write_json

        write_json(a.json, results)
    return results


if __name__ == "__main__":
    main()
