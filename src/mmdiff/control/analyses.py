"""The removal analyses beside the effects table: what part of a task set, and how much of it, carries the task.

Each analysis removes feature sets of a task and scores them, like the removal experiment, against
random features matched in layer and firing-frequency bin (split over records: record i under draw
i mod n_random), every effect with its 95% paired bootstrap interval, its MDE (80% power) and its
selectivity (treated minus the matched control per record, with its interval). Each evaluates only
the tasks it needs: the set's own task, general VQA (`general`) and a benign control (`benign`, a
task no set is about), and shares the clean pass and every removal already evaluated through one
`Evaluator`.

- `set_variants` (eval/set_variants.parquet): each set in full and its own features (the set
  minus every other task set), removed at each of `positions` side by side. A removal whose
  positions hold under LOW_MASS of the set's activation mass is "not testable" and not evaluated.
- `single_features` (eval/single_features.parquet): the top `top` features of each set by the
  ranking score, each removed alone.
- `dose_response` (eval/dose_response.parquet): the top 1, 2, 4, 8, ... features (and the whole
  set) removed together, against random sets of the same size and bins.
- `pipeline_ablation` (eval/pipeline_ablation.parquet): the features each stage of the selection
  pipeline would keep (contrastive firing only, + visual responsiveness, + lexical filter, + the
  adapted-feature filter = the task set), and random features, removed.

The ranking score (`rank_features`) is the one the features were selected on: delta_p, the rise of
the feature's firing frequency from the base split to the task split (mmdiff.detect), ties broken
by the larger odds ratio, then by (layer, feature).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmdiff.control.controls import (
    feature_pairs,
    features_by_layer,
    firing_frequencies,
    matched_random_features,
)
from mmdiff.control.evaluator import Evaluator, effect_columns
from mmdiff.control.outputs import write_table
from mmdiff.control.removal import LOW_MASS, SCORE_COLUMNS, mass_at_positions
from mmdiff.control.tasks import metric_name
from mmdiff.errors import ConfigError, DataError
from mmdiff.schema import Artifact, Column

EVALUATED, NOT_TESTABLE, EMPTY = "evaluated", "not testable", "empty"
TARGET, GENERAL, BENIGN, CATEGORY = "task", "general", "benign", "category"

_SET_COLUMNS = (
    Column("target_task", str, "the task whose features are removed"),
    Column("positions", str, "where the features are removed: text, image or all"),
    Column("n_features", int, "features removed"),
    Column("dims_share", float, "the largest share of a layer's residual dimensions removed: max over "
           "layers of (features removed at the layer / d_model)"),
    Column("mass_at_positions", float, "share of the set's activation mass (statistics split) at the "
           "removal positions; NaN without statistics or when the set never fired"),
    Column("status", str, "what the row is", kinds={
        EVALUATED: "removed and scored",
        NOT_TESTABLE: f"the removal positions hold under {LOW_MASS:.0%} of the set's activation mass: "
                      "not evaluated, it would touch (almost) nothing",
        EMPTY: "no features to remove",
    }),
)  # fmt: skip
_EFFECT_COLUMNS = (
    Column("eval_task", str, "the task evaluated"),
    Column("role", str, "what the eval task is to the set", kinds={
        TARGET: "the set's own task", GENERAL: "general VQA", BENIGN: "a benign control task no set is about",
        CATEGORY: "the records of the set's task in the feature's own category (single features)",
    }),
    *SCORE_COLUMNS,
    Column("control_effect", float, "the matched random features' effect (record i under draw i mod n_random)"),
    Column("control_ci_lo", float),
    Column("control_ci_hi", float),
    Column("selectivity", float, "effect minus the matched control's: mean per-record treated - control"),
    Column("selectivity_ci_lo", float, "its 95% paired bootstrap interval"),
    Column("selectivity_ci_hi", float),
    Column("mde", float, "minimum detectable effect at 80% power (evals.power.paired_mde)"),
    Column("n", int, "records"),
)  # fmt: skip

OWN, FULL = "own", "full"
SET_VARIANTS = Artifact(
    "eval/set_variants.parquet",
    "set_variants",
    doc="Each task set in full and its own features (minus every other set), removed at each position "
    "kind side by side, scored on its task, general VQA and a benign control.",
    columns=(
        Column("variant", str, "which features of the set", kinds={
            FULL: "the whole task set", OWN: "the set minus the features of every other task set",
        }),
        *_SET_COLUMNS, *_EFFECT_COLUMNS,
    ),
)  # fmt: skip
SINGLE_FEATURES = Artifact(
    "eval/single_features.parquet",
    "single_features",
    doc="The top features of each task set (by the ranking score), each removed alone.",
    columns=(
        Column("rank", int, "1 = the highest ranking score in its set"),
        Column("layer", int),
        Column("feature", int),
        Column("score", float, "the ranking score: delta_p (task minus base firing frequency)"),
        *_SET_COLUMNS, *_EFFECT_COLUMNS,
    ),
)  # fmt: skip
DOSE_RESPONSE = Artifact(
    "eval/dose_response.parquet",
    "dose_response",
    doc="The top k features of each task set removed together (k = 1, 2, 4, ... and the whole set), "
    "against random sets of the same size, layers and firing-frequency bins.",
    columns=_SET_COLUMNS + _EFFECT_COLUMNS,
)


def rank_features(table: pd.DataFrame) -> pd.DataFrame:
    """The features of a task table, best first, with their `score`: delta_p (the rise in firing
    frequency from the base split to the task split, what mmdiff.detect selected them on), ties
    broken by the larger odds ratio, then by (layer, feature). A table without delta_p keeps its
    order (score NaN)."""
    t = table.copy()
    t["score"] = t["delta_p"].astype(float) if "delta_p" in t else math.nan
    t["_or"] = t["odds_ratio"].astype(float) if "odds_ratio" in t else 0.0
    t["_order"] = np.arange(len(t))
    keys = ["score", "_or", "layer", "feature"] if "delta_p" in table else ["_order"]
    asc = [False, False, True, True] if "delta_p" in table else [True]
    t = t.sort_values(keys, ascending=asc, kind="stable").drop_duplicates(["layer", "feature"])
    t[["layer", "feature"]] = t[["layer", "feature"]].astype("int64")
    return t[["layer", "feature", "score"]].reset_index(drop=True)


def dose_sizes(n: int, most: int | None = None) -> list[int]:
    """1, 2, 4, ... below n, then n itself; capped at `most` (None: no cap)."""
    top = n if most is None else min(n, int(most))
    sizes, k = [], 1
    while k < top:
        sizes.append(k)
        k *= 2
    return sizes + [top] if top >= 1 else []


def eval_roles(
    target: str, tasks: Sequence[str], general: str | None, benign: str | None
) -> list[tuple[str, str]]:
    """[(role, eval task)]: the set's own task, general VQA and the benign control, those present."""
    out = []
    for role, name in ((TARGET, target), (GENERAL, general), (BENIGN, benign)):
        if name is not None and name in tasks and name not in [t for _, t in out]:
            out.append((role, name))
    return out


