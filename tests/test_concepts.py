"""Concept shift vectors: decompositions recover planted concepts, matching pairs them, shifts are exact."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmdiff.concepts import (
    ConceptError,
    concept_shift,
    decompose,
    dictionary_learning,
    ground_in_tokens,
    kmeans,
    match_concepts,
    sample_vectors,
    semi_nmf,
    shift_vectors,
    shifted_concepts,
    steer_concept_shift,
    top_samples,
    top_tokens,
)
from mmdiff.models.base import Backbone

K, D, PER = 4, 16, 30


def planted(seed: int = 0):
    """x_orig [K*PER, D] in K tight clusters; x_ft = x_orig + a per-cluster shift Delta_c."""
    g = torch.Generator().manual_seed(seed)
    centers = 10.0 * torch.randn(K, D, generator=g, dtype=torch.float64) + 5.0
    truth = torch.arange(K).repeat_interleave(PER)
    x_orig = centers[truth] + 0.3 * torch.randn(K * PER, D, generator=g, dtype=torch.float64)
    shifts = 2.0 * torch.randn(K, D, generator=g, dtype=torch.float64)
    x_ft = x_orig + shifts[truth]
    perm = torch.randperm(K * PER, generator=g)  # samples in no particular order
    return x_orig[perm], x_ft[perm], truth[perm], shifts


def assert_same_partition(labels: torch.Tensor, truth: torch.Tensor) -> dict[int, int]:
    """labels equal truth up to renaming; returns truth cluster -> label."""
    mapping = {}
    for c in range(K):
        found = labels[truth == c].unique()
        assert found.numel() == 1, f"planted cluster {c} split over concepts {found.tolist()}"
        mapping[c] = int(found)
    assert len(set(mapping.values())) == K
    return mapping


@pytest.mark.parametrize("method", ["kmeans", "semi_nmf", "dictionary"])
def test_decompositions_recover_planted_clusters(method):
    x, _, truth, _ = planted()
    result = decompose(x, K, method, seed=0)
    assert result.concepts.shape == (K, D) and result.activations.shape == (K * PER, K)
    assert_same_partition(result.labels, truth)
    again = decompose(x, K, method, seed=0)  # seeded and deterministic
    assert torch.equal(again.concepts, result.concepts) and torch.equal(again.labels, result.labels)


def test_kmeans_centers_are_cluster_means():
    x, _, truth, _ = planted()
    result = kmeans(x, K, seed=1)
    mapping = assert_same_partition(result.labels, truth)
    for c, label in mapping.items():
        torch.testing.assert_close(result.concepts[label], x[truth == c].mean(0))
    assert all(a >= b - 1e-9 for a, b in zip(result.objective, result.objective[1:]))


def test_semi_nmf_objective_decreases_monotonically_and_g_is_nonnegative():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(
        60, 12, generator=g, dtype=torch.float64
    )  # no cluster structure: many iterations
    result = semi_nmf(x, 5, seed=0, max_iter=150, tol=0.0)
    history = torch.tensor(result.objective, dtype=torch.float64)
    assert len(history) == 150
    assert (history[1:] <= history[:-1] * (1 + 1e-12)).all()
    assert history[-1] < history[0]
    assert (result.activations >= 0).all()
    residual = ((x - result.activations @ result.concepts) ** 2).sum()
    torch.testing.assert_close(residual, history[-1])


def test_dictionary_learning_descends_with_unit_ball_atoms():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 10, generator=g, dtype=torch.float64)
    result = dictionary_learning(x, 6, seed=0, max_iter=40, tol=0.0)
    history = torch.tensor(result.objective, dtype=torch.float64)
    assert (history[1:] <= history[:-1] * (1 + 1e-12)).all()
    assert (result.concepts.norm(dim=1) <= 1 + 1e-12).all()
    assert (result.activations >= 0).all()


def test_hungarian_matching_hand_case():
    a = torch.eye(3)
    b = torch.stack(
        [
            torch.tensor([0.0, 0.0, 2.0]),
            torch.tensor([1.0, 0.1, 0.0]),
            torch.tensor([0.0, 1.0, 0.0]),
        ]
    )
    m = match_concepts(a, b)
    assert m.rows.tolist() == [0, 1, 2] and m.cols.tolist() == [1, 2, 0]
    torch.testing.assert_close(
        m.cosine, torch.tensor([1 / 1.01**0.5, 1.0, 1.0], dtype=torch.float64)
    )


def test_shift_vectors_hand_case():
    x_orig = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    x_ft = torch.tensor([[1.0, 0.0], [2.0, 3.0], [5.0, 4.0]])
    deltas, counts = shift_vectors(x_orig, x_ft, torch.tensor([0, 0, 2]), 3)
    assert counts.tolist() == [2, 0, 1]
    torch.testing.assert_close(
        deltas, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        shifted_concepts(torch.ones(3, 2), deltas, 2.0)[0],
        torch.tensor([3.0, 3.0], dtype=torch.float64),
    )
    with pytest.raises(ConceptError, match="same samples"):
        shift_vectors(x_orig, x_ft[:2], torch.tensor([0, 0, 2]), 3)


@pytest.mark.parametrize("method", ["kmeans", "semi_nmf"])
def test_concept_shift_pairs_planted_concepts_and_recovers_shifts(method):
    x_orig, x_ft, truth, shifts = planted(seed=2)
    result = concept_shift(x_orig, x_ft, K, method, seed=0)
    orig_of = assert_same_partition(result.original.labels, truth)
    ft_of = assert_same_partition(result.finetuned.labels, truth)
    pairs = dict(zip(result.matching.rows.tolist(), result.matching.cols.tolist()))
    assert {
        orig_of[c]: ft_of[c] for c in range(K)
    } == pairs  # Hungarian pairs the same planted concept
    for c in range(K):
        torch.testing.assert_close(
            result.deltas[orig_of[c]], shifts[c]
        )  # Delta_c is the planted shift
    assert result.counts.tolist() == [PER] * K
    if method == "kmeans":  # u_c + Delta_c is exactly the fine-tuned cluster mean
        assert (result.recovered_cosine > 1 - 1e-9).all()
    assert (result.recovered_cosine >= result.original_cosine - 1e-12).all()


def test_grounding_top_tokens_and_samples():
    unembedding = torch.eye(5)  # token v is promoted by coordinate v
    concepts = torch.tensor([[0.0, 3.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 5.0]])
    ids, logits = top_tokens(concepts, unembedding, top_k=2)
    assert ids.tolist() == [[1, 2], [4, 0]] and logits.tolist() == [[3.0, 1.0], [5.0, 2.0]]
    x = planted()[0]
    result = kmeans(x, K, seed=0)
    top = top_samples(result, top_k=5)
    assert top.shape == (K, 5)
    for concept in range(K):
        assert (result.labels[top[concept]] == concept).all()
    with pytest.raises(ConceptError, match="at least K samples"):
        kmeans(x[:3], K)


def test_sample_vectors_and_concept_steering_on_tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval().to(torch.float64)
    backbone = Backbone(model, list(model.model.layers), 2, 8, D)
    ids = torch.randint(1, 40, (6, 5))
    vecs = sample_vectors(
        backbone,
        [{"input_ids": ids[:3]}, {"input_ids": ids[3:]}],
        layer=0,
        position="last",
        progress=False,
    )
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(vecs, hs[:, -1].float())
    delta = torch.linspace(-1, 1, D, dtype=torch.float64)
    seen = []
    with steer_concept_shift(backbone, 0, delta, alpha=0.5):
        handle = backbone.layers[0].register_forward_hook(
            lambda m, a, out: seen.append(out)
        )  # runs after the steering
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
    torch.testing.assert_close(seen[0] - hs, (0.5 * delta).expand_as(hs), rtol=0, atol=1e-6)


def test_ground_in_tokens_uses_the_model_unembedding():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    backbone = Backbone(model, list(model.model.layers), 2, 8, D)
    concepts = torch.randn(3, D)
    ids, logits = ground_in_tokens(backbone, concepts, top_k=4)
    expected = concepts @ model.lm_head.weight.detach().T
    assert torch.equal(ids, expected.topk(4, dim=1).indices)
    torch.testing.assert_close(logits, expected.topk(4, dim=1).values)


def test_kmeans_survives_duplicate_points():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    result = kmeans(x, 3, seed=0)
    assert result.objective[-1] == 0.0
    assert (
        result.labels[0] == result.labels[1]
        and result.labels[2] == result.labels[3] != result.labels[0]
    )
