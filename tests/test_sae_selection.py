"""Certified TopK selection: bitwise the exact selection, whichever product found the candidates."""

from __future__ import annotations

import pytest
import torch

from mmdiff.sae.base import SAEConfig
from mmdiff.sae.kernels import plain_topk
from mmdiff.sae import selection
from mmdiff.sae.selection import (
    SPLIT,
    TENSOR_CORE_U_ACC,
    _Bounds,
    _ieee_fp32,
    _product_roundoff,
    certified_topk,
    exact_keys,
    pairwise_dot,
    split_error,
    split_product,
    topk_lower_index,
)
from mmdiff.sae.topk import TopKSAE

PATHS = [None, torch.bfloat16, SPLIT]  # candidates from the working-dtype, bf16, split products


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
    for sel in sels[1:]:
        assert torch.equal(sels[0].values, sel.values)
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
        # the first two candidates cannot be certified against their tied outsider; a wider set
        # from the same fp32 / split product holds all three and their keys decide (level 1); the
        # bf16 path's second try, the fp32 product with the same two candidates, cannot (level 2)
        assert (sel.level == (2 if c is torch.bfloat16 else 1)).all()


def test_ties_wider_than_the_second_try_read_all_keys() -> None:
    x, W, b = _sae_like(8, 32, 200, 3)
    x *= 0.2
    dup = list(range(100, 130))  # 30 copies of column 7: more than the second try's 16 candidates
    W[:, dup] = W[:, 7:8]
    b[[7, *dup]] = 10.0
    for c in [*PATHS, "bf16x3"]:
        sel = certified_topk(x, W, b, 2, candidate_dtype=c, margin=0)
        assert (sel.indices == torch.tensor([7, 100])).all()
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
    for out, grad in zip(outs[1:], grads[1:]):
        assert torch.equal(outs[0].top_indices, out.top_indices)
        assert torch.equal(outs[0].x_hat, out.x_hat)
        for g0, g1 in zip(grads[0], grad):
            assert torch.equal(g0, g1)


def test_near_ties_with_sure_candidates_above_them() -> None:
    # k = 4: two latents far above (certain), three within an ulp or so for the last two places
    x, W, b = _sae_like(32, 16, 64, 4)
    x *= 0.2
    W[:, 40] = W[:, 5]
    W[:, 41] = W[:, 5]
    b[5], b[40], b[41] = 3.0, 3.0 + 2 ** -22, 3.0 + 2 ** -20
    b[[11, 12]] = 6.0
    for c in PATHS:
        sel = certified_topk(x, W, b, 4, candidate_dtype=c, margin=2)
        assert torch.equal(sel.indices, _reference(x, W, b, 4))
        assert ((sel.indices == 11).any(1) & (sel.indices == 12).any(1)).all()


