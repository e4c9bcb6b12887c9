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

Then the same at each implementation's own recommended settings (RECOMMENDED), each table with
time to quality against each peer: training seconds until ours' held-out FVU first reaches the
best FVU the peer reached in the run, beside the peer's own seconds to it (FVU measured at
log-spaced steps, dense early; a ratio marked ">=" means ours was already there at its first
measurement; "not resolved" that the peer was too, so the first step's times would be all the
ratio measured); on CPU, the ceiling of the tokens/s ratio an exact TopK allows (the peer's step
over one dense fp32 encoder product, which no exact selection avoids); and an ablation of ours
(one ingredient changed at a time) at equal tokens. Ours selects with the certified exact TopK
(mmdiff.sae.selection): split bf16 ("bf16x3") candidates on CUDA, working-dtype candidates on CPUs
without fast bf16. Below each table: where ours' timed steps spend their time (forward, of which
the selection and its phases, loss, backward, optimizer; CUDA events on a GPU) and the share of
tokens the selection certified at each level (0: first candidates, 1: second try, 2: all keys).
"""

# ruff: noqa: B023  (the timed lambdas run at once, inside their loop iteration)
from __future__ import annotations

import argparse
import contextlib
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
TOTAL = "total"  # the selection's whole call, beside its phases


class StepPhases:
    """Where ours' training steps spend their time: marks between the step's phases (CUDA events
    on a GPU, so nothing synchronises inside a step; perf_counter on CPU) and the selection's own
    phases and levels (mmdiff.sae.selection.recording). `on` is False outside timed steps."""

    STEP = ("forward", "loss", "backward", "optimizer + decoder constraint")

    def __init__(self, device: str) -> None:
        from mmdiff.sae.selection import SelectionLog

        self.device, self.on = device, False
        self.log = SelectionLog()
        self.steps: list[list[object]] = []

    def _stamp(self) -> object:
        if self.device == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        if self.on:
            self.steps.append([self._stamp()])

    def mark(self) -> None:
        if self.on:
            self.steps[-1].append(self._stamp())

    def selecting(self):
        from mmdiff.sae.selection import recording

        return recording(self.log) if self.on else contextlib.nullcontext()

    def summary(self) -> str:
        """Mean milliseconds per step of each phase, the selection's split, its levels."""
        if not self.steps:
            return ""
        sync(self.device)

        def dt(a: object, b: object) -> float:
            return a.elapsed_time(b) / 1e3 if self.device == "cuda" else b - a  # type: ignore

        n = len(self.steps)
        step = {name: sum(dt(m[i], m[i + 1]) for m in self.steps) / n
                for i, name in enumerate(self.STEP)}
        sel = {name: t / n for name, t in self.log.seconds().items()}
        sel_total = sel.pop(TOTAL, 0.0)
        total = sum(step.values())
        lines = [f"ours, mean per step over {n} timed steps: {total * 1e3:.1f} ms = "
                 + " + ".join(f"{name} {t * 1e3:.1f}" for name, t in step.items())]
        lines.append(f"  selection (inside forward) {sel_total * 1e3:.1f} ms = "
                     + ", ".join(f"{name} {t * 1e3:.1f}" for name, t in sel.items())
                     + f"; rest of forward (sparse decoder, glue) "
                       f"{(step['forward'] - sel_total) * 1e3:.1f} ms")
        shares = self.log.level_shares()
        tokens = sum(len(lv) for lv in self.log.levels)
        keys = ", ".join(f"{what} {c / max(tokens, 1):.1f}" for what, c in self.log.keys.items())
        lines.append("  selection levels (share of tokens): "
                     + "  ".join(f"{i}: {v:.4f}" for i, v in enumerate(shares))
                     + (f"; keys computed per token: {keys}" if keys else ""))
        return "\n".join(lines)


@dataclass
class Impl:
    name: str
    step: Callable[[torch.Tensor, int], None]  # one optimiser step on a batch
    reconstruct: Callable[[torch.Tensor], torch.Tensor]  # x -> x_hat (no grad)
    settings: str = ""  # what differs from the equal settings, for the table
    phases: StepPhases | None = None  # ours: where its steps spend their time


