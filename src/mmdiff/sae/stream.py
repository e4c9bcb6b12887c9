"""The token stream of SAE training: any activation source -> the tokens a masking regime keeps ->
deterministic shuffle blocks -> batches of exactly batch_size tokens.

Resume is exact: the token order is a deterministic function of (seed, position), where a position
(`StreamPosition`) is (epoch, source item, shuffle block, batches taken from the block) plus the few
leftover tokens that opened the block.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmdiff.activations import ActivationBatch
from mmdiff.errors import DataError


@dataclass
class TokenBatch:
    """Flat tokens of several layers: acts[L] [n, d], token_types [n]."""

    acts: dict[int, Tensor]
    token_types: Tensor

    @property
    def n(self) -> int:
        return int(self.token_types.shape[0])

    def take(self, index: Tensor) -> TokenBatch:
        return TokenBatch({L: a[index] for L, a in self.acts.items()}, self.token_types[index])

    @staticmethod
    def cat(parts: Sequence[TokenBatch]) -> TokenBatch:
        layers = list(parts[0].acts)
        return TokenBatch(
            {L: torch.cat([p.acts[L] for p in parts]) for L in layers},
            torch.cat([p.token_types for p in parts]),
        )


def as_token_batch(item: Any, layers: Sequence[int], token_types: tuple[int, ...]) -> TokenBatch:
    """The tokens of one source item whose type is in `token_types`, for `layers`.

    Accepts an `ActivationBatch` ([batch, seq, d] per layer; padding dropped) or a flat batch as the
    activation store yields it (`StoreBatch`, or a mapping with "acts" and "token_types"): acts a
    {layer: [n, d]} dict (or one [n, d] tensor when one layer is trained) and token_types [n].
    """
    if isinstance(item, ActivationBatch):
        keep = item.attention_mask.bool() & torch.isin(
            item.token_types, torch.tensor(token_types, dtype=item.token_types.dtype)
        )
        acts_src, types = item.acts, item.token_types
    else:
        acts_src = item.get("acts") if isinstance(item, Mapping) else getattr(item, "acts", None)
        types = (
            item.get("token_types")
            if isinstance(item, Mapping)
            else getattr(item, "token_types", None)
        )
        if acts_src is None or types is None:
            raise DataError(
                f"expected ActivationBatch or a flat token batch with acts and token_types, found "
                f"{type(item).__name__}; pass mmdiff.capture.iter_activations(...) or an ActivationStore"
            )
        if isinstance(acts_src, Tensor):
            if len(layers) != 1:
                raise DataError(
                    f"the source gives one layer's tokens per batch, but layers {list(layers)} are trained"
                )
            acts_src = {layers[0]: acts_src}
        keep = torch.isin(types, torch.tensor(token_types, dtype=types.dtype))
    missing = [L for L in layers if L not in acts_src]
    if missing:
        raise DataError(
            f"the activations hold layers {sorted(acts_src)}, training needs {list(layers)}: capture layers {missing}"
        )
    return TokenBatch({L: acts_src[L][keep] for L in layers}, types[keep].to(torch.int8))


@dataclass
class StreamPosition:
    """Where the token stream is: enough to rebuild the exact same remaining batches."""

    epoch: int = 0
    item: int = 0  # source items of this epoch consumed before the current block
    block: int = 0  # index of the current shuffle block (seeds its permutation)
    offset: int = 0  # batches already taken from the current block
    carry: TokenBatch | None = None  # leftover tokens (< batch_size) that open the current block

    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "item": self.item,
            "block": self.block,
            "offset": self.offset,
        }
        if self.carry is not None:
            state["carry_types"] = self.carry.token_types
            state["carry_acts"] = {str(L): a for L, a in self.carry.acts.items()}
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> StreamPosition:
        carry = None
        if "carry_types" in state:
            carry = TokenBatch(
                {int(L): a for L, a in state["carry_acts"].items()}, state["carry_types"]
            )
        return cls(
            int(state["epoch"]),
            int(state["item"]),
            int(state["block"]),
            int(state["offset"]),
            carry,
        )


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of its parts (stable across processes and runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def is_store(data: Any) -> bool:
    """True for an ActivationStore (anything with iter_batches and count_tokens)."""
    return hasattr(data, "iter_batches") and hasattr(data, "count_tokens")


def _open_source(
    data: Any,
    layers: Sequence[int],
    token_types: tuple[int, ...],
    epoch: int,
    item: int,
    seed: int,
    batch_size: int,
) -> Iterator[Any]:
    """A fresh iterator over the source for `epoch`, with the first `item` items skipped."""
    if is_store(data):
        # The store reads its shards in an order seeded per epoch, already filtered by token type.
        it = data.iter_batches(
            list(layers),
            batch_size,
            token_types=token_types,
            shuffle=True,
            buffer_tokens=batch_size,
            seed=derived_seed(seed, "store", epoch),
        )
    else:
        it = iter(data)
    for _ in range(item):
        if next(it, None) is None:
            raise DataError(
                f"cannot resume: the data yields fewer than {item} items in epoch {epoch}, but the "
                "checkpoint consumed that many; pass the same data that the checkpointed run used"
            )
    return it


def shuffled_batches(
    data: Any,
    layers: Sequence[int],
    token_types: tuple[int, ...],
    batch_size: int,
    buffer_tokens: int,
    seed: int,
    start: StreamPosition | None = None,
) -> Iterator[tuple[TokenBatch, StreamPosition]]:
    """(batch of exactly batch_size tokens, position after it), forever or until one-shot data ends.

    Blocks of at least `buffer_tokens` tokens (leftover + whole source items) are permuted by a
    generator seeded with (seed, block index) and drained in batches; the leftover opens the next
    block. A re-iterable source (a list, an ActivationStore, an object with __iter__) starts a new
    epoch when it ends; a one-shot iterator ends the stream.
    """
    pos = start or StreamPosition()
    one_shot = not is_store(data) and iter(data) is data
    epoch, item, block, skip, carry = pos.epoch, pos.item, pos.block, pos.offset, pos.carry
    it = _open_source(data, layers, token_types, epoch, item, seed, batch_size)
    epoch_tokens, fresh_epoch = 0, item == 0
    while True:
        opened = StreamPosition(epoch, item, block, 0, carry)
        parts = [carry] if carry is not None else []
        n, exhausted = (carry.n if carry is not None else 0), False
        while n < buffer_tokens:
            raw = next(it, None)
            if raw is None:
                if one_shot:
                    exhausted = True
                    break
                if fresh_epoch and epoch_tokens == 0:
                    raise DataError(
                        f"the data yields no training tokens of types {token_types} in a whole epoch: "
                        "is the training dataset empty (check its records in manifest.json's capture "
                        "summary), or does the masking regime select none of its tokens (train.regimes, "
                        "e.g. `image` on text-only data)? Special tokens (BOS, padding) never count"
                    )
                epoch, item, epoch_tokens, fresh_epoch = epoch + 1, 0, 0, True
                it = _open_source(data, layers, token_types, epoch, 0, seed, batch_size)
                continue
            item += 1
            tb = as_token_batch(raw, layers, token_types)
            epoch_tokens += tb.n
            if tb.n:
                parts.append(tb)
                n += tb.n
        if n < batch_size:
            return
        buf = TokenBatch.cat(parts)
        perm = torch.randperm(
            n, generator=torch.Generator().manual_seed(derived_seed(seed, "block", block))
        )
        n_batches = n // batch_size
        for j in range(skip, n_batches):
            yield (
                buf.take(perm[j * batch_size : (j + 1) * batch_size]),
                dataclasses.replace(opened, offset=j + 1),
            )
        skip = 0
        carry = buf.take(perm[n_batches * batch_size :]) if n % batch_size else None
        block += 1
        if exhausted:
            return


class CapturedActivations:
    """Re-iterable ActivationBatches of a model side: every pass re-runs the (deterministic) capture.

    `progress` shows capture's own bar; keep it off while the trainer's bar is live (rich shows one
    live display at a time).
    """

    def __init__(
        self,
        adapter: Any,
        records: Sequence[Any],
        layers: Sequence[int],
        side: str,
        batch_size: int,
        progress: bool = False,
    ) -> None:
        self.adapter, self.records, self.layers = adapter, list(records), list(layers)
        self.side, self.batch_size, self.progress = side, batch_size, progress

    def __iter__(self) -> Iterator[ActivationBatch]:
        from mmdiff.capture import iter_activations

        return iter(
            iter_activations(
                self.adapter, self.records, self.layers, side=self.side,
                batch_size=self.batch_size, progress=self.progress,
            )
        )  # fmt: skip
