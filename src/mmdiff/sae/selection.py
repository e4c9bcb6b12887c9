"""Certified TopK selection: candidates from a cheap encoder product, the exact top k among them.

The selection this module returns is defined once, whatever product found the candidates:

    S(n) = the k latents i with the largest keys key(n, i) = pairwise_dot(x_in[n], W_enc[:, i])
           + b_enc[i], in the working dtype; among equal keys the lower latent index wins.

`pairwise_dot` multiplies and sums by a fixed binary tree of elementwise operations, so a key has
the same bits on every device and in every batch; `exact_keys` computes it. Computing it for all
F latents of every token would cost more than the encoder product, so it is the last resort:

1. P = x_in @ W_enc + b_enc in `candidate_dtype` (bf16 on hardware with fast bf16 products);
   the top k + margin latents of P are the candidates, p_out the largest P outside them.
2. Their pre-activations R are recomputed in the working dtype (taken from P when P already is
   in the working dtype), and the top k of R are the selection.
3. The certificate, per token, with t = the real-valued pre-activation:
   every product here is within E = ((1 + u_in)^2 (1 + gamma_{D+1}) - 1) * (||x_n|| max_i ||w_i||
   + max |b|) of t (+ u_out |P| for the output rounding), gamma_m = m u / (1 - m u) (Higham's bound
   for a sum of m terms in any order), u_in / u_out the unit roundoff of rounding the inputs /
   the result to `candidate_dtype` (2^-8 for bf16), u that of the accumulation (fp32). With
   E_key the keys' own bound (pairwise: gamma_{log2 D + 2}):
       A  up(p_out) + E_P + E_key  <  R_(k) - E_R - E_key    (no outsider can reach the k-th)
   certifies that the k candidates ranked first by R have keys above every outsider's, so S(n)
   lies among the candidates. If moreover
       B  R_(k) - R_(k+1)  >  2 (E_R + E_key)                 (the k-th and (k+1)-th are apart)
   the candidates' ranking by R is their ranking by key at the boundary, and S(n) is the top k of
   R; otherwise the candidates' keys are computed ([k + margin] per token) and decide, with the
   lower-index rule. Either way the result is S(n), bitwise.
4. Tokens that fail A with low-precision candidates are redone with the working-dtype product
   (`level` 1; rare: the gap must be under about 2^-7 ||x||); tokens that fail A there as well
   (exact or near-exact ties with an outsider, e.g. duplicate encoder columns or an all-zero input)
   get the keys of all F latents (`level` 2), and S(n) is read off them.

Costs: one encoder product in `candidate_dtype`, a top-(k + margin + 1) over [N, F], the
[N, k + margin] recompute when the candidates are low precision, a few [N]-sized comparisons,
and [N, k] dot products for the returned values. The returned indices are sorted ascending and the
values recomputed from them in one call, so two runs that select the same latents return the same
values bit for bit, whichever path found them (and so the same gradients).

Low-precision candidates only pay where low-precision products are fast: CUDA and CPUs with
AVX512-BF16 or AMX. On other CPUs (e.g. AVX2 only) torch's bf16 / fp16 / int8 matmuls run 20-100x
slower than fp32, so `candidate_dtype="auto"` keeps the working dtype there.
"""

from __future__ import annotations

import math
from functools import cache
from typing import NamedTuple

import torch
from torch import Tensor

from mmdiff.sae.kernels import gather_dot

CandidateDtype = torch.dtype | str | None
"""`"auto"` (default: bf16 where fast), a torch dtype, or None (the working dtype)."""


class Selection(NamedTuple):
    values: Tensor  # [N, k] pre-activations of the selected latents (working dtype, before ReLU)
    indices: Tensor  # [N, k] selected latents, ascending per token
    level: Tensor  # [N] uint8: 0 certified from the candidates, 1 from the working-dtype product,
    #                2 read off the keys of all latents


@cache
def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_candidate_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """bf16 where a bf16 matmul beats the working dtype's (CUDA, AVX512-BF16 / AMX CPUs), else
    the working dtype itself."""
    if dtype in (torch.float32, torch.float64) and (
            device.type == "cuda" or (device.type == "cpu" and _cpu_has_fast_bf16())):
        return torch.bfloat16
    return dtype


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def _gamma(m: int, u: float) -> float:
    if m * u >= 1:
        return math.inf
    return m * u / (1 - m * u)


def _product_roundoff(device: torch.device, cand: torch.dtype, work: torch.dtype,
                      ) -> tuple[float, float, float]:
    """(u_in, u_acc, u_out) of `addmm` in dtype `cand` on `device`: unit roundoff of rounding the
    inputs to it, of the accumulation, and of rounding the result."""
    if cand == work:
        u_acc = _unit_roundoff(work)
        u_in = 0.0
        if device.type == "cuda" and work == torch.float32 and (
                torch.backends.cuda.matmul.allow_tf32
                or torch.get_float32_matmul_precision() != "highest"):
            u_in = 2.0 ** -11  # TF32 (or bf16x3) rounds the inputs to 10 mantissa bits
        return u_in, u_acc, 0.0
    u = _unit_roundoff(cand)
    # bf16 / fp16 GEMMs accumulate in fp32 (oneDNN, cuBLAS with reduced-precision reductions
    # off, which `_low_precision_addmm` enforces), then round the result to `cand`.
    return u, _unit_roundoff(torch.float32), u


