"""Running calibration batches through a backbone: reserved batch keys, valid positions, early stop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmdiff.interventions._hooks import InterventionError
from mmdiff.models.base import Backbone, TokenType

# Keys a batch may carry besides the model inputs; they are taken out before the forward.
TOKEN_TYPES = "token_types"  # [batch, seq] TokenType: SPECIAL positions are left out of means
SELECT = "select"  # [batch, seq] bool: the positions of interest (a token, an answer span)


def split_batch(
    batch: Mapping[str, Any],
) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """(model inputs, token types or None, selected positions or None) of one batch dict."""
    if not isinstance(batch, Mapping):
        raise InterventionError(
            f"a batch must be a dict of model inputs (input_ids, attention_mask, pixel_values, ...); got {type(batch).__name__}"
        )
    inputs = {k: v for k, v in batch.items() if k not in (TOKEN_TYPES, SELECT)}
    return inputs, batch.get(TOKEN_TYPES), batch.get(SELECT)


def _shape_of(inputs: Mapping[str, Any]) -> tuple[int, int]:
    for key in ("input_ids", "inputs_embeds"):
        if key in inputs:
            return int(inputs[key].shape[0]), int(inputs[key].shape[1])
    raise InterventionError(
        f"a batch needs input_ids or inputs_embeds; it has keys {sorted(inputs)}"
    )


def valid_positions(inputs: Mapping[str, Any], token_types: torch.Tensor | None) -> torch.Tensor:
    """[batch, seq] bool: non-padding positions, and not SPECIAL where token types are given."""
    b, t = _shape_of(inputs)
    mask = inputs.get("attention_mask")
    valid = torch.ones(b, t, dtype=torch.bool) if mask is None else mask.bool().cpu()
    if valid.shape != (b, t):
        raise InterventionError(
            f"attention_mask has shape {tuple(valid.shape)}, input_ids {(b, t)}: a 2-D padding mask is expected"
        )
    if token_types is not None:
        if tuple(token_types.shape) != (b, t):
            raise InterventionError(
                f"token_types has shape {tuple(token_types.shape)}, the inputs {(b, t)}"
            )
        valid = valid & (token_types.cpu() != int(TokenType.SPECIAL))
    return valid


class _Stop(Exception):
    """Raised by a capture hook after the last layer of interest, to skip the rest of the model."""


def forward_until(backbone: Backbone, inputs: Mapping[str, Any], last_layer: int) -> None:
    """Run backbone.model(**inputs) without a cache and stop after decoder layer `last_layer`."""

    def stop(module: torch.nn.Module, args: tuple, output: Any) -> None:
        raise _Stop

    device = next(backbone.model.parameters()).device
    run = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    run["use_cache"] = False
    handle = backbone.layers[last_layer].register_forward_hook(stop)
    try:
        with torch.no_grad():
            backbone.model(**run)
    except _Stop:
        pass
    finally:
        handle.remove()


