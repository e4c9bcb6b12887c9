"""One interface over every VLM family: load, prompts, image-token mask, layers, heads.

An adapter holds two causal-LM stacks, each a `Backbone`: the VLM's language model ("vlm") and the
base LM it came from ("base"). Hook point L is the residual stream after decoder layer L, which is
HF `hidden_states[L + 1]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Literal

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
    embed_tokens: nn.Module | None = None  # input embeddings: ids [B, T] -> [B, T, d_model]
    unembed: nn.Module | None = None  # lm_head: [.., d_model] -> [.., vocab]
    final_norm: nn.Module | None = None  # norm applied to the last layer's output before lm_head

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> Backbone:
        """The decoder stack of an HF causal LM or VLM (`get_decoder()`), with its text config."""
        decoder = model.get_decoder()
        layers = getattr(decoder, "layers", None)
        if layers is None:
            from mmdiff.errors import ModelError

            raise ModelError(
                f"{type(model).__name__}: its decoder {type(decoder).__name__} has no `layers` list; "
                "this architecture needs its own adapter"
            )
        text_config = model.config.get_text_config()
        num_heads = int(text_config.num_attention_heads)
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        return cls(
            model=model,
            layers=list(layers),
            num_heads=num_heads,
            head_dim=int(head_dim),
            d_model=int(text_config.hidden_size),
            embed_tokens=model.get_input_embeddings(),
            unembed=model.get_output_embeddings(),
            final_norm=getattr(decoder, "norm", None),
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def o_proj(self, layer: int) -> nn.Linear:
        """The attention output projection; its input is the concatenation of per-head outputs."""
        return self.attention(layer).o_proj

    def unembedding_matrix(self) -> torch.Tensor:
        """W_U, [vocab, d_model]: row v is the direction that promotes token v."""
        if self.unembed is None:
            from mmdiff.errors import ModelError

            raise ModelError(f"{type(self.model).__name__} has no output embedding (lm_head)")
        return self.unembed.weight

    def check_layers(self, layers: Sequence[int]) -> list[int]:
        """Sorted unique hook points, or a ModelError naming the valid range."""
        wanted = sorted({int(layer) for layer in layers})
        if not wanted:
            from mmdiff.errors import ModelError

            raise ModelError("no layers given: pass at least one decoder layer index")
        bad = [layer for layer in wanted if not 0 <= layer < len(self.layers)]
        if bad:
            from mmdiff.errors import ModelError

            raise ModelError(
                f"layers {bad} do not exist: {type(self.model).__name__} has {len(self.layers)} decoder "
                f"layers, so hook points are 0..{len(self.layers) - 1}"
            )
        return wanted


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
    ) -> VLMAdapter:
        """Load a VLM (and optionally its base LM) from a local path or a hub id."""

    @abstractmethod
    def vlm_inputs(
        self, records: Sequence[Record], *, with_answer: bool = False
    ) -> dict[str, torch.Tensor]:
        """Padded model inputs for (image, question), in the processor's prompt format."""

    @abstractmethod
    def base_inputs(
        self, records: Sequence[Record], *, with_answer: bool = False
    ) -> dict[str, torch.Tensor]:
        """Padded base-LM inputs for (caption, question): the caption stands in for the image."""

    @property
    @abstractmethod
    def image_token_id(self) -> int: ...

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] bool: `input_ids == image_token_id`, never offsets (docs/method.md#activations-and-token-types)."""
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


def adapter_for_model_type(model_type: str) -> type[VLMAdapter]:
    """The registered adapter whose `model_types` include `model_type`."""
    for cls in ADAPTERS.values():
        if model_type in cls.model_types:
            return cls
    from mmdiff.errors import ModelError

    known = sorted(t for cls in ADAPTERS.values() for t in cls.model_types)
    raise ModelError(
        f"no adapter for model_type {model_type!r}: supported are {known}. Pass family= to force "
        "one, or add an adapter file under mmdiff/models/"
    )