class SetRemover:
    """Removes feature sets through a shared Evaluator against matched random controls, one row
    per evaluated task (the columns _SET_COLUMNS + _EFFECT_COLUMNS)."""

    def __init__(
        self,
        evaluator: Evaluator,
        saes: Mapping[int, Any],
        stats: Any | None,
        *,
        exclude: pd.DataFrame | None = None,
        n_random: int = 3,
        seed: int = 0,
        n_bins: int = 10,
        n_boot: int = 2000,
        n_records: int | None = None,
        sae_key: str = "",
    ) -> None:
        if n_random < 1:
            raise ConfigError(f"n_random must be >= 1, got {n_random}")
        self.ev, self.saes, self.stats = evaluator, saes, stats
        self.exclude, self.n_random, self.seed, self.n_bins = exclude, n_random, seed, n_bins
        self.n_boot, self.n_records, self.sae_key = n_boot, n_records, sae_key
        self.d_sae = {int(L): int(s.W_dec.shape[0]) for L, s in saes.items()}
        self.d_model = {int(L): int(s.W_dec.shape[1]) for L, s in saes.items()}
        self.freqs = (
            firing_frequencies(stats, sorted(self.d_sae)) if stats is not None else None
        )

    def dims_share(self, pairs: pd.DataFrame) -> float:
        by = features_by_layer(pairs)
        return max((len(f) / self.d_model[L] for L, f in by.items()), default=0.0)

    def rows(
        self, pairs: pd.DataFrame, target: str, roles: Sequence[tuple[str, str]], positions: str, label: str
    ) -> list[dict[str, Any]]:
        pairs = feature_pairs(pairs)
        mass = (
            mass_at_positions(self.stats, pairs, positions) if self.stats is not None and len(pairs) else math.nan
        )
        head = {
            "target_task": target, "positions": positions, "n_features": len(pairs),
            "dims_share": self.dims_share(pairs), "mass_at_positions": mass,
        }  # fmt: skip
        status = EMPTY if pairs.empty else NOT_TESTABLE if mass < LOW_MASS else EVALUATED
        draws: list[pd.DataFrame] = []
        if status == EVALUATED:
            try:
                draws = [
                    feature_pairs(d)
                    for d in matched_random_features(
                        pairs, self.d_sae, self.freqs, n_draws=self.n_random, seed=self.seed,
                        n_bins=self.n_bins, exclude=self.exclude,
                    )
                ]  # fmt: skip
            except DataError:  # a set too large to match in some layer: no control, NaN selectivity
                draws = []
        out = []
        for role, tname in roles:
            task = self.ev.task(tname)
            row: dict[str, Any] = {**head, "status": status, "eval_task": tname, "role": role,
                                   "metric": metric_name(task, self.ev.yesno_metric)}  # fmt: skip
            if status == EVALUATED:
                kw = dict(sae_key=self.sae_key, n_records=self.n_records)
                clean = self.ev.clean(tname, self.n_records)
                treated = self.ev.scores(tname, self.saes, [pairs], positions, label=label, **kw)
                control = self.ev.scores(
                    tname, self.saes, draws, positions, label=f"random for {label}", **kw
                ) if draws else None
                row.update(effect_columns(treated, clean, control, n_boot=self.n_boot, seed=self.seed))
            else:
                row["n"] = self.ev.size(tname, self.n_records)
            out.append(row)
        return out


