"""Model inputs and image features kept across evaluations of the same records.

The control stages score the same batches of records many times, once per intervention (a removal,
its random control, a steering strength), and an intervention on the language model's residual
stream changes neither the processor's output nor the vision tower's. On the organism, building a
batch's inputs (image preprocessing, tokenisation) was about a tenth of an evaluation, twice that
when the removal positions needed the token types (the inputs were built a second time for them),
and the vision tower about a fifth. `BatchReuse` builds each batch once and, while `vision()` is
entered, answers the VLM's `get_image_features` for a batch it has seen from memory.

A batch is identified by its side and its records' ids in order, so a reused batch is the same
tensors the first evaluation saw (the same padding, the same image features): scores are exactly
those of building them again. The pixel values a hit is recognised by are the cached tensor itself
(identity, not contents), so a model that copies its pixel values before asking for features simply
misses. Entries are kept until `budget_bytes` is reached, then new batches are built and not kept:
a cycle of evaluations larger than the budget still reuses the batches that fit (an LRU would keep
none of them).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mmdiff.data.records import Record
from mmdiff.evals.harness import model_inputs

REUSE_BYTES = 1 << 30
"""Default budget of the kept inputs and image features (1 GiB): the organism's control stage keeps
about 0.3 GiB; a large VLM keeps what fits and builds the rest each time."""


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside `obj` (nested dicts, lists, tuples, model outputs)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class BatchReuse:
    """Each batch's model inputs built once, and its image features computed once, per adapter."""

    def __init__(self, adapter: Any, budget_bytes: int = REUSE_BYTES) -> None:
        self.adapter, self.budget = adapter, int(budget_bytes)
        self.used = 0
        self._inputs: dict[tuple, dict[str, Any]] = {}
        self._types: dict[tuple, torch.Tensor] = {}
        self._pixels: set[int] = set()  # ids of the kept inputs' pixel values
        self._features: dict[int, tuple[torch.Tensor, Any]] = {}  # id(pixel values) -> (them, output)
        self.hits = self.misses = 0

    def _keep(self, nbytes: int) -> bool:
        if self.used + nbytes > self.budget:
            return False
        self.used += nbytes
        return True

    def inputs(self, side: str, records: Sequence[Record]) -> dict[str, Any]:
        """The adapter's model inputs of `records` on `side` (`vlm_inputs` / `base_inputs`), on its device."""
        key = (side, tuple(str(r.id) for r in records))
        got = self._inputs.get(key)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        built = model_inputs(self.adapter, side, list(records))
        if self._keep(tensor_bytes(built)):
            self._inputs[key] = built
            if isinstance(built.get("pixel_values"), torch.Tensor):
                self._pixels.add(id(built["pixel_values"]))  # kept alive by the entry: the id stays its own
        return built

    def token_types(self, side: str, records: Sequence[Record]) -> torch.Tensor:
        """[batch, seq] token types of the batch (`adapter.token_types` of its inputs)."""
        key = (side, tuple(str(r.id) for r in records))
        got = self._types.get(key)
        if got is None:
            got = self.adapter.token_types(self.inputs(side, records), side)
            if key in self._inputs and self._keep(tensor_bytes(got)):
                self._types[key] = got
        return got

    @contextlib.contextmanager
    def vision(self, side: str = "vlm") -> Iterator[None]:
        """While entered, the VLM's `get_image_features` of pixel values kept here is computed once."""
        model = self.adapter.backbone(side).model if side == "vlm" else None
        owners = [m for m in (model, getattr(model, "model", None)) if m is not None
                  and callable(getattr(m, "get_image_features", None)) and "get_image_features" not in vars(m)]  # fmt: skip
        for owner in owners:
            owner.get_image_features = self._remembering(owner.get_image_features)
        try:
            yield
        finally:
            for owner in owners:
                del owner.get_image_features  # the class's method again

    def _remembering(self, compute: Any) -> Any:
        @functools.wraps(compute)  # its signature: generate() reads which inputs the encoder takes
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            hit = self._features.get(id(pixels))
            if hit is not None and hit[0] is pixels:
                return hit[1]
            out = compute(*args, **kwargs)
            if id(pixels) in self._pixels and self._keep(tensor_bytes(out)):
                self._features[id(pixels)] = (pixels, out)
            return out

        return get_image_features
