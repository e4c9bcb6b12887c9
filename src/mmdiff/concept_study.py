"""The concept-shift study (Khayatan et al. 2025, docs/method.md#concept-shift-vectors) on a model pair: what a researcher reads.

The "original" model is the base LM run on (caption, question); the "fine-tuned" model is the VLM
run on (image, question), on the same records. Each record gives one vector per model: the residual
stream at hook point `layer` at the last prompt position (the position whose next-token
distribution is the answer; with left padding, position -1). `concepts.concept_shift` decomposes
both, pairs the concepts (Hungarian on cosine) and gives the shift vectors Delta_c.

Steering (the judgment call, documented): the base LM on record i is steered by alpha * Delta_c(i),
c(i) = the concept the ORIGINAL model's decomposition assigns i to (A_c), added at hook point
`layer` at the last prompt position only. Why this choice:
- Delta_c(i), not the sample's own shift x_ft_i - x_orig_i: the own shift needs the fine-tuned
  model's vector of that very sample, so it would "recover" the VLM by copying it (at alpha 1 the
  steered residual would equal the VLM's exactly). The concept's mean shift is what the paper
  transfers, and c(i) is computable from the original model alone.
- The last position only: Delta_c was measured there; earlier positions hold other tokens'
  representations, which a shift measured at the answer position says nothing about.
A control steers every record by the mean shift over the fitted records (one global vector, `shift` =
"mean"), so the gain of concept-specific shifts over a single difference of means is visible.
In-sample and held-out: by default the shifts are estimated on the same records they are evaluated
on (split "fit"), as in the paper's recovery experiment; that measures how well K mean shifts
summarise the N per-sample shifts (K = N recovers the VLM exactly at the last layer). With
`holdout` > 0 a seeded share of the records is kept out of the decomposition; each held-out record
is assigned to a concept from its original-model vector alone (`assign_concepts`) and steered by
that concept's shift (split "heldout"): generalisation to new inputs.

Closeness to the fine-tuned model: per record, KL(VLM || steered base) of the next-token
distributions at the last prompt position and whether their top-1 tokens agree; means over records
with 95% bootstrap intervals. The two vocabularies are compared over their shared ids (the base
LM's vocabulary is usually a prefix of the VLM's, which adds image and padding tokens); the
tokenizers must agree on those ids.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmdiff.atomic import save_safetensors, write_json, write_parquet
from mmdiff.concepts import (
    ConceptDecomposition,
    ConceptShift,
    concept_shift,
    ground_in_tokens,
    layer_vectors,
    steer_concept_shift,
    top_samples,
)
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError, DataError
from mmdiff.bootstrap import bootstrap_mean
from mmdiff.models.base import Backbone, VLMAdapter
from mmdiff.models.forward import (
    RecordBatches,
    decode_token,
    next_token_logits,
    shared_vocab_size,
    side_tokenizer,
)
from mmdiff.progress import iterate
from mmdiff.schema import Artifact, Column

METHODS = ("kmeans", "semi_nmf", "dictionary")
METHOD_ALIASES = {"dictionary_learning": "dictionary"}

# fmt: off
_SPLIT = Column("split", str, "'fit': the records the concepts were fitted on (in-sample); 'heldout'")
_SHIFT = Column("shift", str, "what steered", kinds={
    "concept": "alpha * Delta_c(i), c(i) the record's concept in the original model",
    "mean": "the control: alpha * the mean shift over the fitted records, the same for every record",
})
_MODEL = {"orig": "the base LM's concepts u_c", "ft": "the VLM's concepts"}
CONCEPT_MATCHING = Artifact("concepts/matching.parquet", "matching_table", columns=(
    Column("orig", int, "original concept"),
    Column("ft", int, "its Hungarian match among the fine-tuned concepts"),
    Column("cosine", float, "cos(u_c, v_c')"),
    Column("shifted_cosine", float, "cos(u_c + Delta_c, v_c')"),
    Column("count", int, "|A_c|: fitted records assigned to the original concept"),
    Column("shift_norm", float, "||Delta_c||"),
))
CONCEPT_GROUNDING = Artifact("concepts/grounding.parquet", "grounding_table", columns=(
    Column("model", str, "whose concepts", kinds={
        **_MODEL, "shifted": "u_c + Delta_c, read through the VLM's unembedding"}),
    Column("concept", int), Column("rank", int), Column("token_id", int), Column("token", str),
    Column("score", float, "logit through the model's final norm and unembedding"),
))
CONCEPT_SAMPLES = Artifact("concepts/samples.parquet", "samples_table", columns=(
    Column("model", str, "whose concepts", kinds=_MODEL),
    Column("concept", int), Column("rank", int), Column("record_id", str), Column("question", str),
    Column("caption", str), Column("activation", float),
    Column("assigned", bool, "the record belongs to the concept (its label), not merely expresses it"),
))
CONCEPT_STEERING = Artifact("concepts/steering.parquet", "steering_table", columns=(
    _SPLIT, _SHIFT, Column("alpha", float),
    Column("kl", float, "mean over records of KL(VLM || steered base LM), next token"),
    Column("kl_ci_lo", float, "95% bootstrap interval"), Column("kl_ci_hi", float),
    Column("top1_agreement", float, "share of records whose top-1 next tokens agree"),
    Column("top1_ci_lo", float), Column("top1_ci_hi", float), Column("n", int, "records"),
))
CONCEPT_STEERING_RECORDS = Artifact("concepts/steering_records.parquet", "concept_steering", columns=(
    _SPLIT, _SHIFT, Column("alpha", float), Column("record_id", str), Column("concept", int),
    Column("kl", float), Column("top1_match", bool),
))
CONCEPT_VECTORS, CONCEPT_SUMMARY = "concepts/vectors.safetensors", "concepts/summary.json"
SHIFT_KINDS = tuple(_SHIFT.kinds or {})  # Delta_c(i) per record; the control: one mean shift for all
# fmt: on


# ----------------------------------------------------------------------------- inputs
def collect_sample_vectors(
    adapter: VLMAdapter,
    records: Sequence[Record],
    layer: int,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_orig [N, D], x_ft [N, D]) float32: the base LM on (caption, question) and the VLM on
    (image, question), residual stream after decoder layer `layer`, last prompt position."""
    x_orig = layer_vectors(
        adapter.backbone("base"),
        RecordBatches(adapter, records, "base", batch_size),
        layer,
        "last",
        progress=progress,
    )
    x_ft = layer_vectors(
        adapter.backbone("vlm"),
        RecordBatches(adapter, records, "vlm", batch_size),
        layer,
        "last",
        progress=progress,
    )
    return x_orig, x_ft


