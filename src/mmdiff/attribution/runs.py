"""The clean, corrupt and head-patched runs of one batch: one hooked forward pass up to layer L."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmdiff.attribution._common import StopForward, first_tensor
from mmdiff.attribution.corrupt import VisualMean, layer0_input, visual_replacement
from mmdiff.attribution.objective import Objective, Positions, feature_values, objective_positions
from mmdiff.data.records import Record
from mmdiff.errors import DataError, ModelError, SAEError
from mmdiff.models.base import Backbone, VLMAdapter


@dataclass
class Run:
    """What one hooked forward pass read."""

    m: torch.Tensor  # [batch] objective per sample (with a graph when tracked)
    o: dict[int, torch.Tensor]  # layer -> [batch, seq, H * head_dim] input of o_proj


def hooked_forward(
    backbone: Backbone,
    inputs: dict[str, torch.Tensor],
    *,
    layer: int,
    objective: Callable[[torch.Tensor], torch.Tensor],
    corrupt: tuple[torch.Tensor, torch.Tensor] | None = None,
    track: bool = False,
    patch: Mapping[int, tuple[Sequence[int], torch.Tensor]] | None = None,
) -> Run:
    """One forward pass up to layer `layer`, reading o_proj inputs of layers 0..layer.

    corrupt = (image mask [batch, seq], replacement [batch, seq, d_model]) edits the layer-0 input.
    track = build the graph from the layer-0 input (for dm/do). patch = {l: (heads, values
    [batch, seq, H * head_dim])} puts those heads' slices of `values` into o_proj's input at layer l.
    """
    hd = backbone.head_dim
    captured: dict[int, torch.Tensor] = {}
    result: dict[str, torch.Tensor] = {}

    def edit0(h: torch.Tensor) -> torch.Tensor:
        if corrupt is not None:
            mask, replacement = corrupt
            h = torch.where(mask[..., None].to(h.device), replacement.to(h.device, h.dtype), h)
        return h.detach().requires_grad_(True) if track else h

    def o_hook(lyr: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            x = args[0] if args else kwargs["input"]  # [batch, seq, H * head_dim]
            if patch is not None and lyr in patch:
                heads, values = patch[lyr]
                x = x.clone()
                for h in heads:
                    x[..., h * hd : (h + 1) * hd] = values[..., h * hd : (h + 1) * hd].to(x.device, x.dtype)
            captured[lyr] = x
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "input": x}

        return hook

    def out_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        result["m"] = objective(first_tensor(output))
        raise StopForward

    handles = [backbone.o_proj(lyr).register_forward_pre_hook(o_hook(lyr), with_kwargs=True) for lyr in range(layer + 1)]
    handles.append(backbone.layers[layer].register_forward_hook(out_hook))
    grad = torch.enable_grad() if track else torch.no_grad()
    try:
        with grad, layer0_input(backbone, edit0):
            backbone.model(**inputs, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "m" not in result:
        raise ModelError(f"the hook at decoder layer {layer} never fired: is this Backbone the model's decoder?")
    return Run(result["m"], captured)


@dataclass
class PatchingBatch:
    """One batch of samples, ready for its clean and corrupt runs."""

    inputs: dict[str, torch.Tensor]
    objective: Callable[[torch.Tensor], torch.Tensor]
    corrupt: tuple[torch.Tensor, torch.Tensor]
    record_ids: list[str]


def prepare_batch(
    adapter: VLMAdapter,
    sae: Any,
    layer: int,
    feature: int,
    chunk: Sequence[Record],
    visual_mean: VisualMean,
    objective: Objective,
    positions: Positions,
) -> PatchingBatch:
    """The VLM inputs of `chunk`, its objective m and its corruption (image mask, replacement)."""
    backbone = adapter.vlm
    inputs = adapter.vlm_inputs(chunk)
    image_mask = adapter.image_token_mask(inputs["input_ids"])  # [batch, seq]
    if not bool(image_mask.any(1).all()):
        missing = [r.id for r, ok in zip(chunk, image_mask.any(1).tolist()) if not ok]
        raise DataError(f"records {missing} have no image tokens; attribution patching corrupts the image")
    keep = objective_positions(adapter, inputs, positions).to(backbone.device)  # [batch, seq]

    def m(resid: torch.Tensor) -> torch.Tensor:  # [batch, seq, d_model] -> [batch]
        return (feature_values(resid, sae, feature, objective) * keep).sum(1)

    replacement = visual_replacement(visual_mean, image_mask, backbone.d_model, backbone.dtype)
    return PatchingBatch(inputs, m, (image_mask, replacement), [r.id for r in chunk])


def check_inputs(adapter: VLMAdapter, sae: Any, layer: int, records: Sequence[Record]) -> list[Record]:
    """`records` as a list, once the layer exists, the SAE fits the model and there is a record."""
    adapter.vlm.check_layers([layer])
    d_in = getattr(getattr(sae, "cfg", None), "d_in", None) or sae.W_dec.shape[1]
    if int(d_in) != adapter.vlm.d_model:
        raise SAEError(
            f"the SAE reads d_in={d_in} but the VLM's hidden size is {adapter.vlm.d_model}: is it for another model?"
        )
    records = list(records)
    if not records:
        raise DataError("no records given: attribution needs the feature's top-activating samples")
    return records