RECOMMENDED = {  # each implementation's own documented defaults (warmups left out: see docs)
    "ours": "mmdiff's trainer: fused Adam (make_optimizer), lr 2e-4 / sqrt(F / 2^14) (default_lr), "
            "FVU loss",
    "sparsify": "SignSGD + ScheduleFree (momentum 0.95), lr 5e-3 / sqrt(F / 2^14), FVU loss",
    "sae-lens": "Adam (0.9, 0.999), lr 3e-4, summed MSE, clip 1.0, TopKTrainingSAEConfig defaults",
}


def adam(params, lr: float, kind: str) -> torch.optim.Optimizer:
    """The same Adam for every implementation: torch's default kernel or its fused one."""
    return torch.optim.Adam(params, lr=lr, fused=True) if kind == "fused" else \
        torch.optim.Adam(params, lr=lr)


CANDIDATES = {"auto": "auto", "bf16x3": "bf16x3", "bf16": torch.bfloat16, "fp32": None}
CANDIDATE_CHOICE = "auto"  # --candidates


def candidate_product(device: str, bf16: bool) -> object:
    """Ours' candidate product (TopKSAE.candidate_dtype): --candidates, else "auto" (split bf16 on
    CUDA, fp32 on this project's AVX2 CPU), or bf16 on CPU with --bf16-select."""
    if CANDIDATE_CHOICE != "auto":
        return CANDIDATES[CANDIDATE_CHOICE]
    return torch.bfloat16 if bf16 and device == "cpu" else "auto"


def make_ours(D: int, F: int, k: int, lr: float, device: str, bf16: bool, opt_kind: str,
              recommended: bool = False, init: str = "tied", constrain: bool = True,
              loss: str = "fvu") -> Impl:
    """`init`: "tied" (ours: W_enc = W_dec^T, unit rows) or "sparsify" (an nn.Linear encoder,
    decoder = its rows normalised); `constrain`: remove the decoder-parallel gradient; `loss`:
    "fvu" or "mse_sum" (SAELens's). The last three exist for the ablation."""
    from mmdiff.sae.base import SAEConfig
    from mmdiff.sae.loss import constrain_decoder_grad
    from mmdiff.sae.topk import TopKSAE
    from mmdiff.sae.trainer import default_lr, make_optimizer

    sae = TopKSAE(SAEConfig("topk", d_in=D, d_sae=F, k=k, device=device))
    sae.init_weights(seed=0)
    if init == "sparsify":
        torch.manual_seed(0)
        enc = torch.nn.Linear(D, F, device=device)
        with torch.no_grad():
            sae.W_enc.copy_(enc.weight.T)
            sae.W_dec.copy_(enc.weight)
            sae.set_decoder_norm_to_unit_norm()
    sae.candidate_dtype = candidate_product(device, bf16)
    # recommended: the optimizer mmdiff's trainer builds (fused Adam where torch has it)
    opt = (make_optimizer({0: sae}, [0], {0: default_lr(F)}) if recommended
           else adam(sae.parameters(), lr, opt_kind))
    ph = StepPhases(device)

    def step(x: torch.Tensor, i: int) -> None:
        if i == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
        ph.start()
        with ph.selecting():
            out = sae(x)
        ph.mark()
        err = (out.x_hat - x).pow(2).sum()
        loss_ = err / (x - x.mean(0)).pow(2).sum() if loss == "fvu" else err / len(x)
        ph.mark()
        loss_.backward()
        ph.mark()
        if constrain:  # keep decoder rows on the unit sphere, as sparsify does
            constrain_decoder_grad(sae)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        ph.mark()

    def rec(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sae(x).x_hat

    return Impl("ours", step, rec, RECOMMENDED["ours"] if recommended else "", phases=ph)


def make_sparsify(D: int, F: int, k: int, lr: float, device: str, bf16: bool, opt_kind: str,
                  recommended: bool = False) -> Impl:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=F, k=k), device=device)
    if recommended:  # sparsify's default optimizer ("signum") and its learning-rate rule
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=5e-3 / (F / 2**14) ** 0.5),
                                  momentum=0.95)
        opt.train()
    else:
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
        if recommended:
            opt.eval()  # ScheduleFree evaluates at its averaged weights
        with torch.no_grad():
            sae.set_decoder_norm_to_unit_norm()
            x_hat = sae(x).sae_out.float()
        if recommended:
            opt.train()
        return x_hat

    return Impl("sparsify", step, rec, RECOMMENDED["sparsify"] if recommended else "")


