"""Interventions: exact math on hand-made tensors, KV-cache equivalence and clean exit on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmdiff.interventions import (
    InterventionError,
    ablate_features,
    clamp_delta,
    clamp_features,
    compose,
    decoder_directions,
    difference_of_means,
    head_means,
    mean_ablate_heads,
    orthonormal_basis,
    position_mask,
    project_out,
    replace_heads,
    steer_features,
    steer_vector,
)
from mmdiff.models.base import Backbone, TokenType

T, I, S = int(TokenType.TEXT), int(TokenType.IMAGE), int(TokenType.SPECIAL)
D, H, HD, LAYERS = 32, 4, 8, 3


class ReluSAE(torch.nn.Module):
    """A local stand-in for mmdiff.sae: f = relu(x W_enc + b_enc), x_hat = f W_dec + b_dec."""

    def __init__(self, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor) -> None:
        super().__init__()
        self.W_enc, self.b_enc, self.W_dec = w_enc, b_enc, w_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval().to(torch.float64)  # float64: greedy ties cannot flip
    backbone = Backbone(model, list(model.model.layers), H, HD, D)
    ids = torch.tensor(
        [[0, 0, 1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 14, 15, 16]]
    )  # row 0 left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    types = torch.tensor([[S, S, S, I, I, I, T, T], [S, I, I, I, T, T, T, T]], dtype=torch.int8)
    generate(
        backbone, ids, mask, cache=True, n=1
    )  # transformers may add its own hooks on a first run
    assert no_hooks(model)  # records them as the baseline
    return backbone, ids, mask, types


def generate(backbone, ids, mask, cache: bool, n: int = 5):
    out = backbone.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        use_cache=cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits, 1)  # [B, T+n], [B, n, V]


def hook_ids(model: torch.nn.Module) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook installed on the model, by module and id."""
    kinds = ("_forward_hooks", "_forward_pre_hooks")
    return {
        (name, kind, hid)
        for name, m in model.named_modules()
        for kind in kinds
        for hid in getattr(m, kind)
    }


_BASELINE: dict[int, set] = {}


def no_hooks(model: torch.nn.Module) -> bool:
    """No hook beyond those the model had when first seen (transformers installs some of its own)."""
    _BASELINE.setdefault(id(model), hook_ids(model))
    return hook_ids(model) == _BASELINE[id(model)]


# -- exact math on hand-made tensors ------------------------------------------------------------
def test_position_mask_counts_generated_tokens_as_text():
    types = torch.tensor([[S, I, T, T], [I, I, T, S]], dtype=torch.int8)
    assert position_mask("all", types, 2, 0, 4) is None
    assert position_mask("text", types, 2, 0, 4).tolist() == [
        [False, False, True, True],
        [False, False, True, False],
    ]
    assert position_mask("image", types, 2, 0, 4).tolist() == [
        [False, True, False, False],
        [True, True, False, False],
    ]
    # a cached forward over absolute positions 3..5: position 3 from the prompt, 4 and 5 generated
    assert position_mask("text", types, 2, 3, 3).tolist() == [
        [True, True, True],
        [False, True, True],
    ]
    assert position_mask("image", types, 2, 3, 3).tolist() == [
        [False, False, False],
        [False, False, False],
    ]
    explicit = torch.tensor([[True, False, False, True], [False, True, False, False]])
    assert position_mask(explicit, None, 2, 3, 2).tolist() == [[True, False], [False, False]]


def test_position_mask_errors_say_what_to_do():
    with pytest.raises(InterventionError, match="token_types"):
        position_mask("text", None, 2, 0, 4)
    with pytest.raises(InterventionError, match="repeat_interleave"):
        position_mask("text", torch.zeros(2, 4, dtype=torch.int8), 4, 0, 1)
    with pytest.raises(InterventionError, match="bool"):
        position_mask(torch.zeros(2, 4), None, 2, 0, 1)


