"""Share of tokens the certified TopK selection settles at each level, at real shapes, on CPU.

A proxy for the GPU (where the shares decide the selection's cost): the same code and bounds,
with CUDA's arithmetic model. `--cuda-model` (default on) makes the bounds assume tensor-core
accumulation (`TENSOR_CORE_U_ACC`) and runs bf16 GEMMs as CUDA does them (bf16 inputs, fp32
accumulation, bf16 result) through fp32 GEMMs of the bf16 values, so this AVX2 CPU's slow bf16
matmul is not used; the split product is computed as on CPU (fp32 GEMMs of its bf16 parts: the
same exact products, fp32 accumulation). Level-2 tokens are counted but their all-latent keys are
not computed (minutes per batch at these shapes on CPU); `--check N` compares the first N tokens
with the definition (all keys), which takes about a second per token.

    python benchmarks/selection_levels.py                          # both data sets, SAE at init
    python benchmarks/selection_levels.py --sae trained.pt         # {"W_enc", "b_enc", "b_dec"}

Data: benchmarks/scale.py's `synthetic_batch` (512 directions, heavy-tailed weights, bf16) with
its trainer's SAE at init (`random_sae`, b_dec = 0), and benchmarks/sae_train.py's
`SyntheticActivations` with `TopKSAE.init_weights` and b_dec = the batch mean.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CANDIDATES = {"bf16x3": "bf16x3", "bf16": torch.bfloat16, "fp32": None}


def levels(x_in: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, candidates: object,
           margin: int | None) -> tuple[object, object, float]:
    """(Selection, SelectionLog, seconds), level-2 keys stubbed."""
    from mmdiff.sae import selection as S

    exact = S.exact_keys

    def keys(x: torch.Tensor, W_: torch.Tensor, b_: torch.Tensor, latents=None, **kw):
        if latents is None:  # level 2: counted, not computed
            return torch.addmm(b_, x, W_)
        return exact(x, W_, b_, latents, **kw)

    S.exact_keys = keys
    try:
        t0 = time.perf_counter()
        with S.recording() as log:
            sel = S.certified_topk(x_in, W, b, k, candidate_dtype=candidates, margin=margin)
        return sel, log, time.perf_counter() - t0
    finally:
        S.exact_keys = exact


def report(name: str, x_in: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int,
           runs: list[tuple[str, int | None]], check: int) -> None:
    from mmdiff.sae import selection as S

    bounds = S._Bounds(x_in, W, b)
    D = x_in.shape[1]
    pre = torch.addmm(b, x_in, W)
    sd = pre.std(1)
    top = pre.topk(2 * k + 1, dim=-1).values
    u_acc = S._low_precision_u_acc(torch.device("cuda"))

    def med(t: torch.Tensor) -> float:
        return float(t.median())

    print(f"== {name}: tokens={len(x_in)} D={D} F={W.shape[1]} k={k}; per token (median), in "
          f"standard deviations of its pre-activations: k-th largest {med(top[:, k - 1] / sd):.2f}, "
          f"gap to the (k+8)-th {med((top[:, k - 1] - top[:, k + 7]) / sd):.3f}, to the 2k-th "
          f"{med((top[:, k - 1] - top[:, 2 * k - 1]) / sd):.3f}; error bounds: bf16 "
          f"{med(bounds.product(2 ** -8, u_acc) * bounds.scale / sd):.3f}, split "
          f"{med(S.split_error(D, u_acc) * bounds.scale / sd):.4f}, fp32 "
          f"{med(bounds.product(0, 2 ** -24) * bounds.scale / sd):.4f}")
    first = None
    for cand, margin in runs:
        sel, log, secs = levels(x_in, W, b, k, CANDIDATES[cand], margin)
        shares = " / ".join(f"{v:.3f}" for v in log.level_shares())
        keys = ", ".join(f"{w} {c / len(x_in):.1f}" for w, c in log.keys.items())
        same = ""
        if first is not None:
            both = (sel.level < 2) & (first.level < 2)
            same = f"; same latents as the first run: {bool(torch.equal(sel.indices[both], first.indices[both]))}"
        first = first or sel
        print(f"   {cand:7s} margin {str(margin) if margin is not None else 'default':7s} levels "
              f"0 / 1 / 2: {shares}   keys per token: {keys or '-'}   ({secs:.1f} s){same}")
    if check:
        exact = S.topk_lower_index(S.exact_keys(x_in[:check], W, b), k).sort(-1).values
        ok = first.level[:check] < 2
        print(f"   first {check} tokens against the definition (all keys): "
              f"{bool(torch.equal(exact[ok], first.indices[:check][ok]))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--d-in", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=32768)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--sae", default=None, help="a saved encoder (torch.save of W_enc, b_enc, "
                   "b_dec and optionally x, the tokens to use); default: each data set's init")
    p.add_argument("--data", default="scale,sae_train")
    p.add_argument("--runs", default="bf16x3:default,bf16x3:8,fp32:default,bf16:default",
                   help="comma list of candidates:margin")
    p.add_argument("--no-cuda-model", dest="cuda_model", action="store_false")
    p.add_argument("--check", type=int, default=0, help="tokens to check against all keys")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from mmdiff.sae import selection as S

    if a.cuda_model:
        S._low_precision_u_acc = lambda device: S.TENSOR_CORE_U_ACC
        S._low_precision_addmm = lambda b, x, W: torch.addmm(b.float(), x.float(), W.float()).to(
            x.dtype)
    runs = [(c, None if m == "default" else int(m)) for c, m in
            (r.split(":") for r in a.runs.split(","))]
    D, F, k, n = a.d_in, a.d_sae, a.k, a.tokens
    for data in a.data.split(","):
        if data == "scale":
            from scale import synthetic_batch

            x = synthetic_batch(n, D, 0, torch.device("cpu")).float()
        else:
            from sae_train import SyntheticActivations

            x = SyntheticActivations(D, F // 4, k // 2, 0.05, 0, "cpu").batch(0, n)
        if a.sae:
            st = torch.load(a.sae)
            x = st.get("x", x)[:n]
            W, b, b_dec, what = st["W_enc"], st["b_enc"], st["b_dec"], f"SAE {a.sae}"
        elif data == "scale":
            from mmdiff.sae.warm_start import random_sae

            sae = random_sae(D, F, k, 0, 0)
            W, b, b_dec, what = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach(), \
                "random_sae at init, b_dec 0"
        else:
            from mmdiff.sae.base import SAEConfig
            from mmdiff.sae.topk import TopKSAE

            sae = TopKSAE(SAEConfig("topk", d_in=D, d_sae=F, k=k))
            sae.init_weights(seed=0)
            W, b, b_dec, what = sae.W_enc.detach(), sae.b_enc.detach(), x.mean(0), \
                "init_weights, b_dec the batch mean"
        report(f"{data} data, {what}", x - b_dec, W, b, k, runs, a.check)
        if a.sae and "x" in st:
            break


if __name__ == "__main__":
    main()
