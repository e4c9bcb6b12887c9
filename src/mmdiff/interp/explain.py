"""Feature explanations: an LLM explainer (JSON mode) and an offline explainer that needs no LLM.

Inputs are plain data: a `FeatureEvidence` holds a feature's top-activating examples (tokens with
the feature's activation at each, token types, optional heatmap PNGs), the tokens its decoder
direction promotes through the unembedding, and its image-token share of activation mass. The
statistics stage's top-k examples convert into it directly.

`make_explainer(llm_config)` gives the LLM explainer when an endpoint is configured and the offline
explainer otherwise (docs/method.md#feature-explanations).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch
from pydantic import BaseModel, Field, field_validator

from mmdiff.atomic import write_json
from mmdiff.errors import DataError
from mmdiff.models.base import TokenType

if TYPE_CHECKING:
    from mmdiff.interp.client import LLMClient, LLMConfig

IMAGE_PATTERN = "<image>"  # how image tokens are named in patterns and cue counts


@dataclass
class Explanation:
    """What a feature means: a description, the patterns behind it, and what was measured of it.

    Only `detection` is a measured score of the explanation (on examples the explainer did not
    see); `measured_score` is the one thing a report may print as its quality. `confidence` is an
    LLM explainer's own rating and `coverage` an in-sample share of the explainer's examples: neither
    says whether the explanation predicts the feature, so neither is printed as a score.
    """

    description: str
    confidence: float | None = None  # the LLM explainer's self-rating in [0, 1]; None offline
    patterns: list[str] = field(default_factory=list)
    cue_counts: dict[str, int] = field(
        default_factory=dict
    )  # cue (token / word) -> examples showing it
    source: str = ""  # "offline" or "llm:<model>"
    feature_id: str = ""
    coverage: float | None = None  # offline: share of the examples' activating mass its patterns carry
    detection: float | None = None  # balanced accuracy of detection on held-out examples
    detection_n: int | None = None  # how many held-out examples that score was measured on
    detection_ci: list[float] | None = None  # its 95% interval [lo, hi] (interp.heldout), where computed
    grounded: dict[str, Any] | None = None  # interp.grounded.GroundedExplanation.to_dict(): concepts with IoU / AUROC

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Explanation":
        keys = (
            "description", "confidence", "patterns", "cue_counts", "source", "feature_id",
            "coverage", "detection", "detection_n", "detection_ci", "grounded",
        )  # fmt: skip
        return cls(**{k: d[k] for k in keys if k in d})

    def measured_score(self) -> str | None:
        """ "detection 0.83 (balanced accuracy, 40 held-out examples)", or None where nothing was
        measured: the only score of an explanation that a report prints."""
        if self.detection is None or math.isnan(self.detection):
            return None
        on = f", {self.detection_n} held-out examples" if self.detection_n else ", held-out examples"
        if self.detection_ci:
            lo, hi = self.detection_ci
            return f"detection {self.detection:.2f} [{lo:.2f}, {hi:.2f}] (balanced accuracy, 95% interval{on})"
        return f"detection {self.detection:.2f} (balanced accuracy{on})"

    def with_detection(self, balanced_accuracy: float, n_examples: int,
                       ci: tuple[float, float] | None = None) -> "Explanation":
        """A copy carrying a detection score measured on `n_examples` held-out examples
        (`interp.scoring.DetectionScorer`), with its 95% interval where given."""
        import dataclasses

        return dataclasses.replace(
            self, detection=float(balanced_accuracy), detection_n=int(n_examples),
            detection_ci=[float(v) for v in ci] if ci is not None else None,
        )


@dataclass
class ActivatingExample:
    """One context window and the feature's activation at each of its tokens."""

    tokens: list[str]  # decoded tokens, in order
    activations: list[float]  # [len(tokens)] the feature's activation at each token
    token_types: list[int] | None = None  # [len(tokens)] TokenType values; None = all text
    heatmap_png: bytes | None = None  # optional image-patch heatmap, PNG bytes
    record_id: str = ""
    source: str = ""  # which dataset it came from, e.g. "VQAv2" or "VSR" (shown to the LLM)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.activations):
            raise DataError(
                f"example {self.record_id!r}: {len(self.tokens)} tokens but "
                f"{len(self.activations)} "
                "activations; give one activation per token"
            )
        if self.token_types is not None and len(self.token_types) != len(self.tokens):
            raise DataError(
                f"example {self.record_id!r}: {len(self.token_types)} token types for "
                f"{len(self.tokens)} tokens"
            )

    @classmethod
    def from_token_ids(
        cls,
        token_ids: Sequence[int] | torch.Tensor,
        activations: Sequence[float] | torch.Tensor,
        tokenizer: Any,
        *,
        token_types: Sequence[int] | torch.Tensor | None = None,
        heatmap_png: bytes | None = None,
        record_id: str = "",
    ) -> "ActivatingExample":
        """An example from one context window: token ids [T], activations [T], types [T]."""

        def as_list(x: Any) -> list:
            return x.tolist() if isinstance(x, torch.Tensor) else list(x)

        ids = [int(i) for i in as_list(token_ids)]
        return cls(
            tokens=[tokenizer.decode([i]) for i in ids],
            activations=[float(a) for a in as_list(activations)],
            token_types=None if token_types is None else [int(t) for t in as_list(token_types)],
            heatmap_png=heatmap_png,
            record_id=record_id,
        )

    @property
    def max_activation(self) -> float:
        """Largest activation on a non-special token (BOS / attention sinks do not count)."""
        return max(
            (a for a, t in zip(self.activations, self.types()) if t != TokenType.SPECIAL),
            default=0.0,
        )

    def types(self) -> list[int]:
        return (
            list(self.token_types)
            if self.token_types is not None
            else [int(TokenType.TEXT)] * len(self.tokens)
        )

    def plain_text(self) -> str:
        """The text, image-token runs collapsed to one <image> marker, nothing highlighted."""
        out: list[str] = []
        prev_image = False
        for tok, tt in zip(self.tokens, self.types()):
            if tt == TokenType.IMAGE:
                if not prev_image:
                    out.append(f" {IMAGE_PATTERN} ")
                prev_image = True
                continue
            prev_image = False
            if tt != TokenType.SPECIAL:
                out.append(tok)
        return "".join(out).strip()


