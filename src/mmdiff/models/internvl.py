"""InternVL3 / InternVL3.5 (`InternVLForConditionalGeneration`, a Qwen2 or Qwen3 text model).

Prompt: the chat template, an image rendered as "<IMG_CONTEXT>" in a user turn. Each image is cut
into up to `max_patches` 448-px tiles of the aspect ratio closest to its own, plus a thumbnail when
there is more than one tile (the image processor's `crop_to_patches`, which `InternVLProcessor`
turns on); each tile becomes (image_size / patch_size * downsample_ratio)^2 = 256 `<IMG_CONTEXT>`
tokens after the pixel shuffle, and the image's tokens are wrapped in "<img>" ... "</img>".

The expansion is done here from the image processor and the tokenizer (`ProcessorParts`), as
`InternVLProcessor` does it, because that processor cannot be built without torchvision.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mmdiff.errors import ModelError
from mmdiff.models.base import register_adapter
from mmdiff.models.processor_parts import ChatPartsAdapter

IMAGE_TOKEN = "<IMG_CONTEXT>"
IMAGE_START = "<img>"
IMAGE_END = "</img>"


def tokens_per_tile(config: Any) -> int:
    """Image tokens of one tile: the vision grid's side, shrunk by the pixel shuffle, squared."""
    vision = config.vision_config
    size, patch = vision.image_size, vision.patch_size
    side = (size[0] if isinstance(size, (list, tuple)) else size) // (
        patch[0] if isinstance(patch, (list, tuple)) else patch
    )
    return int(side * config.downsample_ratio) ** 2


@register_adapter
class InternVLAdapter(ChatPartsAdapter):
    family: ClassVar[str] = "internvl"
    model_types: ClassVar[tuple[str, ...]] = ("internvl",)
    vlm_classes: ClassVar[dict[str, str]] = {"internvl": "InternVLForConditionalGeneration"}
    image_placeholder: ClassVar[str] = IMAGE_TOKEN
    layout: ClassVar[str] = "InternVL"

    def _encode_vlm(
        self, prompts: list[str], images: list[Any], answers: list[str] | None
    ) -> dict[str, torch.Tensor]:
        # crop_to_patches is off in the saved image processor and turned on by InternVLProcessor
        vision = self.processor.image_processor(
            images=images, crop_to_patches=True, return_tensors="pt"
        )
        per_tile = tokens_per_tile(self.model.config)
        expansions = [
            IMAGE_START + self.image_token * (per_tile * int(n)) + IMAGE_END
            for n in vision["num_patches"]
        ]
        encoded = self._encode_expanded(prompts, answers, expansions)
        encoded["pixel_values"] = vision["pixel_values"]  # [n_tiles_total, C, H, W]
        return encoded

    def patch_grid(self, inputs: dict[str, torch.Tensor], row: int) -> list[tuple[int, int, bool]]:
        """The image tiles of batch row `row` in token order, each (rows, cols, newline): one square
        grid per tile (the crops row by row, then the thumbnail), each of tokens_per_tile tokens."""
        per_tile = tokens_per_tile(self.model.config)
        n_tokens = int((inputs["input_ids"][row] == self.image_token_id).sum())
        if n_tokens == 0 or n_tokens % per_tile:
            raise ModelError(
                f"batch row {row} holds {n_tokens} image tokens, not a positive multiple of the "
                f"{per_tile} per InternVL tile: pass the dict from vlm_inputs"
            )
        side = int(per_tile**0.5)
        return [(side, side, False)] * (n_tokens // per_tile)
