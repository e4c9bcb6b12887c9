"""Certified TopK selection: candidates from a cheap encoder product, the exact top k among them.

The selection this module returns is defined once, whatever product found the candidates:

    S(n) = the k latents i with the largest keys key(n, i) = pairwise_dot(x_in[n], W_enc[:, i])
           + b_enc[i], in the working dtype; among equal keys the lower latent index wins.

`pairwise_dot` multiplies and sums by a fixed binary tree of elementwise operations, so a key has
the same bits on every device and in every batch; `exact_keys` computes it. Computing it for all
F latents of every token would cost more than the encoder product, so it is the last resort.

Products. Each gives, per token n and latent i, a value P within an absolute bound of the
real-valued pre-activation t = <x_n, w_i> + b_i. With T = sum_d |x_d w_d| + |b_i| <= S_n =
||x_n|| max_i ||w_i|| + max |b| (Cauchy-Schwarz), gamma_m(u) = m u / (1 - m u) (Higham, Accuracy
and Stability of Numerical Algorithms, eq. 3.5: a sum of m terms in any order), u = 2^-8 (bf16),
u32 = 2^-24, u_a the unit roundoff of the product's accumulation, the bounds are E S_n + eta_n:

- working dtype (`None`; on CUDA with TF32 switched off for the call, so products are exact and
  the sum is IEEE):                     E = gamma_{D+1}(u_work)
- bf16 (one bf16 GEMM, fp32 accumulation, result rounded to bf16):
                                        E = (1 + u)^2 (1 + gamma_{D+1}(u_a)) - 1, plus u |P|
- "bf16x3" (the split product): x = x_hi + x_lo + e_x, W = W_hi + W_lo + e_W with x_hi = bf16(x),
  x_lo = bf16(x - x_hi), so |x_lo| <= u (1 + u) |x| and |e_x| <= u^2 |x| (and the same for W);
  P = fl(fl(x_hi W_hi + [x_hi | x_lo] [W_lo ; W_hi]) + b), two bf16 GEMMs (K = D and K = 2D,
  3 bf16 GEMMs' work) with fp32 outputs, whose products are exact in fp32. The dropped terms
  (x_lo W_lo and those with e_x, e_W) are at most u^2 (3 (1 + u)^2 + u^2) sum|x||w|, so
        E = u^2 (3 (1 + u)^2 + u^2) + (1 + u)^2 (gamma_D(u_a) + 2 u gamma_{2D}(u_a))
            + (2 u32 + u32^2)(1 + gamma_{2D}(u_a))(1 + u)^2 (1 + 2 u)
  -- O(u^2 + D u_a) instead of the bf16 product's O(u): at D = 4096 about 1e-3 S_n against 8e-3.
- u_a: 2^-24 for IEEE fp32 accumulation (CPU BLAS, CUDA SGEMM); on CUDA tensor cores 2^-22
  (`TENSOR_CORE_U_ACC`): they add blocks of products with truncation, and with no extra
  alignment bits an n-term block errs by under (n + 1) 2^-23 times its terms' absolute sum, which
  gamma(2^-22) covers for every block size (models: Fasi et al. 2021, Khattak & Mikaitis 2025).
- eta_n = 2^-120 (D + 2)(1 + max ||w_i|| + ||x_n||) covers underflow and flush-to-zero (each
  flushed product, sum or bf16 input is off by at most 2^-126).
The keys are within E_key = gamma_{log2 D + 2}(u_work) S_n + eta_n of t; the working-dtype values
R recomputed for candidates (`gather_dot`) within gamma_{D+1}(u_work) S_n + eta_n.

The certificate, per token, with candidates the top m = k + margin latents of P, p_out the largest
P outside them, R their values (P itself where P is fp32, else recomputed), r_k the k-th largest R,
d = E_R + E_key >= |key - R|:
    A  up(p_out) + E_P + E_key  <  r_k - d           (no outsider can reach the k-th candidate)
Then S(n) lies among the candidates, and within them: a candidate with R > R_(k+1) + 2 d has a
key above every candidate ranked k+1 or lower, so it is selected ("sure in"); one with
R < r_k - 2 d has k keys above it ("sure out"); the keys of the rest (the band, a run of ranks
around k, empty when R_(k) - R_(k+1) > 2 d) are computed and fill the remaining places by key,
lower index first. Either way the result is S(n), bitwise. (These comparisons are evaluated in
float64 with each bound padded by 2^-48 of the magnitudes compared, more than their own rounding.)

Levels (`Selection.level`): 0 certified from the first candidates; 1 from a second try: a wider
candidate set (8 m) from the same product for working-dtype and split products, the
working-dtype product for bf16 (whose bound is too wide for a wider set to help); 2 the keys of
all F latents, from which S(n) is read off (exact or near-exact ties with outsiders: duplicate
encoder columns, an all-zero input).

Costs of the CUDA default ("bf16x3"): 3 bf16 GEMM-equivalents (2 x N x D x F x 3 FLOPs), a
top-(m + 1) over [N, F], [N]-sized checks, the band's keys, and [N, k] dot products for the
returned values. The returned indices are sorted ascending and the values recomputed from them in
one call, so two runs that select the same latents return the same values bit for bit, whichever
path found them (and so the same gradients).

Low-precision candidates only pay where low-precision products are fast: CUDA and CPUs with
AVX512-BF16 or AMX. On other CPUs (e.g. AVX2 only) torch's bf16 / fp16 / int8 matmuls run 20-100x
slower than fp32, so `candidate_dtype="auto"` keeps the working dtype there.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

import torch
from torch import Tensor

from mmdiff.sae.kernels import gather_dot

SPLIT = "bf16x3"
"""The split bf16 product: x_hi W_hi + x_hi W_lo + x_lo W_hi in three bf16 GEMMs' work."""

