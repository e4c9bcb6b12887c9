"""Exact math of each SAE architecture on hand-computed cases, and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from mmdiff.errors import SAEError
from mmdiff.sae import (
    SAE,
    SAEConfig,
    build_sae,
    get_sae_class,
    register_sae_class,
    registered_architectures,
)
from mmdiff.sae.jumprelu import JumpReLUSAE


def _set(sae: SAE, W_enc, b_enc, W_dec, b_dec, threshold=None) -> SAE:
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_enc, dtype=torch.float64))
        sae.b_enc.copy_(torch.tensor(b_enc, dtype=torch.float64))
        sae.W_dec.copy_(torch.tensor(W_dec, dtype=torch.float64))
        sae.b_dec.copy_(torch.tensor(b_dec, dtype=torch.float64))
        if threshold is not None:
            sae.threshold.copy_(torch.tensor(threshold, dtype=torch.float64))
    return sae


# d_in = 2, d_sae = 3. W_enc columns: e1, e2, e1 + e2.
W_ENC = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
B_ENC = [0.0, -1.0, 0.5]
W_DEC = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
B_DEC = [0.5, -0.5]
X = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
# apply_b_dec_to_input=False: pre = x W_enc + b_enc
#   x1 = (3, 1):  pre = (3, 0, 4.5)      x2 = (-1, 2): pre = (-1, 1, 1.5)
PRE = torch.tensor([[3.0, 0.0, 4.5], [-1.0, 1.0, 1.5]], dtype=torch.float64)


def cfg(arch: str, **kw) -> SAEConfig:
    base = dict(architecture=arch, d_in=2, d_sae=3, dtype="float64", apply_b_dec_to_input=False)
    base.update(kw)
    return SAEConfig(**base)


def test_topk_exact() -> None:
    sae = _set(build_sae(cfg("topk", k=1)), W_ENC, B_ENC, W_DEC, B_DEC)
    f = sae.encode(X)
    assert torch.equal(f, torch.tensor([[0, 0, 4.5], [0, 0, 1.5]], dtype=torch.float64))
    # x_hat = f W_dec + b_dec: 4.5 * (1, 1) + (0.5, -0.5) = (5, 4); 1.5 * (1, 1) + b = (2, 1)
    out = sae(X)
    assert torch.allclose(out.x_hat, torch.tensor([[5.0, 4.0], [2.0, 1.0]], dtype=torch.float64))
    assert torch.equal(out.feature_acts, f)
    vals, idx = sae.encode_sparse(X)
    assert idx.flatten().tolist() == [2, 2] and vals.flatten().tolist() == [4.5, 1.5]


def test_topk_relu_after_selection_and_b_dec_input() -> None:
    # k=3 keeps every latent, then ReLU drops the negative one.
    sae = _set(build_sae(cfg("topk", k=3)), W_ENC, B_ENC, W_DEC, B_DEC)
    assert torch.equal(sae.encode(X)[1], torch.tensor([0.0, 1.0, 1.5], dtype=torch.float64))
    # apply_b_dec_to_input: pre = (x - b_dec) W_enc + b_enc; x1 - b_dec = (2.5, 1.5) -> (2.5, .5, 4.5)
    sae2 = _set(build_sae(cfg("topk", k=2, apply_b_dec_to_input=True)), W_ENC, B_ENC, W_DEC, B_DEC)
    assert torch.allclose(sae2.hidden_pre(X[:1]), torch.tensor([[2.5, 0.5, 4.5]], dtype=torch.float64))
    assert torch.allclose(sae2.encode(X[:1]), torch.tensor([[2.5, 0.0, 4.5]], dtype=torch.float64))


def test_norm_scale_exact() -> None:
    # s = 2: pre = 2x W_enc + b_enc; x_hat = (f W_dec + b_dec) / 2
    sae = _set(build_sae(cfg("topk", k=1, norm_scale=2.0)), W_ENC, B_ENC, W_DEC, B_DEC)
    x = X[:1]  # 2x = (6, 2): pre = (6, 1, 8.5) -> f = (0, 0, 8.5); x_hat = ((8.5, 8.5) + b) / 2
    assert torch.allclose(sae.encode(x), torch.tensor([[0, 0, 8.5]], dtype=torch.float64))
    assert torch.allclose(sae(x).x_hat, torch.tensor([[4.5, 4.0]], dtype=torch.float64))


def test_topk_decoder_norm_gating_ranks_by_scaled_pre() -> None:
    # ||d|| = (2, 1, sqrt 2): x1 pre*||d|| = (6, 0, 6.36) -> latent 2; with d_0 = (4, 0): (12, ...)
    sae = _set(build_sae(cfg("topk", k=1, decoder_norm_gating=True)), W_ENC, B_ENC,
               [[4.0, 0.0], [0.0, 1.0], [1.0, 1.0]], B_DEC)
    f = sae.encode(X[:1])
    assert torch.equal(f, torch.tensor([[3.0, 0, 0]], dtype=torch.float64))  # value stays pre
    assert torch.allclose(sae(X[:1]).x_hat, torch.tensor([[12.5, -0.5]], dtype=torch.float64))


def test_jumprelu_exact_and_gating() -> None:
    sae = _set(build_sae(cfg("jumprelu")), W_ENC, B_ENC, W_DEC, B_DEC, threshold=[2.0, 0.5, 2.0])
    # pre x1 = (3, 0, 4.5) > (2, .5, 2) -> (3, 0, 4.5); x2 = (-1, 1, 1.5) -> (0, 1, 0)
    assert torch.equal(sae.encode(X), torch.tensor([[3, 0, 4.5], [0, 1, 0]], dtype=torch.float64))
    gated = _set(build_sae(cfg("jumprelu", decoder_norm_gating=True)), W_ENC, B_ENC, W_DEC, B_DEC,
                 threshold=[2.0, 0.5, 2.0])
    # pre*||d|| x2 = (-2, 1, 1.5*sqrt2 = 2.12) > theta -> latents 1 and 2 fire
    assert torch.allclose(gated.encode(X[1:]), torch.tensor([[0, 1, 1.5]], dtype=torch.float64))


def test_jumprelu_threshold_gets_ste_gradient() -> None:
    sae = build_sae(cfg("jumprelu", l1_coefficient=2.0))
    _set(sae, W_ENC, B_ENC, W_DEC, B_DEC, threshold=[3.0002, 0.5, 2.0])
    out = sae(X[:1])  # pre_0 = 3 lies within eps/2 = 0.0005 of theta_0 = 3.0002
    loss = sae.sparsity_penalty(out)
    loss.backward()
    # L0 = sum 1[pre > theta]; d/d theta_0 = -(1/eps) * 1 (inside the window); others 0
    assert sae.threshold.grad is not None
    assert sae.threshold.grad[0].item() == pytest.approx(-2.0 / 0.001)
    assert sae.threshold.grad[1:].abs().sum().item() == 0.0


def test_relu_and_l1() -> None:
    sae = _set(build_sae(cfg("relu", l1_coefficient=0.5)), W_ENC, B_ENC, W_DEC, B_DEC)
    out = sae(X)
    assert torch.equal(out.feature_acts, torch.tensor([[3, 0, 4.5], [0, 1, 1.5]], dtype=torch.float64))
    # l1 = 0.5 * mean_n sum_i f_i ||d_i||: n1 = 3*2 + 4.5*sqrt2; n2 = 1 + 1.5*sqrt2
    expect = 0.5 * ((6 + 4.5 * math.sqrt(2)) + (1 + 1.5 * math.sqrt(2))) / 2
    assert sae.sparsity_penalty(out).item() == pytest.approx(expect)


def test_batchtopk_train_and_eval() -> None:
    sae = _set(build_sae(cfg("batchtopk", k=1)), W_ENC, B_ENC, W_DEC, B_DEC)
    sae.train()
    # keep k * n_tokens = 2 largest of relu(pre) over the batch: 4.5 and 3 (both in token 1)
    f = sae.encode(X)
    assert torch.equal(f, torch.tensor([[3, 0, 4.5], [0, 0, 0]], dtype=torch.float64))
    sae.update_threshold(f, lr=0.5)  # theta = 0.5 * 0 + 0.5 * min positive (3) = 1.5
    assert sae.threshold.tolist() == [1.5, 1.5, 1.5]
    sae.eval()
    assert torch.equal(sae.encode(X), torch.tensor([[3, 0, 4.5], [0, 0, 0]], dtype=torch.float64))


def test_decoder_directions_unit_rows() -> None:
    sae = _set(build_sae(cfg("relu")), W_ENC, B_ENC, W_DEC, B_DEC)
    d = sae.decoder_directions()
    assert torch.allclose(d.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(d[2], torch.tensor([1, 1], dtype=torch.float64) / math.sqrt(2))


def test_shape_mismatch_and_bad_config() -> None:
    sae = build_sae(cfg("topk", k=1, hook_layer=12))
    with pytest.raises(SAEError, match="layer 12 expects inputs of width d_in=2"):
        sae.encode(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(SAEError, match="k must be"):
        cfg("topk", k=4)
    with pytest.raises(SAEError, match="needs SAEConfig.k"):
        build_sae(cfg("topk"))
    with pytest.raises(SAEError, match="unknown SAE architecture 'gated'"):
        build_sae(cfg("gated"))


def test_registry_one_file_per_architecture() -> None:
    assert {"topk", "batchtopk", "jumprelu", "relu"} <= set(registered_architectures())
    assert get_sae_class("jumprelu") is JumpReLUSAE

    @register_sae_class("abs_test")
    class AbsSAE(SAE):
        def activation(self, pre):
            return pre.abs()

    sae = _set(build_sae(cfg("abs_test")), W_ENC, B_ENC, W_DEC, B_DEC)
    assert torch.equal(sae.encode(X[1:]), torch.tensor([[1, 1, 1.5]], dtype=torch.float64))
    with pytest.raises(SAEError, match="already registered"):
        register_sae_class("abs_test")(type("Other", (SAE,), {}))
