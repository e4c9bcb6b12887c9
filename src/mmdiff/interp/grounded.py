"""Grounded explanations: which annotated concept a feature tracks, with scores an LLM cannot fake.

After "Multimodal-SAE: Interpreting Features in Large Multimodal Models", which scores a visual explanation by the overlap of the feature's
activation region with the concept's region. For one feature, over held-out records, each record
gives the feature's activation at every position of one side, image patches on the model's real
patch grid ([rows, cols], possibly non-square) or text tokens ([n_text]), and the regions of the
annotated concepts on the same positions (bool masks, from `mmdiff.data.regions` and the
annotation loaders). Every concept gets two measured scores (docs/method.md#grounded-explanations):

- localisation, IoU: the feature's map thresholded at half its own maximum in that record
  (`active_region`) against the concept's region, averaged over the records where the concept is
  present and the feature fires (a record it does not fire on says nothing about where it fires);
- detection: how well "concept present in the record" is predicted by the feature's max activation
  over the record's positions, as AUROC (threshold-free) and as balanced accuracy of "the feature
  fires" (max > 0; an SAE latent is off at 0, so no threshold is fitted on the held-out records).

The grounding score is min(IoU, 2 * AUROC - 1): a concept must both localise (IoU) and detect
(AUROC above chance, rescaled so chance is 0). A feature is explained by the concepts whose
grounding score is at least `MIN_GROUNDING_SCORE` (and that is present in, and absent from, at
least `MIN_RECORDS` records); with none, the answer is "no grounded concept
found" with the best candidate's scores, never a guess. The scores are pure functions on numpy
arrays; `ground_features` feeds them from records re-run by `interp.examples.token_activations`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mmdiff.data.records import Record
from mmdiff.data.regions import Grid
from mmdiff.errors import DataError
from mmdiff.interp.examples import FeatureKey, RecordActivations
from mmdiff.interp.heatmap import Tile, patch_maps
from mmdiff.interp.scoring import detection_metrics
from mmdiff.models.base import TokenType

ACTIVE_FRACTION = 0.5  # a position is in the feature's active region at >= this share of the record's max
MIN_GROUNDING_SCORE = 0.5  # min(IoU, 2 * AUROC - 1) a concept needs to explain the feature
# Records a concept must be present in, and absent from, to explain a feature: with one present
# record a random feature's IoU and AUROC are luck (12 of 20 random SAE latents on the organism's
# validation records were "grounded" by a concept seen once).
MIN_RECORDS = 5
NO_CONCEPT = "no grounded concept found"


@dataclass(frozen=True)
class Observation:
    """One held-out record seen on one side: the feature's activations and the concept regions there."""

    acts: np.ndarray  # [rows, cols] image patches or [n_text] text tokens: the feature's activation
    regions: Mapping[str, np.ndarray]  # concept -> bool mask of acts' shape; absent concepts may be left out

    def __post_init__(self) -> None:
        acts = np.asarray(self.acts, dtype=np.float64)
        object.__setattr__(self, "acts", acts)
        masks = {}
        for name, region in self.regions.items():
            region = np.asarray(region, dtype=bool)
            if region.shape != acts.shape:
                raise DataError(
                    f"concept {name!r} has a region of shape {region.shape} but the activation map has "
                    f"shape {acts.shape}: map the concept onto the same patch grid (or text positions)"
                )
            masks[name] = region
        object.__setattr__(self, "regions", masks)


