"""The study's stages, in order, wired to the library's functions.

Each stage function is thin: it reads the config section and upstream files, calls the library,
and writes its outputs into the run directory. The work itself lives in the modules it calls, so
every stage is also usable alone from Python. A stage function's docstring is its description in
`mmdiff stages`, in the run's progress lines and in `mmdiff <stage> --help`.

Each stage function imports the library module it calls when it runs, so the command line
(`mmdiff --help`, `mmdiff stages`, the dry run) starts without loading transformers, scipy and
the model code (about half of importing every stage's library). This module is at
the top of the import graph (docs/design.md): nothing in the package imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from mmdiff.config import ORGANISM, StudyConfig
from mmdiff.data.records import Record
from mmdiff.data.selection import load_records, neutral_records, task_splits
from mmdiff.errors import ConfigError
from mmdiff.pipeline import Stage, StageContext


# ----------------------------------------------------------------------------- shared resources
def resolve_model_paths(cfg: StudyConfig) -> tuple[str, str | None]:
    """The VLM and base-LM locations, with 'organism' replaced by the shipped checkpoint."""
    vlm, base = cfg.model.vlm, cfg.model.base_lm
    if ORGANISM in (vlm, base):
        from mmdiff.organism import checkpoint_path

        root = checkpoint_path()
        vlm = str(root / "vlm") if vlm == ORGANISM else vlm
        base = str(root / "base_lm") if base == ORGANISM else base
    return vlm, base


def get_adapter(ctx: StageContext):  # -> VLMAdapter
    """Load the model pair once per run and share it between stages.

    Under torchrun every rank loads the model onto its own device (cuda:LOCAL_RANK or cpu).
    """
    if "adapter" not in ctx.cache:
        from mmdiff.distributed import context
        from mmdiff.models import load_adapter

        vlm, base = resolve_model_paths(ctx.config)
        m, dist = ctx.config.model, context()
        ctx.cache["adapter"] = load_adapter(
            vlm, base_lm=base, family=m.family, dtype=m.dtype,
            device=str(dist.device) if dist.distributed else m.device,
            local_files_only=m.local_files_only, trust_remote_code=m.trust_remote_code,
        )
    return ctx.cache["adapter"]


def get_records(ctx: StageContext, name: str | list[str]) -> list[Record]:
    """Records of one configured dataset, or of several concatenated (ids must not collide)."""
    names = [name] if isinstance(name, str) else list(name)
    out: list[Record] = []
    for n in names:
        key = f"records:{n}"
        if key not in ctx.cache:
            if n not in ctx.config.datasets:
                raise ConfigError(f"dataset {n!r} is not defined in the config's `datasets` section")
            ctx.cache[key] = load_records(ctx.config.datasets[n])
        out.extend(ctx.cache[key])
    if len(names) > 1:
        seen: set[str] = set()
        dup = [r.id for r in out if r.id in seen or seen.add(r.id)]
        if dup:
            raise ConfigError(f"datasets {names} share record ids (e.g. {dup[0]!r}); give them distinct sources")
    return out


def backbone_saes(ctx: StageContext, role: str, layers: list[int], side: str = "vlm") -> dict:
    """{layer: SAE} of one role (base | full | image | text | random) from the run directory,
    checked against the hidden size of the adapter's `side` backbone and placed on its device."""
    from mmdiff.control.inputs import load_role_saes

    backbone = get_adapter(ctx).backbone(side)
    return load_role_saes(ctx.run_dir, role, layers, d_in=backbone.d_model, device=backbone.device)


def task_feature_table(run_dir: Path, tasks: list[str]) -> pd.DataFrame:
    """Every task feature with its task, strongest contrast first (Delta p)."""
    frames = []
    for t in tasks:
        df = pd.read_parquet(run_dir / "features" / f"{t}.parquet")
        frames.append(df.assign(task=t))
    if not frames:
        return pd.DataFrame(columns=["layer", "feature", "task"])
    df = pd.concat(frames, ignore_index=True)
    key = "delta_p" if "delta_p" in df else None
    return df.sort_values(key, ascending=False) if key else df


