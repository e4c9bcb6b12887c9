"""Residual-stream and head-input capture against HF hidden states, padding, and paired runs."""

from __future__ import annotations

import pytest
import torch
from test_models import FAMILIES, make_records

from mmdiff.activations import ActivationBatch
from mmdiff.capture import capture, capture_head_inputs, capture_residuals, iter_activations
from mmdiff.errors import ModelError
from mmdiff.models import TokenType
from mmdiff.models.tiny import load_tiny


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_tiny(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_residuals_equal_hidden_states(adapter, family):
    a = adapter(family)
    inputs = a.vlm_inputs(make_records())
    acts = capture_residuals(a.vlm, inputs, [0, 1, 2])
    with torch.no_grad():
        hidden = a.vlm.model(**inputs, output_hidden_states=True).hidden_states
    for layer in (0, 1):
        torch.testing.assert_close(acts[layer], hidden[layer + 1], rtol=0, atol=0)
    # HF's last hidden state is after the final norm; the hook point is before it
    torch.testing.assert_close(a.vlm.final_norm(acts[2]), hidden[3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["vlm", "base"])
def test_batched_capture_equals_unbatched(adapter, family, side):
    a = adapter(family)
    records = make_records()
    make = a.vlm_inputs if side == "vlm" else a.base_inputs
    backbone = a.backbone(side)
    batched = make(records)
    acts = capture_residuals(backbone, batched, [0, 2])
    assert (batched["attention_mask"] == 0).any()  # the test needs padding to mean anything
    for row, record in enumerate(records):
        single = make([record])
        single_acts = capture_residuals(backbone, single, [0, 2])
        n = single["input_ids"].shape[1]
        assert torch.equal(batched["input_ids"][row, -n:], single["input_ids"][0])
        for layer in (0, 2):
            torch.testing.assert_close(
                acts[layer][row, -n:], single_acts[layer][0], rtol=0, atol=1e-5
            )


def test_head_inputs_split_o_proj_input_by_head(adapter):
    a = adapter("llava")
    inputs = a.vlm_inputs(make_records())
    seen = {}
    handle = a.vlm.o_proj(1).register_forward_hook(
        lambda m, args, out: seen.update(x=args[0], y=out)
    )
    try:
        with torch.no_grad():
            a.vlm.model(**inputs)
    finally:
        handle.remove()
    heads = capture_head_inputs(a.vlm, inputs, [1])[1]
    b, t = inputs["input_ids"].shape
    assert heads.shape == (b, t, 4, 8)
    torch.testing.assert_close(heads.reshape(b, t, 32), seen["x"], rtol=0, atol=0)
    # head h's contribution is its slice through W_O's columns h*8:(h+1)*8; they sum to o_proj's output
    w_o = a.vlm.o_proj(1).weight  # [d_model, heads * head_dim]
    per_head = torch.stack(
        [heads[:, :, h] @ w_o[:, h * 8 : (h + 1) * 8].T for h in range(4)], dim=2
    )
    torch.testing.assert_close(per_head.sum(2), seen["y"], rtol=1e-5, atol=1e-6)


def test_capture_stops_after_last_hooked_layer(adapter):
    a = adapter("llava")
    inputs = a.vlm_inputs(make_records(2))
    # transformers installs hooks of its own on the first forward and keeps them; ours must go
    with torch.no_grad():
        a.vlm.model(**inputs)
    hooks_before = [
        (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in a.vlm.model.modules()
    ]
    calls = {"layer2": 0, "lm_head": 0}
    handles = [
        a.vlm.layers[2].register_forward_hook(
            lambda *_: calls.__setitem__("layer2", calls["layer2"] + 1)
        ),
        a.vlm.unembed.register_forward_hook(
            lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1)
        ),
    ]
    try:
        capture_residuals(a.vlm, inputs, [0, 1])
        assert calls == {"layer2": 0, "lm_head": 0}
        capture_head_inputs(a.vlm, inputs, [2])  # stops at layer 2's o_proj, before its MLP
        assert calls == {"layer2": 0, "lm_head": 0}
        both = capture(a.vlm, inputs, residual_layers=[0], with_logits=True)
        assert calls == {"layer2": 1, "lm_head": 1}
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(both.logits, a.vlm.model(**inputs).logits)
    assert [
        (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in a.vlm.model.modules()
    ] == hooks_before


def test_bad_layers_are_rejected(adapter):
    a = adapter("llava")
    inputs = a.vlm_inputs(make_records(1))
    with pytest.raises(ModelError, match=r"hook points are 0\.\.2"):
        capture_residuals(a.vlm, inputs, [3])
    with pytest.raises(ModelError, match="nothing to capture"):
        capture(a.vlm, inputs)


@pytest.mark.parametrize("side", ["vlm", "base"])
def test_iter_activations_pairs_vlm_and_base_runs(adapter, side):
    a = adapter("llava")
    records = make_records(5)
    batches = list(iter_activations(a, records, [2, 0], side=side, batch_size=2, progress=False))
    assert [b.record_ids for b in batches] == [["r0", "r1"], ["r2", "r3"], ["r4"]]
    for batch, start in zip(batches, (0, 2, 4)):
        assert isinstance(batch, ActivationBatch) and batch.meta["side"] == side
        assert sorted(batch.acts) == [0, 2]
        b, t = batch.input_ids.shape
        assert batch.acts[0].shape == (b, t, 32) and batch.token_types.shape == (b, t)
        assert batch.attention_mask.dtype == torch.bool
        has_image = (batch.token_types == TokenType.IMAGE).any()
        assert bool(has_image) == (side == "vlm")
        # the same activations as a direct capture of the same batch
        chunk = records[start : start + b]
        inputs = a.vlm_inputs(chunk) if side == "vlm" else a.base_inputs(chunk)
        torch.testing.assert_close(
            batch.acts[2], capture_residuals(a.backbone(side), inputs, [2])[2]
        )
        flat = batch.flat(0, (int(TokenType.TEXT),))
        assert flat.shape == (int((batch.token_types == TokenType.TEXT).sum()), 32)


def test_iter_activations_rejects_bad_arguments(adapter):
    a = adapter("llava")
    with pytest.raises(ModelError, match="side"):
        next(iter_activations(a, make_records(1), [0], side="text", progress=False))
    with pytest.raises(ModelError, match="batch_size"):
        next(iter_activations(a, make_records(1), [0], batch_size=0, progress=False))
