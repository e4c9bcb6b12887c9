"""Which of the seed paper's findings a run reproduces, each computed from the run's artifacts.

`findings(run_dir)` returns one `Finding` per claim of the MMDiff and spatial-features papers (docs/method.md#papers) with the
measured number beside the claim and one of four states: reproduced, not reproduced, not measured
(the artifact it needs is missing, empty or unreadable; `detail` says which), not testable (the run
cannot speak to the claim: the clean model scores no better on the task than one constant answer,
so removing features cannot show that they carried it). The criterion of each state is written
into the finding, so the report shows how it was decided.

How the tables of `mmdiff.control` (eval/effects.parquet, eval/steering.parquet and .json) are read,
each through its one schema (`control.removal.EFFECTS`, `control.steering.STEERING`):
- rows are told apart by their `kind`, never by their label: "removal" rows remove the target
  task's own set; "control_mismatched" rows remove another task's set and serve as a control of
  their target task's rows; any other kind is shown in the report but not judged (tables written
  before the `kind` column get it derived once, by the schema's reader);
- a task's own behaviour is the eval_task equal to the task ("spatial", "ocr", "safety"), else its
  variants ("spatial_open", "spatial (relation-matched)"); general VQA is any eval_task starting
  with "vqa"; accuracy-like metrics are preferred, the safety task's is the attack success rate;
- steering compares test-split scores at the validation-chosen settings (`selected`), with the
  paired difference of eval/steering.json when it is there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mmdiff.attribution.frames import HEADS
from mmdiff.control.analyses import (
    ADAPTED,
    CONTRASTIVE,
    DOSE_RESPONSE,
    GENERAL,
    OWN,
    PIPELINE_ABLATION,
    SET_VARIANTS,
    SINGLE_FEATURES,
    TARGET,
)
from mmdiff.control.removal import CONTROL_MISMATCHED, EFFECTS, LOW_MASS, REMOVAL
from mmdiff.control.steering import FEATURE, SINGLE_LAYER, STEERING
from mmdiff.diff import ADAPTED_PER_LAYER, DIFF
from mmdiff.report.sections._common import guarded
from mmdiff.report.sections.control import at_floor, chosen_per_method

Status = Literal["reproduced", "not reproduced", "not measured", "not testable"]
REPRODUCED: Status = "reproduced"
NOT_REPRODUCED: Status = "not reproduced"
NOT_MEASURED: Status = "not measured"
NOT_TESTABLE: Status = "not testable"
STATUSES: tuple[Status, ...] = (REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE, NOT_MEASURED)

ADAPTED_SHARE_CLAIM = 0.05  # "under 5% of all features"
HEAD_TOP_FRACTION = 0.1  # "a few heads": the top 10% of heads by |score| ...
HEAD_CONCENTRATION = 0.5  # ... hold at least half of the total |score|
MID_DEPTH = (
    1 / 3,
    1.0,
)  # "mid-to-deep layers": relative depth layer / (n_layers - 1) in this range


@dataclass(frozen=True)
class Finding:
    """One seed claim and what this run measured for it."""

    key: str
    claim: str  # the seed's claim, in words
    seed: str  # the seed's number
    measured: str  # this run's number, formatted ("–" when not measured)
    status: Status
    criterion: str  # how the status is decided
    detail: str = ""  # the numbers behind it, or why it was not measured
    source: str = ""  # the artifacts it was computed from, relative to the run directory
    value: float | None = None  # the headline measured number, for machines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct_points(x: float) -> str:
    return f"{100 * x:+.1f} pts"


# ------------------------------------------------------------------------------------ adapted share


def adapted_share(run_dir: Path) -> Finding:
    claim = "The adapted set is a small share of all features (under 5%)."
    crit = (
        f"reproduced when adapted features / all features of all layers < {ADAPTED_SHARE_CLAIM:.0%}"
    )
    base = {"key": "adapted_share", "claim": claim, "seed": "< 5% of features", "criterion": crit}
    n = n_sel = None
    source, attrs = "", {}
    diff, why = DIFF.read(run_dir)[:2]
    if diff is not None and len(diff):
        n, n_sel, source, attrs = (
            len(diff),
            int(diff["selected"].astype(bool).sum()),
            DIFF.rel(),
            diff.attrs,
        )
    else:
        why = why or f"{DIFF.rel()} has no rows"
        per_layer, why2 = ADAPTED_PER_LAYER.read(run_dir)[:2]
        if per_layer is not None and len(per_layer):
            n, n_sel = int(per_layer["n_features"].sum()), int(per_layer["n_adapted"].sum())
            source = ADAPTED_PER_LAYER.rel()
        else:
            why = f"{why}; {why2 or ADAPTED_PER_LAYER.rel() + ' has no rows'}"
    if not n:
        return Finding(measured="–", status=NOT_MEASURED, detail=why, **base)
    share = n_sel / n
    detail = f"{n_sel:,} of {n:,} features."
    if "p_gap" in attrs and "p_cos" in attrs:
        detail += (
            f" With p_gap = {attrs['p_gap']:g} and p_cos = {attrs['p_cos']:g} the two-stage selection keeps "
            f"about p_gap x p_cos = {attrs['p_gap'] * attrs['p_cos']:.1%} by construction, so this share "
            "follows from the thresholds rather than from the model."
        )
    return Finding(
        measured=f"{share:.2%}",
        status=REPRODUCED if share < ADAPTED_SHARE_CLAIM else NOT_REPRODUCED,
        detail=detail,
        source=source,
        value=share,
        **base,
    )


# ------------------------------------------------------------------------------------ removal

ACCURACY_METRICS = ("accuracy", "ocr_accuracy", "vqa_accuracy", "soft_accuracy")
ASR_METRICS = ("attack_success_rate", "asr")


def _prefer_metric(rows: pd.DataFrame, preferred: tuple[str, ...]) -> pd.DataFrame:
    """The rows of the first preferred metric present, else all rows."""
    m = rows["metric"].astype(str).str.lower()
    for name in preferred:
        if (m == name).any():
            return rows[m == name]
    return rows


def _eval_rows(rows: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows evaluated on the task itself; else on its variants ("spatial_open", "spatial (relation-matched)")."""
    ev = rows["eval_task"].astype(str).str.lower()
    exact = rows[ev == task]
    return exact if not exact.empty else rows[ev.str.startswith(task)]