def test_projection_removes_exactly_the_span():
    v1 = torch.tensor([1.0, 0, 0, 0, 0])
    v2 = torch.tensor([1.0, 1, 0, 0, 0])
    q = orthonormal_basis(torch.stack([v1, v2, v1 + 2 * v2, torch.zeros(5)]))  # rank 2
    assert q.shape == (5, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2, dtype=torch.float64))
    y = torch.tensor([[3.0, -2.0, 5.0, 7.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        project_out(y, q), torch.tensor([[0.0, 0.0, 5.0, 7.0, -1.0]], dtype=torch.float64)
    )
    empty = orthonormal_basis(torch.zeros(3, 5))
    assert empty.shape == (5, 0) and project_out(y, empty) is y


def test_ablation_edits_only_selected_positions(tiny):
    backbone = tiny[0]
    v = torch.zeros(D)
    v[3] = 2.0
    ablation = ablate_features(backbone, {1: v[None]}, positions="all")
    y = torch.randn(2, 3, D, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    out = ablation.edit(1, y, mask)
    expected = y.clone()
    expected[mask, 3] = 0.0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(out[~mask], y[~mask])


def test_steering_adds_alpha_s_v_at_selected_positions_only(tiny):
    backbone = tiny[0]
    direction = torch.zeros(D)
    direction[1], direction[3] = 3.0, 4.0  # unit v: 0.6, 0.8
    steering = steer_features(backbone, {0: [(direction, 2.0)]}, alpha=0.5)
    y = torch.randn(2, 3, D, dtype=torch.float64)
    mask = torch.tensor([[True, False, False], [False, True, True]])
    diff = steering.edit(0, y, mask) - y
    expected = torch.zeros(D, dtype=torch.float64)
    expected[1], expected[3] = 0.6, 0.8  # alpha * s * v = 0.5 * 2 * v
    torch.testing.assert_close(diff[mask], expected.expand(3, D), rtol=0, atol=1e-12)
    assert torch.equal(diff[~mask], torch.zeros(3, D, dtype=torch.float64))
    with pytest.raises(InterventionError, match="zero vector"):
        steer_features(backbone, {0: [(torch.zeros(D), 1.0)]}, alpha=1.0)
    with pytest.raises(InterventionError, match="hidden size"):
        steer_features(backbone, {0: [(torch.ones(D + 1), 1.0)]}, alpha=1.0)
    with pytest.raises(InterventionError, match="out of range"):
        steer_vector(backbone, LAYERS, torch.ones(D), 1.0)


def test_clamp_hand_computed_and_noop_when_unchanged():
    sae = ReluSAE(torch.eye(4), torch.zeros(4), torch.eye(4))  # f = relu(x), x_hat = f
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    delta = clamp_delta(sae, x, torch.tensor([2]), torch.tensor([5.0]))
    torch.testing.assert_close(x + delta, torch.tensor([[1.0, -2.0, 5.0, 0.5]]))
    # clamping features to the values they already have is exactly a no-op
    torch.manual_seed(1)
    sae = ReluSAE(torch.randn(6, 10), torch.randn(10), torch.randn(10, 6))
    x = torch.randn(1, 6)
    f = sae.encode(x)
    idx = torch.tensor([0, 4, 7])
    assert torch.equal(clamp_delta(sae, x, idx, f[0, idx]), torch.zeros(1, 6))


class ScaledSAE(ReluSAE):
    """Like mmdiff.sae with norm_scale s: f = relu(s x W_enc + b_enc), x_hat = (f W_dec + b_dec) / s."""

    def __init__(self, scale: float, d: int) -> None:
        super().__init__(torch.eye(d), torch.zeros(d), torch.eye(d))
        self.scale, self.b_dec = scale, torch.full((d,), 0.25)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return super().encode(x * self.scale)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (f @ self.W_dec + self.b_dec) / self.scale


def test_clamp_honours_the_sae_input_scale():
    sae = ScaledSAE(2.0, 4)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])  # f = relu(2x) = [2, 0, 6, 1]
    delta = clamp_delta(sae, x, torch.tensor([2]), torch.tensor([10.0]))  # (10 - 6) / 2 along e_2
    torch.testing.assert_close(x + delta, torch.tensor([[1.0, -2.0, 5.0, 0.5]]))
    assert sae.encode(x + delta)[0, 2] == 10.0


def test_clamp_through_hook_sets_the_feature(tiny):
    backbone = tiny[0]
    sae = ReluSAE(
        torch.eye(D, dtype=torch.float64),
        torch.zeros(D, dtype=torch.float64),
        torch.eye(D, dtype=torch.float64),
    )
    clamp = clamp_features(backbone, {2: sae}, {2: {5: 9.0}}, positions="all")
    y = torch.randn(2, 3, D, dtype=torch.float64).abs()  # all features active: relu(y) = y
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = clamp.edit(2, y, mask)
    assert torch.equal(out[~mask], y[~mask])
    torch.testing.assert_close(out[mask][:, 5], torch.full((2,), 9.0, dtype=torch.float64))
    with pytest.raises(InterventionError, match="d_sae"):
        clamp_features(backbone, {2: sae}, {2: {D: 1.0}}, positions="all")
    with pytest.raises(InterventionError, match="another model"):
        clamp_features(
            backbone,
            {2: ReluSAE(torch.eye(4), torch.zeros(4), torch.eye(4))},
            {2: {0: 1.0}},
            positions="all",
        )


def test_replace_heads_replaces_exactly_the_head_slice():
    x = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).reshape(2, 3, 8)  # H=4 heads of head_dim 2
    means = -torch.arange(1, 9, dtype=torch.float32).reshape(4, 2)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    out = replace_heads(x, torch.tensor([1, 3]), means, 2, mask)
    expected = x.clone()
    for b, t in mask.nonzero().tolist():
        expected[b, t, 2:4] = means[1]
        expected[b, t, 6:8] = means[3]
    assert torch.equal(out, expected)