def _low_precision_addmm(b: Tensor, x: Tensor, W: Tensor) -> Tensor:
    if x.device.type != "cuda":
        return torch.addmm(b, x, W)
    flags = torch.backends.cuda.matmul
    name = ("allow_bf16_reduced_precision_reduction" if x.dtype == torch.bfloat16
            else "allow_fp16_reduced_precision_reduction")
    old = getattr(flags, name)
    setattr(flags, name, False)  # fp32 accumulation, so the error bound holds
    try:
        return torch.addmm(b, x, W)
    finally:
        setattr(flags, name, old)


def pairwise_dot(rows: Tensor, cols: Tensor) -> Tensor:
    """sum_d rows[..., d] * cols[..., d] by a fixed binary tree of elementwise adds: [..., D] x2 ->
    [...]. Elementwise operations round the same way on every device and for every batch shape,
    so the result's bits depend only on the two vectors."""
    p = rows * cols
    width = p.shape[-1]
    if width & (width - 1):  # pad to a power of two; adding +0 changes no sum
        p = torch.nn.functional.pad(p, (0, (1 << width.bit_length()) - width))
    while p.shape[-1] > 1:
        half = p.shape[-1] // 2
        p = p[..., :half] + p[..., half:]
    return p[..., 0]


def exact_keys(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, latents: Tensor | None = None,
               *, budget: int = 1 << 24) -> Tensor:
    """The selection keys: x_in [n, D], W_enc [D, F], b_enc [F] -> [n, F] (or [n, m] for the
    `latents` [n, m] given), computed in chunks of at most `budget` products."""
    n, D = x_in.shape
    WT = W_enc.T  # [F, D]
    m = WT.shape[0] if latents is None else latents.shape[1]
    out = x_in.new_empty(n, m)
    step = max(1, budget // max(1, m * D))
    for s in range(0, n, step):
        rows = x_in[s:s + step, None, :]  # [c, 1, D]
        if latents is None:
            out[s:s + step] = pairwise_dot(rows, WT[None]) + b_enc
        else:
            idx = latents[s:s + step]
            out[s:s + step] = pairwise_dot(rows, WT[idx]) + b_enc[idx]
    return out


def topk_lower_index(keys: Tensor, k: int) -> Tensor:
    """Indices of the k largest keys per row, ties to the lower index: [n, F] -> [n, k]."""
    # A stable descending sort keeps equal keys in index order.
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :k]


class _Bounds:
    """Per-token error bounds (absolute) of the products, from ||x_n|| max_i ||w_i|| + max |b|."""

    def __init__(self, x_in: Tensor, W_enc: Tensor, b_enc: Tensor) -> None:
        D = x_in.shape[1]
        u = _unit_roundoff(x_in.dtype)
        slack = 1 + 4 * (D + 2) * u  # the norms below are themselves rounded
        # sums of squares, not .norm(): torch's CPU norm over a dimension is 5-10x slower
        w_max = W_enc.square().sum(0).max().sqrt()
        b_max = b_enc.abs().max()
        self.scale = (x_in.square().sum(1).sqrt() * w_max + b_max) * slack  # [N] >= sum|x||w|+|b|
        self.D = D
        self.key = _gamma(math.ceil(math.log2(max(D, 1))) + 2, u)  # products, tree, bias

    def product(self, u_in: float, u_acc: float) -> float:
        return (1 + u_in) ** 2 * (1 + _gamma(self.D + 1, u_acc)) - 1


def _rank_candidates(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, cand: Tensor, R: Tensor,
                     p_out: Tensor, k: int, scale: Tensor, e_p: float, u_out: float, e_r: float,
                     e_key: float) -> tuple[Tensor, Tensor]:
    """(S(n) [n, k], certified [n]) from candidates `cand` [n, m] with working-dtype values R.

    certified: condition A, no outsider can reach the k-th candidate, so S(n) lies among them.
    Where condition B fails too (two candidates straddle the k-th place within the bounds), the
    candidates' keys decide, with the lower-index rule."""
    R_sorted, order = R.sort(dim=-1, descending=True)
    r_k = R_sorted[:, k - 1]
    p_out = p_out.to(R.dtype)
    p_up = p_out + p_out.abs() * (u_out / (1 - u_out))  # t of any outsider <= p_up + e_p * scale
    margin = (e_r + e_key) * scale
    ok = p_up + (e_p + e_key) * scale < r_k - margin  # A
    selected = cand.gather(1, order[:, :k])
    if R.shape[1] > k:
        close = ok & ~(r_k - R_sorted[:, k] > 2 * margin)  # A holds, B fails
        if bool(close.any()):
            rows = close.nonzero()[:, 0]
            by_index = cand[rows].sort(dim=-1).values  # lower index first among equal keys
            keys = exact_keys(x_in[rows], W_enc, b_enc, by_index)
            selected[rows] = by_index.gather(1, topk_lower_index(keys, k))
    return selected, ok