@dataclass
class FeatureEvidence:
    """Everything an explainer sees about one feature."""

    feature_id: str  # e.g. "L12/F807"
    examples: list[ActivatingExample]  # top-activating examples, any order
    promoted_tokens: list[tuple[str, float]] = field(
        default_factory=list
    )  # top W_U d_f tokens, logit
    image_share: float | None = (
        None  # share of activation mass on image tokens; None = from examples
    )
    # the grounded explanation's text (interp.grounded: concepts with IoU / AUROC on held-out
    # annotated records, or "no grounded concept found"); None when nothing was grounded
    grounded: str | None = None

    def image_token_share(self) -> float:
        """Share of the positive activation mass (special tokens excluded) on image tokens."""
        if self.image_share is not None:
            return float(self.image_share)
        total = image = 0.0
        for ex in self.examples:
            for a, tt in zip(ex.activations, ex.types()):
                if a > 0 and tt != TokenType.SPECIAL:
                    total += a
                    image += a if tt == TokenType.IMAGE else 0.0
        return image / total if total > 0 else 0.0


def promoted_tokens(
    decoder_direction: torch.Tensor, unembedding: torch.Tensor, tokenizer: Any, k: int = 10
) -> list[tuple[str, float]]:
    """Top-k tokens the feature promotes: W_U d_f, decoded. d_f [d_model]; W_U [vocab, d_model]
    (the lm_head weight). Apply the final norm's weight to d_f first if the model has one."""
    d = decoder_direction.detach().float().flatten()
    W_U = unembedding.detach().float()
    if W_U.ndim != 2 or W_U.shape[1] != d.shape[0]:
        raise DataError(
            f"unembedding has shape {tuple(W_U.shape)} but the decoder direction has d_model="
            f"{d.shape[0]}; expected W_U [vocab, {d.shape[0]}] (lm_head.weight) of the same model"
        )
    logits = W_U @ d  # [vocab]
    top = torch.topk(logits, min(k, logits.shape[0]))
    return [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]


