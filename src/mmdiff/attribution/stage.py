"""The attribution stage: each feature's top samples, attribution (and exact) patching, tables, overlays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from mmdiff.progress import progress_bar
from mmdiff.attribution.corrupt import visual_embedding_mean
from mmdiff.attribution.exact import ExactPatching, exact_patching, spearman
from mmdiff.attribution.frames import HEADS, LAYERS, heads_frame, layers_frame
from mmdiff.attribution.objective import Objective, Positions
from mmdiff.attribution.overlays import attention_overlays
from mmdiff.attribution.patching import HeadAttribution, attribution_patching
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError, DataError, SAEError
from mmdiff.interp.examples import feature_keys, feature_maxima
from mmdiff.models.base import VLMAdapter


@dataclass
class FeatureAttribution:
    """Everything the stage computes for one feature."""

    attribution: HeadAttribution
    exact: ExactPatching | None = None
    overlays: dict[str, bytes] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        a, e = self.attribution, self.exact
        out: dict[str, Any] = {
            "feature_layer": a.feature_layer,
            "feature": a.feature,
            "record_ids": a.record_ids,
            "n_samples": len(a.record_ids),
            "mean_m_clean": float(a.m_clean.mean()),
            "mean_m_corrupt": float(a.m_corrupt.mean()),
            "attribution_seconds": a.seconds,
            "attribution_forward_passes": a.forward_passes,
            "attribution_backward_passes": a.backward_passes,
        }
        if e is not None:
            out.update(
                exact_seconds=e.seconds,
                exact_forward_passes=e.forward_passes,
                speed_ratio=e.seconds / a.seconds if a.seconds > 0 else float("nan"),
            )
            if a.score_a is not None and e.noising is not None:
                out["spearman_a_vs_exact"] = spearman(a.score_a, e.noising)
            if a.score_b is not None and e.denoising is not None:
                out["spearman_b_vs_exact_denoising"] = spearman(a.score_b, e.denoising)
        return out


def select_samples(
    features: pd.DataFrame,
    records: Sequence[Record],
    top_k: int,
    *,
    top_examples: pd.DataFrame | None = None,
    saes: Mapping[int, Any] | None = None,
    adapter: VLMAdapter | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[tuple[int, int], list[Record]]:
    """Each feature's top-k activating records among `records`.

    From a statistics top-k table (columns layer, feature, record_id, value) when given, else from
    one pass of the VLM and the SAEs over `records` (`mmdiff.interp.examples.feature_maxima`).
    """
    by_id = {r.id: r for r in records}
    keys = feature_keys(features)
    if top_examples is None:
        if saes is None or adapter is None:
            raise ConfigError("select_samples needs top_examples, or saes and an adapter to find them")
        top_examples = feature_maxima(adapter, saes, records, keys, batch_size=batch_size, progress=progress)
        top_examples = top_examples.rename(columns={"max_activation": "value"})
    missing = [c for c in ("layer", "feature", "record_id", "value") if c not in top_examples.columns]
    if missing:
        raise DataError(f"the top-examples table lacks columns {missing}; it has {list(top_examples.columns)}")
    out: dict[tuple[int, int], list[Record]] = {}
    table = top_examples[top_examples["value"] > 0].sort_values("value", ascending=False, kind="stable")
    for key, group in table.groupby(["layer", "feature"], sort=False):
        key = (int(key[0]), int(key[1]))
        if key not in keys:
            continue
        ids = [rid for rid in dict.fromkeys(group["record_id"]) if rid in by_id][:top_k]
        out[key] = [by_id[rid] for rid in ids]
    return out


def attribute_features(
    adapter: VLMAdapter,
    saes: Mapping[int, Any],
    features: pd.DataFrame,
    records: Sequence[Record],
    out_dir: str | Path,
    *,
    top_k: int = 8,
    top_examples: pd.DataFrame | None = None,
    calibration: Sequence[Record] | None = None,
    n_calibration: int | None = 256,
    objective: Objective = "projection",
    positions: Positions = "all",
    exact: bool = False,
    overlay_heads: int = 3,
    overlay_query: Literal["text", "max"] = "text",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Path]:
    """Pipeline stage: attribution patching of every feature in `features` (columns layer, feature).

    Samples are each feature's top-k activating records among `records` (from `top_examples`, a
    statistics top-k table, or found with the SAEs); the corrupt run's mean visual embedding comes
    from the first `n_calibration` records of `calibration` (default: `records`; None = all). Writes under out_dir (the run's attribution/):
    heads.parquet, layers.parquet, summary.json (per feature: timings, and with `exact` the exact
    patching columns, Spearman correlations and the exact/attribution speed ratio) and
    overlays/L{L}F{f}_{top|bottom}{rank}_L{l}H{h}.png (the attention of the `overlay_heads` top
    and bottom heads by |score_a| on the feature's best sample, read from the text positions or the
    feature's max position). Returns the paths.
    """
    from mmdiff.atomic import write_bytes, write_json, write_parquet

    out = Path(out_dir)
    keys = feature_keys(features)
    missing = sorted({layer for layer, _ in keys} - set(saes))
    if missing:
        raise SAEError(f"features at layers {missing} have no SAE; got SAEs for layers {sorted(saes)}")
    samples = select_samples(
        features, records, top_k, top_examples=top_examples, saes=saes, adapter=adapter,
        batch_size=batch_size, progress=progress,
    )
    calibration = list(calibration or records)[:n_calibration]
    visual_mean = visual_embedding_mean(adapter, calibration, batch_size=batch_size, progress=progress)
    results: list[FeatureAttribution] = []
    skipped: list[str] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("attribution patching", total=len(keys))
        for layer, feature in keys:
            chosen = samples.get((layer, feature), [])
            if not chosen:
                skipped.append(f"L{layer}F{feature}")
                bar.advance(task)
                continue
            sae = saes[layer]
            attr = attribution_patching(
                adapter, sae, layer, feature, chosen, visual_mean,
                objective=objective, positions=positions, batch_size=batch_size, progress=False,
            )
            ex = None
            if exact:
                ex = exact_patching(
                    adapter, sae, layer, feature, chosen, visual_mean, objective=objective, positions=positions,
                    directions=("noising", "denoising"), batch_size=batch_size, progress=False,
                )
            overlays = {}
            if overlay_heads > 0:
                overlays = attention_overlays(
                    adapter, sae, attr, chosen[0], n_heads=overlay_heads, query=overlay_query, objective=objective
                )
            results.append(FeatureAttribution(attr, ex, overlays))
            bar.advance(task)
    paths = {
        "heads": out / "heads.parquet",
        "layers": out / "layers.parquet",
        "summary": out / "summary.json",
    }
    # features that fired on none of the records get no rows; they are listed in the summary
    heads = [heads_frame(r.attribution, r.exact) for r in results] or [HEADS.empty()]
    layers = [layers_frame(r.attribution, r.exact) for r in results] or [LAYERS.empty()]
    write_parquet(paths["heads"], HEADS.validate(pd.concat(heads, ignore_index=True)))
    write_parquet(paths["layers"], LAYERS.validate(pd.concat(layers, ignore_index=True)))
    write_json(
        paths["summary"],
        {
            "objective": objective,
            "positions": positions,
            "top_k": top_k,
            "features": [r.summary() for r in results],
            "skipped_no_activation": skipped,
        },
    )
    for r in results:
        tag = f"L{r.attribution.feature_layer}F{r.attribution.feature}"
        for name, png in r.overlays.items():
            path = out / "overlays" / f"{tag}_{name}.png"
            write_bytes(path, png)
            paths[f"overlay:{tag}_{name}"] = path
    return paths
