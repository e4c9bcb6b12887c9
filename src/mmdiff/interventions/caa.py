"""Single-layer steering baseline: contrastive activation addition (difference of means)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from mmdiff.interventions._batches import forward_until, split_batch, valid_positions
from mmdiff.progress import iterate
from mmdiff.interventions._hooks import InterventionError, check_layer, split_output
from mmdiff.models.base import Backbone

Pooling = Literal["last", "mean", "select"]


def pool(
    hidden: torch.Tensor, valid: torch.Tensor, select: torch.Tensor | None, position: Pooling
) -> torch.Tensor:
    """[batch, seq, d] hidden states -> [batch, d], one vector per sample.

    "last": the last valid position (left or right padding); "mean": the mean over valid positions;
    "select": the mean over the batch's selected positions (a token of interest, an answer span).
    """
    b = hidden.shape[0]
    if position == "select":
        if select is None:
            raise InterventionError(
                'position="select" needs each batch to carry "select": a [batch, seq] bool mask'
            )
        valid = select.bool().to(valid.device)
    elif position not in ("last", "mean"):
        raise InterventionError(f'position must be "last", "mean" or "select"; got {position!r}')
    empty = (~valid.any(1)).nonzero().flatten().tolist()
    if empty:
        raise InterventionError(
            f"samples {empty} of a batch have no position to pool over (all padding or nothing selected)"
        )
    valid = valid.to(hidden.device)
    if position == "last":
        t = hidden.shape[1]
        last = t - 1 - valid.flip(1).to(torch.int8).argmax(1)  # [batch]
        return hidden[torch.arange(b, device=hidden.device), last]
    w = valid.to(hidden.dtype)[..., None]  # [batch, seq, 1]
    return (hidden * w).sum(1) / w.sum(1)


def layer_vectors(
    backbone: Backbone,
    batches: Iterable[Mapping[str, Any]],
    layer: int,
    position: Pooling = "last",
    *,
    progress: bool = True,
) -> torch.Tensor:
    """[n_samples, d_model] float32: one residual-stream vector per sample at hook point `layer`.

    batches: dicts of model inputs; optional keys "token_types" (SPECIAL positions are left out of
    "mean") and "select" ([batch, seq] bool, for position="select").
    """
    check_layer(backbone, layer)
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        captured.append(split_output(output)[0].detach())

    vectors = []
    handle = backbone.layers[layer].register_forward_hook(hook)
    try:
        for batch in iterate(batches, f"layer {layer} vectors", progress):
            inputs, token_types, select = split_batch(batch)
            valid = valid_positions(inputs, token_types)  # [batch, seq]
            captured.clear()
            forward_until(backbone, inputs, layer)
            hidden = captured[0].to(torch.float32)  # [batch, seq, d_model]
            vectors.append(pool(hidden, valid, select, position).cpu())
    finally:
        handle.remove()
    if not vectors:
        raise InterventionError("no batches were given")
    return torch.cat(vectors)


def difference_of_means(
    backbone: Backbone,
    positive_inputs: Iterable[Mapping[str, Any]],
    negative_inputs: Iterable[Mapping[str, Any]],
    layer: int,
    position: Pooling = "last",
    *,
    progress: bool = True,
) -> torch.Tensor:
    """[d_model] CAA steering vector: mean vector of the positive prompts minus that of the negative ones.

    Both inputs are iterables of batch dicts (see `layer_vectors`); use it with `steer_vector`.
    """
    pos = layer_vectors(backbone, positive_inputs, layer, position, progress=progress)
    neg = layer_vectors(backbone, negative_inputs, layer, position, progress=progress)
    return (pos.to(torch.float64).mean(0) - neg.to(torch.float64).mean(0)).to(torch.float32)