def own_features(sets: Mapping[str, pd.DataFrame], name: str) -> pd.DataFrame:
    """The features of set `name` that no other set holds."""
    others = [feature_pairs(p) for n, p in sets.items() if n != name]
    mine = feature_pairs(sets[name])
    if not others:
        return mine
    every = pd.concat(others, ignore_index=True).drop_duplicates()
    merged = mine.merge(every, on=["layer", "feature"], how="left", indicator=True)
    return merged.loc[merged["_merge"] == "left_only", ["layer", "feature"]].reset_index(drop=True)


def _frame(rows: list[dict[str, Any]], artifact: Artifact) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(artifact.names))


def set_variants(
    remover: SetRemover,
    sets: Mapping[str, pd.DataFrame],
    *,
    positions: Sequence[str] = ("text", "all"),
    general: str | None = "vqa",
    benign: str | None = "existence",
) -> pd.DataFrame:
    """SET_VARIANTS: each set in full and its own features, removed at each of `positions`."""
    rows = []
    for name, table in sets.items():
        roles = eval_roles(name, list(remover.ev.tasks), general, benign)
        for variant, pairs in ((FULL, feature_pairs(table)), (OWN, own_features(sets, name))):
            for pos in positions:
                for r in remover.rows(pairs, name, roles, pos, f"remove {variant} {name} at {pos}"):
                    rows.append({"variant": variant, **r})
    return _frame(rows, SET_VARIANTS)