CandidateDtype = torch.dtype | str | None
"""`"auto"` (default: "bf16x3" on CUDA, bf16 on fast-bf16 CPUs), "bf16x3", a torch dtype, or None
(the working dtype)."""

TENSOR_CORE_U_ACC = 2.0 ** -22
"""Unit roundoff assumed for the fp32 accumulation of CUDA low-precision GEMMs (module docstring)."""

WIDEN = 8
"""Level 1 of the working-dtype and split products retries with WIDEN times the candidates."""

SPLIT_VALUES = "product"
"""Where the split product's candidates get their values R: "product" (P itself, within the split
bound) or "recompute" (`gather_dot` in the working dtype: one [N, m] sampled product more, a
bound 4x tighter on CUDA, so a narrower band of keys). Only the speed differs; for benchmarks."""


class Selection(NamedTuple):
    values: Tensor  # [N, k] pre-activations of the selected latents (working dtype, before ReLU)
    indices: Tensor  # [N, k] selected latents, ascending per token
    level: Tensor  # [N] uint8: 0 certified from the candidates, 1 from the second try, 2 read off
    #                the keys of all latents


# ------------------------------------------------------------------------------ instrumentation
@dataclass
class SelectionLog:
    """What `recording()` collects: every call's levels and, per phase, its seconds (CUDA: events,
    read after a synchronize in `seconds()`)."""

    levels: list[Tensor] = field(default_factory=list)
    keys: dict[str, int] = field(default_factory=dict)  # (token, latent) keys computed, by level
    _spans: list[tuple[str, object, object]] = field(default_factory=list)

    def count_keys(self, what: str, n: int) -> None:
        self.keys[what] = self.keys.get(what, 0) + n

    def level_shares(self) -> list[float]:
        """Share of tokens certified at level 0, 1 and 2 over all recorded calls."""
        if not self.levels:
            return [float("nan")] * 3
        counts = torch.bincount(torch.cat([lv.long().cpu() for lv in self.levels]), minlength=3)
        return [float(c) / float(counts.sum()) for c in counts[:3]]

    def seconds(self) -> dict[str, float]:
        """Total seconds per phase over all recorded calls."""
        out: dict[str, float] = {}
        if any(isinstance(a, torch.cuda.Event) for _, a, _ in self._spans):
            torch.cuda.synchronize()
        for name, a, b in self._spans:
            s = a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a
            out[name] = out.get(name, 0.0) + s
        return out