class Explainer(Protocol):
    def explain(self, evidence: FeatureEvidence) -> Explanation: ...


# ------------------------------------------------------------------------------------------------
# Offline explainer
# ------------------------------------------------------------------------------------------------


def _norm_token(tok: str) -> str:
    return tok.replace("\u2581", " ").replace("\u0120", " ").strip().lower()


@dataclass
class OfflineExplainer:
    """A templated explanation from top activating tokens, promoted tokens and image share.

    A token occurrence is "activating" when its activation exceeds `rel_threshold` times the
    feature's maximum over the examples. Patterns are the tokens carrying the most activation mass
    (image tokens pooled as one "<image>" cue). `coverage` is the share of all activating mass those
    patterns carry: a feature concentrated on a few cues scores near 1, a diffuse one near 0. It is
    measured on the same examples the explanation was read from, so it is no confidence: the
    explanation has none until detection scoring measures one on held-out examples.
    """

    rel_threshold: float = 0.3
    max_patterns: int = 5
    max_promoted: int = 5

    def cue_statistics(
        self, evidence: FeatureEvidence
    ) -> tuple[dict[str, float], dict[str, int], float]:
        """(activation mass per cue, examples showing each cue, total activating mass)."""
        peak = max((ex.max_activation for ex in evidence.examples), default=0.0)
        if peak <= 0:
            return {}, {}, 0.0
        cut = self.rel_threshold * peak
        mass: dict[str, float] = defaultdict(float)
        counts: Counter[str] = Counter()
        total = 0.0
        for ex in evidence.examples:
            seen: set[str] = set()
            for tok, a, tt in zip(ex.tokens, ex.activations, ex.types()):
                if a <= cut or tt == TokenType.SPECIAL:
                    continue
                cue = IMAGE_PATTERN if tt == TokenType.IMAGE else _norm_token(tok)
                if not cue:
                    continue
                mass[cue] += a
                total += a
                seen.add(cue)
            counts.update(seen)
        return dict(mass), dict(counts), total

    def explain(self, evidence: FeatureEvidence) -> Explanation:
        if not evidence.examples:
            raise DataError(f"feature {evidence.feature_id}: no activating examples to explain")
        mass, counts, total = self.cue_statistics(evidence)
        n_ex = len(evidence.examples)
        share = evidence.image_token_share()
        promoted = [t for t, _ in evidence.promoted_tokens[: self.max_promoted]]
        if total == 0:
            return Explanation(
                description=f"Feature {evidence.feature_id} never fires on the given examples.",
                coverage=0.0,
                patterns=[],
                cue_counts={},
                source="offline",
                feature_id=evidence.feature_id,
            )
        top = sorted(mass, key=lambda c: (-mass[c], c))[: self.max_patterns]
        coverage = sum(mass[c] for c in top) / total
        text_cues = [c for c in top if c != IMAGE_PATTERN]

        parts = []
        if share >= 0.5:
            parts.append(f"Fires mainly on image tokens ({share:.0%} of activation mass)")
        elif share > 0:
            parts.append(f"Fires mainly on text tokens ({1 - share:.0%} of activation mass)")
        else:
            parts.append("Fires on text tokens only")
        if text_cues:
            parts.append("strongest on " + ", ".join(repr(c) for c in text_cues[:3]))
        if promoted:
            parts.append("promotes " + ", ".join(repr(_norm_token(t) or t) for t in promoted[:3]))
        description = "; ".join(parts) + "."

        patterns = []
        for c in top:
            name = "image tokens" if c == IMAGE_PATTERN else f"token {c!r}"
            patterns.append(
                f"{name}: {mass[c] / total:.0%} of activating mass, in {counts[c]}/{n_ex} examples"
            )
        if promoted:
            patterns.append(
                "promoted through the unembedding: " + ", ".join(repr(t) for t in promoted)
            )
        return Explanation(
            description=description,
            coverage=float(min(1.0, max(0.0, coverage))),
            patterns=patterns,
            cue_counts={c: counts[c] for c in top},
            source="offline",
            feature_id=evidence.feature_id,
        )