def feature_categories(
    topk: pd.DataFrame, meta: Mapping[str, Mapping[str, Any]], key: str
) -> dict[tuple[int, int], str]:
    """{(layer, feature): its own category}: the commonest meta[key] among the distinct records of
    its top activating tokens (a stats topk table: layer, feature, record_id), ties by the smaller
    value; features whose top records carry no such key are left out."""
    out: dict[tuple[int, int], str] = {}
    for (layer, feature), g in topk.groupby(["layer", "feature"], sort=True):
        values = [str(meta[r][key]) for r in dict.fromkeys(g["record_id"].astype(str))
                  if r in meta and meta[r].get(key) is not None]  # fmt: skip
        if values:
            counts = pd.Series(values).value_counts()
            out[(int(layer), int(feature))] = min(counts.index[counts == counts.max()])
    return out


def category_task(ev: Evaluator, task: str, key: str, value: str) -> str | None:
    """The name of the evaluation task of `task`'s records whose meta[key] is `value`, added to the
    evaluator's tasks (None when fewer than 2 records of the task have it)."""
    import dataclasses

    name = f"{task} ({key}={value})"
    if name not in ev.tasks:
        recs = [r for r in ev.task(task).records if str((r.meta or {}).get(key)) == value]
        if len(recs) < 2:
            return None
        ev.tasks[name] = dataclasses.replace(ev.task(task), name=name, records=recs)
    return name


def single_features(
    remover: SetRemover,
    tables: Mapping[str, pd.DataFrame],
    *,
    top: int = 5,
    positions: str = "text",
    general: str | None = "vqa",
    benign: str | None = "existence",
    categories: Mapping[str, tuple[str, Mapping[tuple[int, int], str]]] | None = None,
) -> pd.DataFrame:
    """SINGLE_FEATURES: the `top` best-ranked features of each task table (`rank_features`), each
    removed alone and scored on its task, general VQA and the benign control, and, where
    `categories` gives {task: (meta key, {(layer, feature): category})}, on the records of its task
    in the feature's own category (`feature_categories`)."""
    rows = []
    for name, table in tables.items():
        roles = eval_roles(name, list(remover.ev.tasks), general, benign)
        key, own = (categories or {}).get(name, ("", {}))
        for rank, f in enumerate(rank_features(table).head(top).itertuples(), start=1):
            pair = pd.DataFrame({"layer": [int(f.layer)], "feature": [int(f.feature)]})
            label = f"remove {name} #{rank} L{int(f.layer)}/F{int(f.feature)}"
            value = own.get((int(f.layer), int(f.feature)))
            sub = category_task(remover.ev, name, key, value) if value is not None and name in remover.ev.tasks else None
            mine = [*roles, (CATEGORY, sub)] if sub is not None else roles
            for r in remover.rows(pair, name, mine, positions, label):
                rows.append({"rank": rank, "layer": int(f.layer), "feature": int(f.feature),
                             "score": float(f.score), **r})  # fmt: skip
    return _frame(rows, SINGLE_FEATURES)


def dose_response(
    remover: SetRemover,
    tables: Mapping[str, pd.DataFrame],
    *,
    most: int | None = None,
    positions: str = "text",
    general: str | None = "vqa",
) -> pd.DataFrame:
    """DOSE_RESPONSE: the top 1, 2, 4, ... features of each task table (`dose_sizes`, ranked by
    `rank_features`) removed together, on its task and general VQA."""
    rows = []
    for name, table in tables.items():
        ranked = rank_features(table)
        roles = eval_roles(name, list(remover.ev.tasks), general, None)
        for k in dose_sizes(len(ranked), most):
            rows += remover.rows(ranked.head(k), name, roles, positions, f"remove top {k} of {name}")
    return _frame(rows, DOSE_RESPONSE)


def write_analysis(df: pd.DataFrame, artifact: Artifact, out: str | Path, **extra: Any) -> dict[str, Path]:
    """out/<name>.parquet and out/<name>.json (the rows, plus `extra`: the settings and seconds)."""
    return write_table(df, artifact, out, extra=extra)