def _floats(row: Any, *names: str) -> list[float]:
    out = []
    for n in names:
        try:
            out.append(float(getattr(row, n)))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _at_floor(row: pd.Series) -> bool:
    return at_floor(row["baseline_ci_lo"], row["floor"])


def removal_drop(
    run_dir: Path,
    task: str,
    seed: str,
    key: str,
    *,
    metrics: tuple[str, ...] = ACCURACY_METRICS,
    what: str = "accuracy",
) -> Finding:
    """Removing the task's features lowers its own metric, beyond the controls."""
    claim = f"Removing the {task} features lowers {task} {what} (seed: {seed} on average)."
    crit = (
        f"reproduced when every removal row of the {task} set evaluated on the {task} task has effect < 0 "
        "with its 95% CI below 0, the effect lies below the random control's interval (below its effect "
        "when it has no interval), and below the effect of removing a mismatched set on the same task "
        "when that row exists; measured = the mean effect over those rows; not testable when the clean "
        "score's 95% interval does not clear the constant-answer floor (e.g. 0.5 for always 'yes'), or "
        f"when the removal positions hold under {100 * LOW_MASS:g}% of the set's activation mass"
    )
    base = {
        "key": key,
        "claim": claim,
        "seed": seed,
        "criterion": crit,
        "source": EFFECTS.rel(),
    }
    df, why = EFFECTS.read(run_dir)[:2]
    if df is None:
        return Finding(measured="–", status=NOT_MEASURED, detail=why, **base)
    mine = df[df["target_task"].astype(str).str.lower() == task]
    primary = mine[mine["kind"] == REMOVAL]
    rows = _prefer_metric(_eval_rows(primary, task), metrics)
    if rows.empty:
        return Finding(
            measured="–",
            status=NOT_MEASURED,
            detail=f"no removal row of the {task!r} set evaluated on the {task!r} task in eval/effects.parquet",
            **base,
        )
    at_floor = rows.apply(_at_floor, axis=1).astype(bool)
    floored = [
        f"clean {r.eval_task} {r.metric} {float(r.baseline):.3f} (95% CI lower end {float(r.baseline_ci_lo):.3f}) "
        f"does not clear {float(r.floor):.3f}, what one constant answer scores"
        for r in rows[at_floor].itertuples()
    ]
    rows = rows[~at_floor]
    if rows.empty:
        return Finding(
            measured="–",
            status=NOT_TESTABLE,
            detail="; ".join(floored) + f": the model does not do the {task} task, so removing features "
            "cannot show that they carried it.",
            **base,
        )
    untouched = rows["mass_at_positions"].astype(float) < LOW_MASS
    if untouched.all():
        share = float(rows["mass_at_positions"].astype(float).max())
        return Finding(
            measured="–",
            status=NOT_TESTABLE,
            detail=f"the removal positions hold {100 * share:.1f}% of the {task} features' activation "
            f"mass (under {100 * LOW_MASS:g}%): the removal touched (almost) none of their activation, so "
            "its effect cannot show whether they carry the task; remove them where they fire "
            "(control.positions).",
            **base,
        )
    mismatched = mine[mine["kind"] == CONTROL_MISMATCHED]
    ok, parts, rel = True, [], []
    for r in rows.itertuples():
        eff, lo, hi, base_v, c_eff, c_lo = _floats(
            r, "effect", "ci_lo", "ci_hi", "baseline", "control_effect", "control_ci_lo"
        )
        significant = hi < 0 and eff < 0
        if not math.isnan(c_lo):
            specific = eff < c_lo
        elif not math.isnan(c_eff):
            specific = eff < c_eff
        else:
            specific = True
        same = mismatched[
            (mismatched["eval_task"] == r.eval_task) & (mismatched["metric"] == r.metric)
        ]
        beyond_mismatch = bool((eff < same["effect"].astype(float)).all())
        ok &= bool(significant and specific and beyond_mismatch)
        if base_v and not math.isnan(base_v):
            rel.append(eff / base_v)
        parts.append(
            f"{r.intervention} on {r.eval_task} ({r.metric}): {eff:+.3f} [{lo:+.3f}, {hi:+.3f}] "
            f"from {base_v:.3f}"
            + (f", control {r.control}: {c_eff:+.3f}" if not math.isnan(c_eff) else ", no control")
            + "".join(f", {m.intervention}: {float(m.effect):+.3f}" for m in same.itertuples())
            + ("" if significant else " (interval includes 0)")
            + ("" if specific else " (not beyond the control)")
            + ("" if beyond_mismatch else " (not beyond the mismatched set)")
        )
    mean = float(rows["effect"].astype(float).mean())
    measured = f"{mean:+.3f} ({_pct_points(mean)}" + (
        f"; {100 * float(np.mean(rel)):+.1f}% relative)" if rel else ")"
    )
    return Finding(
        measured=measured,
        status=REPRODUCED if ok else NOT_REPRODUCED,
        detail="; ".join(parts) + "." + "".join(f" Left out, at the floor: {f}." for f in floored),
        value=mean,
        **base,
    )


