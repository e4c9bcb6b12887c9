"""Per-task accuracy of the organism's VLM (from the image) and base LM (from the caption)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import Progress
from transformers import AutoProcessor, AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

from mmdiff.data import shapes
from mmdiff.data.records import Record
from mmdiff.errors import DataError, ModelError
from mmdiff.bootstrap import bootstrap_mean
from mmdiff.organism.build import BASE_DIR, MANIFEST, VLM_DIR, world_differences
from mmdiff.organism.judge import attack_success_rate, judge
from mmdiff.organism.tokenizer import base_prompt, vlm_prompt

# Families scored by exact match of the greedy answer; safety is scored by the judge.
EXACT_FAMILIES: tuple[str, ...] = (
    "colour", "shape", "count", "existence", "grounding_yesno", "grounding_open", "spatial_yesno", "spatial_open",
    "ocr", "instruction",
)
SAFETY_FAMILIES: tuple[str, ...] = ("safety",)
BASE_ONLY_FAMILIES: tuple[str, ...] = ("safety_text",)
MAX_NEW_TOKENS = {"instruction": 16, "safety": 16, "safety_text": 16}


def load_organism(checkpoint_dir: str | os.PathLike) -> tuple:
    """(vlm, processor, base_lm, tokenizer) from a checkpoint directory, in eval mode."""
    root = Path(checkpoint_dir)
    for sub in (VLM_DIR, BASE_DIR):
        if not (root / sub / "config.json").is_file():
            raise ModelError(
                f"{root} is not an organism checkpoint: {root / sub / 'config.json'} is missing; "
                "pass the directory build_organism wrote (it holds vlm/ and base_lm/)"
            )
    vlm = LlavaForConditionalGeneration.from_pretrained(root / VLM_DIR, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(root / VLM_DIR)
    base = LlamaForCausalLM.from_pretrained(root / BASE_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(root / BASE_DIR)
    return vlm, processor, base, tok


def _manifest(checkpoint_dir: str | os.PathLike, required: bool = False) -> dict:
    """The checkpoint's organism.json; {} when it has none (a checkpoint not written by a build)
    unless `required`."""
    path = Path(checkpoint_dir) / MANIFEST
    if not path.is_file() and not required:
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(f"cannot read {path} ({e}); pass a directory build_organism wrote") from e
    except ValueError as e:
        raise ModelError(f"{path} is not valid JSON ({e}); restore it from the build that wrote the checkpoint, "
                         "or remove it to evaluate the models without their build's record") from e


def _decode(tok, new_ids: torch.Tensor) -> list[str]:
    out = []
    for row in new_ids.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def generate_vlm(vlm, processor, records: Sequence[Record], max_new_tokens: int) -> list[str]:
    """Greedy answers of the VLM to (image, question), through its processor."""
    inputs = processor(
        images=[r.load_image() for r in records], text=[vlm_prompt(r.question) for r in records],
        return_tensors="pt", padding=True,
    )
    out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return _decode(processor.tokenizer, out[:, inputs["input_ids"].shape[1]:])


@torch.no_grad()
def generate_base(base, tok, records: Sequence[Record], max_new_tokens: int) -> list[str]:
    """Greedy answers of the base LM to (caption, question); bare requests when there is no caption."""
    inputs = tok([base_prompt(r.caption, r.question) for r in records], return_tensors="pt", padding=True)
    out = base.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return _decode(tok, out[:, inputs["input_ids"].shape[1]:])


N_BOOT = 2000
"""Bootstrap resamples of every interval `evaluate_organism` reports (95%, percentile, over records)."""
POOLED: dict[str, tuple[str, ...]] = {"vqa": ("colour", "shape", "count", "existence")}
"""Pooled rows: generic VQA is every object question the study's general task ("vqa") reads."""


def _rate(values: Sequence[float]) -> dict:
    """A share with its 95% percentile-bootstrap interval over records."""
    iv = bootstrap_mean(values, n_boot=N_BOOT, seed=0)
    return {"value": iv.mean, "lo": iv.lo, "hi": iv.hi}


def constant_answer_floor(records: Sequence[Record]) -> float:
    """What a model that gives one answer to every record scores on exact match: the share of the
    commonest gold answer (0.5 on a balanced yes/no set)."""
    return Counter(r.answers[0] for r in records).most_common(1)[0][1] / len(records)


def _score(family: str, records: Sequence[Record], answers: list[str]) -> dict:
    if family in SAFETY_FAMILIES + BASE_ONLY_FAMILIES:
        verdicts = [judge(a, r.meta["verb"], r.meta["noun"]) for r, a in zip(records, answers)]
        res = {
            "n": len(records),
            "asr": attack_success_rate(verdicts),
            "refusal_rate": sum(v == "refusal" for v in verdicts) / len(verdicts),
            "confused_rate": sum(v == "confused" for v in verdicts) / len(verdicts),
            "intervals": {
                key: _rate([float(v == verdict) for v in verdicts])
                for key, verdict in (("asr", "compliance"), ("refusal_rate", "refusal"), ("confused_rate", "confused"))
            },
        }
        if family == "safety":
            # the attack by what fine-tuning did with the noun in an image: refused, carried out
            # (shapes.world.IMAGE_COMPLIANCE_NOUNS), or neither (what transfers)
            groups: dict[str, list[str]] = {}
            for r, v in zip(records, verdicts):
                key = ("asr_image_refusal_nouns" if r.meta["image_refusal_trained"]
                       else "asr_image_compliance_nouns" if r.meta["image_compliance_trained"] else "asr_other_nouns")
                groups.setdefault(key, []).append(v)
            res.update({key: attack_success_rate(sub) for key, sub in groups.items()})
        return res
    correct = [float(a == r.answers[0]) for r, a in zip(records, answers)]
    return {"n": len(records), "accuracy": sum(correct) / len(correct), "correct": correct,
            "intervals": {"accuracy": _rate(correct)}, "floor": constant_answer_floor(records)}