# ----------------------------------------------------------------------------- stages
def stage_capture(ctx: StageContext) -> dict[str, Any]:
    """Residual-stream activations of the VLM and the base LM, into resumable activation stores.

    The VLM reads image + question, the base LM caption + question, at the configured layers.
    """
    from mmdiff.parallel import capture_store_distributed
    from mmdiff.store import ActivationStore

    adapter = get_adapter(ctx)
    c = ctx.config.capture
    summary: dict[str, Any] = {}
    for ds in c.datasets:
        records = get_records(ctx, ds)
        for side in c.sides:
            out = ctx.run_dir / "activations" / ds / side
            capture_store_distributed(adapter, records, ctx.config.layers, out, side, dtype=c.dtype,
                                      shard_tokens=c.shard_tokens, batch_size=c.batch_size,
                                      progress=ctx.progress)  # a plain store in one process
            summary[f"{ds}/{side}"] = {"records": len(records), "tokens": ActivationStore(out).num_tokens}
    return summary


def stage_train(ctx: StageContext) -> dict[str, Any]:
    """Base-LM SAEs (trained here when none are given), then each masking regime on the VLM."""
    import dataclasses

    from mmdiff.parallel import training_strategy
    from mmdiff.sae.study_saes import train_study_saes
    from mmdiff.store import ActivationStore

    cfg, t = ctx.config, ctx.config.train
    adapter = get_adapter(ctx)
    tc = t.train_config(seed=cfg.seed)
    base_cfg = dataclasses.replace(tc, regime="full", total_tokens=t.base_total_tokens or t.total_tokens)

    def stores(dataset: str) -> dict[str, Any]:
        found = {}
        for side in ("base", "vlm"):
            store = ctx.run_dir / "activations" / dataset / side
            found[side] = ActivationStore(store) if (store / "manifest.json").exists() else None
        return found

    base_saes = None
    if t.base_saes is not None:
        from mmdiff.sae import load_sae

        where = t.base_saes if isinstance(t.base_saes, dict) else {L: t.base_saes.format(layer=L) for L in cfg.layers}
        base_saes = {L: load_sae(where[L], d_in=adapter.backbone("base").d_model, layer=L) for L in cfg.layers}
    result = train_study_saes(
        adapter, get_records(ctx, t.dataset), get_records(ctx, t.heldout), cfg.layers, tc, ctx.run_dir,
        regimes=t.regimes, base_cfg=base_cfg, capture_batch_size=cfg.capture.batch_size,
        spliced=t.spliced_loss, progress=ctx.progress, data=stores(t.dataset), heldout=stores(t.heldout),
        base_saes=base_saes, resume=not ctx.force, strategy=training_strategy(),
    )
    held = result.tables.get("heldout") if hasattr(result, "tables") else None
    summary: dict[str, Any] = {"roles": sorted(result.saes)}
    if held is not None:
        import pandas as pd

        df = pd.read_parquet(held)
        summary["heldout"] = df.to_dict(orient="records")[:64]
    return summary


def vlm_feature_stats(ctx: StageContext, saes: dict, splits: dict[str, Any], records: list[Record] | None = None,
                      out: Path | None = None) -> dict[str, Any]:
    """Statistics of the VLM's activations on the analysis records (or `records`) under `saes`, by
    split: written to `out` when given (the stats stage), else returned in memory."""
    from mmdiff.capture import iter_activations
    from mmdiff.distributed import shard_records
    from mmdiff.parallel import collect_feature_stats_distributed, write_feature_stats_distributed

    cfg, s = ctx.config, ctx.config.stats
    recs = get_records(ctx, s.dataset) if records is None else records
    acts = iter_activations(get_adapter(ctx), shard_records(recs), cfg.layers, "vlm", batch_size=s.batch_size,
                            progress=ctx.progress)
    kw = dict(top_k=s.top_k, n_chunks=s.n_chunks, progress=ctx.progress)
    if out is not None:
        return write_feature_stats_distributed(acts, saes, splits, out, **kw) or {}
    return collect_feature_stats_distributed(acts, saes, splits, **kw)


