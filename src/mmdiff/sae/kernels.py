"""Fast path for TopK SAEs: encode + decode whose backward touches only the k active latents.

Forward: pre = x_in @ W_enc + b_enc (the one dense matmul), top-k, ReLU, sparse decode.
Backward, with g = dL/dx_hat [N, D] and the N*k active (token, latent) pairs:
  dL/dvalues[n, j] = <g[n], W_dec[idx[n, j]]>           sampled dense-dense product (SDDMM)
  dW_dec[i]        = sum_{(n,j): idx=i} values[n,j] g[n]   sparse [F, N] @ dense [N, D]
  dW_enc[:, i]     = sum_{(n,j): idx=i} gpre[n,j] x_in[n]  sparse [F, N] @ dense [N, D]
  db_enc[i]        = sum_{(n,j): idx=i} gpre[n,j]
so the backward costs O(N k D) instead of the dense O(N F D).

The sparse primitives are chosen once per (device type, dtype) at first use: torch's CSR kernels
(MKL on CPU, cuSPARSE on CUDA) when they run, else plain gather / index_add fallbacks.
`MMDIFF_SAE_KERNELS=dense` forces the dense reference (for debugging and tests).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = os.environ.get("MMDIFF_SAE_KERNELS", "sparse")
""""sparse" (default) or "dense": which TopK path SAE.forward takes, fixed at import."""

_CSR_OK: dict[tuple[str, torch.dtype], bool] = {}


def _csr_usable(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _CSR_OK:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = torch.sparse_csr_tensor(
                    torch.tensor([0, 1, 1], device=device), torch.tensor([1], device=device),
                    torch.ones(1, device=device, dtype=dtype), (2, 3))
                m = torch.ones(3, 2, device=device, dtype=dtype)
                ok1 = torch.allclose((a @ m).cpu().float(), torch.tensor([[1.0, 1.0], [0, 0]]))
                # pattern [2, 3] sampled from [2, 2] @ [2, 3] of ones, plus the pattern's 1: 3
                s = torch.sparse.sampled_addmm(a, m[:2], m.T.contiguous())
                ok2 = bool((s.values().cpu().float() == 3).all())
            _CSR_OK[key] = ok1 and ok2
        except (RuntimeError, NotImplementedError, TypeError):
            _CSR_OK[key] = False
    return _CSR_OK[key]


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[n, j] * W_dec[indices[n, j]]: [N, k], [N, k], [F, D] -> [N, D] (no bias)."""
    if values.dtype != W_dec.dtype:
        values = values.to(W_dec.dtype)
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


def gather_dot(rows: Tensor, cols: Tensor, indices: Tensor) -> Tensor:
    """out[n, j] = <rows[n], cols[:, indices[n, j]]>: [N, D], [D, F], [N, k] -> [N, k]."""
    N, k = indices.shape
    if _csr_usable(rows.device, rows.dtype):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            crow = torch.arange(0, N * k + 1, k, device=rows.device)
            pattern = torch.sparse_csr_tensor(
                crow, indices.reshape(-1), rows.new_zeros(N * k), (N, cols.shape[1]))
            return torch.sparse.sampled_addmm(pattern, rows, cols).values().view(N, k)
    out = rows.new_empty(N, k)
    step = max(1, (1 << 22) // max(1, k * rows.shape[1]))  # bound the [chunk, k, D] gather
    colsT = cols.T
    for s in range(0, N, step):
        out[s:s + step] = torch.bmm(colsT[indices[s:s + step]], rows[s:s + step, :, None])[..., 0]
    return out


class _LatentIncidence:
    """The N*k (token, latent) pairs sorted by latent, reused for both sparse outer products."""

    def __init__(self, indices: Tensor, d_sae: int) -> None:
        N, k = indices.shape
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat)
        counts = torch.bincount(flat, minlength=d_sae)
        self.crow = torch.zeros(d_sae + 1, dtype=torch.long, device=indices.device)
        self.crow[1:] = counts.cumsum(0)
        self.tokens = torch.div(self.order, k, rounding_mode="floor")  # token of each sorted pair
        self.flat, self.N, self.d_sae = flat, N, d_sae

    def outer(self, coeffs: Tensor, rows: Tensor) -> Tensor:
        """sum over pairs (n, j) with latent i of coeffs[n, j] * rows[n]: -> [F, D]."""
        if _csr_usable(rows.device, rows.dtype):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = torch.sparse_csr_tensor(self.crow, self.tokens,
                                            coeffs.reshape(-1)[self.order], (self.d_sae, self.N))
                return m @ rows
        out = rows.new_zeros(self.d_sae, rows.shape[1])
        contrib = coeffs.reshape(-1, 1) * rows.repeat_interleave(coeffs.shape[1], dim=0)
        return out.index_add_(0, self.flat, contrib)


