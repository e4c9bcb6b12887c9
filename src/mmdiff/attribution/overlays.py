"""Attention overlays: the top and bottom heads' attention from the question onto the image."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from mmdiff.attribution._common import StopForward
from mmdiff.attribution.objective import Objective, feature_values
from mmdiff.attribution.patching import HeadAttribution, Method
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError, DataError, ModelError
from mmdiff.models.base import Backbone, TokenType, VLMAdapter


def ranked_heads(scores: torch.Tensor, n: int, *, bottom: bool = False) -> list[tuple[int, int, float]]:
    """The n heads with the largest |score| (or the smallest with bottom=True): (layer, head, score)."""
    flat = scores.flatten()
    order = torch.argsort(flat.abs(), descending=not bottom, stable=True)[:n]
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H, float(flat[i])) for i in order]


def top_and_bottom_heads(
    scores: torch.Tensor, n: int
) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """(top, bottom) heads by |score|, disjoint: each list has min(n, H_total // 2) heads, so with
    fewer than 2n heads (a feature at layer 0 of a small model) no head is both "top" and "bottom"."""
    m = min(n, scores.numel() // 2)
    ranked = ranked_heads(scores, scores.numel())  # every head, largest |score| first
    return ranked[:m], ranked[len(ranked) - m :][::-1] if m else []


@contextmanager
def _eager_attention(backbone: Backbone) -> Iterator[None]:
    """Eager attention in the language model for the duration (SDPA returns no attention weights)."""
    decoder = backbone.model.get_decoder()
    configs = {id(c): c for c in [decoder.config] + [backbone.attention(l).config for l in range(backbone.num_layers)]}
    before = {key: cfg._attn_implementation for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            cfg._attn_implementation = "eager"
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = before[key]


def attention_weights(backbone: Backbone, inputs: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """[batch, heads, seq, seq] attention probabilities of decoder layer `layer` on `inputs`."""
    backbone.check_layers([layer])
    seen: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, (tuple, list)) or len(output) < 2 or output[1] is None:
            raise ModelError(
                f"{type(module).__name__} returned no attention weights even under eager attention; "
                "this architecture needs its own attention read-out"
            )
        seen["w"] = output[1].detach()
        raise StopForward

    handle = backbone.attention(layer).register_forward_hook(hook)
    try:
        with torch.no_grad(), _eager_attention(backbone):
            backbone.model(**inputs, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    if "w" not in seen:
        raise ModelError(f"the attention of layer {layer} never ran")
    return seen["w"]


def head_image_attention(
    adapter: VLMAdapter,
    inputs: dict[str, torch.Tensor],
    row: int,
    layer: int,
    head: int,
    queries: torch.Tensor,
) -> torch.Tensor:
    """[n_image] head `head`'s attention at `layer` from the `queries` positions ([seq] bool, mean
    over them) of batch row `row` onto that row's image tokens, in token order."""
    weights = attention_weights(adapter.vlm, inputs, layer)  # [batch, H, seq, seq]
    if not 0 <= head < weights.shape[1]:
        raise ModelError(f"head {head} does not exist: layer {layer} has {weights.shape[1]} heads")
    queries = queries.to(weights.device)
    if not bool(queries.any()):
        raise DataError(f"row {row}: no query positions to read the attention from")
    image = adapter.image_token_mask(inputs["input_ids"])[row].to(weights.device)  # [seq]
    return weights[row, head][queries].float().mean(0)[image].cpu()  # [n_image]


def attention_overlays(
    adapter: VLMAdapter,
    sae: Any,
    attribution: HeadAttribution,
    record: Record,
    *,
    n_heads: int = 3,
    method: Method = "a",
    query: Literal["text", "max"] = "text",
    objective: Objective = "projection",
) -> dict[str, bytes]:
    """PNG overlays of the top and bottom heads' attention onto the image, for one sample.

    Heads are ranked by |score| of `method`; the top and bottom lists never share a head
    (`top_and_bottom_heads`). The attention is read from the text positions (mean) or from the
    feature's max position ("max"). Keys: "top1_L3H1", ..., "bottom1_L0H2", ...
    """
    from mmdiff.interp.heatmap import overlay_png, patch_grid

    scores = attribution.score_a if method == "a" else attribution.score_b
    if scores is None:
        raise ConfigError(f"method {method!r} was not computed for this attribution")
    inputs = adapter.vlm_inputs([record])
    types = adapter.token_types(inputs)[0].long()
    valid = inputs["attention_mask"][0].bool().to(types.device) & (types != int(TokenType.SPECIAL))
    if query == "text":
        queries = valid & (types == int(TokenType.TEXT))
    elif query == "max":
        from mmdiff.capture import capture_residuals

        resid = capture_residuals(adapter.vlm, inputs, [attribution.feature_layer])[attribution.feature_layer]
        with torch.no_grad():
            values = feature_values(resid, sae, attribution.feature, objective)[0].cpu()  # [seq]
        values[~valid.cpu()] = -torch.inf
        queries = torch.zeros_like(valid)
        queries[int(values.argmax())] = True
    else:
        raise ConfigError(f"query must be 'text' or 'max', got {query!r}")
    tiles = patch_grid(adapter, inputs, 0)
    image = record.load_image()
    out: dict[str, bytes] = {}
    top, bottom = top_and_bottom_heads(scores, n_heads)
    for label, chosen in (("top", top), ("bottom", bottom)):
        for rank, (lyr, head, score) in enumerate(chosen, start=1):
            att = head_image_attention(adapter, inputs, 0, lyr, head, queries)
            title = f"{label} {rank}: L{lyr}H{head} (score {score:+.3g})"
            out[f"{label}{rank}_L{lyr}H{head}"] = overlay_png(image, att, tiles, title=title)
    return out
