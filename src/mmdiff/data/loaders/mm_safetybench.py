"""MM-SafetyBench: per-scenario question JSONs and images imgs/<scenario>/<SD|TYPO|SD_TYPO>/<id>.jpg."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mmdiff.data.loaders._common import (
    existing_dir,
    expect_type,
    progress,
    read_json,
    require,
    resolve_image,
    subsample,
)
from mmdiff.data.records import Record
from mmdiff.errors import DataError

# The text prompt that goes with each image variant, as in the benchmark: SD images carry no text,
# so they get the "(SD)" rephrasing; TYPO and SD_TYPO images show the key phrase as typography.
VARIANT_PROMPT_FIELD = {
    "SD": "Rephrased Question(SD)",
    "TYPO": "Rephrased Question",
    "SD_TYPO": "Rephrased Question",
    "TEXT": "Question",  # text-only control: the original question, no image
}


def variant_caption(variant: str, key_phrase: str) -> str | None:
    """A faithful caption of the image, which the benchmark generated from the key phrase."""
    if variant == "SD":
        return f"A picture of {key_phrase}."
    if variant == "TYPO":
        return f'The words "{key_phrase}" written in black on a white background.'
    if variant == "SD_TYPO":
        return f'A picture of {key_phrase}, with the words "{key_phrase}" written below it.'
    return None


def load_mm_safetybench(
    questions: str | Path,
    images: str | Path | None = None,
    *,
    variants: Sequence[str] = ("SD", "TYPO", "SD_TYPO"),
    scenarios: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    check_images: bool = True,
) -> list[Record]:
    """MM-SafetyBench records tagged safety, one per (scenario, question, variant); no answers.

    questions: the processed_questions folder, one <scenario>.json per scenario (e.g.
               01-Illegal_Activitiy.json), {"<id>": {"Question", "Rephrased Question",
               "Rephrased Question(SD)", "Key Phrase", ...}}
    images:    the imgs folder (imgs/<scenario>/<variant>/<id>.jpg); not needed for variant "TEXT"
    variants:  any of SD, TYPO, SD_TYPO, TEXT
    scenarios: scenario names (file stems) to keep; all by default
    """
    qdir = existing_dir(questions, "MM-SafetyBench processed_questions folder")
    bad = [v for v in variants if v not in VARIANT_PROMPT_FIELD]
    if bad or not variants:
        raise DataError(
            f"MM-SafetyBench variants must be among {sorted(VARIANT_PROMPT_FIELD)}, got {list(variants)}"
        )
    needs_images = any(v != "TEXT" for v in variants)
    image_root = existing_dir(images, "MM-SafetyBench imgs folder") if needs_images else None
    files = sorted(qdir.glob("*.json"))
    if not files:
        raise DataError(
            f"no <scenario>.json files in {qdir}: is this MM-SafetyBench's processed_questions folder?"
        )
    if scenarios is not None:
        known = {f.stem for f in files}
        missing = [s for s in scenarios if s not in known]
        if missing:
            raise DataError(
                f"MM-SafetyBench scenarios {missing} not in {qdir}; found {sorted(known)}"
            )
        files = [f for f in files if f.stem in set(scenarios)]

    parsed = []
    for path in files:
        data = expect_type(read_json(path), dict, path, "the top level")
        for qid, entry in data.items():
            rec = f"{qid!r}"
            question = require(entry, "Question", path, rec, str)
            key_phrase = require(entry, "Key Phrase", path, rec, str)
            for v in variants:
                prompt = require(entry, VARIANT_PROMPT_FIELD[v], path, rec, str)
                parsed.append((path.stem, str(qid), v, prompt, question, key_phrase))
    records = []
    for scenario, qid, variant, prompt, question, key_phrase in progress(
        subsample(parsed, limit, seed), "MM-SafetyBench records"
    ):
        image = None
        if variant != "TEXT":
            candidates = [image_root / scenario / variant / f"{qid}.jpg"]
            rec = f"{scenario}/{qid} ({variant})"
            image = resolve_image(candidates, rec, "MM-SafetyBench", check=check_images)
        records.append(
            Record(
                id=f"mm_safetybench/{scenario}/{variant}/{qid}",
                question=prompt,
                answers=[],
                image=image,
                caption=variant_caption(variant, key_phrase),
                tasks=("safety",),
                source="mm_safetybench",
                meta={
                    "scenario": scenario,
                    "variant": variant,
                    "question_id": qid,
                    "original_question": question,
                    "key_phrase": key_phrase,
                },
            )
        )
    return records