def _from_candidates(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, margin: int,
                     cand_dtype: torch.dtype, bounds: _Bounds, rows: Tensor | None,
                     ) -> tuple[Tensor, Tensor]:
    """(selected [n, k], certified [n]) for x_in[rows] from a product in `cand_dtype`."""
    xs = x_in if rows is None else x_in[rows]
    scale = bounds.scale if rows is None else bounds.scale[rows]
    F = W_enc.shape[1]
    m = min(k + margin, F - 1)
    if m < k:  # k == F: every latent is selected
        idx = torch.arange(F, device=xs.device).expand(xs.shape[0], F).clone()
        return idx, torch.ones(xs.shape[0], dtype=torch.bool, device=xs.device)
    u_in, u_acc, u_out = _product_roundoff(x_in.device, cand_dtype, x_in.dtype)
    e_p = bounds.product(u_in, u_acc)
    if cand_dtype == x_in.dtype:
        P = torch.addmm(b_enc, xs, W_enc)  # [n, F]
    else:
        P = _low_precision_addmm(b_enc.to(cand_dtype), xs.to(cand_dtype), W_enc.to(cand_dtype))
    top = P.topk(m + 1, dim=-1, sorted=True)
    del P
    cand, p_out = top.indices[:, :m], top.values[:, m]
    if cand_dtype == x_in.dtype:
        R, e_r = top.values[:, :m], e_p  # the product already is in the working dtype
    else:
        R = gather_dot(xs, W_enc, cand) + b_enc[cand]  # [n, m]
        e_r = bounds.product(0.0, _unit_roundoff(x_in.dtype))
    return _rank_candidates(xs, W_enc, b_enc, cand, R, p_out, k, scale, e_p, u_out, e_r,
                            bounds.key)


def certified_topk(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *,
                   candidate_dtype: CandidateDtype = "auto", margin: int | None = None,
                   ) -> Selection:
    """The exact TopK selection S (module docstring) of x_in [N, D] @ W_enc [D, F] + b_enc [F].

    `candidate_dtype` is the product the candidates come from ("auto": bf16 where bf16 products
    are fast, else the working dtype); `margin` the extra candidates beyond k (default: k for
    low-precision candidates, min(k, 8) for working-dtype ones).
    The result does not depend on either: they only decide how fast it is found.
    """
    N, _ = x_in.shape
    F = W_enc.shape[1]
    if not 0 < k <= F:
        raise ValueError(f"certified_topk needs 0 < k <= d_sae={F}, got k={k}.")
    work = x_in.dtype
    if candidate_dtype is None:
        cand_dtype = work
    elif candidate_dtype == "auto":
        cand_dtype = default_candidate_dtype(x_in.device, work)
    elif isinstance(candidate_dtype, torch.dtype):
        cand_dtype = candidate_dtype
    else:
        raise ValueError(f"candidate_dtype must be 'auto', a torch dtype or None, "
                         f"got {candidate_dtype!r}.")
    if margin is None:  # working-dtype candidates only have to clear ties at its rounding
        margin = k if cand_dtype != work else min(k, 8)
    margin = int(margin)
    # Autocast off: the bounds assume the dtypes written here (under CUDA bf16 autocast a
    # "working-dtype" addmm would silently run in bf16).
    with torch.no_grad(), torch.autocast(x_in.device.type, enabled=False):
        x_in, W_enc, b_enc = x_in.detach(), W_enc.detach(), b_enc.detach()
        bounds = _Bounds(x_in, W_enc, b_enc)
        level = torch.zeros(N, dtype=torch.uint8, device=x_in.device)
        selected, ok = _from_candidates(x_in, W_enc, b_enc, k, margin, cand_dtype, bounds, None)
        if cand_dtype != work and not bool(ok.all()):
            rows = (~ok).nonzero()[:, 0]
            sel2, ok2 = _from_candidates(x_in, W_enc, b_enc, k, margin, work, bounds, rows)
            selected[rows] = sel2
            level[rows] = 1
            ok[rows] = ok2
        if not bool(ok.all()):
            rows = (~ok).nonzero()[:, 0]
            keys = exact_keys(x_in[rows], W_enc, b_enc)  # [n_fail, F]
            selected[rows] = topk_lower_index(keys, k)
            level[rows] = 2
        indices = selected.sort(dim=-1).values
        values = gather_dot(x_in, W_enc, indices) + b_enc[indices]  # one call: same bits always
    return Selection(values, indices, level)
