"""Concept shift vectors (Khayatan et al. 2025, docs/method.md#concept-shift-vectors): how fine-tuning moved a model's concepts.

One vector per sample (the hidden state at a token of interest, or the mean over the answer span:
`sample_vectors`) from the original and from the fine-tuned model on the same inputs. The original
model's vectors are decomposed into K concepts (k-means, semi-NMF after Ding et al. 2010, or
dictionary learning); each concept is grounded in text (top tokens through the unembedding) and in
samples (its top samples). Concepts of the two models are paired by the Hungarian algorithm on
cosine similarity. The shift vector of concept c is Delta_c = mean_{i in A_c}(x_i^ft - x_i^orig),
A_c = the samples assigned to c in the original model; u_c + Delta_c should land near the matched
fine-tuned concept, and adding alpha * Delta_c to the original model's residual stream steers it
towards the fine-tuned behaviour (`steer_concept_shift`).

All decompositions are seeded and deterministic, and run in float64 on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from scipy.optimize import linear_sum_assignment

from mmdiff.interventions._hooks import InterventionError, Positions
from mmdiff.interventions.caa import layer_vectors
from mmdiff.interventions.steer import AdditiveSteering, steer_vector
from mmdiff.models.base import Backbone

Method = Literal["kmeans", "semi_nmf", "dictionary"]

sample_vectors = layer_vectors  # [n_samples, d_model] per-sample vectors at one hook point


class ConceptError(InterventionError):
    """A concept decomposition was given data it cannot work with."""


@dataclass
class ConceptDecomposition:
    """x [N, D] ~ activations [N, K] @ concepts [K, D], with one concept label per sample."""

    method: str
    concepts: torch.Tensor  # [K, D] the concept vectors u_k
    activations: torch.Tensor  # [N, K] how much each sample expresses each concept (higher = more)
    labels: torch.Tensor  # [N] long, the concept each sample is assigned to (A_c = labels == c)
    objective: list[float] = field(default_factory=list)  # per iteration, where the method has one


def _check_data(x: torch.Tensor, k: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ConceptError(
            f"expected sample vectors [n_samples, d_model]; got {getattr(x, 'shape', type(x))}"
        )
    if not 1 <= k <= x.shape[0]:
        raise ConceptError(
            f"K={k} concepts need at least K samples and K >= 1; got {x.shape[0]} samples"
        )
    if not torch.isfinite(x).all():
        raise ConceptError("the sample vectors contain NaN or infinite values")
    return x.detach().to("cpu", torch.float64)


# -- k-means ------------------------------------------------------------------------------------
def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: [K, D] initial centers."""
    n = x.shape[0]
    centers = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            i = torch.multinomial(d2 / total, 1, generator=gen)
        else:  # all points coincide with chosen centers
            i = torch.randint(n, (1,), generator=gen)
        centers.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    return torch.stack(centers)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 4,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> ConceptDecomposition:
    """K-means (k-means++ seeding, Lloyd iterations, best of n_init runs by inertia).

    activations are minus the squared distance to each center, so the top samples of a concept are
    the ones nearest to it; objective holds the inertia of the best run per iteration.
    """
    x = _check_data(x, k)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor, list[float]] | None = None
    for _ in range(max(1, n_init)):
        centers = _kmeans_pp(x, k, gen)
        history: list[float] = []
        for _ in range(max_iter):
            d2 = torch.cdist(x, centers) ** 2  # [N, K]
            labels = d2.argmin(1)
            history.append(float(d2.gather(1, labels[:, None]).sum()))
            new = centers.clone()
            farthest = d2.gather(1, labels[:, None]).squeeze(1).argsort(descending=True).tolist()
            for c in range(k):
                members = labels == c
                if members.any():
                    new[c] = x[members].mean(0)
                else:  # an empty cluster takes the point farthest from its own center
                    new[c] = x[farthest.pop(0)]
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if shift <= tol:
                break
        inertia = float((torch.cdist(x, centers) ** 2).min(1).values.sum())
        if best is None or inertia < best[0]:
            best = (inertia, centers, history)
    assert best is not None
    _, centers, history = best
    d2 = torch.cdist(x, centers) ** 2
    return ConceptDecomposition("kmeans", centers, -d2, d2.argmin(1), history)


