"""Certified TopK selection: bitwise the exact selection, whichever product found the candidates."""

from __future__ import annotations

import pytest
import torch

from mmdiff.sae.base import SAEConfig
from mmdiff.sae.kernels import plain_topk
from mmdiff.sae.selection import (
    _Bounds,
    _product_roundoff,
    certified_topk,
    exact_keys,
    pairwise_dot,
    topk_lower_index,
)
from mmdiff.sae.topk import TopKSAE

PATHS = [None, torch.bfloat16]  # candidates from the working-dtype product, from a bf16 product


def _sae_like(N: int, D: int, F: int, seed: int, bias: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    W = torch.nn.functional.normalize(torch.randn(F, D, generator=g), dim=1).T.contiguous()
    b = torch.randn(F, generator=g) * bias
    return x, W, b


def _reference(x, W, b, k):  # the definition: keys of all latents, lower index among equals
    return topk_lower_index(exact_keys(x, W, b), k).sort(dim=-1).values


def test_pairwise_dot_is_shape_independent() -> None:
    x, W, _ = _sae_like(7, 37, 50, 0)
    one = torch.stack([pairwise_dot(x[i], W[:, j]) for i in range(7) for j in (3, 41)])
    batched = pairwise_dot(x[:, None, :], W.T[[3, 41]][None]).reshape(-1)
    assert torch.equal(one, batched)
    torch.testing.assert_close(batched.double(), (x.double() @ W.double())[:, [3, 41]].reshape(-1))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0, 4, None])
def test_random_batches_equal_the_exact_selection(seed, margin) -> None:
    x, W, b = _sae_like(192, 48, 768, seed)
    k = 12
    ref = _reference(x, W, b, k)
    sels = [certified_topk(x, W, b, k, candidate_dtype=c, margin=margin) for c in PATHS]
    for sel in sels:
        assert torch.equal(sel.indices, ref)
    # same latents -> the same values, bit for bit, whichever path found them
    assert torch.equal(sels[0].values, sels[1].values)
    # and these are the working-dtype pre-activations of the selected latents
    torch.testing.assert_close(sels[0].values, (x @ W + b).gather(1, ref), rtol=0, atol=1e-5)


def test_equals_the_plain_fp32_topk_away_from_ties() -> None:
    x, W, b = _sae_like(256, 64, 1024, 5)
    plain = plain_topk(x, W, b, 16)[1].sort(dim=-1).values
    for c in PATHS:
        assert torch.equal(certified_topk(x, W, b, 16, candidate_dtype=c).indices, plain)


def test_exact_ties_go_to_the_lower_index() -> None:
    x, W, b = _sae_like(16, 32, 200, 3)
    x *= 0.2  # |<x, w>| stays well under 1
    W[:, 150] = W[:, 7]  # duplicate encoder columns: exactly equal pre-activations
    W[:, 120] = W[:, 7]
    b[[7, 120, 150]] = 10.0  # ... the top three of every token
    W[:, 60] = W[:, 9]
    b[[9, 60]] = 5.0  # a tied pair ranked 4th-5th: with k = 4 only the lower index, 9, enters
    x[3] = 0.0  # an all-zero token: its keys are the biases
    for c in PATHS:
        sel = certified_topk(x, W, b, 4, candidate_dtype=c)
        assert torch.equal(sel.indices, _reference(x, W, b, 4))
        assert (sel.indices == torch.tensor([7, 9, 120, 150])).all()
        sel = certified_topk(x, W, b, 2, candidate_dtype=c, margin=0)  # the tie at the boundary
        assert (sel.indices == torch.tensor([7, 120])).all()
        assert (sel.level == 2).all()  # no product can certify an exact tie with an outsider


def test_near_ties_one_ulp_apart() -> None:
    x, W, b = _sae_like(32, 16, 64, 4)
    x *= 0.2
    W[:, 40] = W[:, 5]
    W[:, 41] = W[:, 5]
    b[5], b[40] = 3.0, torch.nextafter(torch.tensor(3.0), torch.tensor(4.0))  # 1 ulp above
    b[41] = 3.0 + 2 ** -20  # 4 ulps above
    for c in PATHS:
        sel = certified_topk(x, W, b, 2, candidate_dtype=c, margin=1)
        assert torch.equal(sel.indices, _reference(x, W, b, 2))
        # the top two of 5, 40, 41 (the rest are far below), mostly 40 and 41 (a rounding of
        # <x, w> + b can merge two of the three keys, and then the lower index wins)
        assert (sel.indices[:, :, None] == torch.tensor([5, 40, 41])).any(-1).all()
        assert (sel.indices == torch.tensor([40, 41])).all(dim=1).float().mean() > 0.5


