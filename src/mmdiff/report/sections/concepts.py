"""Section 7: concept shift: the concepts of the base LM (on captions) and of the VLM (on images),
matched and grounded in tokens, and how far steering the base LM by the concept shifts brings its
next-token distribution to the VLM's, against one mean shift for every record (the control).

Files of `mmdiff.concept_study.run_concept_shift`: concepts/matching, grounding, steering and
steering_records (.parquet) and summary.json. Every steering number is shown with its 95%
interval and the split it was measured on: "fit" is in-sample (the shifts were estimated on those
very records, so it measures how well K mean shifts summarise N per-record shifts, not transfer),
"heldout" is records kept out of the fit. Concept vs mean shift is compared per record (paired).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmdiff.concept_study import (
    CONCEPT_GROUNDING,
    CONCEPT_MATCHING,
    CONCEPT_STEERING,
    CONCEPT_STEERING_RECORDS,
    CONCEPT_SUMMARY,
)
from mmdiff.bootstrap import paired_effect
from mmdiff.report.sections._common import NOT_RUN, Block, Section, Table, fmt, read, read_json
from mmdiff.report.sections.control import interval

TOKENS_SHOWN = 5  # grounding tokens per concept in the matching table
SPLIT_NOTE = {
    "fit": "in-sample: the shifts were estimated on these records",
    "heldout": "held out: records kept out of the decomposition, each assigned to a concept from the "
    "base LM's vector alone",
}


def _tokens(grounding: pd.DataFrame | None, model: str, concept: int) -> str:
    if grounding is None:
        return "–"
    rows = grounding[(grounding["model"] == model) & (grounding["concept"] == concept)]
    return " · ".join(repr(str(t)) for t in rows.sort_values("rank")["token"].head(TOKENS_SHOWN))


def matching_block(matching: pd.DataFrame, grounding: pd.DataFrame | None, summary: dict) -> Block:
    block = Block("Concepts, matched and grounded")
    if summary:
        block.notes.append(
            f"Mean cos(u_c, v_c') = {fmt(summary.get('mean_cosine'))} between each base-LM concept and its "
            f"matched VLM concept; after adding the shift, cos(u_c + Δ_c, v_c') = "
            f"{fmt(summary.get('mean_shifted_cosine'))}. Both decompositions and the shifts come from the "
            "same fitted records, so the second number is in-sample."
        )
    rows = [
        [
            fmt(r.orig),
            fmt(r.ft),
            fmt(r.count),
            fmt(r.cosine),
            fmt(r.shifted_cosine),
            fmt(r.shift_norm),
            _tokens(grounding, "orig", int(r.orig)),
            _tokens(grounding, "ft", int(r.ft)),
            _tokens(grounding, "shifted", int(r.orig)),
        ]
        for r in matching.itertuples()
    ]
    block.tables.append(
        Table(
            "Concept pairs",
            ["base concept", "VLM concept", "records", "cosine", "shifted cosine", "‖Δ_c‖",
             "base-LM tokens", "VLM tokens", "shifted tokens"],
            rows,
            caption="Pairs by the Hungarian algorithm on cosine; records = |A_c|, the fitted records "
            "assigned to the base concept; tokens: the top tokens through each model's final norm and "
            "unembedding (shifted: u_c + Δ_c through the VLM's).",
        )
    )  # fmt: skip
    return block


def paired_concept_minus_mean(per_record: pd.DataFrame) -> list[list[str]]:
    """Per (split, alpha != 0): concept-shift minus mean-shift KL and top-1 agreement, paired over
    records, with 95% bootstrap intervals."""
    rows = []
    for (split, alpha), g in per_record.groupby(["split", "alpha"], sort=False):
        concept = g[g["shift"] == "concept"].set_index("record_id")
        mean = g[g["shift"] == "mean"].set_index("record_id")
        common = concept.index.intersection(mean.index)
        if float(alpha) == 0.0 or common.empty:
            continue
        kl = paired_effect(concept.loc[common, "kl"], mean.loc[common, "kl"])
        top1 = paired_effect(
            concept.loc[common, "top1_match"].astype(float),
            mean.loc[common, "top1_match"].astype(float),
        )
        rows.append(
            [
                str(split),
                fmt(float(alpha)),
                interval(kl.mean, kl.lo, kl.hi),
                interval(top1.mean, top1.lo, top1.hi),
                fmt(len(common)),
            ]
        )
    return rows


def steering_block(steering: pd.DataFrame, per_record: pd.DataFrame | None) -> Block:
    block = Block("Steering the base LM by the concept shifts")
    splits = list(dict.fromkeys(steering["split"].astype(str)))
    for split in splits:
        block.notes.append(f"Split {split!r}: {SPLIT_NOTE.get(split, 'as written by the stage')}.")
    if "heldout" not in splits:
        block.notes.append(
            "No held-out records: every number below is in-sample, so none of them shows that the "
            "shifts transfer to new inputs (set concepts.holdout > 0)."
        )
    rows = [
        [
            str(r.split),
            "concept shift Δ_c(i)" if r.shift == "concept" else "mean shift (control)",
            fmt(r.alpha),
            interval(r.kl, r.kl_ci_lo, r.kl_ci_hi, signed=False),
            interval(r.top1_agreement, r.top1_ci_lo, r.top1_ci_hi, signed=False),
            fmt(r.n),
        ]
        for r in steering.itertuples()
    ]
    block.tables.append(
        Table(
            "Closeness of the steered base LM to the VLM",
            ["split", "steered by", "α", "KL(VLM ‖ base) [95% CI]", "top-1 agreement [95% CI]", "n"],
            rows,
            caption="Next-token distributions at the last prompt position, over the ids both vocabularies "
            "share; lower KL and higher agreement = closer to the VLM. α = 0 is the unsteered base LM.",
        )
    )
    paired = paired_concept_minus_mean(per_record) if per_record is not None else []
    if paired:
        block.tables.append(
            Table(
                "Concept shift minus mean shift (paired over records)",
                ["split", "α", "KL difference [95% CI]", "top-1 agreement difference [95% CI]", "n"],
                paired,
                caption="Per record, the concept shift's KL (agreement) minus the mean shift's at the same "
                "α; a KL interval below 0 means the concept-specific shifts bring the base LM closer to "
                "the VLM than one global shift does.",
            )
        )
    return block


def concepts_section(run_dir: Path) -> Section:
    """Matching, grounding and steering of the concepts stage."""
    section = Section(
        "concepts",
        "Concept shift",
        intro="Concepts of the base LM on (caption, question) and of the VLM on (image, question), from one "
        "vector per record at one layer; the shift Δ_c is the mean VLM-minus-base difference over the "
        "records of base concept c. Steering adds α·Δ_c(i) to the base LM at that layer.",
    )
    matching = read(CONCEPT_MATCHING, run_dir, section)
    grounding = read(CONCEPT_GROUNDING, run_dir, section)
    steering = read(CONCEPT_STEERING, run_dir, section)
    per_record = read(CONCEPT_STEERING_RECORDS, run_dir, section)
    summary = read_json(run_dir / CONCEPT_SUMMARY, run_dir, section) or {}
    if matching is None and steering is None:
        if not section.warnings:
            section.status = NOT_RUN
            section.notes.append(
                f"The concepts stage has not run (no {CONCEPT_MATCHING.rel()}, {CONCEPT_STEERING.rel()})."
            )
        return section
    if summary:
        section.notes.append(
            f"Layer {summary.get('layer')}, K = {summary.get('k')} concepts by {summary.get('method')} "
            f"({summary.get('concepts_used', '?')} with at least one record), {summary.get('n_fit')} "
            f"fitted records, {summary.get('n_heldout', 0)} held out."
        )
    if matching is not None and not matching.empty:
        section.blocks.append(matching_block(matching, grounding, summary))
    if steering is not None and not steering.empty:
        section.blocks.append(steering_block(steering, per_record))
    return section