# -- semi-NMF -----------------------------------------------------------------------------------
def semi_nmf_objective(x: torch.Tensor, concepts: torch.Tensor, activations: torch.Tensor) -> float:
    """||x - activations @ concepts||_F^2."""
    return float(((x - activations @ concepts) ** 2).sum())


def semi_nmf(
    x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 200, tol: float = 1e-9
) -> ConceptDecomposition:
    """Semi-NMF (Ding, Li & Jordan 2010): x [N, D] ~ G [N, K] @ U [K, D] with G >= 0, U of any sign.

    In Ding's notation X = x^T ~ F G^T with F = U^T. Alternates the exact update
    U = (G^T G)^+ G^T x with the multiplicative update
    G <- G * sqrt(([x U^T]^+ + G [U U^T]^-) / ([x U^T]^- + G [U U^T]^+)),
    each of which does not increase the objective. Initialised from k-means as in the paper
    (cluster indicators + 0.2).
    """
    x = _check_data(x, k)
    labels = kmeans(x, k, seed=seed, n_init=1).labels
    g = torch.full((x.shape[0], k), 0.2, dtype=torch.float64)
    g[torch.arange(x.shape[0]), labels] += 1.0
    eps = 1e-300  # only guards 0/0; any positive denominator is left as it is
    history: list[float] = []
    u = torch.zeros(k, x.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        u = torch.linalg.pinv(g.T @ g) @ g.T @ x  # [K, D]
        a, b = x @ u.T, u @ u.T  # [N, K], [K, K]
        a_pos, a_neg = (a.abs() + a) / 2, (a.abs() - a) / 2
        b_pos, b_neg = (b.abs() + b) / 2, (b.abs() - b) / 2
        g = g * torch.sqrt((a_pos + g @ b_neg) / (a_neg + g @ b_pos).clamp_min(eps))
        history.append(semi_nmf_objective(x, u, g))
        if len(history) > 1 and history[-2] - history[-1] <= tol * max(history[-2], 1e-300):
            break
    return ConceptDecomposition("semi_nmf", u, g, g.argmax(1), history)


# -- dictionary learning ------------------------------------------------------------------------
def dictionary_objective(
    x: torch.Tensor, atoms: torch.Tensor, codes: torch.Tensor, alpha: float
) -> float:
    """0.5 ||x - codes @ atoms||_F^2 + alpha ||codes||_1."""
    return float(0.5 * ((x - codes @ atoms) ** 2).sum() + alpha * codes.abs().sum())


def dictionary_learning(
    x: torch.Tensor,
    k: int,
    *,
    alpha: float | None = None,
    positive_codes: bool = True,
    seed: int = 0,
    max_iter: int = 100,
    code_steps: int = 20,
    tol: float = 1e-9,
) -> ConceptDecomposition:
    """Sparse dictionary learning: x [N, D] ~ codes [N, K] @ atoms [K, D], ||atom|| <= 1, codes sparse.

    Minimises 0.5 ||x - A W||^2 + alpha ||A||_1 by alternating ISTA steps on the codes and block
    coordinate descent on the atoms (Mairal et al. 2009), both descent steps. alpha defaults to 0.1
    times the mean sample norm, which makes it scale-free. Atoms start from the k-means centers.
    """
    x = _check_data(x, k)
    if alpha is None:
        alpha = 0.1 * float(x.norm(dim=1).mean())
    atoms = kmeans(x, k, seed=seed, n_init=1).concepts
    atoms = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1.0)
    codes = torch.zeros(x.shape[0], k, dtype=torch.float64)
    history: list[float] = []
    for _ in range(max_iter):
        # codes: ISTA with step 1 / Lipschitz constant of the smooth part
        gram = atoms @ atoms.T  # [K, K]
        lipschitz = float(torch.linalg.eigvalsh(gram).max().clamp_min(1e-12))
        xw = x @ atoms.T  # [N, K]
        for _ in range(code_steps):
            step = codes - (codes @ gram - xw) / lipschitz
            codes = torch.sign(step) * (step.abs() - alpha / lipschitz).clamp_min(0)
            if positive_codes:
                codes = codes.clamp_min(0)
        # atoms: one exact block step per atom, then projection onto the unit ball
        aa, ax = codes.T @ codes, codes.T @ x  # [K, K], [K, D]
        for j in range(k):
            if aa[j, j] <= 0:
                continue  # an unused atom stays where it is
            atoms[j] = atoms[j] + (ax[j] - aa[j] @ atoms) / aa[j, j]
            atoms[j] = atoms[j] / atoms[j].norm().clamp_min(1.0)
        history.append(dictionary_objective(x, atoms, codes, alpha))
        if len(history) > 1 and history[-2] - history[-1] <= tol * max(history[-2], 1e-300):
            break
    labels = (codes if positive_codes else codes.abs()).argmax(1)
    return ConceptDecomposition("dictionary", atoms, codes, labels, history)