def _own_categories(
    run_dir: Path, sets: Mapping[str, Any], keys: Mapping[str, str] | None, records: Sequence[Any]
) -> dict[str, tuple[str, dict[tuple[int, int], str]]]:
    """{task: (meta key, each feature's own category)} for the tasks with a key and a topk table."""
    from mmdiff.stats import stats_paths

    meta = {str(r.id): dict(r.meta or {}) for r in records}
    out = {}
    for task, key in (keys or {}).items():
        path = stats_paths(run_dir / "stats", task).get("topk")
        if task in sets and meta and path is not None and path.is_file():
            out[task] = (key, feature_categories(pd.read_parquet(path), meta, key))
    return out


def run_analyses(
    run_dir: str | Path,
    evaluator: Evaluator,
    *,
    tasks: Sequence[str] | None = None,
    role: str = "text",
    stats_split: str | None = "vqa",
    out: str | Path | None = None,
    positions: str = "text",
    variant_positions: Sequence[str] = ("text", "all"),
    single_top: int = 5,
    dose: bool = True,
    dose_max: int | None = None,
    pipeline: bool = True,
    regime: Callable[[], tuple[Mapping[int, Any], Any, Mapping[str, pd.DataFrame]] | None] | None = None,
    categories: Mapping[str, str] | None = None,
    category_records: Sequence[Any] = (),
    general: str | None = "vqa",
    benign: str | None = "existence",
    n_records: int | None = None,
    n_random: int = 3,
    seed: int = 0,
    n_bins: int = 10,
    n_boot: int = 2000,
) -> dict[str, dict[str, Any]]:
    """Pipeline stage part: the analyses of a run's task sets, written to out (run_dir/eval).

    Reads what `run_removal` reads (the task tables, the role's SAEs, the statistics). `positions`:
    where single features, dose steps and pipeline-step sets are removed; `variant_positions`: the
    position kinds the set variants compare (empty: no variants); single_top 0, dose False or
    pipeline False turns those off (the pipeline ablation also needs stats/detect_<task>.parquet).
    `categories`: {task: the record meta key of its categories}; a single feature's own category is
    read off its top activating records in stats/<task>.topk.parquet, looked up in
    `category_records` (the statistics' records). `regime`: a function giving the random-regime SAEs, their statistics and {task: the features
    the rule keeps on them} (or None), called within the pipeline ablation, whose seconds include it.
    Returns {analysis: {"paths", "cpu_seconds", "evaluations"}}, the seconds being the CPU time of
    the evaluations the analysis ran that no earlier one had (the clean pass is the removal's).
    """
    from mmdiff.control.inputs import load_removal_inputs

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "eval"
    sets, saes, stats = load_removal_inputs(run_dir, evaluator.adapter, tasks, role, stats_split)
    tables = {n: pd.read_parquet(run_dir / "features" / f"{n}.parquet") for n in sets}  # with delta_p
    every = pd.concat(list(sets.values()), ignore_index=True) if sets else None
    remover = SetRemover(evaluator, saes, stats, exclude=every, n_random=n_random, seed=seed,
                         n_bins=n_bins, n_boot=n_boot, n_records=n_records)  # fmt: skip
    settings = {"role": role, "stats_split": stats_split, "n_random": n_random, "seed": seed,
                "n_bins": n_bins, "n_boot": n_boot, "n_records": n_records, "general": general,
                "benign": benign, "control_records": "split", "low_mass": LOW_MASS}  # fmt: skip
    jobs = []
    if variant_positions and sets:
        jobs.append(("set_variants", SET_VARIANTS, {"positions": list(variant_positions)},
                     lambda: set_variants(remover, sets, positions=variant_positions, general=general,
                                          benign=benign)))  # fmt: skip
    if single_top > 0 and sets:
        jobs.append(("single_features", SINGLE_FEATURES, {"positions": positions, "top": single_top,
                     "score": "delta_p (task minus base firing frequency), ties by odds ratio"},
                     lambda: single_features(remover, tables, top=single_top, positions=positions,
                                             general=general, benign=benign,
                                             categories=_own_categories(run_dir, sets, categories, category_records))))  # fmt: skip
    if dose and sets:
        jobs.append(("dose_response", DOSE_RESPONSE, {"positions": positions, "most": dose_max,
                     "score": "delta_p (task minus base firing frequency), ties by odds ratio"},
                     lambda: dose_response(remover, tables, most=dose_max, positions=positions,
                                           general=general)))  # fmt: skip
    if pipeline and sets:
        from mmdiff.detect import DETECT

        detect = {n: DETECT.path_in(run_dir, task=n) for n in sets}
        detect = {n: pd.read_parquet(p) for n, p in detect.items() if p.is_file()}
        if detect:
            def pipeline_job() -> pd.DataFrame:
                start, other = time.process_time(), None
                got = regime() if regime is not None else None
                evaluator.cpu_seconds["pipeline_ablation"] += time.process_time() - start
                if got is not None:
                    r_saes, r_stats, r_sets = got
                    r_every = pd.concat([feature_pairs(t) for t in r_sets.values()], ignore_index=True)
                    other = (SetRemover(evaluator, r_saes, r_stats, exclude=r_every, n_random=n_random, seed=seed,
                                        n_bins=n_bins, n_boot=n_boot, n_records=n_records, sae_key="random"),
                             r_sets)  # fmt: skip
                return pipeline_ablation(remover, detect, positions=positions, general=general, regime=other)

            jobs.append(("pipeline_ablation", PIPELINE_ABLATION, {"positions": positions,
                         "steps": [[n, c, w] for n, c, w in PIPELINE_STEPS], "random_regime": regime is not None},
                         pipeline_job))  # fmt: skip
    done: dict[str, dict[str, Any]] = {}
    for name, artifact, extra, compute in jobs:
        with evaluator.charged_to(name):
            df = compute()
        seconds = round(float(evaluator.cpu_seconds.get(name, 0.0)), 1)
        paths = write_analysis(df, artifact, out, settings={**settings, **extra}, cpu_seconds=seconds,
                               evaluations=int(evaluator.evaluations.get(name, 0)))  # fmt: skip
        done[name] = {"paths": paths, "cpu_seconds": seconds,
                      "evaluations": int(evaluator.evaluations.get(name, 0))}  # fmt: skip
    return done