_LOG: SelectionLog | None = None


@contextlib.contextmanager
def recording(log: SelectionLog | None = None) -> Iterator[SelectionLog]:
    """Collect the levels and phase times of every `certified_topk` call inside into `log` (a new
    one by default), for benchmarks."""
    global _LOG
    old, _LOG = _LOG, log if log is not None else SelectionLog()
    try:
        yield _LOG
    finally:
        _LOG = old


@contextlib.contextmanager
def _phase(name: str, device: torch.device) -> Iterator[None]:
    if _LOG is None:
        yield
        return
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        yield
        b.record()
        _LOG._spans.append((name, a, b))
    else:
        t0 = time.perf_counter()
        yield
        _LOG._spans.append((name, t0, time.perf_counter()))


# ------------------------------------------------------------------------------ products
@cache
def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_candidate_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | str:
    """The split bf16 product on CUDA; bf16 on AVX512-BF16 / AMX CPUs (where three bf16 GEMMs would
    not beat one fp32 GEMM); the working dtype elsewhere."""
    if dtype in (torch.float32, torch.float64):
        if device.type == "cuda":
            return SPLIT
        if device.type == "cpu" and _cpu_has_fast_bf16():
            return torch.bfloat16
    return dtype


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def _gamma(m: int, u: float) -> float:
    if m * u >= 1:
        return math.inf
    return m * u / (1 - m * u)


def _low_precision_u_acc(device: torch.device) -> float:
    """Accumulation roundoff of a bf16 / fp16 GEMM with fp32 accumulation on `device`."""
    return TENSOR_CORE_U_ACC if device.type == "cuda" else _unit_roundoff(torch.float32)


def _product_roundoff(device: torch.device, cand: torch.dtype, work: torch.dtype,
                      ) -> tuple[float, float, float]:
    """(u_in, u_acc, u_out) of the product in dtype `cand` on `device`: unit roundoff of rounding
    the inputs to it, of the accumulation, and of rounding the result. Working-dtype products run
    with TF32 off (`_ieee_fp32`), so their inputs are not rounded."""
    if cand == work:
        return 0.0, _unit_roundoff(work), 0.0
    u = _unit_roundoff(cand)
    return u, _low_precision_u_acc(device), u


def split_error(D: int, u_acc: float) -> float:
    """E of the split product (module docstring), relative to S_n."""
    u, u32 = _unit_roundoff(torch.bfloat16), _unit_roundoff(torch.float32)
    g1, g2 = _gamma(D, u_acc), _gamma(2 * D, u_acc)
    return (u * u * (3 * (1 + u) ** 2 + u * u) + (1 + u) ** 2 * (g1 + 2 * u * g2)
            + (2 * u32 + u32 * u32) * (1 + g2) * (1 + u) ** 2 * (1 + 2 * u))


@contextlib.contextmanager
def _ieee_fp32(device: torch.device, allow_tf32: bool = False) -> Iterator[None]:
    """fp32 matmuls on CUDA without TF32 (or with it, `allow_tf32`) for the block; flags restored."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(m, "fp32_precision"):
            old = m.fp32_precision
            m.fp32_precision = "tf32" if allow_tf32 else "ieee"
        else:
            old = m.allow_tf32
            m.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(m, "fp32_precision"):
                m.fp32_precision = old
            else:
                m.allow_tf32 = old


@contextlib.contextmanager
def _fp32_reductions(device: torch.device) -> Iterator[None]:
    """bf16 / fp16 GEMMs on CUDA reduce in fp32 (split-K included) for the block."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    names = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")
    old = [getattr(flags, n) for n in names]
    for n in names:
        setattr(flags, n, False)
    try:
        yield
    finally:
        for n, v in zip(names, old):
            setattr(flags, n, v)


def _low_precision_addmm(b: Tensor, x: Tensor, W: Tensor) -> Tensor:
    with _fp32_reductions(x.device):
        return torch.addmm(b, x, W)