def test_a_token_failing_the_bf16_certificate_is_fixed_by_the_fallback() -> None:
    # t_a = 1.0039 - 1 = 0.0039 > t_b = 1 - 0.998 = 0.002, but bf16 rounds 1.0039 down to 1 and
    # 0.998 down to 0.9961, so the bf16 product ranks b first (0.0039 vs 0).
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # token 1 picks latent 2 by a wide margin
    W = torch.tensor([[1.0039, 1.0, -1.0, -1.0], [1.0, 0.998, 1.0, -1.0]])  # [D=2, F=4]
    b = torch.zeros(4)
    P16 = (x.bfloat16() @ W.bfloat16()).float()
    assert P16[0, 1] > P16[0, 0]  # the low-precision product alone picks the wrong latent
    sel = certified_topk(x, W, b, 1, candidate_dtype=torch.bfloat16, margin=0)
    assert sel.level.tolist() == [1, 0]  # token 0 failed and was redone in fp32; token 1 did not
    assert sel.indices.tolist() == [[0], [2]]
    assert torch.equal(sel.indices, _reference(x, W, b, 1))


def test_bf16_error_bound_holds() -> None:
    x, W, b = _sae_like(64, 96, 512, 6, bias=0.5)
    x[0] *= 1e3  # scale and a large outlier dimension, as residual streams have
    x[:, 3] += 20
    bounds = _Bounds(x, W, b)
    u_in, u_acc, u_out = _product_roundoff(x.device, torch.bfloat16, torch.float32)
    P = (x.bfloat16() @ W.bfloat16() + b.bfloat16()).double()
    t = x.double() @ W.double() + b.double()
    err = (P - t).abs()
    allowed = bounds.product(u_in, u_acc) * bounds.scale.double()[:, None] + P.abs() * 2 * u_out
    assert (err <= allowed).all()
    assert (err.amax(1) > 0.05 * allowed.amax(1)).all()  # and it is not vacuous


def _organism_activations(layer: int = 2) -> torch.Tensor:  # [tokens, 128] residual stream
    transformers = pytest.importorskip("transformers")
    from mmdiff.organism import base_lm_path

    model = transformers.AutoModelForCausalLM.from_pretrained(base_lm_path(), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (8, 48), generator=g)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    return hidden.reshape(-1, hidden.shape[-1])


def test_organism_activations_equal_the_exact_selection() -> None:
    acts = _organism_activations()
    D = acts.shape[1]
    sae = TopKSAE(SAEConfig("topk", d_in=D, d_sae=16 * D, k=16))
    sae.init_weights(seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
        sae.b_enc.copy_(torch.randn(16 * D, generator=torch.Generator().manual_seed(1)) * 0.05)
    x_in = sae.sae_in(acts).detach()
    W, b = sae.W_enc.detach(), sae.b_enc.detach()
    ref = _reference(x_in, W, b, 16)
    for c in PATHS:
        sel = certified_topk(x_in, W, b, 16, candidate_dtype=c)
        assert torch.equal(sel.indices, ref)
        assert (sel.level == 0).float().mean() > 0.9  # the fallbacks stay rare


def test_sae_gradients_identical_to_the_exact_path() -> None:
    D, F, k = 24, 300, 8
    x, _, _ = _sae_like(96, D, F, 9)
    grads, outs = [], []
    for c in PATHS:
        sae = TopKSAE(SAEConfig("topk", d_in=D, d_sae=F, k=k, norm_scale=1.3))
        sae.init_weights(seed=2)
        sae.candidate_dtype = c
        out = sae(x)
        ((out.x_hat - x).pow(2).sum() + out.top_values.sum()).backward()
        outs.append(out)
        grads.append([p.grad for p in sae.parameters()])
    assert torch.equal(outs[0].top_indices, outs[1].top_indices)
    assert torch.equal(outs[0].x_hat, outs[1].x_hat)
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)