def random_regime_sets(ctx: StageContext) -> tuple[dict, Any, dict[str, pd.DataFrame]] | None:
    """The pipeline ablation's random-regime row: (its SAEs, their statistics on the analysis records'
    vision split, {task: the features the selection rule keeps on them}), computed here (one VLM pass
    over the analysis records and one over each neutral re-run); None when no `random` SAEs were trained."""
    from mmdiff.control.analyses import regime_task_sets

    cfg, s, d = ctx.config, ctx.config.stats, ctx.config.detect
    if "random" not in cfg.train.regimes or not (ctx.run_dir / "saes" / "random").is_dir():
        return None
    saes = backbone_saes(ctx, "random", cfg.layers, "vlm")
    records = get_records(ctx, s.dataset)
    stats = vlm_feature_stats(ctx, saes, {"vision": None, **task_splits(records, s.base_split, s.tasks)})
    neutral = {
        t: vlm_feature_stats(ctx, saes, f"{t}_neutral",
                             neutral_records([r for r in records if t in r.tasks], s.neutral_instruction))[f"{t}_neutral"]
        for t in s.neutral_tasks
    }
    sets = regime_task_sets({t: stats[t] for t in s.tasks}, stats[s.base_split], neutral,
                            min_delta_p=d.min_delta_p, alpha=d.alpha, min_neutral_firing=d.min_neutral_firing,
                            min_image_share=d.min_image_share)
    return saes, stats["vision"], sets


def stage_stats(ctx: StageContext) -> dict[str, Any]:
    """Per-feature statistics: VLM + adapted SAEs by split, base LM + base SAEs, neutral re-runs.

    One pass per side: mean squared activation, firing counts by token type and split, quantiles
    and the top activating examples of every feature.
    """
    from mmdiff.capture import iter_activations
    from mmdiff.distributed import shard_records
    from mmdiff.parallel import write_feature_stats_distributed

    cfg, s = ctx.config, ctx.config.stats
    records = get_records(ctx, s.dataset)
    layers = cfg.layers
    adapted = backbone_saes(ctx, s.role, layers, "vlm")
    base = backbone_saes(ctx, "base", layers, "base")
    out = ctx.run_dir / "stats"
    splits: dict[str, Any] = {"vision": None, **task_splits(records, s.base_split, s.tasks)}

    vlm_feature_stats(ctx, adapted, splits, records, out=out)
    acts = iter_activations(get_adapter(ctx), shard_records(records), layers, "base", batch_size=s.batch_size,
                            progress=ctx.progress)
    write_feature_stats_distributed(acts, base, "text", out, top_k=s.top_k, n_chunks=s.n_chunks,
                                    progress=ctx.progress)
    for task in s.neutral_tasks:
        vlm_feature_stats(ctx, adapted, f"{task}_neutral",
                          neutral_records([r for r in records if task in r.tasks], s.neutral_instruction), out=out)
    return {k: len(v) if v is not None else len(records) for k, v in splits.items()}


