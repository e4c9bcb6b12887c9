"""LLaVA-NeXT (llava-hf `LlavaNextForConditionalGeneration`): LLaVA prompts, anyres image tokens.

The image-token count depends on each image's size: 576-style base tokens, plus the anyres tiles
cropped to the image's aspect ratio, plus one `image_newline` per row of patches; all of these
positions hold the image token id. `image_sizes` comes out of `vlm_inputs` with `pixel_values`
and must be passed on every re-run.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mmdiff.errors import ModelError
from mmdiff.models.base import register_adapter
from mmdiff.models.llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family: ClassVar[str] = "llava_next"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    vlm_classes: ClassVar[dict[str, str]] = {"llava_next": "LlavaNextForConditionalGeneration"}

    def patch_grid(self, inputs: dict[str, torch.Tensor], row: int) -> list[tuple[int, int, bool]]:
        """The image tiles of batch row `row` in token order, each (rows, cols, newline): the base
        (image_size / patch)^2 grid of the whole image, then the anyres tiles joined into one grid
        unpadded to the image's aspect ratio, every row ending in `image_newline` (the layout of
        `LlavaNextModel.pack_image_features`)."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        config = self.model.config
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise ModelError(
                f"patch_grid supports LLaVA-NeXT's 'default' vision_feature_select_strategy, found "
                f"{config.vision_feature_select_strategy!r}: the anyres grid layout is only defined without CLS"
            )
        if "image_sizes" not in inputs:
            raise ModelError(
                "LLaVA-NeXT inputs need image_sizes for the anyres grid: pass the dict from vlm_inputs"
            )
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        size = inputs["image_sizes"][row].cpu()  # (height, width) of the original image
        n_h, n_w = get_anyres_image_grid_shape(
            size.tolist(), config.image_grid_pinpoints, vision.image_size
        )
        unpadded = unpad_image(torch.empty(1, int(n_h) * side, int(n_w) * side), size)
        return [(side, side, False), (int(unpadded.shape[1]), int(unpadded.shape[2]), True)]
