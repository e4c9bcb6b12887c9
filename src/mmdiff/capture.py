"""Read the residual stream and per-head attention outputs of many layers in one forward pass.

Hook point L is the output of decoder layer L: HF `hidden_states[L + 1]` (for the last layer, the
value before the final norm; HF's last `hidden_states` entry is after it), TransformerLens
`blocks.L.hook_resid_post`. Per-head outputs are the input of the layer's attention `o_proj`,
split into heads. When no logits are needed, the forward pass stops right after the last hooked
module, so capturing early layers costs only those layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmdiff.activations import ActivationBatch
from mmdiff.data.records import Record
from mmdiff.errors import ModelError
from mmdiff.models.base import Backbone, Side, VLMAdapter


class _StopForward(Exception):
    """Raised from the last hook to skip the rest of the forward pass."""


@dataclass
class Capture:
    """What one forward pass read."""

    residuals: dict[int, torch.Tensor] = field(
        default_factory=dict
    )  # layer -> [batch, seq, d_model]
    head_inputs: dict[int, torch.Tensor] = field(
        default_factory=dict
    )  # layer -> [batch, seq, heads, head_dim]
    logits: torch.Tensor | None = None  # [batch, seq, vocab], only with with_logits=True


def _first_tensor(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


def capture(
    backbone: Backbone,
    inputs: dict[str, torch.Tensor],
    *,
    residual_layers: Sequence[int] = (),
    head_layers: Sequence[int] = (),
    with_logits: bool = False,
) -> Capture:
    """Run `backbone.model(**inputs)` once and read the residual stream / head inputs at the given layers.

    Without `with_logits`, the pass stops after the last hooked module. Runs under no_grad; the
    returned tensors live on the model's device.
    """
    residual_layers = backbone.check_layers(residual_layers) if residual_layers else []
    head_layers = backbone.check_layers(head_layers) if head_layers else []
    if not residual_layers and not head_layers and not with_logits:
        raise ModelError(
            "nothing to capture: give residual_layers, head_layers or with_logits=True"
        )
    result = Capture()
    pending = len(residual_layers) + len(head_layers)

    def done() -> None:
        # once every hook has fired, nothing later in the model is needed unless logits are
        nonlocal pending
        pending -= 1
        if pending == 0 and not with_logits:
            raise _StopForward

    def residual_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            result.residuals[layer] = _first_tensor(output)  # [batch, seq, d_model]
            done()

        return hook

    def head_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            x = args[0]  # [batch, seq, heads * head_dim]
            result.head_inputs[layer] = x.reshape(
                *x.shape[:-1], backbone.num_heads, backbone.head_dim
            )
            done()

        return hook

    kwargs = dict(inputs)
    kwargs.setdefault("use_cache", False)
    grad = nullcontext() if torch.is_inference_mode_enabled() else torch.no_grad()
    output = None
    handles = []
    try:
        for layer in residual_layers:
            handles.append(backbone.layers[layer].register_forward_hook(residual_hook(layer)))
        for layer in head_layers:
            handles.append(backbone.o_proj(layer).register_forward_pre_hook(head_hook(layer)))
        with grad:
            output = backbone.model(**kwargs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if with_logits:
        result.logits = output.logits
    missing = sorted(set(residual_layers) - set(result.residuals)) + sorted(
        set(head_layers) - set(result.head_inputs)
    )
    if missing:
        raise ModelError(
            f"hooks at layers {missing} never fired: is {type(backbone.model).__name__}'s decoder "
            "really the one listed in this Backbone?"
        )
    return result


def capture_residuals(
    backbone: Backbone, inputs: dict[str, torch.Tensor], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """layer -> [batch, seq, d_model]: the residual stream after each decoder layer, one forward pass."""
    return capture(backbone, inputs, residual_layers=layers).residuals


def capture_head_inputs(
    backbone: Backbone, inputs: dict[str, torch.Tensor], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """layer -> [batch, seq, heads, head_dim]: each head's output, the input of o_proj split into heads."""
    return capture(backbone, inputs, head_layers=layers).head_inputs


def _batches(records: Iterable[Record], batch_size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_activations(
    adapter: VLMAdapter,
    records: Iterable[Record],
    layers: Sequence[int],
    side: Side = "vlm",
    *,
    batch_size: int = 8,
    with_answer: bool = False,
    progress: bool = True,
) -> Iterator[ActivationBatch]:
    """ActivationBatches of residual streams at `layers`, one padded batch of records at a time.

    side="vlm" runs (image, question) through the VLM; side="base" runs (caption, question)
    through the base LM, the paired run of the variance gap. Runs under torch.inference_mode;
    tensors stay on the model's device.
    """
    if side not in ("vlm", "base"):
        raise ModelError(f"side must be 'vlm' or 'base', got {side!r}")
    if batch_size < 1:
        raise ModelError(f"batch_size must be at least 1, got {batch_size}")
    backbone = adapter.backbone(side)
    layers = backbone.check_layers(layers)
    make_inputs = adapter.vlm_inputs if side == "vlm" else adapter.base_inputs
    total = len(records) if hasattr(records, "__len__") else None  # type: ignore[arg-type]

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(f"capture {side} layers {layers}", total=total)
        for chunk in _batches(records, batch_size):
            with torch.inference_mode():
                inputs = make_inputs(chunk, with_answer=with_answer)
                acts = capture_residuals(backbone, inputs, layers)
                token_types = adapter.token_types(inputs, side)
            yield ActivationBatch(
                acts=acts,
                token_types=token_types,
                attention_mask=inputs["attention_mask"].bool(),
                record_ids=[record.id for record in chunk],
                input_ids=inputs["input_ids"],
                meta={"side": side},
            )
            bar.advance(task, len(chunk))