def decompose(
    x: torch.Tensor, k: int = 20, method: Method = "kmeans", *, seed: int = 0, **options: Any
) -> ConceptDecomposition:
    """K concepts of the sample vectors x [N, D] by `method`: "kmeans", "semi_nmf" or "dictionary".

    options go to the method (e.g. max_iter, n_init for k-means, alpha for dictionary learning).
    """
    if method == "kmeans":
        return kmeans(x, k, seed=seed, **options)
    if method == "semi_nmf":
        return semi_nmf(x, k, seed=seed, **options)
    if method == "dictionary":
        return dictionary_learning(x, k, seed=seed, **options)
    raise ConceptError(f'method must be "kmeans", "semi_nmf" or "dictionary"; got {method!r}')


# -- grounding ----------------------------------------------------------------------------------
def top_tokens(
    concepts: torch.Tensor,
    unembedding: torch.Tensor,
    top_k: int = 10,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text grounding: ([K, top_k] token ids, [K, top_k] logits) of concepts [K, D] through W_U [V, D].

    Pass the model's final norm as `norm` to read concepts as the model's last layer would (logit lens).
    """
    if unembedding.shape[1] != concepts.shape[1]:
        raise ConceptError(
            f"the unembedding is [{unembedding.shape[0]}, {unembedding.shape[1]}], the concepts have D={concepts.shape[1]}"
        )
    u = concepts.to(unembedding.device, unembedding.dtype)
    with torch.no_grad():
        if norm is not None:
            u = norm(u)
        logits = u @ unembedding.T  # [K, V]
    values, ids = logits.topk(min(top_k, logits.shape[1]), dim=1)
    return ids.cpu(), values.float().cpu()


def unembedding_of(backbone: Backbone) -> torch.Tensor:
    """[vocab, d_model] the model's unembedding W_U (Backbone.unembed, else its output embeddings)."""
    head = getattr(backbone, "unembed", None)
    if head is None and hasattr(backbone.model, "get_output_embeddings"):
        head = backbone.model.get_output_embeddings()
    if head is None:
        raise ConceptError(
            f"{type(backbone.model).__name__} has no output embeddings; pass the unembedding to top_tokens"
        )
    return head.weight.detach()


def ground_in_tokens(
    backbone: Backbone, concepts: torch.Tensor, top_k: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_tokens` through the backbone's final norm (where it has one) and unembedding."""
    return top_tokens(
        concepts, unembedding_of(backbone), top_k, getattr(backbone, "final_norm", None)
    )


def top_samples(decomposition: ConceptDecomposition, top_k: int = 10) -> torch.Tensor:
    """Sample grounding: [K, top_k] indices of the samples that express each concept most."""
    acts = decomposition.activations  # [N, K]
    return acts.topk(min(top_k, acts.shape[0]), dim=0).indices.T.contiguous()


# -- matching and shift vectors -----------------------------------------------------------------
@dataclass
class ConceptMatching:
    """A one-to-one pairing of concepts a[i] <-> b[j] that maximises the summed cosine similarity."""

    rows: torch.Tensor  # [n_pairs] concept indices in a
    cols: torch.Tensor  # [n_pairs] matched concept indices in b
    cosine: torch.Tensor  # [n_pairs] cosine similarity of each pair
    similarity: torch.Tensor  # [K_a, K_b] all cosine similarities


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[K_a, K_b] cosine similarity of the rows of a [K_a, D] and b [K_b, D] (0 for a zero row)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    an = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    bn = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return an @ bn.T


def match_concepts(a: torch.Tensor, b: torch.Tensor) -> ConceptMatching:
    """Hungarian matching of concepts a [K_a, D] (original) and b [K_b, D] (fine-tuned) on cosine."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ConceptError(
            f"expected two concept sets [K, D] with the same D; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    sim = cosine_matrix(a, b).cpu()
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    rows_t, cols_t = (
        torch.as_tensor(rows, dtype=torch.long),
        torch.as_tensor(cols, dtype=torch.long),
    )
    return ConceptMatching(rows_t, cols_t, sim[rows_t, cols_t], sim)


def shift_vectors(
    x_orig: torch.Tensor, x_ft: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([K, D] Delta_c = mean_{i in A_c}(x_ft_i - x_orig_i), [K] |A_c|); A_c = {i : labels_i = c}.

    x_orig and x_ft are the two models' vectors of the same samples, row for row. A concept with no
    sample gets a zero shift and count 0.
    """
    if x_orig.shape != x_ft.shape or x_orig.dim() != 2:
        raise ConceptError(
            f"x_orig and x_ft must be the same samples' vectors [N, D]; got {tuple(x_orig.shape)} and {tuple(x_ft.shape)}"
        )
    if labels.shape != (x_orig.shape[0],):
        raise ConceptError(f"labels must be [N] = [{x_orig.shape[0]}]; got {tuple(labels.shape)}")
    diff = (x_ft.to(torch.float64) - x_orig.to(torch.float64)).cpu()  # [N, D]
    labels = labels.cpu().long()
    counts = torch.bincount(labels, minlength=k)[:k]
    sums = torch.zeros(k, diff.shape[1], dtype=torch.float64).index_add_(0, labels, diff)
    return sums / counts.clamp_min(1)[:, None], counts


def shifted_concepts(
    concepts: torch.Tensor, deltas: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """[K, D] u_c + alpha * Delta_c: the original concepts moved by their shift vectors."""
    return concepts.to(torch.float64) + alpha * deltas.to(torch.float64)


@dataclass
class ConceptShift:
    """The result of `concept_shift`: both decompositions, their matching and the shift vectors."""

    original: ConceptDecomposition
    finetuned: ConceptDecomposition
    matching: ConceptMatching  # original concept rows[i] <-> fine-tuned concept cols[i]
    deltas: torch.Tensor  # [K, D] Delta_c per original concept
    counts: torch.Tensor  # [K] |A_c|
    recovered_cosine: torch.Tensor  # [n_pairs] cos(u_c + Delta_c, matched fine-tuned concept)
    original_cosine: torch.Tensor  # [n_pairs] cos(u_c, matched fine-tuned concept), for comparison


def concept_shift(
    x_orig: torch.Tensor,
    x_ft: torch.Tensor,
    k: int = 20,
    method: Method = "kmeans",
    *,
    seed: int = 0,
    **options: Any,
) -> ConceptShift:
    """Concepts of both models on the same samples, their Hungarian matching and the shift vectors.

    x_orig, x_ft: [N, D] the original and the fine-tuned model's vectors of the same N samples
    (`sample_vectors` on each model with the same batches). Samples are assigned to concepts by
    the original model's decomposition (A_c), as in the paper.
    """
    original = decompose(x_orig, k, method, seed=seed, **options)
    finetuned = decompose(x_ft, k, method, seed=seed, **options)
    matching = match_concepts(original.concepts, finetuned.concepts)
    deltas, counts = shift_vectors(x_orig, x_ft, original.labels, k)
    moved = shifted_concepts(original.concepts, deltas)
    target = finetuned.concepts[matching.cols]
    recovered = torch.nn.functional.cosine_similarity(moved[matching.rows], target, dim=1)
    return ConceptShift(original, finetuned, matching, deltas, counts, recovered, matching.cosine)


def steer_concept_shift(
    backbone: Backbone,
    layer: int,
    delta: torch.Tensor,
    alpha: float = 1.0,
    positions: Positions = "all",
    token_types: torch.Tensor | None = None,
) -> AdditiveSteering:
    """A context manager that steers the original model along a concept shift: y <- y + alpha * Delta_c.

    A sample of concept c sits near u_c; adding alpha * Delta_c at hook point `layer` moves it to
    u_c + alpha * Delta_c, where the fine-tuned model puts it (alpha = 1).
    """
    return steer_vector(backbone, layer, delta, alpha, positions, token_types)
