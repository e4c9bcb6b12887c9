"""The machinery every intervention shares: position selection and hook lifetime.

Hook point L is the output of `backbone.layers[L]` (HF `hidden_states[L + 1]`). With a KV cache a
forward sees only the new tokens, so each hook has to know which absolute positions it covers. A
pre-hook on the decoder layer reads the layer's cache length *before* the layer appends to it
(`cache.get_seq_length(layer_idx)`); where a layer is not handed the cache, a pre-hook on
`backbone.model` records the cache length of the whole forward instead. Without a cache the forward
covers positions 0..T-1. Position ids are not used: they are shifted by left padding and are 3-D
under M-RoPE, so they do not say which absolute index a token has.

The cache is found by its type, not by the keyword it travels under: transformers 5.24 renamed the
keyword from `past_key_values` to `cache` (older releases also used `past_key_value` in layers), and
a hook that looked for the old name saw no cache, took every cached step for position 0 and edited
the wrong positions of generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Union

import torch
from torch import nn

from mmdiff.errors import MMDiffError
from mmdiff.models.base import Backbone, TokenType

PositionName = Literal["text", "image", "all"]
Positions = Union[PositionName, torch.Tensor]


class InterventionError(MMDiffError, ValueError):
    """An intervention was given inputs that do not fit the model or each other."""


def position_mask(
    positions: Positions,
    token_types: torch.Tensor | None,
    batch: int,
    start: int,
    length: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """[batch, length] bool: which of the absolute positions start..start+length-1 to edit.

    `token_types` ([batch, prompt_len] TokenType) label the prompt; positions past the prompt are
    generated tokens and count as TEXT. An explicit bool mask [batch, mask_len] selects exactly its
    True positions; positions past its end are not selected. Returns None for "all" (every position).
    """
    if isinstance(positions, str):
        if positions == "all":
            return None
        if positions not in ("text", "image"):
            raise InterventionError(
                f"positions must be 'text', 'image', 'all' or a [batch, seq] bool mask; got {positions!r}"
            )
        if token_types is None:
            raise InterventionError(
                f"positions={positions!r} needs the prompt's token types ([batch, seq] TokenType from "
                "adapter.token_types(inputs)); pass token_types=..., or use positions='all'"
            )
        wanted = TokenType.TEXT if positions == "text" else TokenType.IMAGE
        labels, beyond = token_types, positions == "text"
        selected = labels == int(wanted)
    else:
        if positions.dim() != 2 or positions.dtype != torch.bool:
            raise InterventionError(
                f"an explicit position mask must be a [batch, seq] bool tensor; got dtype "
                f"{positions.dtype} and shape {tuple(positions.shape)}"
            )
        selected, beyond = positions, False
    if selected.shape[0] != batch:
        raise InterventionError(
            f"the position labels cover a batch of {selected.shape[0]} but the model runs a batch of "
            f"{batch}; with num_beams or num_return_sequences > 1, repeat them with "
            "token_types.repeat_interleave(n, dim=0)"
        )
    prompt_len = selected.shape[1]
    out = torch.full((batch, length), beyond, dtype=torch.bool, device=device)
    lo, hi = start, min(start + length, prompt_len)
    if hi > lo:
        out[:, : hi - lo] = selected[:, lo:hi].to(device)
    return out


_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


def find_cache(args: tuple, kwargs: dict) -> Any:
    """The KV cache a module call was handed, whatever its keyword; None when it runs without one.

    A cache is an object with `get_seq_length` (every transformers `Cache`); the known keywords are
    tried first, then every other argument, so a future rename cannot silently hide it.
    """
    for key in _CACHE_KEYWORDS:
        value = kwargs.get(key)
        if value is not None and callable(getattr(value, "get_seq_length", None)):
            return value
    for value in (*kwargs.values(), *args):
        if not isinstance(value, torch.Tensor) and callable(getattr(value, "get_seq_length", None)):
            return value
    return None


class _PositionTracker:
    """Tracks the absolute start position of the forward that is running now."""

    def __init__(self) -> None:
        self.model_start: int | None = None  # from the model-level pre-hook, during a forward
        self.layer_start: dict[int, int] = {}  # layer -> start, set by the layer's pre-hook

    @staticmethod
    def _cache_length(cache: Any, layer_idx: int | None) -> int:
        if cache is None:
            return 0
        if layer_idx is None:
            return int(cache.get_seq_length())
        return int(cache.get_seq_length(layer_idx))

    def model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.model_start = self._cache_length(find_cache(args, kwargs), None)

    def model_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.model_start = None

    def layer_pre_hook(self, layer: int, cache_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            cache = find_cache(args, kwargs)
            if cache is not None:
                self.layer_start[layer] = self._cache_length(cache, cache_idx)
            else:
                self.layer_start[layer] = self.model_start or 0

        return hook


def _cache_index(backbone: Backbone, layer: int) -> int:
    attn = getattr(backbone.layers[layer], "self_attn", None)
    idx = getattr(attn, "layer_idx", None)
    return layer if idx is None else int(idx)


def split_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The hidden states inside a decoder layer's output (a tensor or a tuple), and a re-packer."""
    if isinstance(output, torch.Tensor):
        return output, lambda y: y
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda y: (y, *output[1:])
    raise InterventionError(
        f"a decoder layer returned {type(output).__name__}; expected a tensor or a tuple whose first "
        "item is the hidden states [batch, seq, d_model]"
    )


