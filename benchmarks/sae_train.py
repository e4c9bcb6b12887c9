"""TopK SAE training throughput: mmdiff's fast path vs eai-sparsify vs SAELens, one process.

Every implementation trains on the same synthetic batches (a known sparse dictionary plus noise),
with the same k, batch size and Adam settings, each through its own training step:
  ours      TopKSAE.forward (k-sparse autograd kernel), FVU loss, decoder-parallel gradient
            removed, Adam, decoder rows renormalised: the same step as sparsify's trainer.
  sparsify  SparseCoder.forward (its fused encoder + embedding_bag decoder), FVU loss, its
            remove_gradient_parallel_to_decoder_directions / set_decoder_norm_to_unit_norm, Adam.
  sae-lens  TopKTrainingSAE.training_forward_pass (its loss: summed MSE), clip_grad_norm_(1.0)
            and Adam as its SAETrainer does.
AuxK is off for all three (no dead-latent bookkeeping), so the steps do the same work.

Prints tokens/s per implementation, the ratios, held-out FVU after the same number of tokens,
the measured dense-matmul rate of the encoder's shape and each step's share of that roofline
(time of one [batch, D] @ [D, F] matmul / time of one training step: 1.0 would mean the step costs
no more than the one dense product an exact TopK cannot avoid).

    python benchmarks/sae_train.py                  # CPU: D=512, F=8192, k=32, 2 threads
    python benchmarks/sae_train.py --device cuda    # GPU: D=4096, F=32768, k=50, bf16
    python benchmarks/sae_train.py --profile        # where ours spends its time
"""

# ruff: noqa: B023  (the timed lambdas run at once, inside their loop iteration)
from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------------ the data
class SyntheticActivations:
    """x = sum of n_active atoms of a random unit dictionary (|N(0,1)| + 0.5 weights) + noise."""

    def __init__(self, d: int, n_atoms: int, n_active: int, noise: float, seed: int, device: str):
        g = torch.Generator().manual_seed(seed)
        self.atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
        self.atoms = self.atoms.to(device)
        self.n_active, self.noise, self.seed, self.device = n_active, noise, seed, device

    def batch(self, step: int, n: int) -> torch.Tensor:  # [n, d], the same for every impl
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(0, self.atoms.shape[0], (n, self.n_active), generator=g)
        coef = torch.randn(n, self.n_active, generator=g).abs() + 0.5
        noise = torch.randn(n, self.atoms.shape[1], generator=g) * self.noise
        idx, coef, noise = idx.to(self.device), coef.to(self.device), noise.to(self.device)
        return torch.nn.functional.embedding_bag(idx, self.atoms, per_sample_weights=coef,
                                                 mode="sum") + noise


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# ---------------------------------------------------------------------------- implementations
@dataclass
class Impl:
    name: str
    step: Callable[[torch.Tensor, int], None]  # one optimiser step on a batch
    reconstruct: Callable[[torch.Tensor], torch.Tensor]  # x -> x_hat (no grad)


def adam(params, lr: float, kind: str) -> torch.optim.Optimizer:
    """The same Adam for every implementation: torch's default kernel or its fused one."""
    return torch.optim.Adam(params, lr=lr, fused=True) if kind == "fused" else \
        torch.optim.Adam(params, lr=lr)