@dataclass(frozen=True)
class ConceptScore:
    """How well one concept explains a feature on one side ("image" or "text") of held-out records."""

    concept: str
    side: str
    iou: float  # mean IoU over records with the concept present and the feature firing; nan if none
    auroc: float  # "concept present" from the record's max activation; nan if a class is missing
    balanced_accuracy: float  # of "feature fires" (max > 0) as the prediction of "concept present"
    n_present: int  # records holding the concept
    n_absent: int
    n_iou: int  # records the IoU averages over

    @property
    def grounding_score(self) -> float:
        """min(IoU, 2 * AUROC - 1); nan when either is undefined."""
        if math.isnan(self.iou) or math.isnan(self.auroc):
            return math.nan
        return min(self.iou, 2.0 * self.auroc - 1.0)

    def describe(self) -> str:
        return (f"{self.concept} ({self.side}: IoU {self.iou:.2f}, AUROC {self.auroc:.2f}, "
                f"balanced accuracy {self.balanced_accuracy:.2f}, {self.n_present} present / "
                f"{self.n_absent} absent)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields and the grounding score; undefined scores are None (JSON has no NaN)."""
        d = {**asdict(self), "grounding_score": self.grounding_score}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


@dataclass(frozen=True)
class GroundedExplanation:
    """The concepts that explain a feature (best first), or none, with every concept's scores."""

    concepts: tuple[ConceptScore, ...]  # grounding score >= the threshold, best first; empty = none found
    candidates: tuple[ConceptScore, ...]  # every scored concept, best first
    min_score: float

    @property
    def found(self) -> bool:
        return bool(self.concepts)

    @property
    def text(self) -> str:
        if self.concepts:
            return "; ".join(c.describe() for c in self.concepts)
        if not self.candidates:
            return f"{NO_CONCEPT} (no concept could be scored)"
        return f"{NO_CONCEPT} (best: {self.candidates[0].describe()})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "found": self.found,
            "min_score": self.min_score,
            "concepts": [c.to_dict() for c in self.concepts],
            "candidates": [c.to_dict() for c in self.candidates],
        }


def active_region(acts: np.ndarray, fraction: float = ACTIVE_FRACTION) -> np.ndarray:
    """Positions where the feature is at least `fraction` of its max in this record (empty if it never fires)."""
    acts = np.asarray(acts, dtype=np.float64)
    top = float(acts.max()) if acts.size else 0.0
    if top <= 0.0:
        return np.zeros(acts.shape, dtype=bool)
    return acts >= fraction * top


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two bool masks of one shape; nan when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise DataError(f"IoU of masks of shapes {a.shape} and {b.shape}: they must share one grid")
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else math.nan


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for `labels` (Mann-Whitney U, ties count half); nan
    when only one class is present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise DataError(f"{s.size} scores for {y.size} labels; they must pair up")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def score_concept(concept: str, side: str, observations: Sequence[Observation],
                  fraction: float = ACTIVE_FRACTION) -> ConceptScore:
    """IoU, AUROC and balanced accuracy of one concept for one feature on one side's held-out records."""
    return _score(concept, side, observations, *_peaks(observations, fraction))