# -- on a tiny Llama ----------------------------------------------------------------------------
def _interventions(backbone, types):
    g = torch.Generator().manual_seed(3)
    dirs = torch.randn(2, D, generator=g, dtype=torch.float64)
    sae = ReluSAE(
        torch.randn(D, 16, generator=g, dtype=torch.float64),
        torch.zeros(16, dtype=torch.float64),
        torch.randn(16, D, generator=g, dtype=torch.float64),
    )
    means = {0: torch.randn(H, HD, generator=g, dtype=torch.float64)}
    vec = torch.randn(D, generator=g, dtype=torch.float64)
    return {
        "ablate": lambda: ablate_features(backbone, {1: dirs}, "text", types),
        "steer": lambda: steer_features(backbone, {1: [(dirs[0], 4.0)]}, alpha=2.0),
        "clamp": lambda: clamp_features(backbone, {2: sae}, {2: {3: 5.0, 7: 0.0}}, "text", types),
        "heads": lambda: mean_ablate_heads(backbone, {0: [0, 2]}, means, "text", types),
        "vector_image": lambda: steer_vector(backbone, 0, vec, 3.0, "image", types),
    }


def test_the_cache_is_found_whatever_keyword_it_travels_under():
    """transformers 5.24 renamed `past_key_values` to `cache`; a hook that missed the cache edited
    generated tokens as if they sat at position 0 (the bug behind issue 19)."""
    from transformers import DynamicCache

    from mmdiff.interventions._hooks import find_cache

    cache = DynamicCache()
    for key in ("cache", "past_key_values", "past_key_value", "some_future_name"):
        assert find_cache((), {key: cache, "use_cache": True}) is cache
    assert find_cache((torch.zeros(1), cache), {}) is cache  # handed positionally
    assert find_cache((torch.zeros(1),), {"cache": None, "use_cache": False}) is None


@pytest.mark.parametrize("name", ["ablate", "steer", "clamp", "heads", "vector_image", "composed"])
def test_same_tokens_and_logits_with_and_without_kv_cache(tiny, name):
    backbone, ids, mask, types = tiny
    _, base_logits = generate(backbone, ids, mask, cache=True)
    makers = _interventions(backbone, types)
    if name == "composed":
        ctx = compose(makers["ablate"](), makers["steer"](), makers["clamp"](), makers["heads"]())
    else:
        ctx = makers[name]()
    with ctx:
        seq_c, logits_c = generate(backbone, ids, mask, cache=True)
        seq_n, logits_n = generate(backbone, ids, mask, cache=False)
    assert torch.equal(seq_c, seq_n)
    torch.testing.assert_close(logits_c, logits_n, rtol=0, atol=1e-9)
    assert (logits_c - base_logits).abs().max() > 1e-3  # the intervention does something
    assert no_hooks(backbone.model)


def test_text_steering_reaches_generated_tokens_only_when_prompt_has_no_text(tiny):
    backbone, ids, mask, _ = tiny
    types = torch.where(mask.bool(), I, S).to(torch.int8)  # the whole prompt is "image"
    _, base = generate(backbone, ids, mask, cache=True)
    for cache in (True, False):
        with steer_vector(backbone, 1, torch.ones(D), 5.0, "text", types):
            _, steered = generate(backbone, ids, mask, cache=cache)
        assert torch.equal(
            steered[:, 0], base[:, 0]
        )  # the prompt's next-token logits are untouched
        assert (steered[:, 1:] - base[:, 1:]).abs().amax(
            -1
        ).min() > 1e-3  # every generated step is changed


def test_zero_set_ablation_is_exact_noop(tiny):
    backbone, ids, mask, types = tiny
    clean = backbone.model(input_ids=ids, attention_mask=mask).logits
    with ablate_features(
        backbone, {0: torch.zeros(0, D), 2: torch.zeros(3, D)}, "text", types
    ) as ablation:
        assert ablation.layers() == []
        same = backbone.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(clean, same)


