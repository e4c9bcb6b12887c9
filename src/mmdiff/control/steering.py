"""Steering along task features against the single-layer baseline (docs/method.md#steering).

- Feature steering: at each feature's own layer, y <- y + alpha * s * v, v the feature's unit decoder
  direction and s its typical maximum activation, in residual-stream units
  (s = typical max code * ||W_dec f|| / norm_scale). All features of the set steer at once.
- Single-layer baseline (CAA): y <- y + alpha * (mean of task-positive prompts - mean of
  task-negative prompts) at one layer, pooled at the last prompt token.

Model selection is honest: the baseline's layer and alpha, and feature steering's alpha, are chosen
on the validation split (maximising the task score, or minimising it for goal="min", e.g. the
attack success rate); both sweeps are reported on the test split with 95% bootstrap intervals, and
the `selected` column marks the validation choices. Alphas of both signs are swept: steering can
push a score (the ASR included) up or down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from mmdiff.control.outputs import write_table
from mmdiff.control._evaluate import (
    check_positions,
    check_yesno_metric,
    evaluate_under,
    progress_bar,
    record_scores,
)
from mmdiff.control.controls import feature_pairs, features_by_layer
from mmdiff.control.tasks import metric_name
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError, DataError
from mmdiff.bootstrap import bootstrap_mean, paired_effect
from mmdiff.evals.harness import EvalTask
from mmdiff.evals.reuse import BatchReuse
from mmdiff.interventions import difference_of_means, steer_features, steer_vector
from mmdiff.schema import Artifact, Column
from mmdiff.stats import top_examples

FEATURE, SINGLE_LAYER = "feature", "single_layer"
STEERING = Artifact(
    "eval/steering.parquet",
    "steering_experiment",
    doc="One row per (method, layer, alpha, split) tried; the validation choices marked `selected`.",
    columns=(
        Column("method", str, "what steered", kinds={
            FEATURE: "feature steering: alpha * s * v at each feature's own layer",
            SINGLE_LAYER: "the single-layer baseline (CAA): alpha * difference of means at one layer",
        }),
        Column("task", str, "the task steered and scored"),
        Column("alpha", float, "steering strength"),
        Column("score", float, "mean task score"),
        Column("ci_lo", float, "95% bootstrap interval of the score"),
        Column("ci_hi", float),
        Column("layer", int, "the baseline's layer; NA for feature steering", default=pd.NA),
        Column("split", str, "validation or test (older tables: every row a test row)", default="test"),
        Column("metric", str, "the task's metric", default=None),
        Column("selected", bool, "the validation-chosen setting of its method", default=False),
        Column("n", int, "records", default=pd.NA),
    ),
)  # fmt: skip
DEFAULT_ALPHAS: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
SELECTION_NOTE = (
    "alpha of feature steering, and layer and alpha of the single-layer baseline, chosen on the "
    "validation split; all scores reported on the test split"
)


def typical_max_activation(
    stats: Any, layer: int, features: Sequence[int], how: str = "topk_mean"
) -> np.ndarray:
    """[len(features)] each feature's typical maximum code from FeatureStats.

    how: "topk_mean" (mean of the top-k activating tokens kept by the statistics: a maximum that
    one outlier token cannot dominate), "max", or "quantile:<q>" (e.g. "quantile:0.99", from the
    log histogram). A feature that never fired gets 0 (steering along it adds nothing).
    """
    feats = np.asarray(list(features), dtype=np.int64)
    if how == "max":
        return stats.max_activation(layer).numpy()[feats]
    if how == "topk_mean":
        top = top_examples(stats, layer)
        means = top.groupby("feature")["value"].mean()
        return np.array([float(means.get(int(f), 0.0)) for f in feats], dtype=np.float64)
    if how.startswith("quantile:"):
        try:
            q = float(how.split(":", 1)[1])
        except ValueError as exc:
            raise ConfigError(
                f"scale {how!r}: expected 'quantile:<level>', e.g. 'quantile:0.99'"
            ) from exc
        values = stats.quantiles(layer, [q])[0].numpy()[feats]
        return np.nan_to_num(values, nan=0.0)
    raise ConfigError(f"scale must be 'topk_mean', 'max' or 'quantile:<q>'; got {how!r}")


def feature_steering_terms(
    saes: Mapping[int, Any],
    task_set: pd.DataFrame,
    stats: Any | None,
    *,
    scale: str = "topk_mean",
    scales: Mapping[tuple[int, int], float] | None = None,
) -> dict[int, list[tuple[torch.Tensor, float]]]:
    """{layer: [(decoder row [d_model], s in residual units), ...]} for `steer_features`.

    s = typical max code (from `scales` {(layer, feature): value} when given, else from `stats`)
    times ||W_dec f|| / the SAE's norm_scale: the size of the feature's contribution at its maximum.
    """
    terms: dict[int, list[tuple[torch.Tensor, float]]] = {}
    for layer, feats in features_by_layer(task_set).items():
        if layer not in saes:
            raise DataError(
                f"the task set has features at layer {layer} but no SAE was given for it (layers {sorted(saes)})"
            )
        sae = saes[layer]
        w_dec = sae.W_dec.detach()  # [d_sae, d_model]
        if max(feats) >= w_dec.shape[0]:
            raise DataError(
                f"layer {layer}: feature {max(feats)} does not exist in an SAE of {w_dec.shape[0]} features"
            )
        if scales is not None:
            missing = [(layer, f) for f in feats if (layer, f) not in scales]
            if missing:
                raise ConfigError(
                    f"scales lacks features {missing[:5]}; give a typical max activation for each"
                )
            codes = np.array([float(scales[(layer, f)]) for f in feats])
        elif stats is not None:
            codes = typical_max_activation(stats, layer, feats, scale)
        else:
            raise ConfigError(
                "feature steering needs each feature's typical max activation: pass stats (FeatureStats) or scales"
            )
        norm_scale = float(getattr(getattr(sae, "cfg", None), "norm_scale", 1.0))
        rows = []
        for f, code in zip(feats, codes):
            row = w_dec[f].to("cpu", torch.float64)
            rows.append((row, float(code) * float(row.norm()) / norm_scale))
        terms[layer] = rows
    return terms


def _batches(
    adapter: Any, records: Sequence[Record], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Model-input dicts (with "token_types") of the records, for `difference_of_means`."""
    out = []
    for i in range(0, len(records), batch_size):
        inputs = dict(adapter.vlm_inputs(list(records[i : i + batch_size])))
        inputs["token_types"] = adapter.token_types(inputs, "vlm")
        out.append(inputs)
    return out