Select = Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, ...]]
"""(x_in [N, D], W_enc, b_enc, k) -> (values [N, k] before ReLU, indices [N, k], ...): how the k
latents are chosen (mmdiff.sae.selection.certified_topk); None takes torch.topk of the product."""


def plain_topk(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk of the working-dtype product: exact up to ties within its rounding."""
    return torch.addmm(b_enc, x_in, W_enc).topk(k, dim=-1, sorted=False)


class TopKAutoencode(torch.autograd.Function):
    """(x, W_enc, b_enc, W_dec, b_dec) -> (x_hat, values, indices) with a k-sparse backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                k: int, subtract_b_dec: bool, select: Select | None) -> tuple:
        x_in = x - b_dec if subtract_b_dec else x  # [N, D]
        values, indices = (select or plain_topk)(x_in, W_enc, b_enc, k)[:2]
        values = values.relu()  # [N, k]
        x_hat = sparse_decode(indices, values, W_dec) + b_dec  # [N, D]
        ctx.save_for_backward(x_in, W_enc, W_dec, values, indices)
        ctx.subtract_b_dec = subtract_b_dec
        ctx.mark_non_differentiable(indices)
        return x_hat, values, indices

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, g_values: Tensor | None, _g_idx: Any) -> tuple:
        x_in, W_enc, W_dec, values, indices = ctx.saved_tensors
        need_x, need_We, need_be, need_Wd, need_bd = ctx.needs_input_grad[:5]
        gv = None if g_values is None else g_values.to(values.dtype)
        if g is not None:
            g = g.to(W_dec.dtype)
            from_decoder = gather_dot(g, W_dec.T, indices)  # [N, k]
            gv = from_decoder if gv is None else gv + from_decoder
        if gv is None:
            gv = torch.zeros_like(values)
        elif gv is g_values:  # never write into the incoming gradient
            gv = gv.clone()
        gpre = gv.masked_fill_(values <= 0, 0.0)  # ReLU on the selected pre-activations
        inc = _LatentIncidence(indices, W_enc.shape[1])
        gx = gWe = gbe = gWd = gbd = None
        if need_be or need_bd:
            gbe = torch.zeros(W_enc.shape[1], dtype=gpre.dtype, device=gpre.device)
            gbe.index_add_(0, inc.flat, gpre.reshape(-1))
        if need_We:
            gWe = inc.outer(gpre, x_in).T  # [D, F]
        if need_Wd and g is not None:
            gWd = inc.outer(values, g)  # [F, D]
        if need_x:
            gx = sparse_decode(indices, gpre, W_enc.T.contiguous())  # [N, D]
        if need_bd:
            gbd = g.sum(0) if g is not None else torch.zeros_like(x_in[0])
            if ctx.subtract_b_dec:
                gbd = gbd - W_enc @ gbe  # x_in = x - b_dec
        return gx, gWe, gbe if need_be else None, gWd, gbd, None, None, None


def topk_autoencode(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int,
                    *, subtract_b_dec: bool = True, select: Select | None = None,
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """TopK encode + decode of x [N, D] -> (x_hat [N, D], values [N, k], indices [N, k]).

    `select` chooses the k latents (None: torch.topk of the working-dtype product); the values'
    gradient flows back through the k-sparse backward whichever chose them.
    """
    if KERNELS == "dense":
        return topk_autoencode_dense(x, W_enc, b_enc, W_dec, b_dec, k,
                                     subtract_b_dec=subtract_b_dec)
    return TopKAutoencode.apply(x, W_enc, b_enc, W_dec, b_dec, k, subtract_b_dec, select)


def topk_autoencode_dense(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                          k: int, *, subtract_b_dec: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The plain dense reference of `topk_autoencode` (autograd through dense matmuls)."""
    x_in = x - b_dec if subtract_b_dec else x
    pre = x_in @ W_enc + b_enc
    values, indices = pre.topk(k, dim=-1, sorted=False)
    values = values.relu()
    f = torch.zeros_like(pre).scatter(-1, indices, values)
    return f @ W_dec + b_dec, values, indices