def test_contexts_restore_the_model_on_exit_and_on_error(tiny):
    backbone, ids, mask, types = tiny
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    clean = backbone.model(input_ids=ids, attention_mask=mask).logits
    makers = _interventions(backbone, types)
    with pytest.raises(RuntimeError, match="boom"):
        with compose(*(make() for make in makers.values())):
            assert not no_hooks(backbone.model)
            raise RuntimeError("boom")
    assert no_hooks(backbone.model)
    with makers["steer"]():
        pass
    assert no_hooks(backbone.model)
    assert torch.equal(backbone.model(input_ids=ids, attention_mask=mask).logits, clean)
    assert all(torch.equal(v, state[k]) for k, v in backbone.model.state_dict().items())
    # a bad hook input is reported and the hooks still go away
    with pytest.raises(InterventionError, match="batch"):
        with steer_vector(backbone, 0, torch.ones(D), 1.0, "text", types[:1]):
            backbone.model(input_ids=ids, attention_mask=mask)
    assert no_hooks(backbone.model)


def _o_proj_inputs(backbone, ids, mask, layer):
    seen = []
    handle = backbone.o_proj(layer).register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach())
    )
    with torch.no_grad():
        backbone.model(input_ids=ids, attention_mask=mask)
    handle.remove()
    return seen[0]  # [B, T, H * head_dim]


def test_head_means_and_mean_ablation(tiny):
    backbone, ids, mask, types = tiny
    batches = [
        {"input_ids": ids[:1], "attention_mask": mask[:1]},
        {"input_ids": ids[1:], "attention_mask": mask[1:]},
    ]
    means = head_means(backbone, batches, [0, 2], progress=False)
    assert set(means) == {0, 2} and means[2].shape == (H, HD)
    for layer in (0, 2):
        x = _o_proj_inputs(backbone, ids, mask, layer)
        expected = x[mask.bool()].mean(0).reshape(H, HD).float()  # 14 non-padding positions
        torch.testing.assert_close(means[layer], expected, rtol=0, atol=1e-6)
    with mean_ablate_heads(backbone, {2: [1, 3]}, means, "text", types):
        x = _o_proj_inputs(backbone, ids, mask, 2).reshape(2, 8, H, HD)
    clean = _o_proj_inputs(backbone, ids, mask, 2).reshape(2, 8, H, HD)
    text = types == T
    assert torch.equal(
        x[text][:, [1, 3]], means[2][[1, 3]].to(x.dtype).expand(int(text.sum()), 2, HD)
    )
    assert torch.equal(x[~text], clean[~text])
    assert torch.equal(x[text][:, [0, 2]], clean[text][:, [0, 2]])
    with pytest.raises(InterventionError, match="4 heads"):
        mean_ablate_heads(backbone, {2: [4]}, means)