def _pick(rows: list[dict[str, Any]], goal: str) -> dict[str, Any]:
    """The best validation row: highest (goal "max") or lowest score; ties to the smallest |alpha|, then layer."""
    sign = -1.0 if goal == "max" else 1.0
    return min(
        rows,
        key=lambda r: (
            sign * r["score"],
            abs(r["alpha"]),
            r["layer"] if r["layer"] is not None else -1,
        ),
    )


def steering_experiment(
    adapter: Any,
    saes: Mapping[int, Any],
    task_set: pd.DataFrame,
    test: EvalTask,
    validation: EvalTask,
    stats: Any | None,
    *,
    positive_records: Sequence[Record],
    negative_records: Sequence[Record],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    baseline_alphas: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    scale: str = "topk_mean",
    scales: Mapping[tuple[int, int], float] | None = None,
    positions: Literal["text", "image", "all"] = "all",
    goal: Literal["max", "min"] = "max",
    yesno_metric: str = "accuracy",
    n_boot: int = 2000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    reuse: BatchReuse | None = None,
) -> pd.DataFrame:
    """The steering table of one task: feature steering and the single-layer baseline over `alphas`.

    test / validation: the target task on each split. positive_records / negative_records:
    task-positive and task-negative prompts for the baseline's difference of means (take them from
    the validation or training split, never from test). layers: the baseline's candidate layers
    (default: the layers of `saes`). baseline_alphas: the baseline's grid (default: `alphas`); its
    vector is the raw difference of means (residual units, like s * v), whose norm can differ from
    the features' scales, so widen its grid when the attrs' caa_vector_norms are small.
    Columns STEERING: validation rows for every (method,
    layer, alpha) tried, test rows for the feature sweep and for the baseline at its chosen layer;
    `layer` is empty (NA) for feature steering, whose features sit at their own layers.
    `df.attrs["steering"]` holds the choices and the paired test difference feature - baseline.
    Every alpha of 0 (either method, any layer) is the unsteered model: it is evaluated once per
    split. `reuse`: batches' inputs and image features kept across the sweep (one is made if None).
    """
    check_positions(positions)
    check_yesno_metric(yesno_metric)
    if goal not in ("max", "min"):
        raise ConfigError(f"goal must be 'max' or 'min', got {goal!r}")
    alphas = [float(a) for a in alphas]
    b_alphas = alphas if baseline_alphas is None else [float(a) for a in baseline_alphas]
    for name, grid in (("alphas", alphas), ("baseline_alphas", b_alphas)):
        if not grid or len(set(grid)) != len(grid):
            raise ConfigError(f"{name} must be a non-empty list of distinct numbers, got {grid}")
    if not positive_records or not negative_records:
        raise DataError(
            f"the single-layer baseline needs task-positive and task-negative prompts; got "
            f"{len(positive_records)} positive and {len(negative_records)} negative records"
        )
    for split, task in (("test", test), ("validation", validation)):
        if not task.records:
            raise DataError(f"the {split} task {task.name!r} has no records")
    pairs = feature_pairs(task_set, f"task set of {test.name!r}")
    terms = feature_steering_terms(saes, pairs, stats, scale=scale, scales=scales)
    backbone = adapter.backbone(test.side)
    cand_layers = sorted({int(L) for L in (layers if layers is not None else saes)})
    if not cand_layers:
        raise ConfigError("the single-layer baseline needs at least one candidate layer")
    backbone.check_layers(cand_layers)
    metric = metric_name(test, yesno_metric)
    reuse = reuse if reuse is not None else BatchReuse(adapter)

    def feature_build(alpha: float):
        return lambda bb, tt: steer_features(bb, terms, alpha, positions=positions, token_types=tt)

    def layer_build(layer: int, vector: torch.Tensor, alpha: float):
        return lambda bb, tt: steer_vector(
            bb, layer, vector, alpha, positions=positions, token_types=tt
        )

    rows: list[dict[str, Any]] = []
    per_record: dict[tuple, np.ndarray] = {}
    n_evals = 2 * len(alphas) + len(cand_layers) * len(b_alphas) + len(b_alphas)
    with progress_bar(progress) as bar:
        overall = bar.add_task(f"steering {test.name}", total=n_evals + 2 * len(cand_layers))

        clean: dict[str, np.ndarray] = {}  # split -> per-record scores of the unsteered model

        def score(task: EvalTask, build, key: tuple, label: str) -> dict[str, Any]:
            split, alpha = key[-1], key[-2]
            if alpha == 0.0 and split in clean:  # adds 0 at every position: the clean model, scored once
                values = clean[split]
            else:
                res = evaluate_under(
                    adapter, task, None if alpha == 0.0 else build, positions, batch_size=batch_size,
                    bar=bar, description=label, reuse=reuse,
                )
                values = np.asarray(record_scores(res, yesno_metric), dtype=np.float64)
                if alpha == 0.0:
                    clean[split] = values
            per_record[key] = values
            iv = bootstrap_mean(values, n_boot=n_boot, seed=seed)
            bar.advance(overall)
            return {"score": iv.mean, "ci_lo": iv.lo, "ci_hi": iv.hi, "n": iv.n}

        def add(
            method: str, alpha: float, layer: int | None, split: str, result: dict[str, Any]
        ) -> dict[str, Any]:
            row = {
                "method": method,
                "task": test.name,
                "alpha": alpha,
                "layer": layer,
                "split": split,
                "metric": metric,
                "selected": False,
                **result,
            }
            rows.append(row)
            return row

        feat_val = [
            add(
                FEATURE,
                a,
                None,
                "validation",
                score(
                    validation,
                    feature_build(a),
                    ("feature", a, "validation"),
                    f"feature steering a={a:g} (validation)",
                ),
            )
            for a in alphas
        ]
        vectors = {}
        positive = _batches(adapter, positive_records, batch_size)
        negative = _batches(adapter, negative_records, batch_size)
        for L in cand_layers:
            vectors[L] = difference_of_means(
                backbone, positive, negative, L, "last", progress=False
            )  # [d_model]
            bar.advance(overall, 2)
        base_val = [
            add(
                SINGLE_LAYER,
                a,
                L,
                "validation",
                score(
                    validation,
                    layer_build(L, vectors[L], a),
                    ("single_layer", L, a, "validation"),
                    f"layer {L} steering a={a:g} (validation)",
                ),
            )
            for L in cand_layers
            for a in b_alphas
        ]
        best_feat, best_base = _pick(feat_val, goal), _pick(base_val, goal)
        chosen_layer = int(best_base["layer"])
        for a in alphas:
            row = add(
                FEATURE,
                a,
                None,
                "test",
                score(test, feature_build(a), ("feature", a, "test"), f"feature steering a={a:g}"),
            )
            row["selected"] = a == best_feat["alpha"]
        for a in b_alphas:
            row = add(
                SINGLE_LAYER,
                a,
                chosen_layer,
                "test",
                score(
                    test,
                    layer_build(chosen_layer, vectors[chosen_layer], a),
                    ("single_layer", chosen_layer, a, "test"),
                    f"layer {chosen_layer} steering a={a:g}",
                ),
            )
            row["selected"] = a == best_base["alpha"]
    df = pd.DataFrame(rows, columns=list(STEERING.names))
    df["layer"] = df["layer"].astype("Int64")
    diff = paired_effect(
        per_record[("feature", best_feat["alpha"], "test")],
        per_record[("single_layer", chosen_layer, best_base["alpha"], "test")],
        n_boot=n_boot,
        seed=seed,
    )
    df.attrs["steering"] = {
        test.name: {
            "selection": SELECTION_NOTE,
            "goal": goal,
            "metric": metric,
            "positions": positions,
            "scale": "given" if scales is not None else scale,
            "feature_alpha": best_feat["alpha"],
            "baseline_layer": chosen_layer,
            "baseline_alpha": best_base["alpha"],
            "feature_minus_baseline_test": diff.as_dict(),
            "n_features": len(pairs),
            "n_features_never_fired": int(
                sum(s == 0.0 for rows_ in terms.values() for _, s in rows_)
            ),
            "caa_vector_norms": {int(L): float(v.norm()) for L, v in vectors.items()},
        }
    }
    return df


