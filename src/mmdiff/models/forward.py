"""Running a model pair on records: batches of model inputs per side, next-token logits, and the
tokenizers behind them (shared by the studies that read a forward pass's output)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mmdiff.data.records import Record
from mmdiff.errors import ModelError
from mmdiff.models.base import Backbone, Side, VLMAdapter


class RecordBatches:
    """Re-iterable model-input batches of `records` for one side ("base" or "vlm"), built lazily.

    Inputs are built per batch (images are processed when needed, not held for the whole set), and
    must be left-padded: position -1 is every row's last prompt token.
    """

    def __init__(
        self, adapter: VLMAdapter, records: Sequence[Record], side: Side, batch_size: int
    ) -> None:
        self.adapter, self.records, self.side, self.batch_size = adapter, records, side, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.records) / self.batch_size)

    def chunks(self) -> Iterator[Sequence[Record]]:
        for start in range(0, len(self.records), self.batch_size):
            yield self.records[start : start + self.batch_size]

    def inputs(self, chunk: Sequence[Record]) -> dict[str, torch.Tensor]:
        build = self.adapter.vlm_inputs if self.side == "vlm" else self.adapter.base_inputs
        inputs = build(chunk)
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].bool().all()):
            raise ModelError(
                f"the {self.side} inputs are right-padded (some rows end in padding); the concept "
                "study reads the last prompt token at position -1 and needs left padding: set the "
                "tokenizer's padding_side='left'"
            )
        return inputs

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for chunk in self.chunks():
            yield self.inputs(chunk)


def side_tokenizer(adapter: VLMAdapter, side: Side) -> Any:
    """The tokenizer of one side of the pair (None when the VLM's processor exposes none)."""
    if side == "base":
        return adapter.base_tokenizer
    return getattr(adapter, "tokenizer", None) or getattr(adapter.processor, "tokenizer", None)


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token id as text ("" without a tokenizer)."""
    if tokenizer is None:
        return ""
    return str(tokenizer.decode([token_id]))


def shared_vocab_size(adapter: VLMAdapter, v_vlm: int, v_base: int) -> int:
    """The number of leading token ids both models' next-token distributions are compared over.

    min(V_vlm, V_base), after checking that the two tokenizers give those ids the same tokens.
    """
    v = min(v_vlm, v_base)
    tok_vlm, tok_base = side_tokenizer(adapter, "vlm"), side_tokenizer(adapter, "base")
    if tok_vlm is None or tok_base is None or tok_vlm is tok_base:
        return v
    inv_vlm = {i: t for t, i in tok_vlm.get_vocab().items() if i < v}
    inv_base = {i: t for t, i in tok_base.get_vocab().items() if i < v}
    differ = sorted(i for i in inv_vlm.keys() & inv_base.keys() if inv_vlm[i] != inv_base[i])
    if differ:
        i = differ[0]
        raise ModelError(
            f"the VLM and base-LM tokenizers disagree on {len(differ)} of the first {v} token ids "
            f"(id {i}: {inv_vlm[i]!r} vs {inv_base[i]!r}), so their next-token distributions cannot "
            "be compared: is the base LM the one this VLM was built from?"
        )
    return v


def next_token_logits(backbone: Backbone, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, vocab] float64 logits at the last position (left padding: the next token)."""
    with torch.no_grad():
        out = backbone.model(**inputs, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, :].to("cpu", torch.float64)
