"""What the parts of attribution share: the early stop and record batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mmdiff.data.records import Record
from mmdiff.errors import ConfigError


class StopForward(Exception):
    """Raised from a hook once the pass has what it needs (the objective's layer, layer 0's input, an
    attention map), to skip the rest of the model."""


def batches(records: Sequence[Record], batch_size: int) -> Iterator[list[Record]]:
    """`records` in consecutive lists of at most `batch_size`."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(records), batch_size):
        yield list(records[start : start + batch_size])


def first_tensor(output: Any) -> torch.Tensor:
    """A module's output tensor: decoder layers return a tensor or a tuple led by the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output
