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

Two kinds of partial annotation are kept apart from absence. A concept may be present without a
region (`PRESENT`: OCRBench says its images hold text but gives no boxes): it counts for detection
and not for IoU. A record may not annotate a concept's kind at all (a COCO image says nothing about
text, a TextVQA image nothing about COCO categories): `Observation.known` / the `known` argument of
`score_side` name the kinds a record annotates ("text", "category", ...; None = every kind), and a
concept is scored only on the records that annotate its kind, so mixing sources adds no false
absences.

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
import torch

from mmdiff.data.records import Record
from mmdiff.data.regions import Grid
from mmdiff.errors import DataError
from mmdiff.interp.examples import FeatureKey, RecordActivations
from mmdiff.interp.heatmap import Tile, patch_maps, tile_token_count
from mmdiff.interp.scoring import detection_metrics
from mmdiff.models.base import TokenType
from mmdiff.schema import Artifact, Column

ACTIVE_FRACTION = 0.5  # a position is in the feature's active region at >= this share of the record's max
MIN_GROUNDING_SCORE = 0.5  # min(IoU, 2 * AUROC - 1) a concept needs to explain the feature
# Records a concept must be present in, and absent from, to explain a feature: with one present
# record a random feature's IoU and AUROC are luck (12 of 20 random SAE latents on the organism's
# validation records were "grounded" by a concept seen once).
MIN_RECORDS = 5
NO_CONCEPT = "no grounded concept found"
PRESENT = None  # a region value: the concept is in the record, where is not annotated (detection only)


def concept_kind(name: str) -> str:
    """The kind of a concept: "category" of "category=dog", "text" of the bare "text"."""
    return name.split("=", 1)[0]


@dataclass(frozen=True)
class Observation:
    """One held-out record seen on one side: the feature's activations and the concept regions there."""

    acts: np.ndarray  # [rows, cols] image patches or [n_text] text tokens: the feature's activation
    # concept -> bool mask of acts' shape, or PRESENT (no region annotated); absent concepts may be left out
    regions: Mapping[str, np.ndarray | None]
    known: frozenset[str] | None = None  # the concept kinds this record annotates; None = every kind

    def __post_init__(self) -> None:
        acts = np.asarray(self.acts, dtype=np.float64)
        object.__setattr__(self, "acts", acts)
        object.__setattr__(self, "regions", _checked(self.regions, acts.shape))


