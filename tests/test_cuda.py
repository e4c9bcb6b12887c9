"""What only a CUDA GPU can check: bf16 autocast SAE training, the sparse TopK kernels on CUDA
against the dense reference, single-GPU capture (no process group, so no NCCL), and the
interventions' KV-cache equality on CUDA. Marked `cuda`: skipped, not failed, without a GPU;
`make gpu-check` runs them (scripts/gpu_check.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]
CUDA = torch.device("cuda")


def test_bf16_autocast_training_on_cuda(tmp_path):
    from test_sae_trainer import sparse_dictionary, synthetic_batches

    from mmdiff.sae.trainer import METRICS_FILE, TrainConfig, train_saes

    assert torch.cuda.is_bf16_supported(), "this GPU has no bf16: the trainer would run fp32"
    atoms = sparse_dictionary()
    final = {}
    for bf16 in (True, False):
        cfg = TrainConfig(k=4, d_sae=128, batch_size=256, total_tokens=40_000, lr=5e-3,
                          buffer_tokens=2048, dead_tokens_threshold=2000, checkpoint_every=0,
                          log_every=10, seed=0, device="cuda", bf16=bf16)
        out = tmp_path / f"bf16_{bf16}"
        result = train_saes(None, synthetic_batches(atoms, 40, seed=1), [0, 1], cfg, out, progress=False)
        sae = result.saes[0]
        assert sae.W_dec.device.type == "cuda" and sae.W_dec.dtype == torch.float32  # fp32 master weights
        m = pd.read_parquet(out / METRICS_FILE)
        final[bf16] = m[m["layer"] == 0].sort_values("step")["fvu"].iloc[-1]
    assert final[True] < 0.2 and abs(final[True] - final[False]) < 0.05, final


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_sparse_kernels_on_cuda_match_the_dense_reference(dtype, tol):
    from mmdiff.sae.kernels import TopKAutoencode, topk_autoencode_dense

    n, d, f, k = 512, 256, 4096, 32
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [
        torch.randn(*shape, generator=g, device=CUDA, dtype=dtype).mul_(scale).requires_grad_()
        for shape, scale in (((n, d), 1.0), ((d, f), d**-0.5), ((f,), 0.1), ((f, d), f**-0.5), ((d,), 0.1))
    ]
    fast = TopKAutoencode.apply(*params, k, True, None)
    ref = topk_autoencode_dense(*params, k, subtract_b_dec=True)
    dense = [torch.zeros(n, f, device=CUDA, dtype=dtype).scatter(1, out[2], out[1]) for out in (fast, ref)]
    torch.testing.assert_close(dense[0], dense[1], rtol=tol, atol=tol)
    torch.testing.assert_close(fast[0], ref[0], rtol=tol, atol=tol)
    w = torch.randn(n, d, generator=g, device=CUDA, dtype=dtype)
    grads = [torch.autograd.grad((out[0] * w).sum() + 0.3 * (out[1] ** 2).sum(), params) for out in (fast, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def _records(n: int = 4):
    from mmdiff.data.records import Record

    rng = np.random.default_rng(0)
    return [Record(id=f"r{i}", question="Is the red circle left of the blue square?", answers=["yes"],
                   image=Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
                   caption="A red circle left of a blue square.") for i in range(n)]


def test_single_gpu_capture_matches_cpu(tmp_path):
    from mmdiff.capture import capture_residuals
    from mmdiff.models.tiny import load_tiny
    from mmdiff.parallel import capture_store_distributed
    from mmdiff.store import ActivationStore

    cpu = load_tiny("llava", tmp_path / "tiny")
    gpu = load_tiny("llava", tmp_path / "tiny", device="cuda")
    assert gpu.vlm.device.type == "cuda" and not torch.distributed.is_initialized()
    records = _records()
    for side in ("vlm", "base"):
        make_cpu = cpu.vlm_inputs if side == "vlm" else cpu.base_inputs
        make_gpu = gpu.vlm_inputs if side == "vlm" else gpu.base_inputs
        ref = capture_residuals(cpu.backbone(side), make_cpu(records), [0, 1, 2])
        got = capture_residuals(gpu.backbone(side), make_gpu(records), [0, 1, 2])
        for layer in ref:
            torch.testing.assert_close(got[layer].cpu(), ref[layer], rtol=1e-4, atol=1e-4)
    out = tmp_path / "store"
    capture_store_distributed(gpu, records, [0, 2], out, "vlm", dtype="float32", shard_tokens=1024,
                              batch_size=2, progress=False)
    tokens = int(cpu.vlm_inputs(records)["attention_mask"].sum())
    assert ActivationStore(out).num_tokens == tokens


def test_interventions_keep_kv_cache_equality_on_cuda():
    from test_interventions import D, H, HD, LAYERS, generate, no_hooks
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmdiff.interventions import ablate_features, compose, mean_ablate_heads, steer_features
    from mmdiff.models.base import Backbone, TokenType

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=H, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = LlamaForCausalLM(cfg).eval().to(device=CUDA, dtype=torch.float64)
    backbone = Backbone(model, list(model.model.layers), H, HD, D)
    ids = torch.tensor([[0, 0, 1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 14, 15, 16]], device=CUDA)
    mask = (ids != 0).long()
    mask[1, 0] = 1
    T, I, S = int(TokenType.TEXT), int(TokenType.IMAGE), int(TokenType.SPECIAL)
    types = torch.tensor([[S, S, S, I, I, I, T, T], [S, I, I, I, T, T, T, T]], dtype=torch.int8, device=CUDA)
    generate(backbone, ids, mask, cache=True, n=1)
    assert no_hooks(model)
    _, base_logits = generate(backbone, ids, mask, cache=True)
    g = torch.Generator(device="cuda").manual_seed(3)
    dirs = torch.randn(2, D, generator=g, device=CUDA, dtype=torch.float64)
    means = {0: torch.randn(H, HD, generator=g, device=CUDA, dtype=torch.float64)}
    with compose(ablate_features(backbone, {1: dirs}, "text", types),
                 steer_features(backbone, {1: [(dirs[0], 4.0)]}, alpha=2.0),
                 mean_ablate_heads(backbone, {0: [0, 2]}, means, "text", types)):
        seq_c, logits_c = generate(backbone, ids, mask, cache=True)
        seq_n, logits_n = generate(backbone, ids, mask, cache=False)
    assert torch.equal(seq_c, seq_n)
    torch.testing.assert_close(logits_c, logits_n, rtol=0, atol=1e-9)
    assert (logits_c - base_logits).abs().max() > 1e-3
    assert no_hooks(model)
