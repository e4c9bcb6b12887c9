"""The settings of SAE training: one declaration, read by the trainer and by the study config.

`TrainConfig` is what `sae/trainer.py:train_saes` takes. The study config's `train` section
(`mmdiff/config.py:TrainSpec`) is built from these fields mechanically (type, default, and the
docstring under each field as its description), so a setting, its default and its documentation
exist once. Torch-free, so that reading a config does not import torch.

The defaults are for real models (a 4096-token batch, 10M tokens, k=50 as the Llama Scope fine-tune
uses); the organism study sets its own, smaller values in `config.default_config()` (docs/design.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from mmdiff.errors import ConfigError

Regime = Literal["full", "image", "text", "random"]

REGIMES: tuple[str, ...] = ("full", "image", "text", "random")

DEFAULT_BUFFER_TOKENS = 1 << 16


@dataclass
class TrainConfig:
    """How to train the SAEs of one regime (one SAE per layer, all from the same token stream)."""

    k: int = 50
    """Active latents per token of the TopK SAE (warm starts are converted to TopK with this k)."""
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(d_sae / 2**14) per layer, as sparsify."""
    batch_size: int = 4096
    """Tokens per optimisation step (tokens that count in the loss)."""
    total_tokens: int = 10_000_000
    """Training stops after this many tokens (steps = total_tokens // batch_size)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss that teaches dead latents to explain the residual (Gao et al.)."""
    dead_tokens_threshold: int = 10_000_000
    """A latent is dead (and AuxK trains it) once it has not fired for this many training tokens;
    scale it to the run."""
    regime: Regime = "full"
    """Tokens in the loss: full = all non-special, image = image tokens, text = non-image non-special;
    random = random init instead of warm start, on `random_tokens` tokens."""
    random_tokens: Literal["full", "image", "text"] = "full"
    """Which tokens the `random` control trains on."""
    exclude_special: bool = True
    """BOS, padding and other special tokens never enter training (their norms are huge)."""
    seed: int = 0
    """Seeds the random init and the token order; same seed and data = same SAEs."""
    d_sae: int | None = None
    """Latents of a randomly initialised SAE; None = the warm start's, else expansion_factor * d_in."""
    expansion_factor: int = 8
    """d_sae = expansion_factor * d_in for a random init without warm start or d_sae."""
    buffer_tokens: int | None = None
    """Shuffle-buffer size in tokens (whole source batches are pooled, permuted and drained);
    None = max(65536, batch_size)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warmup over this many steps (a function of the step, so resume-exact)."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoint: bool = False
    """Keep the last checkpoint (weights + optimizer) after training ends instead of deleting it."""
    bf16: bool = True
    """bf16 autocast for the SAE forward where the hardware has it (CUDA with bf16); fp32 elsewhere."""
    log_every: int = 10
    """Record the per-step metrics every this many steps (and at the last step)."""
    device: str | None = None
    """Where the SAEs train; None = where the warm start lives, else cpu."""

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ConfigError(f"TrainConfig.regime must be one of {REGIMES}, found {self.regime!r}")
        if self.random_tokens not in ("full", "image", "text"):
            raise ConfigError(
                f"TrainConfig.random_tokens must be full, image or text, found {self.random_tokens!r}"
            )
        if self.buffer_tokens is None:
            self.buffer_tokens = max(DEFAULT_BUFFER_TOKENS, int(self.batch_size))
        positive = ("k", "batch_size", "total_tokens", "buffer_tokens", "log_every",
                    "expansion_factor", "dead_tokens_threshold")  # fmt: skip
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, found {getattr(self, name)!r}")
        for name in ("checkpoint_every", "lr_warmup_steps", "auxk_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, found {getattr(self, name)!r}")
        if self.d_sae is not None and self.d_sae < 1:
            raise ConfigError(f"TrainConfig.d_sae must be >= 1 or None, found {self.d_sae!r}")
        if self.buffer_tokens < self.batch_size:
            raise ConfigError(
                f"TrainConfig.buffer_tokens ({self.buffer_tokens}) must be >= batch_size ({self.batch_size}): "
                "the shuffle buffer has to hold at least one batch"
            )
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be positive or None, found {self.lr!r}")

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def trajectory_key(self) -> dict[str, Any]:
        """The fields that decide the training trajectory; a checkpoint only resumes under the same."""
        skip = {"total_tokens", "checkpoint_every", "keep_checkpoint", "log_every", "device"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