def write_steering(steering: pd.DataFrame, out: str | Path) -> dict[str, Path]:
    """out/steering.parquet and out/steering.json (the rows, the selection and the paired differences)."""
    extra = {"selection": SELECTION_NOTE, "summary": steering.attrs.get("steering", {})}
    return write_table(steering, STEERING, out, extra=extra)


def run_steering(
    run_dir: str | Path,
    adapter: Any,
    test_records: Sequence[Record],
    validation_records: Sequence[Record],
    *,
    tasks: Sequence[str] | None = None,
    role: str = "text",
    stats_split: str | None = "vqa",
    out: str | Path | None = None,
    safety_judge: Any = None,
    goals: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> dict[str, Path]:
    """Pipeline stage / `mmdiff steer`: the steering sweep of every task set, written to out (run_dir/eval).

    For each task set run_dir/features/<task>.parquet (`tasks`, default all) whose task exists in
    both splits (`study_eval_tasks` of test_records and validation_records): feature steering with
    the SAEs run_dir/saes/<role>/layer_<L>/ and the scales of run_dir/stats/<stats_split>, against
    the single-layer baseline whose positive prompts are the task's validation records and whose
    negative prompts are the other validation tasks' records. goals: {task: "max" | "min"}
    (default "min" for safety, the attack success rate, else "max"). Other keyword arguments go to
    `steering_experiment`. Writes steering.parquet and steering.json.
    """
    from mmdiff.control.inputs import check_stats_fit, load_role_saes, load_stats, load_task_sets
    from mmdiff.control.tasks import study_eval_tasks

    run_dir = Path(run_dir)
    test_tasks = study_eval_tasks(list(test_records), safety_judge=safety_judge)
    val_tasks = study_eval_tasks(list(validation_records), safety_judge=safety_judge)
    task_sets = load_task_sets(run_dir, tasks)
    runnable = [n for n in task_sets if n in test_tasks and n in val_tasks]
    skipped = sorted(set(task_sets) - set(runnable))
    if tasks is not None and skipped:
        raise DataError(
            f"task sets {skipped} have no evaluation task in both splits (test: {sorted(test_tasks)}, "
            f"validation: {sorted(val_tasks)}); give records of those tasks"
        )
    if not runnable:
        raise DataError(
            f"no task set {sorted(task_sets)} matches an evaluation task of both splits (test: {sorted(test_tasks)})"
        )
    backbone = adapter.backbone("vlm")
    layers = {int(L) for n in runnable for L in task_sets[n]["layer"].unique()}
    layers |= {int(L) for L in kwargs.get("layers") or []}
    saes = load_role_saes(run_dir, role, layers, d_in=backbone.d_model, device=backbone.device)
    stats = None
    if stats_split is not None:
        stats = load_stats(run_dir, stats_split)
        check_stats_fit(stats, saes)
    frames, summary = [], {}
    for name in runnable:
        negative = [r for t, task in val_tasks.items() if t != name for r in task.records]
        goal = (goals or {}).get(name, "min" if name == "safety" else "max")
        df = steering_experiment(
            adapter,
            saes,
            task_sets[name],
            test_tasks[name],
            val_tasks[name],
            stats,
            positive_records=val_tasks[name].records,
            negative_records=negative,
            goal=goal,
            **kwargs,  # type: ignore[arg-type]
        )
        frames.append(df)
        summary.update(df.attrs.get("steering", {}))
    table = pd.concat(frames, ignore_index=True)
    table.attrs["steering"] = {
        **summary,
        "skipped_task_sets": skipped,
        "role": role,
        "stats_split": stats_split,
    }
    return write_steering(table, run_dir / "eval" if out is None else out)
