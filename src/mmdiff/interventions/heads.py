"""Head mean-ablation: replace attention heads' slices of the o_proj input by their calibration means."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from mmdiff.interventions._batches import forward_until, split_batch, valid_positions
from mmdiff.progress import iterate
from mmdiff.interventions._hooks import Intervention, InterventionError, Positions, check_layer
from mmdiff.models.base import Backbone


def replace_heads(
    x: torch.Tensor,
    heads: torch.Tensor,
    means: torch.Tensor,
    head_dim: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """o_proj input x [batch, seq, H * head_dim] with heads' slices set to means [H, head_dim] where mask."""
    b, t, width = x.shape
    per_head = x.reshape(b, t, width // head_dim, head_dim)  # [batch, seq, H, head_dim]
    keep = torch.ones(b, t, per_head.shape[2], 1, dtype=torch.bool, device=x.device)
    rows = torch.ones(b, t, dtype=torch.bool, device=x.device) if mask is None else mask
    keep[:, :, heads.to(x.device)] = ~rows[:, :, None, None]
    out = torch.where(keep, per_head, means.to(x.device, x.dtype))
    return out.reshape(b, t, width)


class HeadMeanAblation(Intervention):
    """A forward pre-hook on o_proj of each layer that mean-ablates the chosen heads."""

    residual = False

    def __init__(
        self,
        backbone: Backbone,
        heads: Mapping[int, Sequence[int]],
        means: Mapping[int, torch.Tensor],
        positions: Positions = "all",
        token_types: torch.Tensor | None = None,
    ) -> None:
        super().__init__(backbone, positions, token_types)
        h, hd = backbone.num_heads, backbone.head_dim
        self.heads: dict[int, torch.Tensor] = {}
        self.means: dict[int, torch.Tensor] = {}
        for layer, chosen in heads.items():
            check_layer(backbone, layer)
            chosen = sorted({int(i) for i in chosen})
            if not chosen:
                continue
            bad = [i for i in chosen if not 0 <= i < h]
            if bad:
                raise InterventionError(
                    f"heads {bad} do not exist at layer {layer}: the model has {h} heads"
                )
            if layer not in means:
                raise InterventionError(
                    f"no head means for layer {layer}; compute them with head_means(backbone, batches, layers)"
                )
            m = torch.as_tensor(means[layer]).detach()
            if tuple(m.shape) != (h, hd):
                raise InterventionError(
                    f"head means of layer {layer} have shape {tuple(m.shape)}; expected [num_heads, head_dim] = {[h, hd]}"
                )
            self.heads[layer] = torch.tensor(chosen, dtype=torch.long)
            self.means[layer] = m

    def layers(self) -> list[int]:
        return sorted(self.heads)

    def edit_o_proj_input(
        self, layer: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if x.shape[-1] != self.backbone.num_heads * self.backbone.head_dim:
            raise InterventionError(
                f"o_proj of layer {layer} got input width {x.shape[-1]}, expected num_heads * head_dim = "
                f"{self.backbone.num_heads * self.backbone.head_dim}: are num_heads/head_dim of the Backbone right?"
            )
        return replace_heads(x, self.heads[layer], self.means[layer], self.backbone.head_dim, mask)


def mean_ablate_heads(
    backbone: Backbone,
    heads: Mapping[int, Sequence[int]],
    means: Mapping[int, torch.Tensor],
    positions: Positions = "all",
    token_types: torch.Tensor | None = None,
) -> HeadMeanAblation:
    """A context manager that replaces heads' o_proj input slices by their means.

    heads: {layer: [head, ...]}; means: {layer: [num_heads, head_dim]} from `head_means`.
    positions as in `ablate_features`, default "all".
    """
    return HeadMeanAblation(backbone, heads, means, positions, token_types)


def head_means(
    backbone: Backbone,
    batches: Iterable[Mapping[str, Any]],
    layers: Sequence[int],
    *,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """{layer: [num_heads, head_dim]} mean of each head's o_proj input over a calibration set.

    batches: dicts of model inputs (input_ids, attention_mask, pixel_values, ...); the mean runs over
    non-padding positions (attention_mask == 1), and also leaves out SPECIAL positions where a
    batch carries "token_types" ([batch, seq] TokenType).
    """
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise InterventionError("head_means needs at least one layer")
    for layer in layers:
        check_layer(backbone, layer)
    h, hd = backbone.num_heads, backbone.head_dim
    sums = {layer: torch.zeros(h * hd, dtype=torch.float64) for layer in layers}
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured[layer] = (args[0] if args else kwargs["input"]).detach()

        return hook

    handles = [
        backbone.o_proj(layer).register_forward_pre_hook(capture(layer), with_kwargs=True)
        for layer in layers
    ]
    try:
        for batch in iterate(batches, "head means", progress):
            inputs, token_types, _ = split_batch(batch)
            valid = valid_positions(inputs, token_types)  # [batch, seq]
            captured.clear()
            forward_until(backbone, inputs, layers[-1])
            for layer in layers:
                x = captured[layer]  # [batch, seq, H * head_dim]
                if x.shape[-1] != h * hd:
                    raise InterventionError(
                        f"o_proj of layer {layer} has input width {x.shape[-1]}, expected {h} * {hd}"
                    )
                sums[layer] += x[valid.to(x.device)].to(torch.float64).sum(0).cpu()
            count += int(valid.sum())
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise InterventionError(
            "head_means saw no non-padding position: the calibration batches are empty"
        )
    return {layer: (sums[layer] / count).reshape(h, hd).to(torch.float32) for layer in layers}