_MM_OUT_DTYPE: dict[str, bool] = {}


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for bf16-valued a, b with exact products and fp32 accumulation, fp32 result: a bf16
    GEMM with fp32 output on CUDA (or, where torch lacks `out_dtype`, a TF32 GEMM of the same values:
    bf16 values are exact in TF32); on CPU an fp32 GEMM of the values."""
    if a.device.type == "cuda":
        if _MM_OUT_DTYPE.get("cuda", True):
            try:
                with _fp32_reductions(a.device):
                    return torch.mm(a, b, out_dtype=torch.float32)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError, NotImplementedError):  # torch without out_dtype
                _MM_OUT_DTYPE["cuda"] = False
        with _ieee_fp32(a.device, allow_tf32=True):
            return torch.mm(a.float(), b.float())
    return torch.mm(a.float(), b.float())


def split_product(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """fl(fl(x_hi W_hi + [x_hi | x_lo] [W_lo ; W_hi]) + b): [n, D], [D, F], [F] -> [n, F] fp32."""
    n, D = x.shape
    xc = torch.empty(n, 2 * D, dtype=torch.bfloat16, device=x.device)  # [x_hi | x_lo]
    x_hi, x_lo = xc[:, :D], xc[:, D:]
    x_hi.copy_(x)
    x_lo.copy_(x - x_hi)  # promoted to x's dtype in the kernel: exact, no bf16 -> fp32 copy
    Wc = torch.empty(2 * D, W.shape[1], dtype=torch.bfloat16, device=W.device)  # [W_lo ; W_hi]
    W_lo, W_hi = Wc[:D], Wc[D:]
    W_hi.copy_(W)
    W_lo.copy_(W - W_hi)
    P = _mm_fp32(x_hi, W_hi)
    P += _mm_fp32(xc, Wc)
    P += b.float()
    return P


class _Bounds:
    """Per-token error bounds (absolute) of the products, from ||x_n|| max_i ||w_i|| + max |b|."""

    def __init__(self, x_in: Tensor, W_enc: Tensor, b_enc: Tensor) -> None:
        D = x_in.shape[1]
        u = _unit_roundoff(x_in.dtype)
        slack = 1 + 4 * (D + 2) * u  # the norms below are themselves rounded
        # sums of squares, not .norm(): torch's CPU norm over a dimension is 5-10x slower, and a
        # ones-vector product sums W's columns faster than .sum(0) (any order: the slack covers it)
        w_max = (W_enc.new_ones(1, D) @ W_enc.square()).max().sqrt()
        b_max = b_enc.abs().max()
        x_norm = x_in.square().sum(1).sqrt()
        self.scale = (x_norm * w_max + b_max) * slack  # [N] >= sum|x||w|+|b|
        self.floor = 2.0 ** -120 * (D + 2) * (1 + w_max + x_norm) * slack  # underflow, FTZ
        self.D = D
        self.key = _gamma(math.ceil(math.log2(max(D, 1))) + 2, u)  # products, tree, bias

    def product(self, u_in: float, u_acc: float) -> float:
        return (1 + u_in) ** 2 * (1 + _gamma(self.D + 1, u_acc)) - 1

    def rows(self, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        if rows is None:
            return self.scale, self.floor
        return self.scale[rows], self.floor[rows]


@dataclass(frozen=True)
class _Product:
    """How the candidate product is computed and how far it may be from t."""

    kind: torch.dtype | str  # the working dtype, a low-precision dtype, or SPLIT
    e_p: float  # E relative to S_n
    u_out: float  # rounding of the result, relative to |P|
    r_from_p: bool  # R is P itself (P is in the working dtype or fp32 split); else recomputed

    @staticmethod
    def of(kind: torch.dtype | str, x_in: Tensor, bounds: _Bounds) -> _Product:
        work, dev = x_in.dtype, x_in.device
        if kind == SPLIT:
            e = split_error(bounds.D, _low_precision_u_acc(dev))
            return _Product(SPLIT, e, 0.0, SPLIT_VALUES == "product")
        u_in, u_acc, u_out = _product_roundoff(dev, kind, work)
        return _Product(kind, bounds.product(u_in, u_acc), u_out, kind == work)

    def compute(self, x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        if self.kind == SPLIT:
            return split_product(x, W, b)
        if self.kind == x.dtype:
            return torch.addmm(b, x, W)  # inside certified_topk's _ieee_fp32: no TF32
        return _low_precision_addmm(b.to(self.kind), x.to(self.kind), W.to(self.kind))


# ------------------------------------------------------------------------------ keys
def pairwise_dot(rows: Tensor, cols: Tensor, *, overwrite_cols: bool = False) -> Tensor:
    """sum_d rows[..., d] * cols[..., d] by a fixed binary tree of elementwise adds: [..., D] x2 ->
    [...]. Elementwise operations round the same way on every device and for every batch shape,
    so the result's bits depend only on the two vectors. `overwrite_cols`: cols is a scratch
    tensor of the products' shape, multiplied in place (one allocation and pass fewer)."""
    p = cols.mul_(rows) if overwrite_cols else rows * cols
    width = p.shape[-1]
    if width & (width - 1):  # pad to a power of two; adding +0 changes no sum
        p = torch.nn.functional.pad(p, (0, (1 << width.bit_length()) - width))
    while p.shape[-1] > 1:
        half = p.shape[-1] // 2
        p = p[..., :half] + p[..., half:]
    return p[..., 0]