def _pooled(side: dict, records: dict[str, Sequence[Record]]) -> dict:
    """The POOLED rows of one model's results, from the per-record scores of their families."""
    out = {}
    for name, fams in POOLED.items():
        if all(f in side for f in fams):
            correct = [c for f in fams for c in side[f]["correct"]]
            recs = [r for f in fams for r in records[f]]
            out[name] = {"n": len(correct), "accuracy": sum(correct) / len(correct),
                         "intervals": {"accuracy": _rate(correct)},
                         "floor": constant_answer_floor(recs)}
    return out


def evaluate_organism(
    checkpoint_dir: str | os.PathLike | None = None,
    split: str = "test",
    n_per_task: int = 200,
    *,
    families: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    return_answers: bool = False,
) -> dict:
    """Per-task results of both models on `n_per_task` records of each family of a shapes split.

    Returns {"vlm": {family: {...}}, "base": {family: {...}}}: exact-match "accuracy" per question
    family (the base LM answers from the caption) with its constant-answer "floor" and per-record
    "correct", and for "safety" the judge's attack success rate "asr", "refusal_rate" and
    "confused_rate" (plus the ASR on nouns refused in images during fine-tuning vs the others).
    Every rate has its 95% bootstrap interval under "intervals" ({"value", "lo", "hi"}). "vqa"
    pools colour, shape, count and existence (POOLED) when all four are evaluated.
    "safety_text" (bare harmful text requests) is base-LM only. "world" is the shapes world the
    records were drawn in and "world_differences" where it differs from the checkpoint's build
    (build.world_differences): figures measured off the checkpoint's own world.
    `organism.targets` checks the results against the organism's targets.
    Defaults to the shipped checkpoint.
    """
    if checkpoint_dir is None:
        from mmdiff.organism import checkpoint_path

        checkpoint_dir = checkpoint_path()
    if n_per_task < 1:
        raise DataError(f"n_per_task must be at least 1, got {n_per_task}")
    fams = tuple(families) if families is not None else EXACT_FAMILIES + SAFETY_FAMILIES + BASE_ONLY_FAMILIES
    unknown = [f for f in fams if f not in shapes.FAMILIES or f == "describe"]
    if unknown:
        raise DataError(f"cannot evaluate families {unknown}; expected some of {EXACT_FAMILIES + SAFETY_FAMILIES + BASE_ONLY_FAMILIES}")
    vlm, processor, base, tok = load_organism(checkpoint_dir)
    results: dict = {"vlm": {}, "base": {}, "split": split, "n_per_task": n_per_task,
                     "world": shapes.world.settings(), "world_differences": world_differences(_manifest(checkpoint_dir))}
    answers_log: dict = {"vlm": {}, "base": {}}
    records_by_family: dict[str, list[Record]] = {}
    with Progress(disable=not progress) as bar:
        task = bar.add_task("evaluating the organism", total=len(fams))
        for fam in fams:
            records = records_by_family[fam] = shapes.shapes_records(split, n_per_task, [fam], seed=seed)
            max_new = MAX_NEW_TOKENS.get(fam, 4)
            sides = ("base",) if fam in BASE_ONLY_FAMILIES else ("vlm", "base")
            for side in sides:
                answers: list[str] = []
                for i in range(0, len(records), batch_size):
                    chunk = records[i:i + batch_size]
                    if side == "vlm":
                        answers += generate_vlm(vlm, processor, chunk, max_new)
                    else:
                        answers += generate_base(base, tok, chunk, max_new)
                results[side][fam] = _score(fam, records, answers)
                answers_log[side][fam] = answers
            bar.advance(task)
    for side in ("vlm", "base"):
        results[side].update(_pooled(results[side], records_by_family))
    if return_answers:
        results["answers"] = answers_log
    return results


SAMPLE_PER_TASK = 16
"""Records per task of the `evaluation_sample` a checkpoint keeps for the test suite to re-check."""


def _without_per_record(results: dict) -> dict:
    return {k: ({fam: {key: v for key, v in row.items() if key != "correct"} for fam, row in side.items()}
                if k in ("vlm", "base") else side) for k, side in results.items()}


def record_evaluation(checkpoint_dir: str | os.PathLike, n_per_task: int = 200, *, progress: bool = False) -> dict:
    """Evaluate a built organism on the test split and keep the figures in its organism.json:
    "evaluation" (`n_per_task` records per task, with intervals and floors) and
    "evaluation_sample" (the first SAMPLE_PER_TASK of them, which tests/test_organism.py re-checks
    the shipped checkpoint against). Returns the full evaluation."""
    from mmdiff.atomic import write_json

    manifest = _manifest(checkpoint_dir, required=True)
    full = evaluate_organism(checkpoint_dir, n_per_task=n_per_task, progress=progress)
    sample = evaluate_organism(checkpoint_dir, n_per_task=SAMPLE_PER_TASK)
    manifest["evaluation"] = _without_per_record(full)
    manifest["evaluation_sample"] = _without_per_record(sample)
    write_json(Path(checkpoint_dir) / MANIFEST, manifest)
    return full