def test_difference_of_means_matches_hidden_states(tiny):
    backbone, ids, mask, types = tiny
    with torch.no_grad():
        hs = backbone.model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[2]
    pos = [{"input_ids": ids[:1], "attention_mask": mask[:1]}]
    neg = [{"input_ids": ids[1:], "attention_mask": mask[1:]}]
    last = difference_of_means(backbone, pos, neg, layer=1, position="last", progress=False)
    torch.testing.assert_close(last, (hs[0, -1] - hs[1, -1]).float(), rtol=0, atol=1e-6)
    # "mean" leaves out padding and, with token types, SPECIAL positions (BOS)
    pos[0]["token_types"], neg[0]["token_types"] = types[:1], types[1:]
    mean = difference_of_means(backbone, pos, neg, layer=1, position="mean", progress=False)
    torch.testing.assert_close(
        mean, (hs[0, 3:].mean(0) - hs[1, 1:].mean(0)).float(), rtol=0, atol=1e-6
    )
    right_padded = [
        {"input_ids": torch.tensor([[1, 5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    ]
    with torch.no_grad():
        hr = backbone.model(
            input_ids=torch.tensor([[1, 5, 6]]), output_hidden_states=True
        ).hidden_states[2]
    got = difference_of_means(backbone, right_padded, neg, layer=1, position="last", progress=False)
    torch.testing.assert_close(got, (hr[0, -1] - hs[1, -1]).float(), rtol=0, atol=1e-6)


def test_decoder_directions_picks_rows():
    w_dec = torch.arange(12.0).reshape(4, 3)
    sae = ReluSAE(w_dec.T, torch.zeros(4), w_dec)
    dirs = decoder_directions({5: sae}, {5: [3, 1]})
    assert torch.equal(dirs[5], torch.tensor([[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]]))
    with pytest.raises(InterventionError, match="d_sae=4"):
        decoder_directions({5: sae}, {5: [4]})


def test_llava_image_positions_kv_cache_equivalence():
    """Through a VLM wrapper: hooks on the language model's layers, image positions from the prompt."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=70,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=H,
        pad_token_id=0,
        eos_token_id=None,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=69,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval().to(torch.float64)
    backbone = Backbone(model, list(model.get_decoder().layers), H, HD, D)
    ids = torch.tensor(
        [[1, 5] + [69] * 4 + [7, 8], [0, 1] + [69] * 4 + [9, 10]]
    )  # 2x2 patches per image
    mask = (ids != 0).long()
    types = torch.where(ids == 69, I, T).to(torch.int8)
    types[(ids == 1) | (mask == 0)] = S
    pixels = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    model.generate(
        **batch, max_new_tokens=1, pad_token_id=0
    )  # transformers adds its own capture hooks once
    assert no_hooks(model)

    def run(cache):
        out = model.generate(
            **batch,
            max_new_tokens=4,
            do_sample=False,
            use_cache=cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        return out.sequences, torch.stack(out.logits, 1)

    _, base = run(True)
    means = head_means(backbone, [batch], [0], progress=False)
    with compose(
        steer_vector(backbone, 0, torch.ones(D), 2.0, "image", types),
        mean_ablate_heads(backbone, {1: [0, 3]}, {1: means[0]}, "image", types),
    ):
        seq_c, logits_c = run(True)
        seq_n, logits_n = run(False)
    assert torch.equal(seq_c, seq_n)
    torch.testing.assert_close(logits_c, logits_n, rtol=0, atol=1e-9)
    assert (logits_c[:, 0] - base[:, 0]).abs().max() > 1e-3
    assert no_hooks(model)


def test_bad_positions_are_reported_when_built(tiny):
    backbone = tiny[0]
    with pytest.raises(InterventionError, match="bool"):
        steer_vector(backbone, 0, torch.ones(D), 1.0, torch.ones(2, 8))
    with pytest.raises(InterventionError, match="positions must be"):
        steer_vector(backbone, 0, torch.ones(D), 1.0, "tokens")
    with pytest.raises(InterventionError, match="token_types"):
        ablate_features(backbone, {0: torch.ones(1, D)})  # default "text" needs token types


class _TupleLayer(torch.nn.Module):
    def forward(self, x):
        return x + 1, "extra"  # older decoder layers return (hidden_states, ...)


class _DictLayer(torch.nn.Module):
    def forward(self, x):
        return {"hidden_states": x}


class _Toy(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layers = torch.nn.ModuleList([layer])

    def forward(self, x):
        return self.layers[0](x)


def test_tuple_layer_outputs_are_edited_and_other_outputs_rejected():
    toy = _Toy(_TupleLayer())
    backbone = Backbone(toy, list(toy.layers), 1, 4, 4)
    x = torch.zeros(1, 2, 4)
    with steer_vector(backbone, 0, torch.tensor([1.0, 0, 0, 0]), 2.0):
        y, extra = toy(x)
    assert extra == "extra"
    assert torch.equal(y, torch.tensor([[[3.0, 1, 1, 1], [3.0, 1, 1, 1]]]))
    odd = _Toy(_DictLayer())
    with pytest.raises(InterventionError, match="tuple"):
        with steer_vector(Backbone(odd, list(odd.layers), 1, 4, 4), 0, torch.ones(4), 1.0):
            odd(x)


def test_clamp_with_the_project_sae_matches_its_decoder():
    """With mmdiff.sae (norm_scale != 1): y' - y == decode(f_clamped) - decode(f), f = encode(y)."""
    from mmdiff.sae.base import SAEConfig, build_sae

    sae = build_sae(SAEConfig(architecture="relu", d_in=D, d_sae=48, norm_scale=3.0))
    sae.init_weights(seed=0)
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
    y = torch.randn(5, D, generator=torch.Generator().manual_seed(2))
    idx, vals = torch.tensor([3, 17]), torch.tensor([4.0, 0.0])
    with torch.no_grad():
        f = sae.encode(y)
        f_clamped = f.clone()
        f_clamped[:, idx] = vals
        expected = sae.decode(f_clamped) - sae.decode(f)
        got = clamp_delta(sae, y, idx, vals)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