# ----------------------------------------------------------------------------- grounding
def grounding_table(adapter: VLMAdapter, shift: ConceptShift, top_k: int = 10) -> pd.DataFrame:
    """Text grounding: each concept's top tokens through its model's final norm and unembedding.

    model "orig": the base LM's concepts u_c; "ft": the VLM's concepts; "shifted": u_c + Delta_c,
    read through the VLM's unembedding (where the shift moves the original concept).
    """
    sets = [
        ("orig", "base", shift.original.concepts),
        ("ft", "vlm", shift.finetuned.concepts),
        ("shifted", "vlm", shift.original.concepts.to(torch.float64) + shift.deltas),
    ]
    rows: list[dict[str, Any]] = []
    for model, side, concepts in sets:
        backbone = adapter.backbone(side)
        ids, scores = ground_in_tokens(backbone, concepts, top_k)  # [K, top_k] each
        tokenizer = side_tokenizer(adapter, side)
        for c in range(ids.shape[0]):
            for r in range(ids.shape[1]):
                token_id = int(ids[c, r])
                rows.append(
                    {
                        "model": model,
                        "concept": c,
                        "rank": r,
                        "token_id": token_id,
                        "token": decode_token(tokenizer, token_id),
                        "score": float(scores[c, r]),
                    }
                )
    return pd.DataFrame(rows, columns=list(CONCEPT_GROUNDING.names))


def samples_table(records: Sequence[Record], shift: ConceptShift, top_k: int = 10) -> pd.DataFrame:
    """Sample grounding: each concept's top records (by its activation), with question and caption.

    `assigned` says whether the record belongs to the concept (its label), as opposed to merely
    expressing it strongly.
    """
    rows: list[dict[str, Any]] = []
    decompositions: list[tuple[str, ConceptDecomposition]] = [
        ("orig", shift.original),
        ("ft", shift.finetuned),
    ]
    for model, dec in decompositions:
        top = top_samples(dec, top_k)  # [K, top_k] sample indices
        for c in range(top.shape[0]):
            for r in range(top.shape[1]):
                i = int(top[c, r])
                rec = records[i]
                rows.append(
                    {
                        "model": model,
                        "concept": c,
                        "rank": r,
                        "record_id": rec.id,
                        "question": rec.question,
                        "caption": rec.caption or "",
                        "activation": float(dec.activations[i, c]),
                        "assigned": bool(int(dec.labels[i]) == c),
                    }
                )
    return pd.DataFrame(rows, columns=list(CONCEPT_SAMPLES.names))