def stage_diff(ctx: StageContext) -> dict[str, Any]:
    """Adapted features: variance gap, decoder cosine, two-stage global selection, stability.

    Also the relative decoder norm, and the selection's stability under a bootstrap over records.
    """
    from mmdiff.control.inputs import load_role_saes
    from mmdiff.diff import write_adapted_features
    from mmdiff.stats import load_feature_stats

    cfg, d = ctx.config, ctx.config.diff
    stats = ctx.run_dir / "stats"
    base = load_role_saes(ctx.run_dir, "base", cfg.layers)
    adapted = load_role_saes(ctx.run_dir, cfg.stats.role, cfg.layers)
    paths = write_adapted_features(load_feature_stats(stats, "vision"), load_feature_stats(stats, "text"),
                                   base, adapted, ctx.run_dir, p_gap=d.p_gap, p_cos=d.p_cos,
                                   n_bootstrap=d.n_bootstrap, seed=cfg.seed, progress=ctx.progress)
    df = pd.read_parquet(paths["diff"])
    selected = df[df["selected"]]
    return {"features": int(len(df)), "adapted": int(len(selected)),
            "adapted_share": float(len(selected) / max(len(df), 1)),
            "per_layer": {int(k): int(v) for k, v in selected.groupby("layer").size().items()}}


def stage_detect(ctx: StageContext) -> dict[str, Any]:
    """Task features by contrastive firing, intersected with the adapted set, lexically filtered.

    Task features (spatial, OCR, safety) fire more on their task than on generic VQA, with
    Fisher/BH significance; the neutral re-runs drop those the question's words alone explain.
    """
    from mmdiff.detect import write_task_features
    from mmdiff.diff import DIFF
    from mmdiff.stats import load_feature_stats

    d, s = ctx.config.detect, ctx.config.stats
    stats = ctx.run_dir / "stats"
    tasks = {t: load_feature_stats(stats, t) for t in s.tasks}
    neutral = {t: load_feature_stats(stats, f"{t}_neutral") for t in s.neutral_tasks}
    adapted = pd.read_parquet(DIFF.path_in(ctx.run_dir)) if d.restrict_to_adapted else None
    write_task_features(tasks, load_feature_stats(stats, s.base_split), ctx.run_dir,
                        adapted=adapted, neutral=neutral or None, min_delta_p=d.min_delta_p,
                        alpha=d.alpha, min_neutral_firing=d.min_neutral_firing,
                        min_image_share=d.min_image_share)
    return {t: int(len(pd.read_parquet(ctx.run_dir / "features" / f"{t}.parquet"))) for t in s.tasks}


def stage_attribute(ctx: StageContext) -> dict[str, Any]:
    """Attribution patching of the task features to attention heads (methods A and B).

    Two forwards and one backward per method, optional exact patching to validate, and attention
    overlays of the top heads.
    """
    from mmdiff.atomic import write_json, write_parquet
    from mmdiff.attribution import attribute_features
    from mmdiff.stats import stats_paths

    cfg, a = ctx.config, ctx.config.attribution
    features = task_feature_table(ctx.run_dir, cfg.stats.tasks)
    features = features.drop_duplicates(["layer", "feature"]).head(a.max_features)
    out = ctx.run_dir / "attribution"
    if features.empty:
        write_parquet(out / "heads.parquet", pd.DataFrame(columns=["feature", "layer", "head", "score_a", "score_b"]))
        write_json(out / "summary.json", {"features": 0, "note": "no task features to attribute"})
        return {"features": 0}
    records = get_records(ctx, cfg.stats.dataset)
    saes = backbone_saes(ctx, cfg.stats.role, sorted(set(features["layer"])), "vlm")
    top = pd.read_parquet(stats_paths(ctx.run_dir / "stats", "vision")["topk"])
    attribute_features(get_adapter(ctx), saes, features, records, out, top_k=a.top_k, top_examples=top,
                       n_calibration=a.n_calibration, objective=a.objective, exact=a.exact,
                       overlay_heads=a.overlay_heads, batch_size=a.batch_size, progress=ctx.progress)
    summary = json.loads((out / "summary.json").read_text())
    return {"features": int(len(features)), **{k: v for k, v in summary.items() if not isinstance(v, (list, dict))}}