def make_ours(D: int, F: int, k: int, lr: float, device: str, bf16: bool, opt_kind: str) -> Impl:
    from mmdiff.sae.base import SAEConfig
    from mmdiff.sae.topk import TopKSAE

    sae = TopKSAE(SAEConfig("topk", d_in=D, d_sae=F, k=k, device=device))
    sae.init_weights(seed=0)
    if bf16:
        sae.select_dtype = torch.bfloat16  # bf16 encoder product picks the k, values exact
    opt = adam(sae.parameters(), lr, opt_kind)

    def step(x: torch.Tensor, i: int) -> None:
        if i == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
        out = sae(x)
        loss = (out.x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        loss.backward()
        with torch.no_grad():  # keep decoder rows on the unit sphere, as sparsify does
            g = sae.W_dec.grad
            g.sub_((g * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    def rec(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sae(x).x_hat

    return Impl("ours", step, rec)


def make_sparsify(D: int, F: int, k: int, lr: float, device: str, bf16: bool, opt_kind: str) -> Impl:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=F, k=k), device=device)
    opt = adam(sae.parameters(), lr, opt_kind)

    def step(x: torch.Tensor, i: int) -> None:
        if i == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)  # autocasts to bf16 on CUDA by itself
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def rec(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            sae.set_decoder_norm_to_unit_norm()
            return sae(x).sae_out.float()

    return Impl("sparsify", step, rec)


def make_saelens(D: int, F: int, k: int, lr: float, device: str, bf16: bool, opt_kind: str) -> Impl:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=k, device=device))
    opt = adam(sae.parameters(), lr, opt_kind)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device == "cuda")

    def step(x: torch.Tensor, i: int) -> None:
        if i == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
        sae.train()
        with autocast:
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=i,
                is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def rec(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sae(x).float()

    return Impl("sae-lens", step, rec)


MAKERS = {"ours": make_ours, "sparsify": make_sparsify, "sae-lens": make_saelens}


# -------------------------------------------------------------------------------- measurement
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(B: int, D: int, F: int, device: str, dtype: torch.dtype, reps: int = 5) -> tuple[float, float]:
    """(GFLOP/s, seconds) of one [B, D] @ [D, F] matmul, median of `reps`."""
    a = torch.randn(B, D, device=device, dtype=dtype)
    b = torch.randn(D, F, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    return 2 * B * D * F / t / 1e9, t


def run_interleaved(impls: list[Impl], data: SyntheticActivations, steps: int, warmup: int, B: int,
                    device: str, held_out: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each step, every implementation trains on the same batch in turn, so that load from
    other processes on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for i in range(warmup + steps):
        x = data.batch(i, B)
        for impl in impls:
            sync(device)
            t0 = time.perf_counter()
            impl.step(x, i)
            sync(device)
            if i >= warmup:
                times[impl.name].append(time.perf_counter() - t0)
    out = {}
    for impl in impls:
        t = times[impl.name]
        out[impl.name] = {"tokens_per_s": steps * B / sum(t), "step_s": sum(t) / steps,
                          "median_step_s": sorted(t)[len(t) // 2],
                          "fvu": fvu(held_out, impl.reconstruct(held_out)),
                          "tokens": (warmup + steps) * B}
    return out


def profile_ours(D: int, F: int, k: int, B: int, lr: float, device: str, bf16: bool,
                 data: SyntheticActivations, opt_kind: str, steps: int = 6) -> str:
    """Median milliseconds of each phase of ours: the forward's parts (encoder matmul, top-k,
    sparse decoder) timed alone on the same tensors, then the training step's phases."""
    from mmdiff.sae.base import SAEConfig
    from mmdiff.sae.kernels import sparse_decode
    from mmdiff.sae.topk import TopKSAE

    sae = TopKSAE(SAEConfig("topk", d_in=D, d_sae=F, k=k, device=device))
    sae.init_weights(seed=0)
    sae.select_dtype = torch.bfloat16 if bf16 else None
    opt = adam(sae.parameters(), lr, opt_kind)
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], object]) -> object:
        sync(device)
        t0 = time.perf_counter()
        r = fn()
        sync(device)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return r

    mm_dtype = torch.bfloat16 if bf16 else torch.float32
    for i in range(steps + 2):
        x = data.batch(i, B)
        with torch.no_grad():
            x_in = (x - sae.b_dec).to(mm_dtype)
            W, b = sae.W_enc.detach().to(mm_dtype), sae.b_enc.detach().to(mm_dtype)
            pre = timed("encoder matmul (alone)", lambda: torch.addmm(b, x_in, W))
            v, idx = timed("top-k (alone)", lambda: pre.topk(k, dim=-1, sorted=False))
            timed("sparse decoder (alone)", lambda: sparse_decode(idx, v.float().relu(), sae.W_dec))
        out = timed("step: forward", lambda: sae(x))
        loss = timed("step: FVU loss", lambda: (out.x_hat - x).pow(2).sum()
                     / (x - x.mean(0)).pow(2).sum())
        timed("step: backward", loss.backward)

        def constrain() -> None:
            with torch.no_grad():
                g = sae.W_dec.grad
                g.sub_((g * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec)

        timed("step: decoder-parallel grad removal", constrain)
        timed("step: optimizer", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        timed("step: decoder renorm", sae.set_decoder_norm_to_unit_norm)
    lines = [f"{'phase':40s} median ms"]
    for name, ts in times.items():
        kept = sorted(ts[2:])  # first two are warm-up
        lines.append(f"{name:40s} {kept[len(kept) // 2] * 1e3:9.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (count as tokens)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--impls", default="ours,sparsify,sae-lens")
    p.add_argument("--adam", default="default", choices=["default", "fused"],
                   help="Adam kernel, the same for every implementation")
    p.add_argument("--bf16-select", action="store_true",
                   help="ours: choose the k latents from a bf16 encoder product (CPU opt-in)")
    p.add_argument("--profile", action="store_true", help="print a profile of ours and exit")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    if a.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no GPU.")
        D, F, k, bf16 = 4096, 32768, 50, True
    else:
        D, F, k, bf16 = 512, 8192, 32, a.bf16_select
        torch.set_num_threads(a.threads)
    B = a.batch_size
    data = SyntheticActivations(D, n_atoms=F // 4, n_active=k // 2, noise=0.05, seed=a.seed,
                                device=a.device)
    held_out = data.batch(10**6, 4096)

    print(f"device={a.device} threads={torch.get_num_threads()} D={D} F={F} k={k} batch={B} "
          f"steps={a.steps}+{a.warmup} warmup lr={a.lr} adam={a.adam} bf16={bf16} "
          f"torch={torch.__version__}")
    if a.profile:
        print(profile_ours(D, F, k, B, a.lr, a.device, bf16, data, a.adam))
        return

    gflops32, t32 = matmul_rate(B, D, F, a.device, torch.float32)
    gflops16, t16 = matmul_rate(B, D, F, a.device, torch.bfloat16)
    print(f"dense matmul [{B},{D}]@[{D},{F}]: fp32 {gflops32:.1f} GFLOP/s ({t32 * 1e3:.1f} ms), "
          f"bf16 {gflops16:.1f} GFLOP/s ({t16 * 1e3:.1f} ms)")
    roof_t = t16 if bf16 else t32

    impls = []
    for name in a.impls.split(","):
        try:
            impls.append(MAKERS[name](D, F, k, a.lr, a.device, bf16, a.adam))
        except ImportError as e:
            print(f"{name:9s} skipped: {e}")
    results = run_interleaved(impls, data, a.steps, a.warmup, B, a.device, held_out)
    for name, r in results.items():
        print(f"{name:9s} {r['tokens_per_s']:10.0f} tokens/s  step {r['step_s'] * 1e3:8.1f} ms "
              f"(median {r['median_step_s'] * 1e3:.1f})  roofline share "
              f"{roof_t / r['median_step_s']:.2f}  held-out FVU {r['fvu']:.4f} "
              f"after {r['tokens']} tokens")
    if "ours" in results:
        for peer, target in (("sparsify", 2.0), ("sae-lens", 5.0)):
            if peer in results:
                ratio = results["ours"]["tokens_per_s"] / results[peer]["tokens_per_s"]
                med = results[peer]["median_step_s"] / results["ours"]["median_step_s"]
                print(f"ours/{peer}: {ratio:.2f}x tokens/s, {med:.2f}x by median step "
                      f"(target >= {target:g}x: {'met' if ratio >= target else 'missed'} by "
                      f"tokens/s); FVU ours {results['ours']['fvu']:.4f} vs "
                      f"{results[peer]['fvu']:.4f}")
    if not math.isfinite(sum(r["fvu"] for r in results.values())):
        raise SystemExit("a run diverged (non-finite FVU)")


if __name__ == "__main__":
    main()