def matching_table(shift: ConceptShift) -> pd.DataFrame:
    """Concept pairs: original concept, matched fine-tuned concept, cos(u_c, v_c'),
    cos(u_c + Delta_c, v_c'), |A_c| and ||Delta_c||, sorted by original concept."""
    m = shift.matching
    df = pd.DataFrame(
        {
            "orig": m.rows.numpy().astype(np.int64),
            "ft": m.cols.numpy().astype(np.int64),
            "cosine": shift.original_cosine.numpy().astype(np.float64),
            "shifted_cosine": shift.recovered_cosine.numpy().astype(np.float64),
            "count": shift.counts[m.rows].numpy().astype(np.int64),
            "shift_norm": shift.deltas[m.rows].norm(dim=1).numpy().astype(np.float64),
        },
        columns=list(CONCEPT_MATCHING.names),
    )
    return df.sort_values("orig", kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- steering
def kl_and_top1(
    vlm_logits: torch.Tensor, base_logits: torch.Tensor, vocab: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: KL(VLM || base) of the next-token distributions over the first `vocab` ids, and
    whether the two top-1 tokens agree. Logits [batch, >= vocab] each."""
    log_p = torch.log_softmax(vlm_logits[:, :vocab].to(torch.float64), dim=-1)  # [batch, vocab]
    log_q = torch.log_softmax(base_logits[:, :vocab].to(torch.float64), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)  # [batch]; >= 0 up to rounding
    top1 = log_p.argmax(-1) == log_q.argmax(-1)
    return kl.numpy(), top1.numpy()


def steered_next_token_logits(
    backbone: Backbone,
    inputs: dict[str, torch.Tensor],
    layer: int,
    deltas: torch.Tensor,
    concepts: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """[batch, vocab] next-token logits with row i steered by alpha * deltas[concepts[i]] at hook
    point `layer`, at the last position only. deltas [K, D], concepts [batch] long."""
    seq_len = int(inputs["input_ids"].shape[1])
    if concepts.shape != (int(inputs["input_ids"].shape[0]),):
        raise ConfigError(
            f"concepts must give one concept per batch row: [{inputs['input_ids'].shape[0]}]; got {tuple(concepts.shape)}"
        )
    with contextlib.ExitStack() as stack:
        for c in sorted(set(concepts.tolist())):
            positions = torch.zeros(len(concepts), seq_len, dtype=torch.bool)  # [batch, seq]
            positions[concepts == c, -1] = True
            stack.enter_context(
                steer_concept_shift(backbone, layer, deltas[c], alpha, positions=positions)
            )
        return next_token_logits(backbone, inputs)


def concept_steering(
    adapter: VLMAdapter,
    records: Sequence[Record],
    layer: int,
    shift: ConceptShift,
    alphas: Sequence[float],
    *,
    concepts: torch.Tensor | None = None,
    split: str = "fit",
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Per record, shift kind and alpha: KL(VLM || steered base) and top-1 agreement.

    shift "concept": row i steered by alpha * Delta_c(i), c(i) = concepts[i], by default the
    original model's labels of the records `shift` was fitted on (A_c; give `assign_concepts` of
    other records' vectors to evaluate those); "mean": every row by alpha * the mean shift over the
    fitted records (the control). alpha 0 runs the same hooks with a zero vector, i.e. the
    unsteered base LM. `split` labels the rows ("fit", "heldout").
    """
    base, vlm = adapter.backbone("base"), adapter.backbone("vlm")
    labels = shift.original.labels if concepts is None else concepts.long().cpu()  # [N]
    if labels.shape != (len(records),):
        raise ConfigError(
            f"concepts must give one concept per record: [{len(records)}]; got {tuple(labels.shape)}"
        )
    counts = shift.counts.to(torch.float64)
    mean_shift = (shift.deltas * counts[:, None]).sum(0) / counts.sum()  # [D] mean_i(x_ft - x_orig)
    kinds = {"concept": shift.deltas, "mean": mean_shift[None, :]}
    base_batches = RecordBatches(adapter, records, "base", batch_size)
    vlm_batches = RecordBatches(adapter, records, "vlm", batch_size)
    rows: list[dict[str, Any]] = []
    vocab: int | None = None
    start = 0
    chunks = list(base_batches.chunks())
    for chunk in iterate(chunks, f"concept steering at layer {layer}", progress):
        n = len(chunk)
        vlm_logits = next_token_logits(vlm, vlm_batches.inputs(chunk))  # [n, V_vlm]
        base_inputs = base_batches.inputs(chunk)
        batch_labels = labels[start : start + n]
        if vocab is None:
            v_base = int(adapter.backbone("base").unembedding_matrix().shape[0])
            vocab = shared_vocab_size(adapter, int(vlm_logits.shape[1]), v_base)
        for a_index, alpha in enumerate(alphas):
            results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for kind in SHIFT_KINDS:
                if kind == "mean" and alpha == 0:  # adds nothing: the same run as "concept"
                    results[kind] = results["concept"]
                    continue
                which = batch_labels if kind == "concept" else torch.zeros_like(batch_labels)
                base_logits = steered_next_token_logits(
                    base, base_inputs, layer, kinds[kind], which, float(alpha)
                )  # [n, V_base]
                results[kind] = kl_and_top1(vlm_logits, base_logits, vocab)
            for kind, (kl, top1) in results.items():
                for j in range(n):
                    rows.append(
                        {
                            "_order": (SHIFT_KINDS.index(kind), a_index, start + j),
                            "split": split,
                            "shift": kind,
                            "alpha": float(alpha),
                            "record_id": records[start + j].id,
                            "concept": int(batch_labels[j]),
                            "kl": float(kl[j]),
                            "top1_match": bool(top1[j]),
                        }
                    )
        start += n
    rows.sort(key=lambda row: row["_order"])  # shift kind, then alpha, then record order
    return pd.DataFrame(rows, columns=list(CONCEPT_STEERING_RECORDS.names))


def steering_table(per_record: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Per split, shift kind and alpha: mean KL and top-1 agreement over records, with 95%
    bootstrap CIs."""
    rows = []
    for (split, kind, alpha), group in per_record.groupby(["split", "shift", "alpha"], sort=False):
        kl = bootstrap_mean(group["kl"].to_numpy(), seed=seed)
        top1 = bootstrap_mean(group["top1_match"].to_numpy(dtype=np.float64), seed=seed)
        rows.append(
            {
                "split": split,
                "shift": kind,
                "alpha": float(alpha),
                "kl": kl.mean,
                "kl_ci_lo": kl.lo,
                "kl_ci_hi": kl.hi,
                "top1_agreement": top1.mean,
                "top1_ci_lo": top1.lo,
                "top1_ci_hi": top1.hi,
                "n": len(group),
            }
        )
    return pd.DataFrame(rows, columns=list(CONCEPT_STEERING.names))


# ----------------------------------------------------------------------------- held-out records
def assign_concepts(
    decomposition: ConceptDecomposition,
    x: torch.Tensor,
    *,
    l1: float = 0.0,
    steps: int = 200,
) -> torch.Tensor:
    """[n] long: the concept each new vector x [n, D] belongs to under a fitted decomposition.

    The same rule the decomposition labels its own samples by, with its concepts held fixed:
    k-means the nearest center; semi-NMF the largest coefficient of the non-negative least-squares
    fit x ~ g U (g >= 0); dictionary learning the largest of the non-negative sparse codes
    (projected ISTA on 0.5 ||x - a W||^2 + l1 ||a||_1, `l1` the penalty the atoms were learned with).
    """
    u = decomposition.concepts.to("cpu", torch.float64)  # [K, D]
    x = x.detach().to("cpu", torch.float64)  # [n, D]
    if x.dim() != 2 or x.shape[1] != u.shape[1]:
        raise ConfigError(
            f"expected vectors [n, {u.shape[1]}] to assign to concepts; got {tuple(x.shape)}"
        )
    if decomposition.method == "kmeans":
        return torch.cdist(x, u).argmin(1)
    if decomposition.method == "semi_nmf":
        from scipy.optimize import nnls

        basis = u.T.numpy()  # [D, K]
        codes = np.stack([nnls(basis, row)[0] for row in x.numpy()])  # [n, K]
        return torch.as_tensor(codes).argmax(1)
    if decomposition.method == "dictionary":
        gram = u @ u.T  # [K, K]
        lipschitz = float(torch.linalg.eigvalsh(gram).max().clamp_min(1e-12))
        xw = x @ u.T  # [n, K]
        codes = torch.zeros(x.shape[0], u.shape[0], dtype=torch.float64)
        for _ in range(steps):
            codes = (codes - (codes @ gram - xw + l1) / lipschitz).clamp_min(0)
        return codes.argmax(1)
    raise ConfigError(f"cannot assign vectors to concepts of method {decomposition.method!r}")


def holdout_split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit indices, held-out indices), each sorted: round(holdout * n) records drawn by `seed`."""
    n_heldout = round(holdout * n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_heldout:]), sorted(order[:n_heldout])


# ----------------------------------------------------------------------------- the study
def _check_arguments(
    adapter: VLMAdapter,
    records: Sequence[Record],
    layer: int,
    k: int,
    method: str,
    alphas: Sequence[float],
    batch_size: int,
    holdout: float,
) -> str:
    method = METHOD_ALIASES.get(method, method)
    if method not in METHODS:
        raise ConfigError(
            f"concept decomposition method must be one of {list(METHODS)} (or 'dictionary_learning'); got {method!r}"
        )
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"layer must be an int decoder-layer index; got {layer!r}")
    for side in ("base", "vlm"):
        adapter.backbone(side).check_layers([layer])  # ModelError naming the valid range
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k (the number of concepts) must be a positive int; got {k!r}")
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(
            f"holdout is the share of records kept out of the fit, in [0, 1); got {holdout!r}"
        )
    n_heldout = round(holdout * len(records))
    if holdout > 0 and n_heldout == 0:
        raise DataError(
            f"holdout={holdout} of {len(records)} records holds out none: pass more records or a larger holdout"
        )
    n_fit = len(records) - n_heldout
    if n_fit < k:
        held = f" after holding out {n_heldout}" if n_heldout else ""
        raise DataError(
            f"K={k} concepts need at least {k} records (one vector per record); got {n_fit}{held}: "
            "pass more records or a smaller k"
        )
    if not alphas or not all(math.isfinite(float(a)) for a in alphas):
        raise ConfigError(
            f"alphas must be a non-empty list of finite numbers; got {list(alphas)!r}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(
            f"record ids must be unique (the tables are keyed by them); {dup!r} repeats"
        )
    for r in records:
        r.require_caption()  # the base LM reads the caption in place of the image
        if r.image is None:
            raise DataError(
                f"record {r.id!r} ({r.source or 'unknown source'}) has no image, and the fine-tuned "
                "side runs the VLM on (image, question): drop text-only records"
            )
    return method


def run_concept_shift(
    adapter: VLMAdapter,
    records: Sequence[Record],
    layer: int,
    out_dir: str | Path,
    *,
    k: int = 20,
    method: str = "kmeans",
    alphas: Sequence[float] = (0.0, 0.5, 1.0),
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    top_k: int = 10,
    holdout: float = 0.0,
) -> dict[str, Path]:
    """Concept shift of base LM (caption) -> VLM (image) at `layer`; writes out_dir/concepts/.

    Returns {name: path} of matching.parquet, grounding.parquet, samples.parquet,
    steering.parquet, steering_records.parquet, vectors.safetensors and summary.json.
    top_k: tokens and samples kept per concept. holdout: the share of records (drawn by `seed`)
    kept out of the decomposition and the shift vectors; steering is then also evaluated on them
    (split "heldout"), each assigned to a concept from the original model's vector alone.
    """
    records = list(records)
    method = _check_arguments(adapter, records, layer, k, method, alphas, batch_size, holdout)
    x_orig, x_ft = collect_sample_vectors(
        adapter, records, layer, batch_size=batch_size, progress=progress
    )  # [N, D] each
    fit, heldout = holdout_split(len(records), holdout, seed)
    fit_records = [records[i] for i in fit]
    shift = concept_shift(x_orig[fit], x_ft[fit], k, method, seed=seed)  # type: ignore[arg-type]
    matching = matching_table(shift)
    grounding = grounding_table(adapter, shift, top_k)
    samples = samples_table(fit_records, shift, top_k)
    per_record = [
        concept_steering(
            adapter, fit_records, layer, shift, alphas, batch_size=batch_size, progress=progress
        )
    ]
    heldout_labels = torch.zeros(0, dtype=torch.long)
    if heldout:
        l1 = 0.1 * float(x_orig[fit].to(torch.float64).norm(dim=1).mean())  # the library default
        heldout_labels = assign_concepts(shift.original, x_orig[heldout], l1=l1)
        heldout_records = [records[i] for i in heldout]
        per_record.append(
            concept_steering(
                adapter,
                heldout_records,
                layer,
                shift,
                alphas,
                concepts=heldout_labels,
                split="heldout",
                batch_size=batch_size,
                progress=progress,
            )
        )
    steering_records = pd.concat(per_record, ignore_index=True)
    steering = steering_table(steering_records, seed=seed)

    tables = {
        "matching": (CONCEPT_MATCHING, matching),
        "grounding": (CONCEPT_GROUNDING, grounding),
        "samples": (CONCEPT_SAMPLES, samples),
        "steering": (CONCEPT_STEERING, steering),
        "steering_records": (CONCEPT_STEERING_RECORDS, steering_records),
    }
    paths = {name: artifact.path_in(out_dir) for name, (artifact, _) in tables.items()}
    paths["vectors"] = Path(out_dir) / CONCEPT_VECTORS
    paths["summary"] = Path(out_dir) / CONCEPT_SUMMARY
    for name, (artifact, table) in tables.items():
        write_parquet(paths[name], artifact.validate(table))
    save_safetensors(
        paths["vectors"],
        {
            "x_orig": x_orig,  # [N, D] every record, in the given order
            "x_ft": x_ft,  # [N, D]
            "fit_index": torch.tensor(fit, dtype=torch.long),  # [N_fit] rows the concepts fit on
            "heldout_index": torch.tensor(heldout, dtype=torch.long),  # [N_heldout]
            "concepts_orig": shift.original.concepts,  # [K, D]
            "concepts_ft": shift.finetuned.concepts,  # [K, D]
            "deltas": shift.deltas,  # [K, D] Delta_c
            "labels_orig": shift.original.labels,  # [N_fit] A_c membership
            "labels_ft": shift.finetuned.labels,  # [N_fit]
            "labels_heldout": heldout_labels,  # [N_heldout] assigned from x_orig
        },
        metadata={"layer": str(layer), "method": method, "k": str(k), "seed": str(seed)},
    )
    write_json(
        paths["summary"],
        _summary(len(fit), len(heldout), layer, k, method, seed, alphas, shift, steering),
    )
    return paths


def _summary(
    n_fit: int,
    n_heldout: int,
    layer: int,
    k: int,
    method: str,
    seed: int,
    alphas: Sequence[float],
    shift: ConceptShift,
    steering: pd.DataFrame,
) -> dict[str, Any]:
    by_split: dict[str, dict[str, dict[str, float]]] = {}
    for row in steering.itertuples():
        entry = by_split.setdefault(f"{row.split}/{row.shift}", {"kl": {}, "top1_agreement": {}})
        entry["kl"][str(float(row.alpha))] = float(row.kl)
        entry["top1_agreement"][str(float(row.alpha))] = float(row.top1_agreement)
    return {
        "layer": layer,
        "k": k,
        "method": method,
        "seed": seed,
        "n_records": n_fit + n_heldout,
        "n_fit": n_fit,
        "n_heldout": n_heldout,
        "d_model": int(shift.deltas.shape[1]),
        "original": "base LM on (caption, question)",
        "finetuned": "VLM on (image, question)",
        "vector": "residual stream after decoder layer `layer`, last prompt position",
        "steering": "base LM + alpha * Delta_c(i) at `layer`, last prompt position; c(i) from the "
        "original model's decomposition (held-out records: assigned from their original vector); "
        "control shift='mean': one mean shift for all records; split 'fit' is in-sample",
        "mean_cosine": float(shift.original_cosine.mean()),
        "mean_shifted_cosine": float(shift.recovered_cosine.mean()),
        "concepts_used": int((shift.counts > 0).sum()),
        "alphas": [float(a) for a in alphas],
        "steering_by_alpha": by_split,
    }