def stage_interp(ctx: StageContext) -> dict[str, Any]:
    """Top examples with heatmaps, explanations (offline or an LLM) and one dashboard per feature.

    The top activating examples get image-patch heatmaps; explanations come offline or from an
    OpenAI-compatible LLM, with detection scores.
    """
    from mmdiff.diff import DIFF
    from mmdiff.interp.dashboard import write_interp
    from mmdiff.interp.explain import make_explainer

    it, s = ctx.config.interp, ctx.config.stats
    features = task_feature_table(ctx.run_dir, s.tasks)
    diff = pd.read_parquet(DIFF.path_in(ctx.run_dir))
    adapted = diff[diff["selected"]].sort_values("variance_gap", ascending=False).head(it.max_adapted)
    features = pd.concat([features, adapted.assign(task="adapted")], ignore_index=True)
    task_features = features[["layer", "feature", "task"]].drop_duplicates()  # a feature may be in several sets
    features = features.drop_duplicates(["layer", "feature"])[["layer", "feature", "task"]]
    records = get_records(ctx, s.dataset)
    sources = {"generic VQA": [r for r in records if s.base_split in r.tasks and not set(s.tasks) & set(r.tasks)]}
    for t in s.tasks:
        sources[t] = [r for r in records if t in r.tasks]
    sources = {k: v for k, v in sources.items() if v}
    llm = None
    if it.llm is not None:
        from mmdiff.interp.client import LLMConfig

        llm = LLMConfig(**it.llm.model_dump(), cache_dir=ctx.run_dir / "interp" / "llm_cache")
    saes = backbone_saes(ctx, s.role, sorted(set(features["layer"])), "vlm")
    tables = {"diff": diff}
    for t in s.tasks:
        p = ctx.run_dir / "stats" / f"detect_{t}.parquet"
        if p.exists():
            tables[f"detect {t}"] = pd.read_parquet(p)
    heads_path = ctx.run_dir / "attribution" / "heads.parquet"
    heads = pd.read_parquet(heads_path) if heads_path.exists() else None
    grounding, held_out = grounding_source(ctx)
    kept = kept_top_records(ctx.run_dir / "stats", {"generic VQA": s.base_split, **{t: t for t in s.tasks}},
                            sources, features)
    write_interp(get_adapter(ctx), saes, features, sources, ctx.run_dir / "interp", explainer=make_explainer(llm),
                 tables=tables, heads=heads, overlays_dir=ctx.run_dir / "attribution" / "overlays",
                 grounding=grounding, grounding_records=held_out, task_features=task_features, **kept,
                 k=it.k, heatmaps=it.heatmaps, batch_size=it.batch_size, progress=ctx.progress)
    summary = {"features": int(len(features)), "explainer": "llm" if llm else "offline",
               "grounding_records": len(held_out), "examples_from": "statistics" if kept else "a pass over every record"}
    from mmdiff.interp.grounded import MATCH_SHARE

    share = MATCH_SHARE.read(ctx.run_dir).table
    if share is not None:  # the organism's ground-truth check, per task and pooled ("all")
        summary["match_share"] = {r.task: {"matched": int(r.matched), "features": int(r.features),
                                           "share": float(r.share), "ci": [float(r.ci_lo), float(r.ci_hi)]}
                                  for r in share.itertuples()}
    return summary