def make_saelens(D: int, F: int, k: int, lr: float, device: str, bf16: bool, opt_kind: str,
                 recommended: bool = False) -> Impl:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=k, device=device))
    opt = adam(sae.parameters(), 3e-4 if recommended else lr, opt_kind)  # its runner's default
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

    return Impl("sae-lens", step, rec, RECOMMENDED["sae-lens"] if recommended else "")


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


def eval_steps(total: int, every: int) -> set[int]:
    """Steps (1-based) after which the held-out FVU is measured: every `every` steps, or for
    every=0 log-spaced (1, 2, 3, 4, 5, 7, 9, 12, 16, ...: about x1.3 apart), plus the last.
    Dense early points matter: time to quality is read where the fast learners cross a target."""
    if every:
        return set(range(every, total + 1, every)) | {total}
    out, s = {total}, 1
    while s <= total:
        out.add(s)
        s = max(s + 1, round(s * 1.3))
    return out


def run_interleaved(impls: list[Impl], data: SyntheticActivations, steps: int, warmup: int, B: int,
                    device: str, held_out: torch.Tensor, eval_every: int = 0,
                    ) -> dict[str, dict]:
    """Each step, every implementation trains on the same batch in turn, so that load from
    other processes on a shared machine falls on all of them alike. After the steps of
    `eval_steps` (untimed) the held-out FVU joins each one's curve: (tokens, training seconds
    so far, FVU)."""
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    curves: dict[str, list[tuple[int, float, float]]] = {impl.name: [] for impl in impls}
    evals = eval_steps(warmup + steps, eval_every)
    for i in range(warmup + steps):
        x = data.batch(i, B)
        for impl in impls:
            if impl.phases is not None:
                impl.phases.on = i >= warmup
            sync(device)
            t0 = time.perf_counter()
            impl.step(x, i)
            sync(device)
            times[impl.name].append(time.perf_counter() - t0)
            if i + 1 in evals:
                curves[impl.name].append(((i + 1) * B, sum(times[impl.name]),
                                          fvu(held_out, impl.reconstruct(held_out))))
    out = {}
    for impl in impls:
        if impl.phases is not None:
            impl.phases.on = False
        t = times[impl.name][warmup:]
        out[impl.name] = {"tokens_per_s": steps * B / sum(t), "step_s": sum(t) / steps,
                          "median_step_s": sorted(t)[len(t) // 2],
                          "fvu": fvu(held_out, impl.reconstruct(held_out)),
                          "tokens": (warmup + steps) * B, "curve": curves[impl.name],
                          "settings": impl.settings,
                          "phases": impl.phases.summary() if impl.phases is not None else ""}
    return out


def first_crossing(curve: list[tuple[int, float, float]], target: float
                   ) -> tuple[int, float, bool] | None:
    """(tokens, training seconds, at the first evaluation?) where the curve first reaches FVU <=
    target; None if it never does. At the first evaluation the true crossing may be earlier."""
    for j, (tok, sec, f) in enumerate(curve):
        if f <= target:
            return tok, sec, j == 0
    return None


def time_to_peer_best(results: dict[str, dict], peer: str) -> dict:
    """Time to quality against one peer: the target is the best held-out FVU the peer reached in
    the run. -> {target, ours / peer: (tokens, seconds, at first evaluation) or None, ratio: the
    peer's seconds / ours (None if ours never got there), lower_bound: ours crossed at its first
    evaluation, so the true ratio is at least the figure}."""
    target = min(f for _, _, f in results[peer]["curve"])
    mine = first_crossing(results["ours"]["curve"], target)
    theirs = first_crossing(results[peer]["curve"], target)
    return {"target": target, "ours": mine, "peer": theirs,
            "ratio": theirs[1] / mine[1] if mine and theirs else None,
            "lower_bound": bool(mine and mine[2])}


def print_table(title: str, results: dict[str, dict], roof_t: float, fp32_product: bool) -> None:
    """One row per implementation, then ours' time split and its ratios to each peer: tokens/s
    (with the ceiling an exact fp32 selection allows on this machine) and time to the peer's
    best held-out FVU."""
    print(f"\n{title}")
    for name, r in results.items():
        tok, sec, best = min(r["curve"], key=lambda c: c[2])
        print(f"{name:9s} {r['tokens_per_s']:8.0f} tokens/s  median step "
              f"{r['median_step_s'] * 1e3:7.1f} ms  roofline {roof_t / r['median_step_s']:.2f}  "
              f"FVU {r['fvu']:.4f} after {r['tokens']} tokens (best {best:.4f} at {tok} tokens, "
              f"{sec:.1f} s)" + (f"  [{r['settings']}]" if r["settings"] else ""))
    if "ours" not in results:
        return
    if results["ours"]["phases"]:
        print(results["ours"]["phases"])
    for peer, (t_speed, t_time) in (("sparsify", (2.0, 3.0)), ("sae-lens", (6.0, None))):
        if peer not in results:
            continue
        speed = results["ours"]["tokens_per_s"] / results[peer]["tokens_per_s"]
        med = results[peer]["median_step_s"] / results["ours"]["median_step_s"]
        line = (f"ours/{peer}: {speed:.2f}x tokens/s (by median step {med:.2f}x; target "
                f">= {t_speed:g}x {'met' if speed >= t_speed else 'missed'}")
        if fp32_product:  # ours' step holds one dense product, which no exact TopK avoids
            line += f"; ceiling {results[peer]['median_step_s'] / roof_t:.2f}x"
        q = time_to_peer_best(results, peer)
        if q["ratio"] is None:
            line += f"); ours never reached {peer}'s best FVU {q['target']:.4f}"
        elif q["lower_bound"] and q["peer"][2]:
            line += (f"); {peer}'s best FVU {q['target']:.4f} came at its first measurement, "
                     f"where ours was already below it: time to it not resolved")
        else:
            ge = ">= " if q["lower_bound"] else ""
            line += (f"); to {peer}'s best FVU {q['target']:.4f}: ours {q['ours'][1]:.1f} s at "
                     f"{q['ours'][0]} tokens, {peer} {q['peer'][1]:.1f} s at {q['peer'][0]}: "
                     f"{ge}{q['ratio']:.2f}x in time")
            if t_time:
                line += f" (target >= {t_time:g}x {'met' if q['ratio'] >= t_time else 'missed'})"
        print(line)
    if fp32_product:
        print("ceiling = the peer's median step / one dense fp32 [B,D]@[D,F] product: the most an "
              "exact TopK can gain on this machine without a faster product than fp32")


ABLATION = {  # name -> make_ours keyword arguments; each row changes one thing from "ours"
    "ours (tied init, FVU loss, lr as given)": {},
    "sparsify's init (nn.Linear encoder)": {"init": "sparsify"},
    "summed-MSE loss (SAELens's lr scale)": {"loss": "mse_sum"},
    "no decoder-parallel gradient removal": {"constrain": False},
    "mmdiff's trainer: lr 2e-4/sqrt(F/2^14), fused": {"recommended": True},
}


def ablation(D: int, F: int, k: int, lr: float, device: str, bf16: bool, opt_kind: str,
             data: SyntheticActivations, steps: int, B: int, held_out: torch.Tensor) -> str:
    """Held-out FVU of ours after `steps` steps with one ingredient changed at a time."""
    lines = [f"{'ablation of ours (equal tokens: ' + str(steps * B) + ')':48s} held-out FVU"]
    for name, kw in ABLATION.items():
        impl = make_ours(D, F, k, lr, device, bf16, opt_kind, **kw)
        for i in range(steps):
            impl.step(data.batch(i, B), i)
        lines.append(f"{name:48s} {fvu(held_out, impl.reconstruct(held_out)):.4f}")
    return "\n".join(lines)


def profile_ours(D: int, F: int, k: int, B: int, lr: float, device: str, bf16: bool,
                 data: SyntheticActivations, opt_kind: str, steps: int = 6) -> str:
    """Median milliseconds of each phase of ours: the forward's parts (encoder matmul, top-k,
    sparse decoder) timed alone on the same tensors, then the training step's phases."""
    from mmdiff.sae.base import SAEConfig
    from mmdiff.sae.kernels import plain_topk, sparse_decode
    from mmdiff.sae.selection import SelectionLog, certified_topk, recording
    from mmdiff.sae.topk import TopKSAE

    sae = TopKSAE(SAEConfig("topk", d_in=D, d_sae=F, k=k, device=device))
    sae.init_weights(seed=0)
    sae.candidate_dtype = candidate_product(device, bf16)
    opt = adam(sae.parameters(), lr, opt_kind)
    times: dict[str, list[float]] = {}
    certified: list[float] = []
    log = SelectionLog()

    def timed(name: str, fn: Callable[[], object]) -> object:
        sync(device)
        t0 = time.perf_counter()
        r = fn()
        sync(device)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return r

    for i in range(steps + 2):
        x = data.batch(i, B)
        with torch.no_grad():
            x_in = x - sae.b_dec
            W, b = sae.W_enc.detach(), sae.b_enc.detach()
            timed("encoder matmul fp32 (alone)", lambda: torch.addmm(b, x_in, W))
            v, idx = timed("plain top-k incl. matmul (alone)", lambda: plain_topk(x_in, W, b, k))
            with recording(log if i >= 2 else None):
                sel = timed("certified top-k incl. matmul (alone)", lambda: certified_topk(
                    x_in, W, b, k, candidate_dtype=sae.candidate_dtype))
            certified.append(float((sel.level == 0).float().mean()))
            timed("sparse decoder (alone)", lambda: sparse_decode(idx, v.relu(), sae.W_dec))
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
    lines.append(f"tokens certified from the first candidates: {min(certified):.4f} (worst batch)")
    lines.append("certified top-k's phases, mean ms per call:")
    calls = max(1, len(log.levels))
    for name, t in log.seconds().items():
        lines.append(f"  {name:38s} {t / calls * 1e3:9.1f}")
    lines.append("levels (share of tokens): " + "  ".join(
        f"{i}: {v:.4f}" for i, v in enumerate(log.level_shares())))
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
                   help="ours on CPU: bf16 candidates for the certified selection (the default "
                        "on CPUs with fast bf16; on others bf16 matmuls are slow)")
    p.add_argument("--candidates", default="auto", choices=sorted(CANDIDATES),
                   help="ours: the product the certified selection draws candidates from (auto: "
                        "bf16x3 on CUDA, fp32 on CPUs without fast bf16); the selection is the "
                        "exact TopK whichever, only its speed changes")
    p.add_argument("--split-values", default="product", choices=["product", "recompute"],
                   help="ours with bf16x3 candidates: their values from the split product, or "
                        "recomputed in fp32 (narrower band of keys; mmdiff.sae.selection."
                        "SPLIT_VALUES)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="held-out FVU every N steps (0: log-spaced, dense early)")
    p.add_argument("--no-recommended", dest="recommended", action="store_false",
                   help="skip the run at each implementation's recommended settings")
    p.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the ablation of ours")
    p.add_argument("--profile", action="store_true", help="print a profile of ours and exit")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    global CANDIDATE_CHOICE
    CANDIDATE_CHOICE = a.candidates
    from mmdiff.sae import selection

    selection.SPLIT_VALUES = a.split_values

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
          f"candidates={candidate_product(a.device, bf16)} torch={torch.__version__}")
    if a.profile:
        print(profile_ours(D, F, k, B, a.lr, a.device, bf16, data, a.adam))
        return

    # The ceiling holds where ours' candidates come from the fp32 product that roof_t times: what
    # "auto" resolves to is selection's choice (bf16 on fast-bf16 CPUs), not a rule restated here.
    cand = candidate_product(a.device, bf16)
    if cand == "auto":
        cand = selection.default_candidate_dtype(torch.device(a.device), torch.float32)
    fp32_product = not bf16 and cand in (None, torch.float32)
    gflops, roof_t = matmul_rate(B, D, F, a.device, torch.bfloat16 if bf16 else torch.float32)
    print(f"dense matmul [{B},{D}]@[{D},{F}] {'bf16' if bf16 else 'fp32'}: {gflops:.1f} GFLOP/s "
          f"({roof_t * 1e3:.1f} ms)")

    for recommended in (False, True):
        if recommended and not a.recommended:
            continue
        impls = []
        for name in a.impls.split(","):
            try:
                impls.append(MAKERS[name](D, F, k, a.lr, a.device, bf16, a.adam,
                                          recommended=recommended))
            except ImportError as e:
                print(f"{name:9s} skipped: {e}")
        results = run_interleaved(impls, data, a.steps, a.warmup, B, a.device, held_out,
                                  eval_every=a.eval_every)
        title = ("each at its own recommended settings" if recommended
                 else f"equal settings (Adam, lr {a.lr})")
        print_table(title, results, roof_t, fp32_product=fp32_product)
        if not math.isfinite(sum(r["fvu"] for r in results.values())):
            raise SystemExit("a run diverged (non-finite FVU)")
    if a.ablation:
        print()
        print(ablation(D, F, k, a.lr, a.device, bf16, a.adam, data, a.warmup + a.steps, B,
                       held_out))


if __name__ == "__main__":
    main()