# ------------------------------------------------------------------------------------------------
# LLM explainer
# ------------------------------------------------------------------------------------------------


class ExplanationReply(BaseModel):
    """The JSON an LLM explainer must answer with."""

    description: str = Field(min_length=1)
    confidence: float = Field(ge=0.0, le=1.0)
    patterns: list[str] = Field(default_factory=list)
    cue_counts: dict[str, int] = Field(default_factory=dict)

    @field_validator("cue_counts", mode="before")
    @classmethod
    def _counts(cls, v: object) -> object:
        # some models answer [{"cue": "left", "count": 3}, ...]; accept that shape too
        if isinstance(v, list):
            return {
                str(d.get("cue", d.get("token", ""))): d.get("count", 0)
                for d in v
                if isinstance(d, dict)
            }
        return v


EXPLAINER_SYSTEM = (
    "You are an interpretability researcher explaining one feature (a latent of a sparse "
    "autoencoder) inside the language backbone of a vision-language model. You see the examples "
    "on which the feature activates most. Tokens where it activates are marked <<like this>> with "
    "the activation in parentheses; <image> stands for the image tokens, and a line says how much "
    "the feature fires on them. Heatmaps of where it fires on the image may follow.\n"
    "Find what the activating tokens (and image regions) have in common. "
    "Answer with a JSON object:\n"
    '{"description": "<one or two sentences: what the feature detects>", '
    '"confidence": <0..1, how consistent the examples are with the description>, '
    '"patterns": ["<short recurring pattern>", ...], '
    '"cue_counts": {"<cue word or token>": <number of examples showing it>, ...}}'
)


def mark_example(example: ActivatingExample, threshold: float) -> str:
    """The example's text, tokens above `threshold` marked <<tok>>(act), image runs collapsed."""
    out: list[str] = []
    types = example.types()
    i = 0
    while i < len(example.tokens):
        if types[i] == TokenType.IMAGE:
            j = i
            while j < len(types) and types[j] == TokenType.IMAGE:
                j += 1
            acts = example.activations[i:j]
            active = sum(a > threshold for a in acts)
            out.append(f" <image: {j - i} tokens, {active} active, max {max(acts):.2f}> ")
            i = j
            continue
        tok, a = example.tokens[i], example.activations[i]
        if types[i] != TokenType.SPECIAL:
            if a > threshold:
                lead = tok[: len(tok) - len(tok.lstrip())]
                out.append(f"{lead}<<{tok.strip()}>>({a:.2f})")
            else:
                out.append(tok)
        i += 1
    return "".join(out).strip()