def check_layer(backbone: Backbone, layer: int) -> None:
    n = len(backbone.layers)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise InterventionError(
            f"layer {layer!r} is out of range: this backbone has decoder layers 0..{n - 1}"
        )


def check_vector(name: str, v: torch.Tensor, d_model: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        v = torch.as_tensor(v)
    if v.shape[-1] != d_model:
        raise InterventionError(
            f"{name} has last dimension {v.shape[-1]}, the model's hidden size is {d_model}: "
            "is it for another model or another hook point?"
        )
    if not torch.isfinite(v).all():
        raise InterventionError(f"{name} contains NaN or infinite values")
    return v


class Intervention:
    """A context manager that installs forward hooks on a backbone and removes them on exit.

    Subclasses define `layers()` and either `edit(layer, y, mask)` on the residual stream (hook
    point = output of layers[L]) or `edit_o_proj_input(layer, x, mask)` on the input of o_proj.
    `mask` is [batch, seq] bool, or None for every position. Interventions compose: nest them or
    enter several in one `with` (hooks on the same module run in the order they were entered).
    """

    residual = True  # edit the layer output; False: edit the o_proj input

    def __init__(
        self, backbone: Backbone, positions: Positions, token_types: torch.Tensor | None
    ) -> None:
        self.backbone = backbone
        self.positions = positions
        self.token_types = token_types
        # validate now, not at the first forward
        if isinstance(positions, torch.Tensor):
            position_mask(positions, None, positions.shape[0] if positions.dim() else 0, 0, 0)
        elif isinstance(positions, str):
            position_mask(
                positions, token_types, 0 if token_types is None else token_types.shape[0], 0, 0
            )
        else:
            raise InterventionError(
                f"positions must be 'text', 'image', 'all' or a [batch, seq] bool mask; got {type(positions).__name__}"
            )
        if token_types is not None and (
            not isinstance(token_types, torch.Tensor) or token_types.dim() != 2
        ):
            raise InterventionError(
                f"token_types must be a [batch, seq] tensor of TokenType values; got {getattr(token_types, 'shape', type(token_types))}"
            )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._tracker = _PositionTracker()

    # -- to override -------------------------------------------------------------------------
    def layers(self) -> list[int]:
        raise NotImplementedError

    def edit(self, layer: int, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[batch, seq, d_model] -> [batch, seq, d_model], changed only where mask is True."""
        raise NotImplementedError

    def edit_o_proj_input(
        self, layer: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """[batch, seq, num_heads * head_dim] -> same, changed only where mask is True."""
        raise NotImplementedError

    # -- hook plumbing -----------------------------------------------------------------------
    def mask_for(self, layer: int, y: torch.Tensor) -> torch.Tensor | None:
        start = self._tracker.layer_start.get(layer, 0)
        return position_mask(
            self.positions, self.token_types, y.shape[0], start, y.shape[1], y.device
        )

    def _layer_post_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            y, repack = split_output(output)
            return repack(self.edit(layer, y, self.mask_for(layer, y)))

        return hook

    def _o_proj_pre_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                x = args[0]
                return (
                    self.edit_o_proj_input(layer, x, self.mask_for(layer, x)),
                    *args[1:],
                ), kwargs
            x = kwargs["input"]
            return args, {
                **kwargs,
                "input": self.edit_o_proj_input(layer, x, self.mask_for(layer, x)),
            }

        return hook

    def __enter__(self) -> Intervention:
        if self._handles:
            raise InterventionError(
                "this intervention is already active; build a new one to nest it"
            )
        bb = self.backbone
        if not self.layers():  # nothing to do: install no hook at all
            return self
        try:
            self._handles.append(
                bb.model.register_forward_pre_hook(self._tracker.model_pre_hook, with_kwargs=True)
            )
            self._handles.append(
                bb.model.register_forward_hook(self._tracker.model_post_hook, with_kwargs=True)
            )
            for layer in self.layers():
                check_layer(bb, layer)
                pre = self._tracker.layer_pre_hook(layer, _cache_index(bb, layer))
                self._handles.append(
                    bb.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
                )
                if self.residual:
                    post = self._layer_post_hook(layer)
                    self._handles.append(
                        bb.layers[layer].register_forward_hook(post, with_kwargs=True)
                    )
                else:
                    o_proj = bb.o_proj(layer)
                    self._handles.append(
                        o_proj.register_forward_pre_hook(
                            self._o_proj_pre_hook(layer), with_kwargs=True
                        )
                    )
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tracker = _PositionTracker()

    def __exit__(self, *exc: object) -> None:
        self._remove()