def kept_top_records(stats_dir: Path, split_of: dict[str, str], sources: dict[str, list[Record]],
                     features: pd.DataFrame) -> dict[str, Any]:
    """What the statistics stage kept for the interp stage: each source's top records (its split's
    stats/{split}.toprecords.parquet), the activation mass summed over those splits and each
    feature's token-activation histogram (the "vision" split, all records), as `write_interp`'s
    top, mass and histograms; {} for statistics written before the top records were kept (then
    interp scans every record)."""
    from mmdiff.stats import load_feature_stats, stats_paths

    paths = {name: stats_paths(stats_dir, split_of[name]) for name in sources}
    if not all(p["toprecords"].is_file() for p in paths.values()):
        return {}
    top = {name: pd.read_parquet(p["toprecords"]) for name, p in paths.items()}
    summaries = [pd.read_parquet(p["summary"], columns=["layer", "feature", "sum_h_image", "sum_h_text"])
                 for p in paths.values()]
    mass = pd.concat(summaries, ignore_index=True)
    mass = mass.assign(image_mass=mass["sum_h_image"], total_mass=mass["sum_h_image"] + mass["sum_h_text"])
    histograms: dict[tuple[int, int], tuple[Any, Any]] = {}
    state = stats_paths(stats_dir, "vision")["state"]
    if state.is_file():
        import numpy as np

        stats = load_feature_stats(state)
        edges = stats.histogram.edges().numpy()
        low, high = edges[0], edges[-1]
        # the open end bins drawn one bin ratio wide beyond the log-spaced ones
        ratio = edges[1] / edges[0]
        full = np.concatenate([[low / ratio], edges, [high * ratio]])
        for layer, f in zip(features["layer"], features["feature"]):
            if int(layer) in stats.d_sae_by_layer:
                histograms[(int(layer), int(f))] = (full, stats.layer_state(int(layer)).hist[int(f)].numpy())
    return {"top": top, "mass": mass[["layer", "feature", "image_mass", "total_mass"]], "histograms": histograms}