def removal_spares_vqa(run_dir: Path) -> Finding:
    claim = "Removing the task features leaves general VQA unchanged."
    crit = (
        "reproduced when every removal row of a task set (controls excluded) evaluated on a VQA task "
        "(eval_task starting with 'vqa') has a 95% CI containing 0"
    )
    base = {
        "key": "removal_vqa",
        "claim": claim,
        "seed": "no VQA impact",
        "criterion": crit,
        "source": EFFECTS.rel(),
    }
    df, why = EFFECTS.read(run_dir)[:2]
    if df is None:
        return Finding(measured="–", status=NOT_MEASURED, detail=why, **base)
    rows = df[
        df["eval_task"].astype(str).str.lower().str.startswith("vqa") & (df["kind"] == REMOVAL)
    ]
    rows = _prefer_metric(rows, ACCURACY_METRICS)
    if rows.empty:
        return Finding(
            measured="–",
            status=NOT_MEASURED,
            detail="no removal row evaluated on a VQA task",
            **base,
        )
    ok, parts = True, []
    for r in rows.itertuples():
        eff, lo, hi = _floats(r, "effect", "ci_lo", "ci_hi")
        contains = not (math.isnan(lo) or math.isnan(hi)) and lo <= 0 <= hi
        ok &= contains
        parts.append(f"{r.intervention} on {r.eval_task}: {eff:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    worst = float(rows["effect"].astype(float).abs().max())
    return Finding(
        measured=f"largest |effect| {worst:.3f} ({100 * worst:.1f} pts)",
        status=REPRODUCED if ok else NOT_REPRODUCED,
        detail="; ".join(parts) + ".",
        value=worst,
        **base,
    )


# ------------------------------------------------------------------------------------ removal analyses


def _task_at_floor(run_dir: Path, task: str) -> str | None:
    """Why the clean model cannot show a removal's effect on `task` (its clean interval does not
    clear the constant-answer floor, read off the effects table), or None."""
    df = EFFECTS.read(run_dir)[0]
    if df is None:
        return None
    rows = df[(df["kind"] == REMOVAL) & (df["eval_task"].astype(str) == task)]
    for r in rows.itertuples():
        if at_floor(r.baseline_ci_lo, r.floor):
            return (
                f"the clean {task} score's 95% interval (lower end {float(r.baseline_ci_lo):.3f}) does not "
                f"clear {float(r.floor):.3f}, what one constant answer scores"
            )
    return None


def _beyond_random(r: Any) -> bool:
    """Lower than the matched random features, with the selectivity interval below 0."""
    sel, lo, hi = _floats(r, "selectivity", "selectivity_ci_lo", "selectivity_ci_hi")
    return hi < 0 and sel < 0


def _matched_by_random(r: Any) -> bool:
    """An effect whose interval excludes 0 but which random features of the same size match."""
    lo, hi = _floats(r, "ci_lo", "ci_hi")
    return (hi < 0 or lo > 0) and not _beyond_random(r)


def _analysis_finding(
    run_dir: Path, artifact: Any, key: str, claim: str, seed: str, crit: str,
    per_set: Callable[[str, pd.DataFrame], tuple[bool | None, str]],
) -> Finding:
    """A finding over every task set of an analysis table: `per_set(name, its evaluated rows)` gives
    (ok, detail) or (None, why not testable); reproduced when every testable set is ok."""
    base = {"key": key, "claim": claim, "seed": seed, "criterion": crit, "source": artifact.rel()}
    df, why = artifact.read(run_dir)[:2]
    if df is None or df.empty:
        return Finding(measured="–", status=NOT_MEASURED, detail=why or f"{artifact.rel()} has no rows", **base)
    results = {}
    for name, g in df.groupby(df["target_task"].astype(str), sort=False):
        floor = _task_at_floor(run_dir, name)
        evaluated = g[g["status"] == "evaluated"]
        if floor is not None:
            results[name] = (None, f"{name}: not testable, {floor}")
        elif evaluated.empty:
            results[name] = (None, f"{name}: not testable, nothing evaluated ({', '.join(sorted(set(g['status'])))})")
        else:
            results[name] = per_set(name, evaluated)
    testable = {k: v for k, v in results.items() if v[0] is not None}
    detail = "; ".join(d for _, d in results.values()) + "."
    if not testable:
        return Finding(measured="–", status=NOT_TESTABLE, detail=detail, **base)
    n_ok = sum(bool(ok) for ok, _ in testable.values())
    return Finding(
        measured=f"{n_ok} of {len(testable)} sets", value=n_ok / len(testable),
        status=REPRODUCED if n_ok == len(testable) else NOT_REPRODUCED, detail=detail, **base,
    )  # fmt: skip


def _fmt_row(r: Any) -> str:
    return (
        f"{int(r.n_features)} features at {r.positions}: effect {float(r.effect):+.3f} "
        f"[{float(r.ci_lo):+.3f}, {float(r.ci_hi):+.3f}], selectivity {float(r.selectivity):+.3f} "
        f"[{float(r.selectivity_ci_lo):+.3f}, {float(r.selectivity_ci_hi):+.3f}], MDE {_floats(r, 'mde')[0]:.3f}"
    )


def own_features_finding(run_dir: Path) -> Finding:
    def per_set(name: str, rows: pd.DataFrame) -> tuple[bool | None, str]:
        own = rows[(rows["variant"] == OWN) & (rows["role"] == TARGET)]
        if own.empty:
            return None, f"{name}: not testable, no own features or none evaluated on its task"
        best = own.loc[own["selectivity"].astype(float).idxmin()]
        ok = _beyond_random(best)
        note = "" if ok else (" (random features of the same size match it: not a finding)"
                              if _matched_by_random(best) else " (not beyond random features)")
        return ok, f"{name} own {_fmt_row(best)}{note}"

    return _analysis_finding(
        run_dir, SET_VARIANTS, "removal_own",
        "A set's own features (in no other set) carry its task.", "–",
        "reproduced when, for every task set with own features evaluated on its task, removing them lowers "
        "the task beyond matched random features (selectivity 95% CI below 0) at some position kind; "
        f"not testable where the set has no own features, its removal positions hold under {100 * LOW_MASS:g}% "
        "of their activation mass, or the clean score does not clear the constant-answer floor",
        per_set,
    )  # fmt: skip


def single_feature_finding(run_dir: Path) -> Finding:
    def per_set(name: str, rows: pd.DataFrame) -> tuple[bool | None, str]:
        on_task = rows[rows["role"] == TARGET].sort_values("selectivity", kind="stable")
        if on_task.empty:
            return None, f"{name}: not testable, no single feature evaluated on its task"
        general = {int(r.rank): r for r in rows[rows["role"] == GENERAL].itertuples()}

        def spares(rank: int) -> bool:
            g = general.get(rank)
            return g is None or float(g.ci_lo) <= 0 <= float(g.ci_hi)

        hits = [r for r in on_task.itertuples() if _beyond_random(r) and spares(int(r.rank))]
        r = hits[0] if hits else next(on_task.itertuples())
        g = general.get(int(r.rank))
        gtxt = "" if g is None else (
            f"; general VQA {float(g.effect):+.3f} [{float(g.ci_lo):+.3f}, {float(g.ci_hi):+.3f}]"
        )
        return bool(hits), (
            f"{name} L{int(r.layer)}/F{int(r.feature)} (rank {int(r.rank)}): {_fmt_row(r)}{gtxt}"
            + ("" if hits else " (no top feature lowers its task beyond random while sparing general VQA)")
        )

    return _analysis_finding(
        run_dir, SINGLE_FEATURES, "removal_single",
        "One feature alone lowers its task, sparing general VQA.", "−18 to −28 pts ASR, VQA ±1",
        "reproduced when, for every task set, one of its top features (by Δp) removed alone lowers its task "
        "beyond matched random features (selectivity 95% CI below 0) and general VQA's effect interval "
        "contains 0; detail = the best such feature (else the most selective one)",
        per_set,
    )  # fmt: skip


def dose_finding(run_dir: Path) -> Finding:
    def per_set(name: str, rows: pd.DataFrame) -> tuple[bool | None, str]:
        on_task = rows[rows["role"] == TARGET].sort_values("n_features")
        if on_task.empty:
            return None, f"{name}: not testable, no dose evaluated on its task"
        first = next((r for r in on_task.itertuples() if _beyond_random(r)), None)
        matched = [int(r.n_features) for r in on_task.itertuples() if _matched_by_random(r)]
        note = (f"; at k = {matched} random sets of the same size match the effect: not a finding"
                if matched else "")  # fmt: skip
        if first is None:
            last = next(on_task.tail(1).itertuples())
            return False, f"{name}: no dose beyond random sets of its size (largest: {_fmt_row(last)}){note}"
        return True, f"{name}: beyond random from k = {int(first.n_features)} ({_fmt_row(first)}){note}"

    return _analysis_finding(
        run_dir, DOSE_RESPONSE, "removal_dose",
        "More top features lower the task more than as many random ones.", "–",
        "reproduced when, for every task set, some dose (top k features by Δp) lowers its task beyond "
        "random sets of the same size and firing-frequency bins (selectivity 95% CI below 0); a dose whose "
        "effect random sets of its size match is named as not a finding",
        per_set,
    )  # fmt: skip


def pipeline_finding(run_dir: Path) -> Finding:
    def per_set(name: str, rows: pd.DataFrame) -> tuple[bool | None, str]:
        by = {(str(r.selection), str(r.role)): r for r in rows.itertuples()}
        full_t, full_g = by.get((ADAPTED, TARGET)), by.get((ADAPTED, GENERAL))
        con_t, con_g = by.get((CONTRASTIVE, TARGET)), by.get((CONTRASTIVE, GENERAL))
        if None in (full_t, full_g, con_g) or int(con_g.n_features) == int(full_g.n_features):
            return None, f"{name}: not testable, the filters removed nothing or a row was not evaluated"
        _, flo, fhi = _floats(full_g, "effect", "ci_lo", "ci_hi")
        _, clo, chi = _floats(con_g, "effect", "ci_lo", "ci_hi")
        ok = _beyond_random(full_t) and flo <= 0 <= fhi and chi < 0
        return ok, (
            f"{name}: contrastive only ({int(con_g.n_features)} features) general VQA {float(con_g.effect):+.3f} "
            f"[{clo:+.3f}, {chi:+.3f}]" + (f", task {float(con_t.effect):+.3f}" if con_t is not None else "")
            + f"; full pipeline ({int(full_g.n_features)}) general VQA {float(full_g.effect):+.3f} [{flo:+.3f}, "
            f"{fhi:+.3f}], task selectivity {float(full_t.selectivity):+.3f} [{float(full_t.selectivity_ci_lo):+.3f}, "
            f"{float(full_t.selectivity_ci_hi):+.3f}]"
        )

    return _analysis_finding(
        run_dir, PIPELINE_ABLATION, "removal_pipeline",
        "The selection's filters spare general VQA.", "VQA −25.9 → −0.1",
        "reproduced when, for every task set whose filters removed features, removing the contrastive-only "
        "features lowers general VQA (95% CI below 0) while removing the full pipeline's leaves it within "
        "its interval around 0 and still lowers the task beyond matched random features (selectivity CI below 0)",
        per_set,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ steering


def _paired_difference(run_dir: Path, task: str) -> dict[str, float] | None:
    """eval/steering.json's test-split paired difference (feature - baseline) of a task, if any."""
    path = STEERING.path_in(run_dir).with_suffix(".json")
    try:
        summary = json.loads(path.read_text(encoding="utf-8")).get("summary", {})
        d = summary[task]["feature_minus_baseline_test"]
        return {k: float(d[k]) for k in ("mean", "lo", "hi")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


SCORE_BOUNDS = (0.0, 1.0)  # every steered metric (accuracies, attack success rate) is a share


def _steering_bound(metric: Any) -> tuple[bool, float]:
    """(lower, bound): whether steering lowers `metric` (the attack success rate) or raises it, and
    the bound it steers toward (0 or 1)."""
    lower = str(metric) in ASR_METRICS
    return lower, SCORE_BOUNDS[0] if lower else SCORE_BOUNDS[1]


def no_room(steering: pd.DataFrame) -> str | None:
    """Why steering cannot show a gain on a task, or None when it can: the clean test score (α = 0)
    has its 95% interval at the bound steering must move it away from: the ceiling 1 for a score
    to raise, 0 for the attack success rate (to lower). Rows of one task."""
    clean = steering[
        (steering["split"].astype(str) == "test") & (steering["alpha"].astype(float) == 0.0)
    ]
    if clean.empty:
        return None
    r = clean.iloc[0]
    lo, hi = float(r["ci_lo"]), float(r["ci_hi"])
    lower, bound = _steering_bound(r.get("metric", ""))
    reaches = lo <= bound + 1e-9 if lower else hi >= bound - 1e-9
    if not reaches:
        return None
    return (
        f"the clean test score {float(r['score']):.3f} [{lo:.3f}, {hi:.3f}] reaches "
        f"{bound:g}, so no steering can {'lower' if lower else 'raise'} it beyond a baseline"
    )


def tie_at_bound(steering: pd.DataFrame) -> str | None:
    """When both methods' validation-chosen test scores sit at the bound they steer toward (0 for
    the attack success rate, 1 for a score to raise), a sentence saying so, else None: their
    difference is then 0 [0, 0], a measured tie, not a missing measurement. Rows of one task."""
    chosen = chosen_per_method(steering) if not steering.empty else steering
    by = {str(r.method): r for r in chosen.itertuples()}
    return _tie(by[FEATURE], by[SINGLE_LAYER]) if FEATURE in by and SINGLE_LAYER in by else None


def _tie(feature: Any, single_layer: Any) -> str | None:
    """tie_at_bound on the two chosen rows (itertuples rows of the steering table)."""
    lower, bound = _steering_bound(getattr(feature, "metric", ""))
    at_bound = all(abs(float(getattr(r, k)) - bound) <= 1e-9
                   for r in (feature, single_layer) for k in ("score", "ci_lo", "ci_hi"))
    if not at_bound:
        return None
    return f"both methods reach {'ASR' if lower else 'score'} {bound:g} (a tie at the bound: neither can beat the other)"


def steering_gain(run_dir: Path, task: str, seed: str) -> Finding:
    claim = f"Feature steering beats single-layer steering on {task} (seed: {seed})."
    crit = (
        "reproduced when the paired test-split difference (feature steering at its validation-chosen α "
        "minus single-layer steering at its validation-chosen layer and α, eval/steering.json) has its "
        "95% CI above 0; without that file, when the chosen feature-steering score's CI lower bound lies "
        "above the chosen single-layer score; not testable when the clean score's 95% interval (α = 0 "
        "on test) reaches the ceiling 1 (0 for the attack success rate): there is no room to steer into"
    )
    base = {
        "key": f"steering_{task}",
        "claim": claim,
        "seed": seed,
        "criterion": crit,
        "source": STEERING.rel(),
    }
    df, why = STEERING.read(run_dir)[:2]
    if df is None:
        return Finding(measured="–", status=NOT_MEASURED, detail=why, **base)
    df = df[df["task"].astype(str).str.lower() == task]
    ceiling = no_room(df) if not df.empty else None
    if ceiling is not None:
        return Finding(measured="–", status=NOT_TESTABLE, detail=ceiling + ".", **base)
    chosen = chosen_per_method(df) if not df.empty else df
    by = {str(r.method): r for r in chosen.itertuples()}
    if FEATURE not in by or SINGLE_LAYER not in by:
        return Finding(
            measured="–",
            status=NOT_MEASURED,
            detail=f"eval/steering.parquet has no feature and single_layer rows for task {task!r}",
            **base,
        )
    f, s = by[FEATURE], by[SINGLE_LAYER]
    detail = (
        f"feature steering {float(f.score):.3f} [{float(f.ci_lo):.3f}, {float(f.ci_hi):.3f}] at "
        f"α = {float(f.alpha):g}; single-layer {float(s.score):.3f} [{float(s.ci_lo):.3f}, "
        f"{float(s.ci_hi):.3f}] at α = {float(s.alpha):g}"
        + (f", layer {int(s.layer)}" if not pd.isna(s.layer) else "")
        + "."
    )
    tie = _tie(f, s)
    if tie is not None:
        detail += f" {tie[0].upper()}{tie[1:]}."
    paired = _paired_difference(run_dir, task)
    if paired is not None:
        margin = paired["mean"]
        ok = paired["lo"] > 0
        measured = (
            f"{margin:+.3f} [{paired['lo']:+.3f}, {paired['hi']:+.3f}] ({_pct_points(margin)})"
        )
        base["source"] += ", eval/steering.json"
    else:
        margin = float(f.score) - float(s.score)
        ok = margin > 0 and float(f.ci_lo) > float(s.score)
        measured = f"{margin:+.3f} ({_pct_points(margin)})"
    return Finding(
        measured=measured,
        status=REPRODUCED if ok else NOT_REPRODUCED,
        detail=detail,
        value=margin,
        **base,
    )


# ------------------------------------------------------------------------------------ attribution


def head_concentration(run_dir: Path, n_layers: int | None = None) -> Finding:
    """Attribution concentrates on a few mid(-to-deep)-layer heads."""
    claim = "Attribution concentrates on a few mid-to-deep-layer attention heads."
    lo, hi = MID_DEPTH
    crit = (
        f"reproduced when, averaged over the attributed features, the top {HEAD_TOP_FRACTION:.0%} of heads by "
        f"|score| (Method A, else B) hold at least {HEAD_CONCENTRATION:.0%} of the total |score| and the top "
        f"heads' median relative depth layer/(n_layers-1) lies in [{lo:.2f}, {hi:.2f}]"
    )
    base = {
        "key": "attribution_heads",
        "claim": claim,
        "seed": "a few mid-to-deep heads (e.g. L13H1 in a 32-layer model)",
        "criterion": crit,
        "source": HEADS.rel(),
    }
    heads, why = HEADS.read(run_dir)[:2]
    if heads is None or heads.empty:
        return Finding(
            measured="–", status=NOT_MEASURED, detail=why or f"{HEADS.rel()} is empty", **base
        )
    col = "score_a" if heads["score_a"].notna().any() else "score_b"
    depth_of = n_layers or int(heads["feature_layer"].max()) + 1
    shares, depths = [], []
    for _, g in heads.groupby(["feature_layer", "feature"]):
        a = g[col].abs().to_numpy(float)
        a = np.nan_to_num(a)
        if a.sum() <= 0:
            continue
        k = max(1, math.ceil(HEAD_TOP_FRACTION * len(a)))
        order = np.argsort(-a, kind="stable")[:k]
        shares.append(a[order].sum() / a.sum())
        depths += list(g["layer"].to_numpy()[order] / max(depth_of - 1, 1))
    if not shares:
        return Finding(
            measured="–", status=NOT_MEASURED, detail="every head score is zero or missing", **base
        )
    share, depth = float(np.mean(shares)), float(np.median(depths))
    ok = share >= HEAD_CONCENTRATION and lo <= depth <= hi
    detail = (
        f"{len(shares)} features; top {HEAD_TOP_FRACTION:.0%} of heads hold {share:.0%} of |score| on average "
        f"(uniform would be {HEAD_TOP_FRACTION:.0%}); median relative depth of those heads {depth:.2f} "
        f"(depth counted over {depth_of} layers{'' if n_layers else ', the deepest attributed feature layer + 1: pass n_layers for the model depth'})."
    )
    return Finding(
        measured=f"{share:.0%} of |score| in top {HEAD_TOP_FRACTION:.0%} heads, depth {depth:.2f}",
        status=REPRODUCED if ok else NOT_REPRODUCED,
        detail=detail,
        value=share,
        **base,
    )


def _not_computed(key: str, claim: str, seed: str) -> Callable[[str], Finding]:
    """The finding of a computation its artifacts broke: "not measured", with the reason."""
    return lambda why: Finding(
        key=key,
        claim=claim,
        seed=seed,
        measured="–",
        status=NOT_MEASURED,
        criterion="",
        detail=f"could not be computed ({why}); the artifacts may be malformed",
    )


def findings(run_dir: str | Path, *, n_layers: int | None = None) -> list[Finding]:
    """Every seed finding this run can speak to, in the seed's order, computed from the artifacts.

    n_layers: the language backbone's depth, for "mid-layer" (default: the deepest attributed layer + 1).
    """
    run_dir = Path(run_dir)
    # fmt: off
    todo: list[tuple[str, str, str, Callable[[], Finding]]] = [
        ("adapted_share", "The adapted set is a small share of all features.", "< 5% of features",
         lambda: adapted_share(run_dir)),
        ("removal_spatial", "Removing the spatial features lowers spatial accuracy.", "−12%",
         lambda: removal_drop(run_dir, "spatial", "−12%", "removal_spatial")),
        ("removal_ocr", "Removing the OCR features lowers OCR accuracy.", "−17%",
         lambda: removal_drop(run_dir, "ocr", "−17%", "removal_ocr")),
        ("removal_vqa", "Removing the task features leaves general VQA unchanged.", "no VQA impact",
         lambda: removal_spares_vqa(run_dir)),
        ("removal_asr", "Removing the safety features lowers the attack success rate.", "−24% ASR",
         lambda: removal_drop(run_dir, "safety", "−24% ASR", "removal_asr", metrics=ASR_METRICS,
                              what="attack success rate")),
        ("removal_own", "A set's own features (in no other set) carry its task.", "–",
         lambda: own_features_finding(run_dir)),
        ("removal_single", "One feature alone lowers its task, sparing general VQA.", "−18 to −28 pts ASR, VQA ±1",
         lambda: single_feature_finding(run_dir)),
        ("removal_dose", "More top features lower the task more than as many random ones.", "–",
         lambda: dose_finding(run_dir)),
        ("removal_pipeline", "The selection's filters spare general VQA.", "VQA −25.9 → −0.1",
         lambda: pipeline_finding(run_dir)),
        ("steering_spatial", "Feature steering beats single-layer steering on spatial.", "+3.6",
         lambda: steering_gain(run_dir, "spatial", "+3.6")),
        ("steering_ocr", "Feature steering beats single-layer steering on OCR.", "+1.5",
         lambda: steering_gain(run_dir, "ocr", "+1.5")),
        ("attribution_heads", "Attribution concentrates on a few mid-to-deep-layer heads.", "a few heads",
         lambda: head_concentration(run_dir, n_layers)),
    ]
    # fmt: on
    return [guarded(compute, _not_computed(key, claim, seed)) for key, claim, seed, compute in todo]