# ------------------------------------------------------------------------------ pipeline ablation
RANDOM_SEL, REGIME = "random", "random-regime SAE"
CONTRASTIVE, VISUAL, LEXICAL, ADAPTED = "contrastive", "+ visual", "+ lexical", "+ adapted"
PIPELINE_STEPS: tuple[tuple[str, str | None, str], ...] = (
    (CONTRASTIVE, "candidate", "contrastive firing only: delta_p, odds ratio and BH q-value pass"),
    (VISUAL, "neutral_image_dominated", "+ visual responsiveness: image tokens hold at least min_image_share "
     "of the activation mass on the neutral re-run"),
    (LEXICAL, "neutral_active", "+ the lexical filter: still fires with the neutral instruction"),
    (ADAPTED, "in_adapted_set", "+ the adapted-feature filter: in the adapted set (= the full pipeline)"),
)  # fmt: skip
"""(selection, the detect table's column it adds, what it is): each step keeps the previous step's
features that also pass its column; a column that is NA for every feature (a filter the study did not
run for the task, e.g. no neutral re-run) is not applied."""

PIPELINE_ABLATION = Artifact(
    "eval/pipeline_ablation.parquet",
    "pipeline_ablation",
    doc="The features each step of the selection pipeline keeps, and random features, removed; "
    "scored on the task and general VQA.",
    columns=(
        Column("selection", str, "which features", kinds={
            RANDOM_SEL: "random features matched in layer and firing-frequency bin to the full pipeline's set",
            REGIME: "the same rule (contrastive firing, visual responsiveness, lexical filter; no adapted-feature "
                    "filter: the regime is not adapted from the base SAE) on the SAE trained from scratch on "
                    "VLM activations (the `random` regime), its features removed from its own decoder",
            **{name: what for name, _, what in PIPELINE_STEPS},
        }),
        Column("step", int, "0 = random, 1 = the random-regime SAE, then the pipeline's steps in order"),
        Column("applied", bool, "False when the step's filter was not run for this task (same set as the step before)"),
        *_SET_COLUMNS, *_EFFECT_COLUMNS,
    ),
)  # fmt: skip