@dataclass
class LLMExplainer:
    """Asks an LLM (OpenAI-compatible, JSON mode) to explain a feature from its top examples."""

    client: "LLMClient"
    max_examples: int = 20
    max_images: int = 4
    rel_threshold: float = 0.3
    system_prompt: str = EXPLAINER_SYSTEM

    def messages(self, evidence: FeatureEvidence) -> list[dict[str, Any]]:
        """The chat messages for one feature (exposed for inspection and caching tests)."""
        from mmdiff.interp.client import system_message, user_message

        if not evidence.examples:
            raise DataError(f"feature {evidence.feature_id}: no activating examples to explain")
        examples = sorted(evidence.examples, key=lambda e: -e.max_activation)[: self.max_examples]
        peak = max(e.max_activation for e in examples)
        threshold = self.rel_threshold * peak if peak > 0 else math.inf
        lines = [f"Feature {evidence.feature_id}. Top {len(examples)} activating examples:"]
        for n, ex in enumerate(examples, start=1):
            lines.append(
                f"Example {n}{f' [{ex.source}]' if ex.source else ''} "
                f"(max activation {ex.max_activation:.2f}): " + mark_example(ex, threshold)
            )
        lines.append(
            f"Share of activation mass on image tokens: {evidence.image_token_share():.0%}."
        )
        if evidence.promoted_tokens:
            toks = ", ".join(repr(t) for t, _ in evidence.promoted_tokens[:10])
            lines.append(f"Tokens the feature promotes through the unembedding: {toks}.")
        if evidence.grounded:
            lines.append(
                "Measured on held-out records with annotated concepts (IoU of where it fires with the "
                f"concept's region, AUROC of the concept's presence): {evidence.grounded}."
            )
        images: list[bytes] = []
        if self.client.supports_images:
            images = [e.heatmap_png for e in examples if e.heatmap_png][: self.max_images]
            if images:
                lines.append(
                    f"{len(images)} heatmaps follow, in the order of the examples that have one."
                )
        return [system_message(self.system_prompt), user_message("\n".join(lines), images=images)]

    def explain(self, evidence: FeatureEvidence) -> Explanation:
        reply: ExplanationReply = self.client.chat_json(self.messages(evidence), ExplanationReply)
        return self._to_explanation(evidence, reply)

    def explain_many(
        self, evidences: Sequence[FeatureEvidence], *, progress: bool = True
    ) -> list[Explanation]:
        """Explanations of many features, requests running concurrently under the client's limit."""
        from mmdiff.interp.client import ChatRequest

        reqs = [ChatRequest(self.messages(ev), validator=ExplanationReply) for ev in evidences]
        replies = self.client.chat_many(reqs, progress=progress, description="explaining features")
        return [self._to_explanation(ev, r) for ev, r in zip(evidences, replies)]

    def _to_explanation(self, evidence: FeatureEvidence, reply: ExplanationReply) -> Explanation:
        return Explanation(
            description=reply.description.strip(),
            confidence=float(reply.confidence),
            patterns=list(reply.patterns),
            cue_counts=dict(reply.cue_counts),
            source=f"llm:{self.client.name}",
            feature_id=evidence.feature_id,
        )


def make_explainer(llm: "LLMConfig | LLMClient | None" = None, **kwargs: Any) -> Explainer:
    """The LLM explainer when an endpoint is configured, else the offline one (no network)."""
    if llm is None:
        return OfflineExplainer(**kwargs)
    from mmdiff.interp.client import LLMClient, LLMConfig

    if isinstance(llm, LLMConfig):
        llm = LLMClient(llm)
    if not isinstance(llm, LLMClient):
        raise DataError(
            f"make_explainer expects an LLMConfig, an LLMClient or None, found {type(llm).__name__}"
        )
    return LLMExplainer(llm, **kwargs)


def write_explanations(path: str | Path, explanations: Sequence[Explanation]) -> None:
    """Save explanations as one JSON file, atomically (runs/<name>/interp/explanations.json)."""
    write_json(path, {"explanations": [e.to_dict() for e in explanations]})


def read_explanations(path: str | Path) -> list[Explanation]:
    """Explanations saved by `write_explanations`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [Explanation.from_dict(d) for d in data["explanations"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"cannot read explanations from {path}: {exc}; expected a file written by "
            "write_explanations (re-run the interp stage to rebuild it)"
        ) from exc
