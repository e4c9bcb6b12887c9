"""The TopK fast path against the dense reference: values and gradients, in float64."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mmdiff.sae import kernels
from mmdiff.sae.base import SAEConfig
from mmdiff.sae.kernels import TopKAutoencode, gather_dot, sparse_decode, topk_autoencode_dense
from mmdiff.sae.selection import certified_topk
from mmdiff.sae.topk import TopKSAE

N, D, F, K = 13, 6, 40, 4


def _params(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    W_enc = torch.randn(D, F, generator=g, dtype=dtype)
    b_enc = torch.randn(F, generator=g, dtype=dtype) * 0.1
    W_dec = torch.randn(F, D, generator=g, dtype=dtype)
    b_dec = torch.randn(D, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]


def _grads(outputs, params, seed=1):
    x_hat, values, _ = outputs
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x_hat.shape, generator=g, dtype=x_hat.dtype)
    # A loss that uses both outputs: reconstruction plus a term on the active values.
    loss = (x_hat * w).sum() + 0.3 * (values ** 2).sum()
    return torch.autograd.grad(loss, params)


@pytest.fixture(params=["csr", "fallback"])
def backend(request, monkeypatch):
    if request.param == "fallback":  # force the gather / index_add primitives
        monkeypatch.setattr(kernels, "_csr_usable", lambda device, dtype: False)
    else:  # torch's CPU CSR kernels run float32 / float64: the fast primitives must be chosen
        assert kernels._csr_usable(torch.device("cpu"), torch.float64)
        assert kernels._csr_usable(torch.device("cpu"), torch.float32)
    return request.param


@pytest.mark.parametrize("subtract_b_dec", [True, False])
def test_fast_path_matches_dense_values_and_grads(backend, subtract_b_dec) -> None:
    params = _params()
    fast = TopKAutoencode.apply(*params, K, subtract_b_dec, None)
    ref = topk_autoencode_dense(*params, K, subtract_b_dec=subtract_b_dec)
    # Same latents (as sets), same values, same reconstruction.
    f_fast = torch.zeros(N, F, dtype=torch.float64).scatter(1, fast[2], fast[1])
    f_ref = torch.zeros(N, F, dtype=torch.float64).scatter(1, ref[2], ref[1])
    torch.testing.assert_close(f_fast, f_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-12)
    # values[n, j] ordering may differ between paths; compare gradients of an order-free loss.
    for gf, gr in zip(_grads(fast, params), _grads(ref, params)):
        torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-10)


def test_backward_touches_only_active_latents() -> None:
    params = _params(3)
    x_hat, values, idx = TopKAutoencode.apply(*params, K, True, None)
    _, gWe, gbe, gWd, _ = _grads((x_hat, values, idx), params)
    active = torch.zeros(F, dtype=torch.bool)
    active[idx[values > 0]] = True
    assert (~active).any()  # the case is not degenerate
    assert gWe[:, ~active].abs().max() == 0 and gbe[~active].abs().max() == 0
    assert gWd[~active].abs().max() == 0
    assert gWd[active].abs().sum(1).min() > 0


def test_gradcheck_float64() -> None:
    params = _params(5)

    def fn(x, W_enc, b_enc, W_dec, b_dec):
        x_hat, values, _ = TopKAutoencode.apply(x, W_enc, b_enc, W_dec, b_dec, K, True, None)
        return x_hat, values

    assert torch.autograd.gradcheck(fn, tuple(params), eps=1e-6, atol=1e-6)


def test_certified_selection_through_the_kernel() -> None:
    # float64 working dtype, candidates from a float32 product: exact values, exact latents
    params = _params(7)
    select = partial(certified_topk, candidate_dtype=torch.float32)
    _, values, idx = TopKAutoencode.apply(*params, K, True, select)
    x, W_enc, b_enc, _, b_dec = params
    pre = (x - b_dec) @ W_enc + b_enc
    torch.testing.assert_close(values, pre.gather(1, idx).relu(), rtol=0, atol=1e-12)
    ref_idx = pre.topk(K, dim=1).indices
    assert (idx == ref_idx.sort(1).values).all()


def test_primitives_exact() -> None:
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], dtype=torch.float64)  # [F=3, D=2]
    idx = torch.tensor([[0, 2], [1, 1]])
    vals = torch.tensor([[2.0, 1.0], [0.5, -1.0]], dtype=torch.float64)
    # row 0: 2*(1,0) + 1*(3,3) = (5,3); row 1: 0.5*(0,2) - (0,2) = (0,-1)
    assert sparse_decode(idx, vals, W).tolist() == [[5.0, 3.0], [0.0, -1.0]]
    rows = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    # <row0, W[0]> = 1, <row0, W[2]> = 6; <row1, W[1]> = 0
    assert gather_dot(rows, W.T, idx).tolist() == [[1.0, 6.0], [0.0, 0.0]]


def test_sae_forward_uses_fast_path_and_matches_encode(backend) -> None:
    sae = TopKSAE(SAEConfig("topk", d_in=D, d_sae=F, k=K, dtype="float64", norm_scale=1.5))
    sae.init_weights(seed=0)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    out = sae(x)
    assert out.top_indices.shape == (2, 5, K)
    torch.testing.assert_close(out.feature_acts, sae.encode(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.x_hat, sae.decode(sae.encode(x)), rtol=0, atol=1e-12)
    loss = (out.x_hat - x).pow(2).sum()
    loss.backward()
    grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()
    ref_loss = (sae.decode(sae.encode(x)) - x).pow(2).sum()
    ref_loss.backward()
    for g, p in zip(grads, sae.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-10)


def test_grad_through_values_only_leaves_incoming_grad_intact() -> None:
    params = _params(11)
    _, values, idx = TopKAutoencode.apply(*params, K, True, None)
    g_in = torch.randn(values.shape, dtype=torch.float64)
    keep = g_in.clone()
    grads = torch.autograd.grad(values, params, grad_outputs=g_in, allow_unused=True)
    assert torch.equal(g_in, keep)
    _, ref_values, ref_idx = topk_autoencode_dense(*params, K)
    # same latents; map the incoming gradient onto the reference order through the indices
    f_g = torch.zeros(N, F, dtype=torch.float64).scatter(1, idx, g_in)
    ref_grads = torch.autograd.grad(ref_values, params, grad_outputs=f_g.gather(1, ref_idx),
                                    allow_unused=True)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a),
                                   rtol=1e-10, atol=1e-10)


def test_bfloat16_through_the_fallback_primitives() -> None:
    # torch's CPU CSR kernels have no bf16: the gather / index_add fallbacks must take over.
    assert not kernels._csr_usable(torch.device("cpu"), torch.bfloat16)
    params = [p.detach().bfloat16().requires_grad_() for p in _params(13, torch.float32)]
    x_hat, values, idx = TopKAutoencode.apply(*params, K, True, None)
    x, W_enc, b_enc, W_dec, b_dec = params
    # the same bf16 products, differentiated densely by autograd
    pre = torch.addmm(b_enc, x - b_dec, W_enc)
    ref_v, ref_i = pre.topk(K, dim=-1, sorted=False)
    assert torch.equal(idx.sort(1).values, ref_i.sort(1).values)
    f = torch.zeros_like(pre).scatter(1, ref_i, ref_v.relu())
    ref_x_hat = f @ W_dec + b_dec
    w = torch.randn(N, D).bfloat16()
    grads = torch.autograd.grad((x_hat * w).sum(), params)
    ref_grads = torch.autograd.grad((ref_x_hat * w).sum(), params)
    torch.testing.assert_close(x_hat, ref_x_hat, rtol=0.02, atol=0.05)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert (g.float() - r.float()).norm() <= 0.02 * r.float().norm()