def _peaks(observations: Sequence[Observation], fraction: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each record's max activation [n_records] and active region (computed once per feature)."""
    maxima = np.array([float(o.acts.max()) if o.acts.size else 0.0 for o in observations])
    return maxima, [active_region(o.acts, fraction) for o in observations]


def _score(concept: str, side: str, observations: Sequence[Observation], maxima: np.ndarray,
           actives: Sequence[np.ndarray]) -> ConceptScore:
    present, ious = [], []
    for obs, top, active in zip(observations, maxima, actives):
        region = obs.regions.get(concept)
        has = region is not None and bool(region.any())
        present.append(has)
        if has and top > 0.0:
            ious.append(iou(active, region))
    n_present = sum(present)
    n_absent = len(present) - n_present
    if n_present and n_absent:
        bal = detection_metrics(present, [m > 0.0 for m in maxima]).balanced_accuracy
    else:
        bal = math.nan
    return ConceptScore(
        concept=concept, side=side,
        iou=float(np.mean(ious)) if ious else math.nan,
        auroc=auroc(maxima, present), balanced_accuracy=bal,
        n_present=n_present, n_absent=n_absent, n_iou=len(ious),
    )


def _rank_key(c: ConceptScore) -> tuple[float, float, float]:
    g = c.grounding_score
    return (-(g if not math.isnan(g) else -math.inf),
            -(c.auroc if not math.isnan(c.auroc) else -math.inf),
            -(c.iou if not math.isnan(c.iou) else -math.inf))


def ground_feature(
    observations: Mapping[str, Sequence[Observation]],
    *,
    min_score: float = MIN_GROUNDING_SCORE,
    min_records: int = MIN_RECORDS,
    top: int = 3,
    fraction: float = ACTIVE_FRACTION,
) -> GroundedExplanation:
    """The concepts that best explain a feature, from held-out observations per side ("image", "text").

    Every concept named in any observation of a side is scored on all of that side's observations
    (a record whose regions leave the concept out does not hold it). Up to `top` concepts with a
    grounding score >= `min_score` explain the feature, best first; with none, the explanation says
    "no grounded concept found" and keeps the candidates' scores.
    """
    scores = []
    for side, obs in observations.items():
        names = sorted({name for o in obs for name in o.regions})
        peaks = _peaks(obs, fraction)
        scores.extend(_score(name, side, obs, *peaks) for name in names)
    ranked = tuple(sorted(scores, key=_rank_key))
    chosen = tuple(c for c in ranked  # nan compares False
                   if c.grounding_score >= min_score and min(c.n_present, c.n_absent) >= min_records)[:top]
    return GroundedExplanation(concepts=chosen, candidates=ranked, min_score=min_score)


# --------------------------------------------------------------------------------------------
# from re-run records to observations


ConceptSource = Callable[[Record, "Grid | None", Sequence[str]], Mapping[str, Mapping[str, np.ndarray]]]
"""(record, its finest patch grid or None without image, its text tokens) -> side -> concept -> region."""


def _finest(tiles: Sequence[Tile]) -> int:
    """Index of the tile with the most patches (the first of equals): the map the concepts are drawn on."""
    return max(range(len(tiles)), key=lambda i: (tiles[i][0] * tiles[i][1], -i))


def ground_features(
    record_acts: Sequence[RecordActivations],
    keys: Sequence[FeatureKey],
    concepts_of: ConceptSource,
    tokenizer: Any,
    **kwargs: Any,
) -> dict[FeatureKey, GroundedExplanation]:
    """`ground_feature` for each feature over held-out records re-run by `token_activations`: the image
    side on each record's finest patch tile, the text side on its text tokens. kwargs go to
    `ground_feature` (min_score, top, fraction)."""
    per_record = []
    for ra in record_acts:
        text = ra.token_types == int(TokenType.TEXT)  # [T]
        tokens = [tokenizer.decode([int(i)]) for i in ra.input_ids[text].tolist()]
        tile = _finest(ra.tiles) if ra.tiles else None
        grid = ra.tiles[tile][:2] if tile is not None else None
        per_record.append((ra, text, tile, concepts_of(ra.record, grid, tokens)))
    out = {}
    for key in keys:
        sides: dict[str, list[Observation]] = {"image": [], "text": []}
        for ra, text, tile, concepts in per_record:
            if tile is not None:
                image_map = patch_maps(ra.image_values(key), ra.tiles)[tile].numpy()  # [rows, cols]
                sides["image"].append(Observation(image_map, concepts.get("image", {})))
            if bool(text.any()):
                sides["text"].append(Observation(ra.activations[key][text].numpy(), concepts.get("text", {})))
        out[key] = ground_feature({s: o for s, o in sides.items() if o}, **kwargs)
    return out


# --------------------------------------------------------------------------------------------
# the organism's ground-truth check

# The concept kinds ("<kind>=<value>", or the bare "text") that match a task's features: an OCR or
# safety (typographic) feature should track rendered words, a spatial one object positions or the
# asked relation, colour and shape ones their attribute.
TASK_CONCEPT_KINDS: dict[str, tuple[str, ...]] = {
    "ocr": ("word", "text"),
    "safety": ("word", "text"),
    "spatial": ("cell", "row", "col", "relation", "subject", "related"),
    "colour": ("colour", "object", "said"),
    "shape": ("shape", "object", "said"),
}


def matches_task(grounded: GroundedExplanation | Mapping[str, Any], task: str) -> bool | None:
    """Whether a feature's best grounded concept is of a kind its task predicts (TASK_CONCEPT_KINDS);
    False when no concept was found, None for tasks without a prediction."""
    kinds = TASK_CONCEPT_KINDS.get(task)
    if kinds is None:
        return None
    concepts = grounded.concepts if isinstance(grounded, GroundedExplanation) else grounded.get("concepts", [])
    if not concepts:
        return False
    best = concepts[0].concept if isinstance(concepts[0], ConceptScore) else concepts[0]["concept"]
    return best.split("=", 1)[0] in kinds


def match_share(features: Sequence[tuple[str, GroundedExplanation | Mapping[str, Any]]]) -> dict[str, tuple[int, int]]:
    """task -> (features whose best grounded concept matches the task, features of the task) over
    (task, grounded explanation) pairs; tasks without a prediction are left out."""
    out: dict[str, tuple[int, int]] = {}
    for task, grounded in features:
        match = matches_task(grounded, task)
        if match is None:
            continue
        hit, n = out.get(task, (0, 0))
        out[task] = (hit + int(match), n + 1)
    return out