@dataclass(frozen=True)
class ConceptScore:
    """How well one concept explains a feature on one side ("image" or "text") of held-out records."""

    concept: str
    side: str
    iou: float  # mean IoU over records locating the concept where the feature fires; nan if none
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
        def num(v: float) -> str:
            return "n/a" if math.isnan(v) else f"{v:.2f}"

        return (f"{self.concept} ({self.side}: IoU {num(self.iou)}, AUROC {num(self.auroc)}, "
                f"balanced accuracy {num(self.balanced_accuracy)}, {self.n_present} present / "
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
    kept = [i for i, o in enumerate(observations) if o.known is None or concept_kind(concept) in o.known]
    observations, maxima, actives = [observations[i] for i in kept], maxima[kept], [actives[i] for i in kept]
    present, ious = [], []
    for obs, top, active in zip(observations, maxima, actives):
        region = obs.regions.get(concept)
        located = region is not None and bool(region.any())
        present.append(located or (concept in obs.regions and region is PRESENT))
        if located and top > 0.0:
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
    scores: list[ConceptScore] = []
    for side, obs in observations.items():
        if obs:
            stacked = [o.acts[..., None] for o in obs]
            scores.extend(score_side(side, stacked, [o.regions for o in obs], fraction, [o.known for o in obs])[0])
    return _explain(scores, min_score, min_records, top)


def _explain(scores: Sequence[ConceptScore], min_score: float, min_records: int, top: int) -> GroundedExplanation:
    ranked = tuple(sorted(scores, key=_rank_key))
    chosen = tuple(c for c in ranked  # nan compares False
                   if c.grounding_score >= min_score and min(c.n_present, c.n_absent) >= min_records)[:top]
    return GroundedExplanation(concepts=chosen, candidates=ranked, min_score=min_score)


def score_side(side: str, acts: Sequence[np.ndarray], regions: Sequence[Mapping[str, np.ndarray | None]],
               fraction: float = ACTIVE_FRACTION,
               known: Sequence[frozenset[str] | None] | None = None) -> list[list[ConceptScore]]:
    """`score_concept` for many features and every concept at once, as array operations.

    acts: per record, the activations of n features at that record's positions ([..., n], any
    per-record shape before the feature axis); regions: per record, concept -> bool mask of the
    positions' shape, or PRESENT (absent concepts may be left out); known: per record, the concept
    kinds it annotates (None = all; a concept is scored only on the records annotating its kind).
    Returns per feature its ConceptScore of every concept named in any record (sorted by name): the
    same numbers as `score_concept` on each feature's observations, without a Python loop over
    features or records.
    """
    from scipy.stats import rankdata

    names = sorted({name for r in regions for name in r})
    n_records = len(acts)
    if not n_records:
        return []
    n_feat = int(np.asarray(acts[0]).shape[-1])
    if not names:
        return [[] for _ in range(n_feat)]
    col = {name: j for j, name in enumerate(names)}
    maxima = np.zeros((n_records, n_feat))
    inter = np.zeros((n_records, n_feat, len(names)))  # |active & region| per record
    active_n = np.zeros((n_records, n_feat))  # |active|
    region_n = np.zeros((n_records, len(names)))  # |region|
    flagged = np.zeros((n_records, len(names)), dtype=bool)  # PRESENT: in the record, no region
    valid = np.ones((n_records, len(names)), dtype=bool)  # the record annotates the concept's kind
    for r, kinds in enumerate(known or ()):
        if kinds is not None:
            valid[r] = [concept_kind(name) in kinds for name in names]
    for r, (a, reg) in enumerate(zip(acts, regions)):
        a = np.asarray(a, dtype=np.float64).reshape(-1, n_feat)  # [positions, n]
        top = a.max(0) if a.shape[0] else np.zeros(n_feat)
        maxima[r] = top
        active = (a >= fraction * top) & (top > 0.0)  # [positions, n]; empty where it never fires
        active_n[r] = active.sum(0)
        if not reg:
            continue
        masks = np.zeros((a.shape[0], len(names)))  # [positions, concepts]
        for name, mask in reg.items():
            if mask is PRESENT:
                flagged[r, col[name]] = True
            else:
                masks[:, col[name]] = np.asarray(mask, dtype=bool).reshape(-1)
        region_n[r] = masks.sum(0)
        inter[r] = active.T.astype(np.float64) @ masks
    located = (region_n > 0) & valid  # [R, C]
    present = located | (flagged & valid)
    absent = valid & ~present
    fires = maxima > 0.0  # [R, n]
    n_present = present.sum(0)  # [C]
    n_absent = absent.sum(0)
    # IoU over records locating the concept where the feature fires (then the union is not empty)
    counted = fires[:, :, None] & located[:, None, :]  # [R, n, C]
    union = active_n[:, :, None] + region_n[:, None, :] - inter
    ious = np.where(counted, inter / np.where(counted, union, 1.0), 0.0)
    n_iou = counted.sum(0)  # [n, C]
    mean_iou = np.where(n_iou > 0, ious.sum(0) / np.maximum(n_iou, 1), math.nan)
    # AUROC (Mann-Whitney, ties half) of "present" from the record's max, per feature and concept,
    # ranked among the records annotating the concept's kind (one ranking per distinct set of them)
    pos = present.astype(np.float64)
    both = (n_present > 0) & (n_absent > 0)
    u = np.zeros((n_feat, len(names)))
    patterns, which = np.unique(valid.T, axis=0, return_inverse=True)
    for p, rows in enumerate(patterns):
        cols = np.flatnonzero(np.asarray(which).reshape(-1) == p)
        if rows.any():
            ranks = rankdata(maxima[rows], axis=0)  # [R', n] average ranks over ties
            u[:, cols] = ranks.T @ pos[rows][:, cols] - n_present[cols] * (n_present[cols] + 1) / 2.0
    area = np.where(both, u / np.maximum(n_present * n_absent, 1), math.nan)
    # balanced accuracy of "fires" (max > 0) as the prediction of "present"
    tpr = (fires.T.astype(np.float64) @ pos) / np.maximum(n_present, 1)
    tnr = ((~fires).T.astype(np.float64) @ absent.astype(np.float64)) / np.maximum(n_absent, 1)
    bal = np.where(both, (tpr + tnr) / 2.0, math.nan)
    return [
        [ConceptScore(concept=name, side=side, iou=float(mean_iou[f, j]), auroc=float(area[f, j]),
                      balanced_accuracy=float(bal[f, j]), n_present=int(n_present[j]), n_absent=int(n_absent[j]),
                      n_iou=int(n_iou[f, j]))
         for j, name in enumerate(names)]
        for f in range(n_feat)
    ]


# --------------------------------------------------------------------------------------------
# from re-run records to observations


ConceptSource = Callable[[Record, "Grid | None", Sequence[str]], Mapping[str, Mapping[str, "np.ndarray | None"]]]
"""(record, its finest patch grid or None without image, its text tokens) -> side -> concept ->
region (or PRESENT). A source may also have `known(record)`: the concept kinds it annotates in that
record (None or no such method: every kind named anywhere, absent where not named)."""


@dataclass(frozen=True)
class ConceptSources:
    """Several concept sources as one (COCO boxes and OCR tokens, say): each record gets the concepts
    of the first source that `covers` it, and only the kinds that source annotates are known there."""

    sources: tuple[Any, ...]

    def _of(self, record: Record) -> Any:
        return next((s for s in self.sources if s.covers(record)), None)

    def covers(self, record: Record) -> bool:
        return self._of(record) is not None

    def known(self, record: Record) -> frozenset[str] | None:
        source = self._of(record)
        if source is None:
            return frozenset()
        return source.known(record) if hasattr(source, "known") else None

    def __call__(self, record: Record, grid: Grid | None, tokens: Sequence[str]) -> Mapping[str, Mapping[str, Any]]:
        source = self._of(record)
        return source(record, grid, tokens) if source is not None else {"image": {}, "text": {}}


def _finest(tiles: Sequence[Tile]) -> int:
    """Index of the tile with the most patches (the first of equals): the map the concepts are drawn on."""
    return max(range(len(tiles)), key=lambda i: (tiles[i][0] * tiles[i][1], -i))


@dataclass(frozen=True)
class HeldOut:
    """The held-out records as detection reads them: what each holds and how strongly each feature fires."""

    records: tuple[Record, ...]
    present: tuple[frozenset[str], ...]  # per record: concepts present on either side (located or PRESENT)
    known: tuple[frozenset[str] | None, ...]  # per record: the concept kinds annotated (None = all)
    maxima: np.ndarray  # [R, n] each feature's max activation over the record's image and text positions


@dataclass(frozen=True)
class Observed:
    """What `observe` read off re-run records: per side (activations, regions, known kinds) lists for
    `score_side`, and the records' view for held-out detection."""

    sides: Mapping[str, tuple[list[np.ndarray], list[Mapping[str, Any]], list[frozenset[str] | None]]]
    held_out: HeldOut


def observe(record_acts: Sequence[RecordActivations], keys: Sequence[FeatureKey], concepts_of: ConceptSource,
            tokenizer: Any) -> Observed:
    """The concepts of each record re-run by `token_activations` and the features' activations on
    them: the image side on each record's finest patch tile, the text side on its text tokens."""
    keys = list(keys)
    known_of = getattr(concepts_of, "known", None)
    sides: dict[str, tuple[list[np.ndarray], list[Mapping[str, Any]], list[frozenset[str] | None]]] = {
        "image": ([], [], []), "text": ([], [], [])}
    records, present, known, maxima = [], [], [], []
    for ra in record_acts:
        text = ra.token_types == int(TokenType.TEXT)  # [T]
        tokens = [tokenizer.decode([int(i)]) for i in ra.input_ids[text].tolist()]
        tile = _finest(ra.tiles) if ra.tiles else None
        grid = ra.tiles[tile][:2] if tile is not None else None
        concepts = concepts_of(ra.record, grid, tokens)
        kinds = known_of(ra.record) if known_of is not None else None
        values = torch.stack([ra.activations[key] for key in keys], dim=-1)  # [T, n]
        held: set[str] = set()
        if tile is not None:
            maps = _tile_maps(values[ra.token_types == int(TokenType.IMAGE)], ra.tiles, tile)
            regions = _checked(concepts.get("image", {}), maps.shape[:2])
            sides["image"][0].append(maps)  # [rows, cols, n]
            sides["image"][1].append(regions)
            sides["image"][2].append(kinds)
            held |= {name for name, r in regions.items() if r is PRESENT or r.any()}
        if bool(text.any()):
            regions = _checked(concepts.get("text", {}), (int(text.sum()),))
            sides["text"][0].append(values[text].numpy())  # [n_text, n]
            sides["text"][1].append(regions)
            sides["text"][2].append(kinds)
            held |= {name for name, r in regions.items() if r is PRESENT or r.any()}
        content = (ra.token_types == int(TokenType.TEXT)) | (ra.token_types == int(TokenType.IMAGE))
        top = values[content].max(0).values if bool(content.any()) else torch.zeros(len(keys))
        records.append(ra.record)
        present.append(frozenset(held))
        known.append(kinds)
        maxima.append(top.float().numpy())
    n = len(keys)
    table = np.stack(maxima) if maxima else np.zeros((0, n))
    return Observed(sides, HeldOut(tuple(records), tuple(present), tuple(known), table))


def ground_observed(
    observed: Observed,
    keys: Sequence[FeatureKey],
    *,
    min_score: float = MIN_GROUNDING_SCORE,
    min_records: int = MIN_RECORDS,
    top: int = 3,
    fraction: float = ACTIVE_FRACTION,
) -> dict[FeatureKey, GroundedExplanation]:
    """`ground_feature` for each feature of `observe`'s records; all features and concepts of a side
    are scored at once (`score_side`)."""
    keys = list(keys)
    per_feature: list[list[ConceptScore]] = [[] for _ in keys]
    for side, (acts, regions, known) in observed.sides.items():
        for f, scores in enumerate(score_side(side, acts, regions, fraction, known)):
            per_feature[f].extend(scores)
    return {key: _explain(per_feature[f], min_score, min_records, top) for f, key in enumerate(keys)}


def ground_features(
    record_acts: Sequence[RecordActivations],
    keys: Sequence[FeatureKey],
    concepts_of: ConceptSource,
    tokenizer: Any,
    **kwargs: Any,
) -> dict[FeatureKey, GroundedExplanation]:
    """`ground_feature` for each feature over held-out records re-run by `token_activations`
    (`observe`, then `ground_observed` with its keyword arguments)."""
    return ground_observed(observe(record_acts, keys, concepts_of, tokenizer), keys, **kwargs)


def _tile_maps(image: torch.Tensor, tiles: Sequence[Tile], tile: int) -> np.ndarray:
    """[rows, cols, n] the maps of one tile from image-token values [n_image, n] (as `patch_maps`
    gives each feature's: token order, newline tokens dropped)."""
    if image.shape[0] != tile_token_count(tiles):
        patch_maps(image[:, 0], tiles)  # raises, naming the grid and the count
    start = sum(rows * (cols + int(newline)) for rows, cols, newline in tiles[:tile])
    rows, cols, newline = tiles[tile]
    block = image[start : start + rows * (cols + int(newline))].reshape(rows, cols + int(newline), -1)
    return block[:, :cols].float().numpy()


def _checked(regions: Mapping[str, np.ndarray | None], shape: tuple[int, ...]) -> dict[str, np.ndarray | None]:
    """The regions as bool masks, each of the activation map's shape (as `Observation` checks);
    PRESENT stays PRESENT."""
    out: dict[str, np.ndarray | None] = {}
    for name, region in regions.items():
        if region is PRESENT:
            out[name] = PRESENT
            continue
        region = np.asarray(region, dtype=bool)
        if region.shape != tuple(shape):
            raise DataError(
                f"concept {name!r} has a region of shape {region.shape} but the activation map has "
                f"shape {tuple(shape)}: map the concept onto the same patch grid (or text positions)"
            )
        out[name] = region
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
    return concept_kind(best) in kinds


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of the proportion k / n (95% by default); (nan, nan) when n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _best_of_kinds(grounded: GroundedExplanation, kinds: Sequence[str]) -> ConceptScore | None:
    return next((c for c in grounded.candidates if concept_kind(c.concept) in kinds), None)


def grounding_table(task_features: Any, grounded: Mapping[FeatureKey, GroundedExplanation]) -> Any:
    """One row per (task, feature) of `task_features` (columns layer, feature, task) that was
    grounded: its best concept and scores, whether that concept is of its task's kind, and the best
    candidate of its task's kinds (TASK_CONCEPT_KINDS). Columns: `GROUNDING`."""
    import pandas as pd

    rows = []
    for layer, feature, task in zip(task_features["layer"], task_features["feature"], task_features["task"]):
        g = grounded.get((int(layer), int(feature)))
        if g is None:
            continue
        best = g.concepts[0] if g.concepts else (g.candidates[0] if g.candidates else None)
        kinds = TASK_CONCEPT_KINDS.get(str(task))
        own = _best_of_kinds(g, kinds) if kinds else None
        match = matches_task(g, str(task))

        def num(c: ConceptScore | None, name: str) -> float:
            return math.nan if c is None else float(getattr(c, name))

        rows.append({
            "layer": int(layer), "feature": int(feature), "task": str(task), "found": g.found,
            "concept": best.concept if best else None,
            "grounding_score": num(best, "grounding_score"), "iou": num(best, "iou"), "auroc": num(best, "auroc"),
            "balanced_accuracy": num(best, "balanced_accuracy"),
            "matches": match,
            "task_concept": own.concept if own else None,
            "task_grounding_score": num(own, "grounding_score"), "task_iou": num(own, "iou"),
            "task_auroc": num(own, "auroc"),
        })
    table = pd.DataFrame(rows, columns=list(GROUNDING.names))
    return GROUNDING.validate(table.astype({"matches": "boolean", "found": bool}))


def match_share_table(table: Any) -> Any:
    """Per task with a prediction, and pooled as "all": the share of its features whose best
    grounded concept is of the task's kind, with its Wilson 95% interval, and the quartiles of the
    best concept's AUROC and grounding score (a feature without any scored concept counts as 0).
    Columns: `MATCH_SHARE`."""
    import pandas as pd

    judged = table[table["matches"].notna()]
    rows = []
    groups = [(str(t), g) for t, g in judged.groupby("task", sort=True)]
    if groups:
        groups.append(("all", judged))
    for task, g in groups:
        n, k = int(len(g)), int(g["matches"].astype(bool).sum())
        lo, hi = wilson_interval(k, n)
        auc = g["auroc"].fillna(0.5).to_numpy()  # no concept present and absent: chance
        score = g["grounding_score"].fillna(0.0).to_numpy()
        rows.append({
            "task": task, "features": n, "matched": k, "share": k / n if n else math.nan, "ci_lo": lo, "ci_hi": hi,
            "found": int(g["found"].sum()),
            **{f"auroc_q{q}": float(np.quantile(auc, q / 100)) for q in (25, 50, 75)},
            **{f"score_q{q}": float(np.quantile(score, q / 100)) for q in (25, 50, 75)},
        })
    return MATCH_SHARE.validate(pd.DataFrame(rows, columns=list(MATCH_SHARE.names)))


GROUNDING = Artifact("interp/grounding.parquet", "grounding_table", doc=(
    "Each grounded (task, feature): its best concept on the held-out records and whether it is of the task's kind."),
    columns=(
        Column("layer", int), Column("feature", int),
        Column("task", str, "the detect stage's set (spatial, ocr, safety, ...) or 'adapted'"),
        Column("found", bool, "a concept reached the grounding score and record counts"),
        Column("concept", str, "the grounded concept, or the best candidate when none was found; NA if none scored"),
        Column("grounding_score", float, "min(IoU, 2 AUROC - 1) of `concept`"),
        Column("iou", float), Column("auroc", float), Column("balanced_accuracy", float),
        Column("matches", bool, "a concept was found and is of the task's kind (TASK_CONCEPT_KINDS); NA "
               "for tasks without a prediction"),
        Column("task_concept", str, "the best candidate of the task's kinds; NA without one"),
        Column("task_grounding_score", float), Column("task_iou", float), Column("task_auroc", float),
    ))
MATCH_SHARE = Artifact("interp/match_share.parquet", "match_share_table", doc=(
    "The organism's ground-truth check: per task, the share of its features explained by a concept of its kind."),
    columns=(
        Column("task", str, "a task with a prediction, or 'all' (every judged task feature)"),
        Column("features", int), Column("matched", int),
        Column("share", float, "matched / features"),
        Column("ci_lo", float, "Wilson 95% interval"), Column("ci_hi", float),
        Column("found", int, "features with any grounded concept"),
        Column("auroc_q25", float, "quartiles of the best concept's AUROC (0.5 where none was scored)"),
        Column("auroc_q50", float), Column("auroc_q75", float),
        Column("score_q25", float, "quartiles of the best concept's grounding score (0 where none)"),
        Column("score_q50", float), Column("score_q75", float),
    ))
