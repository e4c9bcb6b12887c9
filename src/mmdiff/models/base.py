"""One interface over every VLM family: load, prompts, image-token mask, layers, heads.

An adapter holds two causal-LM stacks, each a `Backbone`: the VLM's language model ("vlm") and the
base LM it came from ("base"). Hook point L is the residual stream after decoder layer L, which is
HF `hidden_states[L + 1]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import nn

from mmdiff.data.records import Record

Side = Literal["vlm", "base"]


class TokenType(IntEnum):
    """Per-token labels used by capture, training masks and statistics."""

    TEXT = 0
    IMAGE = 1
    SPECIAL = 2  # BOS, padding and other special / attention-sink positions


@dataclass
class Backbone:
    """A decoder stack one can run and hook: the VLM (full model) or the base LM."""

    model: nn.Module  # what forward() is called on
    layers: list[nn.Module]  # decoder layers; hook point L = output of layers[L]
    num_heads: int
    head_dim: int
    d_model: int

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def o_proj(self, layer: int) -> nn.Linear:
        """The attention output projection; its input is the concatenation of per-head outputs."""
        return self.attention(layer).o_proj


class VLMAdapter(ABC):
    """Base class of a family adapter. Subclasses register with `@register_adapter`."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF config.model_type values this adapter handles

    vlm: Backbone
    base: Backbone | None
    processor: Any
    base_tokenizer: Any

    @classmethod
    @abstractmethod
    def from_pretrained(
        cls,
        vlm: str,
        base_lm: str | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        local_files_only: bool | None = None,
        trust_remote_code: bool = False,
    ) -> "VLMAdapter":
        """Load a VLM (and optionally its base LM) from a local path or a hub id."""

    @abstractmethod
    def vlm_inputs(self, records: Sequence[Record], *, with_answer: bool = False) -> dict[str, torch.Tensor]:
        """Padded model inputs for (image, question), in the processor's prompt format."""

    @abstractmethod
    def base_inputs(self, records: Sequence[Record], *, with_answer: bool = False) -> dict[str, torch.Tensor]:
        """Padded base-LM inputs for (caption, question): the caption stands in for the image."""

    @property
    @abstractmethod
    def image_token_id(self) -> int: ...

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] bool: `input_ids == image_token_id`, never offsets (METHOD.md §8)."""
        return input_ids == self.image_token_id

    @abstractmethod
    def token_types(self, inputs: dict[str, torch.Tensor], side: Side = "vlm") -> torch.Tensor:
        """[batch, seq] int8 TokenType labels: image, text, or special (BOS, padding, ...)."""

    @abstractmethod
    def yes_no_token_ids(self, side: Side = "vlm") -> tuple[list[int], list[int]]:
        """Token ids of the yes variants and of the no variants ("Yes", " yes", ...)."""

    def backbone(self, side: Side) -> Backbone:
        if side == "vlm":
            return self.vlm
        if self.base is None:
            from mmdiff.errors import ModelError

            raise ModelError("this adapter was loaded without a base LM; pass base_lm= to load one")
        return self.base


ADAPTERS: dict[str, type[VLMAdapter]] = {}


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    ADAPTERS[cls.family] = cls
    return cls