def _adversarial(D: int, seed: int):
    """Inputs that stress the split product: bf16 rounding boundaries, an outlier dimension,
    cancellation (t near 0 with large terms), values 40 binades apart, near-underflow values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, D, generator=g)
    W = torch.randn(D, 96, generator=g) / D ** 0.5
    b = torch.randn(96, generator=g) * 0.1
    # halfway between two bf16 numbers plus a little: hi rounds up, lo carries the rest
    x[0] = (1 + 2 ** -8 + 2 ** -17) * torch.sign(torch.randn(D, generator=g))
    W[:, 0] = (1 - 2 ** -9 - 2 ** -18) / D ** 0.5
    x[1, 3] = 1e4  # an outlier dimension
    x[2] = x[3].neg()  # cancellation with the next token's products
    x[3] *= 2 ** 20
    x[4] *= 2 ** -20
    x[5] = torch.randn(D, generator=g) * 2 ** -120  # near underflow
    W[:, 1] = W[:, 2]  # equal columns: t exactly equal
    W[:, 3] = -W[:, 4]
    x[6] = W[:, 5] * 7  # aligned with a column: t = 7 ||w||^2, every product positive
    return x, W, b


@pytest.mark.parametrize("D", [64, 1000, 4096])
def test_split_product_bound_holds_against_float64(D) -> None:
    for seed in range(3):
        x, W, b = _adversarial(D, seed)
        bounds = _Bounds(x, W, b)
        P = split_product(x, W, b)
        assert P.dtype == torch.float32
        t = x.double() @ W.double() + b.double()
        err = (P.double() - t).abs()
        for u_acc in (2.0 ** -24, TENSOR_CORE_U_ACC):  # CPU arithmetic satisfies both models
            allowed = split_error(D, u_acc) * bounds.scale.double()[:, None] \
                + bounds.floor.double()[:, None]
            assert (err <= allowed).all()
        # and the bound is far tighter than the bf16 product's, for the same inputs
        assert split_error(D, TENSOR_CORE_U_ACC) < bounds.product(2 ** -8, 2 ** -24) / 6
        P16 = (x.bfloat16() @ W.bfloat16() + b.bfloat16()).double()
        assert err.max() < (P16 - t).abs().max() / 50


def test_split_error_terms() -> None:
    # at D = 4096 with IEEE fp32 accumulation: gamma_D(2^-24) + u^2 terms, ~2.9e-4
    assert 2.4e-4 < split_error(4096, 2.0 ** -24) < 3.1e-4
    assert split_error(4096, TENSOR_CORE_U_ACC) < 1.1e-3
    # the dropped terms alone: 3 u^2 with u = 2^-8
    assert split_error(1, 0.0) == pytest.approx(3 * 2.0 ** -16, rel=0.05)


def test_working_dtype_product_runs_without_tf32() -> None:
    m = torch.backends.cuda.matmul
    old = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        with _ieee_fp32(torch.device("cuda")):  # only flags: no GPU needed
            assert torch.get_float32_matmul_precision() == "highest"
        assert m.fp32_precision == "tf32"
    finally:
        m.fp32_precision = old


def test_split_candidates_certify_most_tokens_at_level_0(monkeypatch) -> None:
    # Modest shapes, the CUDA accumulation bound (tensor cores), an SAE at init on synthetic
    # residual-like data: the split product certifies most tokens from the first candidates,
    # where the one-GEMM bf16 product's bound (about 2^-7 ||x|| max||w||) certifies almost none
    monkeypatch.setattr(selection, "_low_precision_u_acc", lambda device: TENSOR_CORE_U_ACC)
    # a bf16 GEMM as CUDA runs it (bf16 inputs, fp32 accumulation, bf16 result), without the
    # 20-100x slow bf16 matmul of AVX2 CPUs
    monkeypatch.setattr(selection, "_low_precision_addmm", lambda b, x, W: torch.addmm(
        b.float(), x.float(), W.float()).to(x.dtype))
    D, F, k = 1024, 8192, 32
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(F // 4, D, generator=g), dim=1)
    idx = torch.randint(0, F // 4, (96, k // 2), generator=g)
    coef = torch.randn(96, k // 2, generator=g).abs() + 0.5
    x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")
    x = x + 0.05 * torch.randn(96, D, generator=g) - x.mean(0)
    sae = TopKSAE(SAEConfig("topk", d_in=D, d_sae=F, k=k))
    sae.init_weights(seed=0)
    W, b = sae.W_enc.detach(), sae.b_enc.detach()
    split = certified_topk(x, W, b, k, candidate_dtype=SPLIT, margin=k)
    assert (split.level == 0).float().mean() > 0.9
    assert (split.level < 2).all()
    one = certified_topk(x, W, b, k, candidate_dtype=torch.bfloat16, margin=8)
    assert (one.level == 0).float().mean() < 0.5
    assert torch.equal(split.indices, one.indices)
    sub = slice(0, 8)  # the definition, on a few tokens (all F keys are slow on CPU)
    assert torch.equal(split.indices[sub], _reference(x[sub], W, b, k))


def test_recording_counts_levels() -> None:
    x, W, b = _sae_like(64, 32, 256, 1)
    with selection.recording() as log:
        certified_topk(x, W, b, 8, candidate_dtype=None)
        certified_topk(x, W, b, 8, candidate_dtype=SPLIT)
    shares = log.level_shares()
    assert sum(shares) == pytest.approx(1.0)
    assert len(log.levels) == 2
    assert "product" in log.seconds()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
def test_on_cuda_every_path_equals_the_definition_computed_on_cpu() -> None:
    # the keys' bits do not depend on the device, so the CPU's definition is the CUDA's too; the
    # split product runs as real bf16 GEMMs with fp32 outputs, under the tensor-core bound
    cuda = torch.device("cuda")
    x, W, b = _sae_like(512, 1024, 8192, 11)
    x = x - x.mean(0)
    ref = _reference(x[:64], W, b, 32)
    for c in ["auto", *PATHS]:
        sel = certified_topk(x.to(cuda), W.to(cuda), b.to(cuda), 32, candidate_dtype=c)
        assert torch.equal(sel.indices[:64].cpu(), ref)
        if c in ("auto", SPLIT):
            assert (sel.level == 0).float().mean() > 0.9
    keys = exact_keys(x[:4].to(cuda), W.to(cuda), b.to(cuda))
    assert torch.equal(keys.cpu(), exact_keys(x[:4], W, b))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
def test_split_product_bound_holds_on_cuda_tensor_cores() -> None:
    for D in (1000, 4096):
        x, W, b = _adversarial(D, 0)
        bounds = _Bounds(x, W, b)
        P = split_product(x.cuda(), W.cuda(), b.cuda()).cpu().double()
        t = x.double() @ W.double() + b.double()
        allowed = split_error(D, TENSOR_CORE_U_ACC) * bounds.scale.double()[:, None] \
            + bounds.floor.double()[:, None]
        assert ((P - t).abs() <= allowed).all()
    assert selection._MM_OUT_DTYPE.get("cuda", True), "torch.mm(out_dtype=float32) unavailable"


def test_split_values_recomputed_give_the_same_selection(monkeypatch) -> None:
    x, W, b = _sae_like(192, 48, 768, 7)
    ref = _reference(x, W, b, 12)
    for how in ("product", "recompute"):
        monkeypatch.setattr(selection, "SPLIT_VALUES", how)
        sel = certified_topk(x, W, b, 12, candidate_dtype=SPLIT, margin=4)
        assert torch.equal(sel.indices, ref)
