"""Top-activating examples of SAE features, token-level activations, and the explainers' evidence.

For each feature (layer, latent) and each example source (a generic VQA set, a task set such as
VSR): one pass of the VLM over the source's records finds every record's max activation
(`feature_maxima`); the top-k records are re-run to get the activation at every token, text and
image (`token_activations`); each becomes an `ActivatingExample` with a continuous heatmap of its
image-token activations on the model's real patch grid (`activating_example`). `collect_evidence`
does all of it and adds the tokens the feature promotes through the unembedding and its share of
activation mass on image tokens (over all records of all sources), giving the `FeatureEvidence`
the explainers take (docs/method.md#feature-explanations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmdiff.data.records import Record
from mmdiff.errors import DataError, SAEError
from mmdiff.interp.explain import ActivatingExample, FeatureEvidence, promoted_tokens
from mmdiff.interp.heatmap import Tile, overlay_png, patch_grid
from mmdiff.models.base import TokenType, VLMAdapter

FeatureKey = tuple[int, int]  # (layer, feature)


def feature_id(key: FeatureKey) -> str:
    """"L12/F807" for (12, 807): the id explanations and dashboards use."""
    return f"L{key[0]}/F{key[1]}"


def feature_keys(features: pd.DataFrame | Sequence[FeatureKey]) -> list[FeatureKey]:
    """Unique (layer, feature) pairs, in order, from a features table (columns layer, feature) or pairs."""
    if isinstance(features, pd.DataFrame):
        missing = [c for c in ("layer", "feature") if c not in features.columns]
        if missing:
            raise DataError(f"the features table needs columns layer and feature; it has {list(features.columns)}")
        pairs = zip(features["layer"], features["feature"])
    else:
        pairs = features
    keys = list(dict.fromkeys((int(layer), int(f)) for layer, f in pairs))
    if not keys:
        raise DataError("no features given: pass a table with at least one (layer, feature) row")
    return keys


def _by_layer(keys: Sequence[FeatureKey], saes: Mapping[int, Any]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, f in keys:
        if layer not in saes:
            raise SAEError(f"feature L{layer}/F{f} has no SAE: got SAEs for layers {sorted(saes)}")
        d_sae = saes[layer].W_dec.shape[0]
        if not 0 <= f < d_sae:
            raise SAEError(f"feature {f} does not exist at layer {layer}: its SAE has {d_sae} latents")
        out.setdefault(layer, []).append(f)
    return out


def _codes(sae: Any, acts: torch.Tensor, features: list[int], token_block: int = 2048) -> torch.Tensor:
    """[batch, seq, n_features] the SAE activations of `features` on residuals [batch, seq, d_model].

    Encoded `token_block` tokens at a time, so the [tokens, d_sae] code matrix stays small even
    for wide SAEs and long (anyres) image-token sequences.
    """
    w = sae.W_dec
    b, t, d = acts.shape
    flat = acts.reshape(b * t, d)
    index = torch.as_tensor(features, dtype=torch.long, device=w.device)
    out = []
    with torch.no_grad():
        for start in range(0, b * t, token_block):
            block = flat[start : start + token_block].to(device=w.device, dtype=w.dtype)
            out.append(sae.encode(block).index_select(-1, index).float().cpu())  # [block, n_features]
    return torch.cat(out).reshape(b, t, len(features))


def feature_maxima(
    adapter: VLMAdapter,
    saes: Mapping[int, Any],
    records: Sequence[Record],
    features: pd.DataFrame | Sequence[FeatureKey],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (feature, record): max activation over the record's non-special tokens, where.

    Columns: layer, feature, record_id, max_activation, position (index in the unpadded sequence),
    token_type, image_mass and total_mass (sums of the positive activations on image tokens / all
    non-special tokens). One forward pass per batch for all features.
    """
    from mmdiff.capture import iter_activations

    keys = feature_keys(features)
    by_layer = _by_layer(keys, saes)
    records = list(records)
    if not records:
        raise DataError("feature_maxima needs records; got none")
    frames: list[pd.DataFrame] = []
    for batch in iter_activations(adapter, records, sorted(by_layer), "vlm", batch_size=batch_size, progress=progress):
        types = batch.token_types.long().cpu()  # [batch, seq]
        mask = batch.attention_mask.bool().cpu()
        keep = mask & (types != int(TokenType.SPECIAL))
        image = keep & (types == int(TokenType.IMAGE))
        positions = mask.long().cumsum(1) - 1  # [batch, seq]
        for layer, feats in by_layer.items():
            h = _codes(saes[layer], batch.acts[layer], feats)  # [batch, seq, n_features]
            masked = h.masked_fill(~keep[..., None], -torch.inf)
            best, where = masked.max(1)  # [batch, n_features]
            positive = h.clamp_min(0)
            total = (positive * keep[..., None]).sum(1)  # [batch, n_features]
            on_image = (positive * image[..., None]).sum(1)
            rows, cols = np.meshgrid(np.arange(h.shape[0]), np.arange(len(feats)), indexing="ij")
            rows, cols = rows.flatten(), cols.flatten()
            where_flat = where[rows, cols]
            frames.append(
                pd.DataFrame(
                    {
                        "layer": np.full(rows.size, layer, dtype=np.int64),
                        "feature": np.asarray(feats, dtype=np.int64)[cols],
                        "record_id": [batch.record_ids[r] for r in rows],
                        "max_activation": best[rows, cols].clamp_min(0).numpy().astype(np.float64),
                        "position": positions[rows, where_flat].numpy(),
                        "token_type": types[rows, where_flat].numpy(),
                        "image_mass": on_image[rows, cols].numpy().astype(np.float64),
                        "total_mass": total[rows, cols].numpy().astype(np.float64),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def top_records(maxima: pd.DataFrame, k: int) -> dict[FeatureKey, list[str]]:
    """Each feature's k records with the largest positive max activation, best first."""
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    table = maxima[maxima["max_activation"] > 0].sort_values(
        ["layer", "feature", "max_activation"], ascending=[True, True, False], kind="stable"
    )
    return {
        (int(layer), int(f)): list(group["record_id"].head(k))
        for (layer, f), group in table.groupby(["layer", "feature"], sort=False)
    }


@dataclass
class RecordActivations:
    """One record re-run through the VLM: its tokens and each feature's activation at every token."""

    record: Record
    input_ids: torch.Tensor  # [T] without padding
    token_types: torch.Tensor  # [T] TokenType values
    activations: dict[FeatureKey, torch.Tensor]  # key -> [T]
    tiles: list[Tile]  # the image's patch grid, in token order ([] without image tokens)

    def image_values(self, key: FeatureKey) -> torch.Tensor:
        """[n_image] the feature's activation at the image tokens, in token order."""
        return self.activations[key][self.token_types == int(TokenType.IMAGE)]


def token_activations(
    adapter: VLMAdapter,
    saes: Mapping[int, Any],
    records: Sequence[Record],
    features: pd.DataFrame | Sequence[FeatureKey],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> list[RecordActivations]:
    """Token-level activations of `features` on each record (text and image tokens), padding removed."""
    from mmdiff.capture import capture_residuals
    from mmdiff.progress import iterate

    keys = feature_keys(features)
    by_layer = _by_layer(keys, saes)
    records = list(records)
    chunks = [records[i : i + batch_size] for i in range(0, len(records), max(1, batch_size))]
    out: list[RecordActivations] = []
    for chunk in iterate(chunks, "token activations", progress):
        with torch.inference_mode():
            inputs = adapter.vlm_inputs(chunk)
            acts = capture_residuals(adapter.vlm, inputs, sorted(by_layer))
            types = adapter.token_types(inputs).long().cpu()
        codes = {layer: _codes(saes[layer], acts[layer], feats) for layer, feats in by_layer.items()}
        mask = inputs["attention_mask"].bool().cpu()
        ids = inputs["input_ids"].cpu()
        for row, record in enumerate(chunk):
            keep = mask[row]
            has_image = bool((types[row][keep] == int(TokenType.IMAGE)).any())
            activations = {
                (layer, f): codes[layer][row, keep, j] for layer, feats in by_layer.items() for j, f in enumerate(feats)
            }
            out.append(
                RecordActivations(
                    record=record,
                    input_ids=ids[row, keep],
                    token_types=types[row, keep],
                    activations=activations,
                    tiles=patch_grid(adapter, inputs, row) if has_image else [],
                )
            )
    return out


def activating_example(
    acts: RecordActivations,
    key: FeatureKey,
    tokenizer: Any,
    *,
    source: str = "",
    heatmap: bool = True,
    vmax: float | None = None,
) -> ActivatingExample:
    """The `ActivatingExample` of one record for one feature, with its image heatmap (PNG) when the
    record has image tokens and `heatmap` is set."""
    values = acts.activations[key]
    png = None
    if heatmap and acts.tiles:  # no title: the dashboard names the record beside it
        png = overlay_png(acts.record.load_image(), acts.image_values(key), acts.tiles, vmax=vmax, enlarge=False)
    example = ActivatingExample.from_token_ids(
        acts.input_ids, values, tokenizer, token_types=acts.token_types, heatmap_png=png, record_id=acts.record.id
    )
    example.source = source
    return example


def tokenizer_of(adapter: VLMAdapter) -> Any:
    """The adapter's tokenizer (its own, or its processor's), to decode token ids with."""
    tokenizer = getattr(adapter, "tokenizer", None) or getattr(adapter.processor, "tokenizer", None)
    if tokenizer is None:
        raise DataError(f"{type(adapter).__name__} exposes no tokenizer to decode tokens with")
    return tokenizer


class _DecodeCache:
    """A tokenizer's `decode` of single tokens, remembered: the examples of many features decode the
    same records' tokens again and again."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._seen: dict[tuple[int, ...], str] = {}

    def decode(self, ids: Sequence[int]) -> str:
        key = tuple(int(i) for i in ids)
        if key not in self._seen:
            self._seen[key] = self.tokenizer.decode(list(key))
        return self._seen[key]


def feature_promoted_tokens(adapter: VLMAdapter, sae: Any, feature: int, k: int = 10) -> list[tuple[str, float]]:
    """Top-k tokens feature `feature` promotes: W_U final_norm(d_f) (the norm's scale does not change
    the ranking, its per-dimension weights do)."""
    backbone = adapter.vlm
    d = sae.W_dec[feature].detach().to(backbone.dtype).to(backbone.device)
    with torch.no_grad():
        if backbone.final_norm is not None:
            d = backbone.final_norm(d[None])[0]
    return promoted_tokens(d, backbone.unembedding_matrix(), tokenizer_of(adapter), k=k)


@dataclass
class FeatureExamples:
    """The interp stage's per-feature result: evidence for the explainers and per-record maxima."""

    evidence: dict[FeatureKey, FeatureEvidence]
    maxima: pd.DataFrame  # feature_maxima of every source, with a "source" column


def chosen_from_table(table: pd.DataFrame, keys: Sequence[FeatureKey], k: int) -> dict[FeatureKey, list[str]]:
    """Each feature's first k records, best first, from a top-records table (columns
    `mmdiff.stats.TOP_EXAMPLE_COLUMNS`, e.g. the statistics stage's stats/{split}.toprecords.parquet)."""
    missing = [c for c in ("layer", "feature", "rank", "record_id", "value") if c not in table.columns]
    if missing:
        raise DataError(f"a top-records table needs columns layer, feature, rank, record_id, value; it lacks {missing}")
    wanted = pd.MultiIndex.from_tuples(list(keys), names=["layer", "feature"])
    rows = table[pd.MultiIndex.from_frame(table[["layer", "feature"]]).isin(wanted) & (table["value"] > 0)]
    rows = rows.sort_values(["layer", "feature", "rank"], kind="stable")
    return {
        (int(layer), int(f)): list(group["record_id"].head(k))
        for (layer, f), group in rows.groupby(["layer", "feature"], sort=False)
    }


def collect_evidence(
    adapter: VLMAdapter,
    saes: Mapping[int, Any],
    features: pd.DataFrame | Sequence[FeatureKey],
    sources: Mapping[str, Sequence[Record]],
    *,
    k: int = 10,
    heatmaps: bool = True,
    n_promoted: int = 10,
    batch_size: int = 8,
    progress: bool = True,
    top: Mapping[str, pd.DataFrame] | None = None,
    mass: pd.DataFrame | None = None,
) -> FeatureExamples:
    """`FeatureEvidence` per feature from the top-k records of each source (e.g. {"VQAv2": ...,
    "VSR": ...}): token-level activations, heatmaps, promoted tokens and the image-token share of
    activation mass over all records of all sources. Features that never fire get no examples.

    top: source name -> its top-records table, kept by the statistics stage over the same records
    (`mmdiff.stats.top_records`); a source with one is not scanned, only the records shown are run.
    mass: columns layer, feature, image_mass, total_mass (the activation mass over all sources, e.g.
    from the statistics summaries); without it, the mass is summed from the scanned sources.
    The returned maxima hold one row per (feature, record) of every scanned source, and for a source
    read from `top`, its rows of the table (the records kept there)."""
    if not sources:
        raise DataError('collect_evidence needs at least one example source, e.g. {"VQAv2": records}')
    keys = feature_keys(features)
    tokenizer = _DecodeCache(tokenizer_of(adapter))
    examples: dict[FeatureKey, list[ActivatingExample]] = {key: [] for key in keys}
    tables = []
    for name, records in sources.items():
        if top is not None and name in top:
            chosen = chosen_from_table(top[name], keys, k)
            shown = {(layer, f, rid) for (layer, f), ids in chosen.items() for rid in ids}
            kept = top[name].rename(columns={"value": "max_activation"})
            kept = kept[[key in shown for key in zip(kept["layer"], kept["feature"], kept["record_id"])]]
            tables.append(kept[["layer", "feature", "record_id", "max_activation", "position", "token_type"]]
                          .assign(source=name))
        else:
            maxima = feature_maxima(adapter, saes, records, keys, batch_size=batch_size, progress=progress)
            tables.append(maxima.assign(source=name))
            chosen = top_records(maxima, k)
        by_id = {r.id: r for r in records}
        unknown = sorted({rid for ids in chosen.values() for rid in ids} - set(by_id))
        if unknown:
            raise DataError(f"the top records of source {name!r} name records it does not hold (e.g. {unknown[0]!r}): "
                            "were the statistics computed on other records? Re-run the statistics stage")
        needed = list(dict.fromkeys(rid for ids in chosen.values() for rid in ids))
        if not needed:
            continue
        rerun = token_activations(adapter, saes, [by_id[rid] for rid in needed], keys, batch_size=batch_size, progress=progress)
        by_record = {ra.record.id: ra for ra in rerun}
        for key, ids in chosen.items():
            if key not in examples:
                continue
            # one colour scale for all of a feature's heatmaps, set by its image-token activations
            vmax = max((float(by_record[rid].image_values(key).max(0).values) for rid in ids if by_record[rid].tiles), default=None)
            for rid in ids:
                examples[key].append(
                    activating_example(by_record[rid], key, tokenizer, source=name, heatmap=heatmaps, vmax=vmax)
                )
    maxima = pd.concat(tables, ignore_index=True)
    if mass is None:
        if top:
            raise DataError("collect_evidence reads sources from top-records tables: pass their activation mass too (mass=)")
        mass = maxima
    mass = mass.groupby(["layer", "feature"])[["image_mass", "total_mass"]].sum()
    evidence: dict[FeatureKey, FeatureEvidence] = {}
    for key in keys:
        image_mass, total_mass = mass.loc[key] if key in mass.index else (0.0, 0.0)
        share = float(image_mass / total_mass) if total_mass > 0 else 0.0
        promoted = feature_promoted_tokens(adapter, saes[key[0]], key[1], n_promoted) if n_promoted > 0 else []
        evidence[key] = FeatureEvidence(feature_id(key), examples[key], promoted, share)
    return FeatureExamples(evidence, maxima)