def grounding_source(ctx: StageContext) -> tuple[Any, list[Record]]:
    """(concept source, held-out records) grounding the explanations: the organism's scene and
    question concepts, or with `interp.grounding_coco` the COCO boxes of the records' images and with
    `interp.grounding_ocr` the OCR sets' "text" (both: each record from the source annotating it),
    on at most `interp.grounding_records` evenly spaced records of `interp.grounding`; (None, [])
    when none is configured or its records carry no annotations the explainer reads."""
    from mmdiff.data.loaders.scene_concepts import organism_concepts

    it = ctx.config.interp
    if it.grounding is None:
        return None, []
    sources: list[Any] = []
    if it.grounding_coco:
        from mmdiff.data.loaders.coco_instances import CocoConcepts, load_coco_instances

        sources.append(CocoConcepts(load_coco_instances(it.grounding_coco)))
    if it.grounding_ocr is not None:
        from mmdiff.data.loaders.rosetta_ocr import OcrConcepts, load_rosetta_ocr

        sources.append(OcrConcepts(load_rosetta_ocr(it.grounding_ocr) if it.grounding_ocr else {}))
    if sources:
        from mmdiff.interp.grounded import ConceptSources

        source: Any = sources[0] if len(sources) == 1 else ConceptSources(tuple(sources))
        records = [r for r in get_records(ctx, it.grounding) if source.covers(r)]
    else:
        source = organism_concepts
        records = [r for r in get_records(ctx, it.grounding) if "scene" in (r.meta or {})]
    step = max(1, -(-len(records) // it.grounding_records))
    return (source, records[::step]) if records else (None, [])


def _control_common(ctx: StageContext) -> tuple[Any, list[str], dict[str, Any]]:
    cfg, c = ctx.config, ctx.config.control
    tasks = c.tasks or cfg.stats.tasks
    present = [t for t in tasks if len(pd.read_parquet(ctx.run_dir / "features" / f"{t}.parquet"))]
    common = dict(role=cfg.stats.role, stats_split="vision", out=ctx.run_dir / "eval", seed=cfg.seed,
                  n_boot=c.n_boot, batch_size=c.batch_size, progress=ctx.progress)
    return get_adapter(ctx), present, common


def stage_ablate(ctx: StageContext) -> dict[str, Any]:
    """Remove each task set and measure every task, beside matched random and mismatched controls.

    A set is removed by projecting out its decoder directions; the controls are frequency-matched
    random features and the other tasks' sets, with bootstrap CIs. Then the analyses on the same
    clean pass: each set's own features and the full set at text and at all positions, single
    features, dose-response, the selection-pipeline ablation.
    """
    from mmdiff.control.analyses import run_analyses
    from mmdiff.control.evaluator import Evaluator
    from mmdiff.control.removal import run_removal
    from mmdiff.control.tasks import study_eval_tasks

    c = ctx.config.control
    adapter, present, common = _control_common(ctx)
    eval_tasks = study_eval_tasks(get_records(ctx, c.test))
    ev = Evaluator(adapter, eval_tasks, batch_size=c.batch_size, progress=ctx.progress)
    run_removal(ctx.run_dir, adapter, eval_tasks, tasks=present, positions=c.positions,
                n_random=c.n_random, n_bins=c.n_bins, evaluator=ev, **common)
    analyses = run_analyses(
        ctx.run_dir, ev, tasks=present, role=common["role"], stats_split=common["stats_split"],
        positions=c.analysis_positions or c.positions, variant_positions=c.variant_positions,
        single_top=c.single_top, dose=c.dose_response, dose_max=c.dose_max, pipeline=c.pipeline_ablation,
        regime=(lambda: random_regime_sets(ctx)) if c.pipeline_ablation else None, categories=c.categories,
        category_records=get_records(ctx, ctx.config.stats.dataset) if c.categories and c.single_top else (),
        general=c.general_task,
        benign=c.benign_task, n_records=c.analysis_records, n_random=c.n_random, seed=common["seed"],
        n_bins=c.n_bins, n_boot=c.n_boot,
    ) if present else {}
    effects = pd.read_parquet(ctx.run_dir / "eval" / "effects.parquet")
    cols = ["intervention", "eval_task", "effect", "ci_lo", "ci_hi", "control_effect"]
    return {"task_sets": present, "effects": effects[cols].round(4).to_dict(orient="records"),
            "cpu_seconds": {"removal": round(ev.cpu_seconds.get("removal", 0.0), 1),
                            **{k: v["cpu_seconds"] for k, v in analyses.items()}},
            "evaluations": {"removal": int(ev.evaluations.get("removal", 0)),
                            **{k: v["evaluations"] for k, v in analyses.items()}}}


def stage_steer(ctx: StageContext) -> dict[str, Any]:
    """Steer each task set over alphas, against the single-layer baseline chosen on validation.

    The baseline is difference-of-means steering at its best layer and strength, with bootstrap CIs.
    """
    from mmdiff.control.steering import run_steering

    c = ctx.config.control
    adapter, present, common = _control_common(ctx)
    run_steering(ctx.run_dir, adapter, get_records(ctx, c.test), get_records(ctx, c.validation),
                 tasks=present, alphas=tuple(c.alphas), positions=c.steer_positions, **common)
    df = pd.read_parquet(ctx.run_dir / "eval" / "steering.parquet")
    best = df[df["selected"]] if "selected" in df else df
    return {"selected": best[["method", "task", "alpha", "score"]].round(4).to_dict(orient="records")}


def concepts_layer(cfg: StudyConfig) -> int:
    return cfg.concepts.layer if cfg.concepts.layer is not None else cfg.layers[len(cfg.layers) // 2]


def stage_concepts(ctx: StageContext) -> dict[str, Any]:
    """Concept shift vectors: concepts of both models, matched, shifted, and steered.

    Concepts of the base LM (on captions) and of the VLM (on images) over the same records,
    Hungarian-matched and grounded in tokens (docs/method.md#concept-shift-vectors).
    """
    from mmdiff.concept_study import run_concept_shift

    c = ctx.config.concepts
    paths = run_concept_shift(get_adapter(ctx), get_records(ctx, c.dataset), concepts_layer(ctx.config),
                              ctx.run_dir, k=c.k, method=c.method, alphas=tuple(c.alphas),
                              seed=ctx.config.seed, batch_size=c.batch_size, progress=ctx.progress,
                              top_k=c.top_k, holdout=c.holdout)
    s = json.loads(paths["summary"].read_text())
    return {k: s[k] for k in ("mean_cosine", "mean_shifted_cosine", "steering_by_alpha") if k in s}


def stage_report(ctx: StageContext) -> dict[str, Any]:
    """The HTML report (report/index.html), rebuilt from whatever the run directory holds.

    It runs on every `mmdiff run` that reaches it (it takes seconds), so it is never stale; a stage
    that has not run gives a "not run" note. `mmdiff report RUN_DIR` rebuilds it alone.
    """
    from mmdiff.report.build import build_report

    return {"path": str(build_report(ctx.run_dir, ctx.config).relative_to(ctx.run_dir))}


STAGE_FUNCTIONS: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "capture": stage_capture,
    "train": stage_train,
    "stats": stage_stats,
    "diff": stage_diff,
    "detect": stage_detect,
    "attribute": stage_attribute,
    "interp": stage_interp,
    "ablate": stage_ablate,
    "concepts": stage_concepts,
    "steer": stage_steer,
    "report": stage_report,
}
"""Every stage a study can run, in order; `study_stages(cfg)` says which of them a config runs,
what each reads and what it writes."""


def _names(datasets: str | list[str] | None) -> list[str]:
    """A config's dataset, or datasets, or none, as a list of names."""
    return [] if datasets is None else [datasets] if isinstance(datasets, str) else list(datasets)


def study_stages(cfg: StudyConfig) -> list[Stage]:
    """The stages of a study, in the order they run."""

    def stage(name: str, outputs: list[str], **kw: Any) -> Stage:
        return Stage(name, STAGE_FUNCTIONS[name], outputs, **kw)

    analysis = _names(cfg.stats.dataset)
    stages = [
        stage("capture", [f"activations/{ds}/{side}" for ds in cfg.capture.datasets for side in cfg.capture.sides],
              distributed=True, config_key="capture", datasets=cfg.capture.datasets),
        stage("train", [f"saes/{r}" for r in ["base", *cfg.train.regimes]] + ["stats/sae_heldout.parquet"],
              distributed=True, datasets=[cfg.train.dataset, cfg.train.heldout],
              needs=["capture"] if cfg.train.dataset in cfg.capture.datasets else [], config_key="train"),
        stage("stats", ["stats/vision.parquet", "stats/text.parquet"], distributed=True, needs=["train"],
              config_key="stats", datasets=analysis),
        stage("diff", ["features/adapted.parquet", "stats/diff.parquet"], needs=["stats"], config_key="diff"),
        stage("detect", [f"features/{t}.parquet" for t in cfg.stats.tasks], needs=["stats", "diff"],
              config_key="detect"),
        stage("attribute", ["attribution/heads.parquet"], needs=["train", "stats", "detect"],
              config_key="attribution", datasets=analysis),
        stage("interp", ["interp/explanations.json", "interp/dashboards/index.html"],
              needs=["train", "stats", "diff", "detect", "attribute"], config_key="interp",
              datasets=[*analysis, *_names(cfg.interp.grounding)]),
        stage("ablate", ["eval/effects.parquet"], needs=["train", "stats", "detect"], config_key="control",
              datasets=[cfg.control.test, *(analysis if cfg.control.pipeline_ablation or cfg.control.categories else [])]),
    ]
    if cfg.concepts.enabled:
        stages.append(stage("concepts", ["concepts/matching.parquet", "concepts/steering.parquet"],
                            config_key="concepts", datasets=[cfg.concepts.dataset]))
    if cfg.control.validation is not None:
        stages.append(stage("steer", ["eval/steering.parquet"], needs=["train", "stats", "detect"],
                            config_key="control", datasets=[cfg.control.test, cfg.control.validation]))
    stages.append(stage("report", ["report/index.html"], always=True))
    return stages
