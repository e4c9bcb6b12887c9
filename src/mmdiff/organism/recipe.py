"""The organism's recipe: every size, step count and seed that `build_organism` uses."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mmdiff.errors import ConfigError
from mmdiff.organism import mixtures

VISION_POSITIONS: tuple[str, ...] = ("sincos", "random")
"""How the vision tower's position embeddings start (OrganismConfig.vision_positions)."""
BASE_LOSSES: tuple[str, ...] = ("answer", "caption", "sequence")
"""What the base LM's loss can cover (OrganismConfig.base_loss_on, organism.batches.base_batch)."""


@dataclass
class StageConfig:
    """One training stage: plain AdamW, linear warmup then cosine decay to 10% of the peak rate."""

    steps: int
    """Optimiser steps."""
    batch_size: int
    """Sequences per step."""
    lr: float
    """Peak learning rate."""
    warmup: int = 50
    """Warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""


@dataclass
class OrganismConfig:
    """The model organism: a tiny Llama base LM and the LLaVA VLM fine-tuned from it."""

    seed: int = 0
    """Seed of weight initialisation, data order and the shapes world."""
    d_model: int = 128
    """Hidden size of the language model."""
    n_layers: int = 4
    """Decoder layers of the language model."""
    n_heads: int = 4
    """Attention heads of the language model (key/value heads too: no grouping)."""
    d_mlp: int = 384
    """Intermediate size of the language model's MLP."""
    vision_d_model: int = 128
    """Hidden size of the CLIP vision tower."""
    vision_layers: int = 2
    """Encoder layers of the vision tower."""
    vision_heads: int = 4
    """Attention heads of the vision tower."""
    vision_d_mlp: int = 256
    """Intermediate size of the vision tower's MLP."""
    image_size: int = 64
    """Image side in pixels (the shapes world renders 64x64)."""
    patch_size: int = 8
    """Vision patch side: (64 / 8)^2 = 64 image tokens, the CLS token dropped ("default" strategy)."""
    base: StageConfig = field(default_factory=lambda: StageConfig(steps=6000, batch_size=32, lr=1e-3, warmup=100))
    """Base LM, text only: captions, QA with the caption in context, refusals of harmful requests."""
    base_grounding: StageConfig | None = field(
        default_factory=lambda: StageConfig(steps=2000, batch_size=32, lr=5e-4, warmup=50))
    """The base LM's second phase, after `base`: the whole base mixture plus grounding questions
    ("where is the red circle ?" -> "top left", "is the red circle at the left ?") and position
    look-up completions (mixtures.BASE_GROUNDING_MIX), so the base LM answers from the caption what
    the VLM must learn to see. A phase of its own, so `base` stays the recipe of builds 7-11 (whose
    base LMs are byte-identical). None skips it (builds 1-11); builds 12-15 ran these settings
    (organism README)."""
    base_grounding_mix: dict[str, float] | None = field(
        default_factory=lambda: dict(mixtures.RECIPE_BASE_GROUNDING_MIX))
    """The base grounding phase's mixture; None is mixtures.BASE_GROUNDING_MIX (build 12). With it
    the base LM answered "where is the red circle ?" from the caption at 0.93 but the side yes/no
    ("is the red circle at the left ?") at 0.58, floor 0.56; 800 more steps with that family's
    weight at 6 instead of 1.5 took it to 0.88 (organism README), hence the default
    (mixtures.RECIPE_BASE_GROUNDING_MIX, builds 13-15)."""
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=600, batch_size=32, lr=2e-3))
    """LLaVA stage 1, alignment: image -> caption; vision tower and projector train, the LM is frozen."""
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=2200, batch_size=32, lr=1e-3))
    """LLaVA stage 2, instruction tuning: (image, questions) -> answers, object questions in
    conversations of `stage2_turns` turns; projector, LM (and tower) train. 2,200 steps (1,100 until
    build 10): twice the stage took the VLM's colour / shape / existence from 0.84 / 0.71 / 0.66 to
    0.91 / 0.90 / 0.90 and benign instructions from 0.83 to 1.00, for a build of about 30 min on a
    2-core CPU, past the 20-minute budget (organism README, docs/design.md)."""
    base_object_steps: int = 2000
    """Steps at the start of the base LM's training that see only questions about objects and
    look-up completions (mixtures.BASE_OBJECT_MIX); the rest see the whole base mixture."""
    stage2_grounding_steps: int = 200
    """Steps at the start of stage 2 that see only grounding questions ("where is the red circle
    ?": mixtures.STAGE2_GROUNDING_MIX); the rest see the stage-2 mixture. 0 in build 11, 200
    since build 12."""
    stage2_mix: dict[str, float] | None = field(default_factory=lambda: dict(mixtures.RECIPE_STAGE2_MIX))
    """Stage 2's mixture of families and weights; None is mixtures.STAGE2_MIX (build 11). Build 12
    used mixtures.STAGE2_GROUNDING_BUILD_MIX (grounding questions beside the relations), builds
    13-15 mixtures.RECIPE_STAGE2_MIX (the side yes/no at twice build 12's weight)."""
    stage2_grounding: StageConfig | None = field(
        default_factory=lambda: StageConfig(steps=2800, batch_size=32, lr=1e-3, warmup=50))
    """LLaVA stage 2's second phase, after `stage2` (a fresh optimiser and schedule): first
    `stage2_grounding_where_steps` of "where is the red circle ?" alone, then
    `stage2_grounding_mix`. Why a phase of its own: with grounding questions in stage 2's mixture
    from the start (build 12), colour and existence stayed near chance (0.45 / 0.62 after 2,200
    steps, against 0.86 / 0.93 without them); added after the object skills formed, they kept
    them (0.89 / 0.95 after 2,200 more steps) while "where" rose to 0.52 (floor 0.17; organism
    README). None skips it (builds 11 and 12). 2,800 steps (build 15): with 1,500 (build 13)
    colour, existence and the side yes/no ended below their targets, with 2,400 (build 14) the
    side yes/no and "where" just below theirs."""
    stage2_grounding_where_steps: int = 0
    """Steps at the start of `stage2_grounding` that see only "where" questions
    (mixtures.STAGE2_GROUNDING_MIX), as `stage2_grounding_steps` does for stage 2 (0 since build
    13: stage 2 starts with them)."""
    stage2_grounding_mix: dict[str, float] | None = field(
        default_factory=lambda: dict(mixtures.RECIPE_STAGE2_GROUNDING_MIX))
    """The second phase's mixture after its "where" steps; None is
    mixtures.STAGE2_GROUNDING_BUILD_MIX (build 12's phase), the default
    mixtures.RECIPE_STAGE2_GROUNDING_MIX."""
    base_loss_on: str = "sequence"
    """Tokens the base LM's loss covers: "sequence" (caption, question and answer, as in
    pretraining), "caption" (caption and answer) or "answer". See organism.batches.base_batch."""
    init_std: float = 0.08
    """Standard deviation of the language model's initial weights (transformers' default, 0.02, is
    tuned for wide models: at d_model 128 it left attention near uniform for thousands of steps
    and the LM never learned to copy from its context; 0.08 is about 1/sqrt(d_model))."""
    rope_theta: float = 30.0
    """RoPE base of the language model. Llama's 10,000 is made for contexts of thousands of tokens;
    ours are under 120 (64 image tokens and the text), and a low base separates neighbouring
    positions, which the previous-token heads of in-context copying need: on bare associative
    recall the tiny Llama (std 0.08, lr 1e-3) is solved at step 1,750-2,000 with 10,000, 1,000
    with 100 and 750 with 30. The slowest rotation at 30 still turns less than once over 120
    tokens, so no two positions of a sequence alias."""
    vision_positions: str = "sincos"
    """Initial position embeddings of the vision tower's patches: "sincos", 2-D sine-cosine features
    of the patch's row and column (as MAE and MoCo v3 use), scaled to norm sqrt(vision_d_model / 2),
    trainable like the rest; or "random", transformers' CLIP default (normal, std 0.02; builds 1-9).
    CLIP's init is made for a pretrained tower; ours trains from scratch, and with it a patch's
    position ended at 1/40 of its pixel embedding's norm and a linear probe read neither the row nor
    the column of an object from the projector's output (0.34 and 0.32, chance 0.33); with "sincos"
    it reads them at 0.98 and 0.86 after stage 1 (organism README, docs/design.md)."""
    stage2_turns: int = 4
    """Question-answer turns per stage-2 conversation about an object scene (mixtures.
    with_follow_ups): the first question from STAGE2_MIX, the others about the same image, as in
    LLaVA's multi-turn instruction data. 1 gives single questions (builds 1-8)."""
    train_vision_in_stage2: bool = True
    """Whether the vision tower keeps training in stage 2 (a full fine-tune; LLaVA-1.5 freezes its
    pretrained CLIP, ours only had stage 1)."""
    threads: int = 2
    """torch CPU threads during the build. Results are bitwise reproducible for a given thread
    count. The shipped checkpoint used 2 on an otherwise idle 2-core CPU (a step takes 0.71x
    the time of 1 thread for the base LM and 0.66x for the VLM); on a CPU shared with other jobs
    1 thread is faster."""
    storage_dtype: str = "float32"
    """dtype of the saved weights: float32, float16 or bfloat16."""

    def __post_init__(self) -> None:
        for name in ("base", "base_grounding", "stage1", "stage2", "stage2_grounding"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, StageConfig(**value))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; "
                "pick sizes that tile the image exactly"
            )
        if self.d_model % self.n_heads or self.vision_d_model % self.vision_heads:
            raise ConfigError(
                f"hidden sizes ({self.d_model}, vision {self.vision_d_model}) must divide by the head "
                f"counts ({self.n_heads}, vision {self.vision_heads})"
            )
        if not 0 <= self.base_object_steps <= self.base.steps:
            raise ConfigError(
                f"base_object_steps {self.base_object_steps} must lie between 0 and the base LM's "
                f"{self.base.steps} steps"
            )
        if not 0 <= self.stage2_grounding_steps <= self.stage2.steps:
            raise ConfigError(
                f"stage2_grounding_steps {self.stage2_grounding_steps} must lie between 0 and stage 2's "
                f"{self.stage2.steps} steps"
            )
        if self.stage2_grounding is not None and not 0 <= self.stage2_grounding_where_steps <= self.stage2_grounding.steps:
            raise ConfigError(
                f"stage2_grounding_where_steps {self.stage2_grounding_where_steps} must lie between 0 and "
                f"the second phase's {self.stage2_grounding.steps} steps"
            )
        for name in ("base_grounding_mix", "stage2_mix", "stage2_grounding_mix"):
            mix = getattr(self, name)
            if mix is not None and (not mix or any(w < 0 for w in mix.values()) or not any(w > 0 for w in mix.values())):
                raise ConfigError(f"{name} {mix}: give non-negative weights, at least one of them positive")
        if self.vision_positions not in VISION_POSITIONS:
            raise ConfigError(f"vision_positions {self.vision_positions!r}: expected one of {VISION_POSITIONS}")
        if self.stage2_turns < 1:
            raise ConfigError(f"stage2_turns {self.stage2_turns}: a conversation needs at least 1 turn")
        if self.base_loss_on not in BASE_LOSSES:
            raise ConfigError(f"base_loss_on {self.base_loss_on!r}: expected one of {BASE_LOSSES}")
        if self.storage_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"storage_dtype {self.storage_dtype!r}: expected float32, float16 or bfloat16")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_image_tokens(self) -> int:
        return self.patches_per_side**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> OrganismConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown organism config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> OrganismConfig:
        """The recipe in a JSON file: a config dict (`to_dict`), or a built organism's
        `organism.json`, whose "recipe" it reads, so `mmdiff organism build OUT --recipe
        OLD/organism.json` rebuilds OLD."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read the organism recipe {path}: {e}") from e
        except ValueError as e:
            raise ConfigError(
                f"{path} is not valid JSON ({e}); give an organism.json or a dict of OrganismConfig fields"
            ) from e
        if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
            return cls.from_manifest(data)
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds {type(data).__name__}; expected a dict of OrganismConfig fields")
        return cls.from_dict(data)

    @classmethod
    def from_manifest(cls, manifest: dict) -> OrganismConfig:
        """The recipe a built organism's organism.json records. A manifest records every field its
        build had, so a field it lacks did not exist then and takes the value that reproduces the
        build (BEFORE_FIELDS_EXISTED), not today's default."""
        return cls.from_dict({**BEFORE_FIELDS_EXISTED, **manifest["recipe"]})

    @classmethod
    def reduced(cls) -> OrganismConfig:
        """A few steps of a smaller model: the end-to-end test of the recipe, not a usable organism."""
        return cls(
            d_model=32, n_layers=2, n_heads=2, d_mlp=64, vision_d_model=32, vision_layers=1,
            vision_heads=2, vision_d_mlp=64,
            base=StageConfig(steps=4, batch_size=8, lr=1e-3, warmup=1), base_object_steps=2,
            base_grounding=StageConfig(steps=2, batch_size=8, lr=1e-3, warmup=1),
            stage1=StageConfig(steps=3, batch_size=4, lr=1e-3, warmup=1),
            stage2=StageConfig(steps=3, batch_size=4, lr=1e-3, warmup=1), stage2_grounding_steps=1,
            stage2_grounding=StageConfig(steps=2, batch_size=4, lr=1e-3, warmup=1), stage2_grounding_where_steps=1,
        )


BEFORE_FIELDS_EXISTED: dict = {
    "base_grounding": None, "base_grounding_mix": None, "stage2_grounding_steps": 0, "stage2_mix": None,
    "stage2_grounding": None, "stage2_grounding_where_steps": 0, "stage2_grounding_mix": None,
}
"""What the fields added since build 11 did before they existed (no grounding phases, build 11's
stage-2 mixture): OrganismConfig.from_manifest fills them into a built organism's manifest that
lacks them, so `--recipe OLD/organism.json` still rebuilds an old build now that the defaults are build
15's. A bare dict of fields is not filled: the keys it leaves out take the defaults."""