def exact_keys(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, latents: Tensor | None = None,
               *, budget: int | None = None) -> Tensor:
    """The selection keys: x_in [n, D], W_enc [D, F], b_enc [F] -> [n, F] (or [n, m] for the
    `latents` [n, m] given), in blocks of at most `budget` products (rows x latents x D; default
    2^26 on CUDA, where fewer, larger blocks save kernel launches, 2^24 elsewhere)."""
    if budget is None:
        budget = 1 << (26 if x_in.device.type == "cuda" else 24)
    n, D = x_in.shape
    F = W_enc.shape[1]
    if latents is None:
        out = x_in.new_empty(n, F)
        WT = W_enc.T  # [F, D]
        fc = min(F, max(1, budget // D))  # latents per block
        rc = max(1, budget // (fc * D))  # rows per block
        for s in range(0, n, rc):
            rows = x_in[s:s + rc, None, :]  # [c, 1, D]
            for f in range(0, F, fc):
                out[s:s + rc, f:f + fc] = pairwise_dot(rows, WT[None, f:f + fc]) + b_enc[f:f + fc]
        return out
    m = latents.shape[1]
    out = x_in.new_empty(n, m)
    # gathering from a contiguous [F, D] copy reads whole rows: worth the copy once the gathers
    # touch more than about F / 8 columns (a strided column gather reads a cache line per value)
    WT = W_enc.T.contiguous() if latents.numel() * 8 >= F else W_enc.T
    step = max(1, budget // max(1, m * D))
    for s in range(0, n, step):
        idx = latents[s:s + step]
        out[s:s + step] = pairwise_dot(x_in[s:s + step, None, :], WT[idx],
                                       overwrite_cols=True) + b_enc[idx]
    return out


def topk_lower_index(keys: Tensor, k: int) -> Tensor:
    """Indices of the k largest keys per row, ties to the lower index: [n, F] -> [n, k]."""
    # A stable descending sort keeps equal keys in index order.
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :k]


# ------------------------------------------------------------------------------ certificate
def _resolve_band(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, cand: Tensor, R_sorted: Tensor,
                  k: int, d: Tensor, ok: Tensor) -> Tensor:
    """S(n) [n, k] from candidates `cand` [n, m] ordered by their values R_sorted (descending),
    |key - R| <= d [n], for the tokens `ok` [n] where no outsider reaches the k-th candidate
    (condition A); the other tokens' rows are left as the first k candidates."""
    n, m = cand.shape
    if m == k:
        return cand
    sure_in = R_sorted[:, :k] > (R_sorted[:, k] + 2 * d)[:, None]  # [n, k], a prefix per row
    sure_out = R_sorted < (R_sorted[:, k - 1] - 2 * d)[:, None]  # [n, m], a suffix per row
    lo = sure_in.sum(1)  # the band is sorted positions [lo, hi)
    hi = m - sure_out.sum(1)
    need = k - lo
    selected = cand[:, :k].clone()
    rows = ((need > 0) & ok).nonzero()[:, 0]
    if len(rows) == 0:
        return selected
    lo, hi, need = lo[rows], hi[rows], need[rows]
    width = int((hi - lo).max())
    pos = lo[:, None] + torch.arange(width, device=cand.device)  # [r, width]
    valid = pos < hi[:, None]
    band = cand[rows].gather(1, pos.clamp_max(m - 1))
    by_index = torch.where(valid, band, band.new_tensor(W_enc.shape[1]) + torch.arange(
        width, device=cand.device)).sort(dim=-1).values  # lower index first; padding last
    real = by_index < W_enc.shape[1]
    keys = exact_keys(x_in[rows], W_enc, b_enc, by_index.where(real, 0))
    if _LOG is not None:
        _LOG.count_keys("band", by_index.numel())
    keys = keys.masked_fill(~real, -math.inf)
    winners = by_index.gather(1, torch.sort(keys, dim=-1, descending=True, stable=True).indices)
    j = torch.arange(k, device=cand.device)
    from_band = j[None, :] >= lo[:, None]  # places lo..k-1 come from the band's best `need`
    take = winners.gather(1, (j[None, :] - lo[:, None]).clamp(0, width - 1))
    selected[rows] = torch.where(from_band, take, selected[rows])
    return selected


def _certify(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, P: Tensor, k: int, m: int,
             prod: _Product, bounds: _Bounds, rows: Tensor | None,
             ) -> tuple[Tensor, Tensor]:
    """(selected [n, k], certified [n]) for the tokens x_in[rows] from their product P [n, F]."""
    xs = x_in if rows is None else x_in[rows]
    scale, floor = bounds.rows(rows)
    dev = x_in.device
    with _phase("candidates: top-(m+1)", dev):
        top = P.topk(m + 1, dim=-1, sorted=True)
    cand, p_out = top.indices[:, :m], top.values[:, m].to(xs.dtype)
    with _phase("candidates: values R", dev):
        if prod.r_from_p:
            R_sorted, e_r = top.values[:, :m].to(xs.dtype), prod.e_p
        else:
            R = gather_dot(xs, W_enc, cand) + b_enc[cand]  # [n, m]
            R_sorted, order = R.sort(dim=-1, descending=True)
            cand = cand.gather(1, order)
            e_r = bounds.product(0.0, _unit_roundoff(xs.dtype))
    with _phase("certificate", dev):
        # The comparisons run in float64 with every bound padded by 2^-48 of the magnitudes
        # involved, so their own rounding (a few 2^-53) cannot make a false inequality true.
        f64 = torch.float64 if dev.type != "mps" else torch.float32  # (MPS has no float64)
        pad = 2.0 ** -48 if f64 == torch.float64 else 2.0 ** -19
        scale, floor, p_out, R_sorted = (t.to(f64) for t in (scale, floor, p_out, R_sorted))
        E_key = bounds.key * scale + floor
        p_up = p_out + p_out.abs() * (prod.u_out / (1 - prod.u_out))  # t of an outsider <= p_up + E_p
        E_p = prod.e_p * scale + floor
        d = e_r * scale + floor + E_key
        size = R_sorted.abs().amax(1) + p_up.abs() + E_p + d
        E_p, d = E_p + pad * size, d + pad * size
        ok = p_up + E_p + E_key < R_sorted[:, k - 1] - d  # A
    with _phase("band keys", dev):
        selected = _resolve_band(xs, W_enc, b_enc, cand, R_sorted, k, d, ok)
    return selected, ok


def _resolve_kind(candidate_dtype: CandidateDtype, x_in: Tensor) -> torch.dtype | str:
    work = x_in.dtype
    if candidate_dtype is None:
        return work
    if candidate_dtype == "auto":
        return default_candidate_dtype(x_in.device, work)
    if candidate_dtype == SPLIT or isinstance(candidate_dtype, torch.dtype):
        return candidate_dtype
    raise ValueError(f"candidate_dtype must be 'auto', '{SPLIT}', a torch dtype or None, "
                     f"got {candidate_dtype!r}.")


def default_margin(kind: torch.dtype | str, work: torch.dtype, k: int) -> int:
    """Candidates beyond k: min(k, 8) for the working dtype, k for low-precision products.

    Measured at D = 4096, F = 32768, k = 50 on an SAE at init (docs/design.md): the split product's
    bound is 0.07 standard deviations of the pre-activations (tensor-core accumulation model),
    the gap from the 50th to the 58th largest about 0.04, to the 100th about 0.2, so margin 8
    certifies 0% of tokens first time and margin k 100%."""
    return min(k, 8) if kind == work else k


def certified_topk(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *,
                   candidate_dtype: CandidateDtype = "auto", margin: int | None = None,
                   ) -> Selection:
    """The exact TopK selection S (module docstring) of x_in [N, D] @ W_enc [D, F] + b_enc [F].

    `candidate_dtype` is the product the candidates come from ("auto": the split bf16 product on
    CUDA, bf16 on CPUs with fast bf16, else the working dtype; "bf16x3"; a dtype; None: the working
    dtype); `margin` the extra candidates beyond k (default `default_margin`).
    The result does not depend on either: they only decide how fast it is found.
    """
    N, _ = x_in.shape
    F = W_enc.shape[1]
    if not 0 < k <= F:
        raise ValueError(f"certified_topk needs 0 < k <= d_sae={F}, got k={k}.")
    work = x_in.dtype
    kind = _resolve_kind(candidate_dtype, x_in)
    margin = default_margin(kind, work, k) if margin is None else int(margin)
    dev = x_in.device
    # Autocast off: the bounds assume the dtypes written here (under CUDA bf16 autocast a
    # "working-dtype" addmm would silently run in bf16).
    # TF32 off: fp32 matmuls inside (the working-dtype product, the norms) are IEEE.
    with torch.no_grad(), torch.autocast(dev.type, enabled=False), _ieee_fp32(dev), \
            _phase("total", dev):
        x_in, W_enc, b_enc = x_in.detach(), W_enc.detach(), b_enc.detach()
        with _phase("bounds", dev):
            bounds = _Bounds(x_in, W_enc, b_enc)
        level = torch.zeros(N, dtype=torch.uint8, device=dev)
        m = min(k + margin, F - 1)
        if m < k:  # k == F: every latent is selected
            selected = torch.arange(F, device=dev).expand(N, F).clone()
            ok = torch.ones(N, dtype=torch.bool, device=dev)
        else:
            prod = _Product.of(kind, x_in, bounds)
            with _phase("product", dev):
                P = prod.compute(x_in, W_enc, b_enc)
            selected, ok = _certify(x_in, W_enc, b_enc, P, k, m, prod, bounds, None)
            m1 = min(WIDEN * m, F - 1) if prod.r_from_p else m
            if bool(ok.all()) or (m1 == m and prod.r_from_p):
                del P
            else:
                rows = (~ok).nonzero()[:, 0]
                if prod.r_from_p:  # a wider candidate set from the same product
                    P1, prod1 = P[rows], prod
                    del P
                else:  # bf16: the working-dtype product
                    del P
                    prod1 = _Product.of(work, x_in, bounds)
                    with _phase("level 1: product", dev):
                        P1 = prod1.compute(x_in[rows], W_enc, b_enc)
                sel1, ok1 = _certify(x_in, W_enc, b_enc, P1, k, m1, prod1, bounds, rows)
                del P1
                selected[rows] = sel1
                level[rows] = 1
                ok[rows] = ok1
        if not bool(ok.all()):
            rows = (~ok).nonzero()[:, 0]
            with _phase("level 2: all keys", dev):
                keys = exact_keys(x_in[rows], W_enc, b_enc)  # [n_fail, F]
                if _LOG is not None:
                    _LOG.count_keys("all latents (level 2)", keys.numel())
                selected[rows] = topk_lower_index(keys, k)
            level[rows] = 2
        with _phase("values", dev):
            indices = selected.sort(dim=-1).values
            values = gather_dot(x_in, W_enc, indices) + b_enc[indices]  # one call: same bits
    if _LOG is not None:
        _LOG.levels.append(level)
    return Selection(values, indices, level)
