"""SAE metrics on hand-computed cases: FVU (by token type), L0, dead fraction, spliced-in loss,
decoder cosine."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from mmdiff.activations import ActivationBatch
from mmdiff.errors import ModelError, SAEError
from mmdiff.models.base import Backbone, TokenType
from mmdiff.sae.base import SAEConfig
from mmdiff.sae.metrics import (
    FVUAccumulator,
    SplicedLoss,
    decoder_cosine,
    evaluate_sae,
    fvu,
    fvu_by_token_type,
    l0,
    mean_decoder_cosine,
    next_token_ce,
    replace_layer_output,
    spliced_loss,
)
from mmdiff.sae.topk import TopKSAE

IMG, TXT, SPC = int(TokenType.IMAGE), int(TokenType.TEXT), int(TokenType.SPECIAL)


def signed_identity_sae(d: int, k: int) -> TopKSAE:
    """W_enc = [I, -I], W_dec = [I; -I]: with k = d every input is reconstructed exactly."""
    sae = TopKSAE(SAEConfig(architecture="topk", d_in=d, d_sae=2 * d, k=k))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_fvu_hand_case():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean [2, 0], total variance 2
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # squared error 1
    assert fvu(x, x_hat) == pytest.approx(0.5)
    assert fvu(x, x) == 0.0


def test_fvu_by_token_type_uses_each_groups_own_mean():
    x = torch.tensor([[0.0], [2.0], [10.0], [14.0]])
    x_hat = torch.tensor([[1.0], [2.0], [10.0], [12.0]])
    types = torch.tensor([IMG, IMG, TXT, TXT], dtype=torch.int8)
    out = fvu_by_token_type(x, x_hat, types)
    assert out["image"] == pytest.approx(1 / 2)  # sse 1, variance around 1 is 2
    assert out["text"] == pytest.approx(4 / 8)  # sse 4, variance around 12 is 8
    assert out["all"] == pytest.approx(5 / 131)  # mean 6.5: 42.25 + 20.25 + 12.25 + 56.25


def test_fvu_accumulator_streams_exactly():
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(50, 3, generator=g), torch.randn(50, 3, generator=g)
    acc = FVUAccumulator()
    for s in range(0, 50, 7):
        acc.update(x[s : s + 7], x_hat[s : s + 7])
    assert acc.value() == pytest.approx(fvu(x, x_hat), rel=1e-12)
    assert math.isnan(FVUAccumulator().value())


def test_l0_counts_nonzeros():
    assert l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])) == pytest.approx(1.5)


def _batch() -> ActivationBatch:
    # one record: BOS (special), an image token, two text tokens, one padding position
    acts = torch.tensor([[[100.0, 100.0], [1.0, 0.0], [0.0, -2.0], [3.0, 4.0], [7.0, 7.0]]])
    types = torch.tensor([[SPC, IMG, TXT, TXT, SPC]], dtype=torch.int8)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    return ActivationBatch({5: acts}, types, mask, ["r0"])


def test_evaluate_sae_exact_identity():
    ev = evaluate_sae(signed_identity_sae(2, k=2), [_batch()], layer=5)
    assert (ev.n_tokens, ev.n_image_tokens, ev.n_text_tokens) == (3, 1, 2)
    assert ev.fvu == 0.0 and ev.fvu_text == 0.0
    assert math.isnan(ev.fvu_image)  # one image token has no variance
    # [1,0] fires latent 0; [0,-2] fires latent 3; [3,4] fires latents 0 and 1
    assert ev.l0 == pytest.approx(4 / 3)
    assert ev.fire_counts.tolist() == [2, 1, 0, 1]
    assert ev.dead_fraction == pytest.approx(1 / 4)


def test_evaluate_sae_hand_case_with_k1():
    ev = evaluate_sae(signed_identity_sae(2, k=1), [_batch()], layer=5)
    # k=1 keeps only the 4 of [3, 4]: squared error 9 on that token, all others exact
    assert ev.fvu_text == pytest.approx(9 / 22.5)  # text mean [1.5, 1]
    assert ev.fvu == pytest.approx(9 / (210 / 9))  # all-token mean [4/3, 2/3]
    ev_special = evaluate_sae(
        signed_identity_sae(2, k=1), [_batch()], layer=5, exclude_special=False
    )
    assert ev_special.n_tokens == 4  # BOS counts, padding never does


def test_evaluate_sae_errors_name_the_problem():
    with pytest.raises(SAEError, match="layers \\[5\\], not layer 3"):
        evaluate_sae(signed_identity_sae(2, 2), [_batch()], layer=3)
    with pytest.raises(SAEError, match="d_in=3"):
        evaluate_sae(signed_identity_sae(3, 3), [_batch()], layer=5)


def test_decoder_cosine_hand_case():
    a, b = signed_identity_sae(2, 2), signed_identity_sae(2, 2)
    with torch.no_grad():
        b.W_dec.copy_(torch.tensor([[1.0, 1.0], [0.0, -1.0], [-2.0, 0.0], [0.0, 0.0]]))
    cos = decoder_cosine(a, b)
    assert cos.tolist() == pytest.approx([2**-0.5, -1.0, 1.0, 0.0], abs=1e-6)
    assert mean_decoder_cosine(a, b) == pytest.approx((2**-0.5 - 1 + 1 + 0) / 4, abs=1e-6)
    with pytest.raises(SAEError, match="index-aligned"):
        decoder_cosine(a, signed_identity_sae(3, 3))


# ----------------------------------------------------------------------------- spliced-in loss


@pytest.fixture(scope="module")
def tiny_lm() -> Backbone:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg).eval()
    return Backbone(model, list(model.model.layers), num_heads=2, head_dim=4, d_model=8)


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (2, 7), generator=g)
    attn = torch.ones(2, 7, dtype=torch.long)
    attn[1, 5:] = 0
    types = torch.full((2, 7), TXT, dtype=torch.int8)
    types[:, 0] = SPC
    types[1, 5:] = SPC
    types[:, 1:3] = IMG
    return {"input_ids": ids, "attention_mask": attn}, types


def test_next_token_ce_matches_hf_loss(tiny_lm):
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = tiny_lm.model(input_ids=ids, labels=ids)
    assert next_token_ce(out.logits, ids, torch.ones_like(ids, dtype=torch.bool)) == pytest.approx(
        float(out.loss), rel=1e-5
    )


def test_identity_sae_recovers_everything(tiny_lm):
    inputs, types = _inputs()
    r = spliced_loss(tiny_lm, 0, signed_identity_sae(8, k=8), inputs, types)
    assert r.ce_sae == pytest.approx(r.ce_clean, abs=1e-5)
    assert r.ce_zero != pytest.approx(r.ce_clean, abs=1e-3)
    assert r.fraction_recovered == pytest.approx(1.0, abs=1e-4)
    # text targets: row 0 has positions 3..6, row 1 positions 3..4
    assert r.n_targets == 6


def test_zero_reconstruction_recovers_nothing_and_hook_is_removed(tiny_lm):
    inputs, types = _inputs()
    r = spliced_loss(tiny_lm, 1, torch.zeros_like, inputs, types)
    assert r.fraction_recovered == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        again = tiny_lm.model(**inputs).logits
    with replace_layer_output(tiny_lm, 1, lambda h: h), torch.no_grad():
        same = tiny_lm.model(**inputs).logits
    assert torch.equal(again, same)
    assert not tiny_lm.layers[1]._forward_hooks


def test_fraction_recovered_formula_and_errors(tiny_lm):
    assert SplicedLoss(
        0, ce_clean=1.0, ce_sae=2.0, ce_zero=5.0, n_targets=1
    ).fraction_recovered == pytest.approx(0.75)
    inputs, types = _inputs()
    with pytest.raises(ModelError, match="out of range"):
        spliced_loss(tiny_lm, 7, torch.zeros_like, inputs, types)
    with pytest.raises(ModelError, match="must match"):
        spliced_loss(tiny_lm, 0, torch.zeros_like, inputs, types[:, :3])


def test_evaluate_sae_reads_an_activation_store_like_the_batches(tmp_path):
    from mmdiff.store import ActivationStore, ActivationStoreWriter

    with ActivationStoreWriter(tmp_path / "s", [5], 2, dtype="float32") as writer:
        writer.add(_batch())
    sae = signed_identity_sae(2, k=1)
    from_store = evaluate_sae(sae, ActivationStore(tmp_path / "s"), layer=5)
    from_batches = evaluate_sae(sae, [_batch()], layer=5)
    assert pd.Series(from_store.row()).equals(pd.Series(from_batches.row()))  # NaN == NaN here
    assert from_store.n_tokens == 3  # BOS stored but excluded, padding never stored


def test_spliced_losses_of_many_saes_match_one_at_a_time(tiny_lm):
    from mmdiff.sae.metrics import spliced_loss_over_batches, spliced_losses

    inputs, types = _inputs()
    halves = [
        ({k: v[:1] for k, v in inputs.items()}, types[:1]),
        ({k: v[1:] for k, v in inputs.items()}, types[1:]),
    ]
    saes = {
        "id0": (signed_identity_sae(8, k=8), 0),
        "k2": (signed_identity_sae(8, k=2), 1),
        "zero1": (torch.zeros_like, 1),
    }
    together = spliced_losses(tiny_lm, saes, halves)
    for key, (sae, layer) in saes.items():
        alone = spliced_loss_over_batches(tiny_lm, layer, sae, halves)
        assert together[key].row() == pytest.approx(alone.row())
    # two batches weighted by their targets give the one-batch answer (4 + 2 text targets)
    whole = spliced_loss(tiny_lm, 1, saes["k2"][0], inputs, types)
    assert together["k2"].ce_sae == pytest.approx(whole.ce_sae, rel=1e-6)
    assert together["zero1"].fraction_recovered == pytest.approx(0.0, abs=1e-9)


def test_spliced_loss_on_answer_tokens_is_the_teacher_forced_answer_loss(tiny_lm):
    """targets='answer' scores exactly the positions labels mark: HF's own loss with those labels."""
    inputs, types = _inputs()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, 5:] = inputs["input_ids"][0, 5:]  # row 0: the last two tokens are the answer
    labels[1, 4] = inputs["input_ids"][1, 4]  # row 1: one answer token before its padding
    with torch.no_grad():
        hf = tiny_lm.model(**inputs, labels=labels).loss
    answered = {**inputs, "labels": labels}
    r = spliced_loss(tiny_lm, 0, signed_identity_sae(8, k=8), answered, types, targets="answer")
    assert r.targets == "answer" and r.row()["targets"] == "answer"
    assert r.n_targets == 3  # 2 + 1 answer tokens, not the 6 text tokens
    assert r.ce_clean == pytest.approx(float(hf), rel=1e-5)
    assert r.fraction_recovered == pytest.approx(1.0, abs=1e-4)
    # hand check of the same number: mean CE of the three answer tokens from the clean logits
    with torch.no_grad():
        logits = tiny_lm.model(**inputs).logits.double()
    lp = torch.log_softmax(logits, -1)
    ids = inputs["input_ids"]
    hand = -(lp[0, 4, ids[0, 5]] + lp[0, 5, ids[0, 6]] + lp[1, 3, ids[1, 4]]) / 3
    assert r.ce_clean == pytest.approx(float(hand), rel=1e-9)
    zero = spliced_loss(tiny_lm, 1, torch.zeros_like, answered, types, targets="answer")
    assert zero.fraction_recovered == pytest.approx(0.0, abs=1e-9)
    text = spliced_loss(tiny_lm, 0, signed_identity_sae(8, k=8), answered, types)
    assert text.targets == "text" and text.n_targets == 6  # labels are ignored by text targets


def test_spliced_loss_on_answers_needs_labels(tiny_lm):
    inputs, types = _inputs()
    with pytest.raises(ModelError, match="with_answer=True"):
        spliced_loss(tiny_lm, 0, torch.zeros_like, inputs, types, targets="answer")
    with pytest.raises(ModelError, match="targets must be one of"):
        spliced_loss(tiny_lm, 0, torch.zeros_like, inputs, types, targets="question")