def pipeline_sets(scores: pd.DataFrame) -> list[tuple[str, bool, pd.DataFrame]]:
    """[(selection, applied, its (layer, feature) set)] of one task's detect table (every feature's
    scores, stats/detect_<task>.parquet), one per PIPELINE_STEPS step."""
    keep = pd.Series(True, index=scores.index)
    out = []
    for name, column, _ in PIPELINE_STEPS:
        applied = column in scores and scores[column].notna().any()
        if applied:
            keep &= scores[column].astype("boolean").fillna(False).astype(bool)
        out.append((name, bool(applied), feature_pairs(scores.loc[keep, ["layer", "feature"]])))
    return out


def regime_task_sets(
    tasks: Mapping[str, Any], base: Any, neutral: Mapping[str, Any], **detect: Any
) -> dict[str, pd.DataFrame]:
    """The selection rule without the adapted-feature filter (mmdiff.detect.task_features with
    adapted=None) on another SAE's statistics: {task: its kept features, with delta_p}. `tasks`:
    {task: FeatureStats of the task split}; `neutral`: {task: neutral re-run's FeatureStats}."""
    from mmdiff.detect import task_features

    out = {}
    for name, st in tasks.items():
        df = task_features(st, base, adapted=None, neutral=neutral.get(name), task_name=name, **detect)
        out[name] = df[df["kept"]].reset_index(drop=True)
    return out


def _random_row(r: dict[str, Any], selection: str, step: int) -> dict[str, Any]:
    """A row of the matched random features, from a removal row's control columns."""
    return {
        **r, "selection": selection, "step": step, "applied": True,
        "treated": r["baseline"] + r["control_effect"] if r["status"] == EVALUATED else math.nan,
        "effect": r["control_effect"], "ci_lo": r["control_ci_lo"], "ci_hi": r["control_ci_hi"],
        "selectivity": math.nan, "selectivity_ci_lo": math.nan, "selectivity_ci_hi": math.nan, "mde": math.nan,
    }  # fmt: skip


def pipeline_ablation(
    remover: SetRemover,
    scores: Mapping[str, pd.DataFrame],
    *,
    positions: str = "text",
    general: str | None = "vqa",
    regime: tuple[SetRemover, Mapping[str, pd.DataFrame]] | None = None,
) -> pd.DataFrame:
    """PIPELINE_ABLATION: for each task's detect table, the features each pipeline step keeps
    removed, (step 0) random features matched to the last step's set, and (step 1, with `regime`:
    its remover over the random-regime SAEs and {task: the features its rule keeps}) the random
    regime's features, each on its task and general VQA. The random row's effect is the last
    step's matched control (record i under draw i mod n_random), so it costs nothing more; its own
    selectivity is NaN."""
    rows = []
    for name, table in scores.items():
        roles = eval_roles(name, list(remover.ev.tasks), general, None)
        steps = pipeline_sets(table)
        mine = [
            {"selection": selection, "step": i, "applied": applied, **r}
            for i, (selection, applied, pairs) in enumerate(steps, start=2)
            for r in remover.rows(pairs, name, roles, positions, f"remove {name} ({selection})")
        ]
        rows += [_random_row(r, RANDOM_SEL, 0) for r in (mine[-len(roles):] if roles else [])]
        if regime is not None and name in regime[1]:
            other, sets = regime
            rows += [
                {"selection": REGIME, "step": 1, "applied": True, **r}
                for r in other.rows(sets[name], name, roles, positions, f"remove {name} ({REGIME})")
            ]
        rows += mine
    return _frame(rows, PIPELINE_ABLATION)
