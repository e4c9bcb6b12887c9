"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Prompt: the chat template, "<|vision_start|><|image_pad|><|vision_end|>{question}" in a user turn.
Each image becomes t*h*w / merge^2 `<|image_pad|>` tokens, (t, h, w) = `image_grid_thw` from the
image processor. M-RoPE positions are computed from `image_grid_thw` and `mm_token_type_ids`, so
both come out of `vlm_inputs` and must be passed on every re-run or patch.

The text expansion is done here, from the image processor and the tokenizer (`ProcessorParts`),
instead of through `Qwen2VLProcessor`, which cannot be built without torchvision.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mmdiff.errors import ModelError
from mmdiff.models.base import register_adapter
from mmdiff.models.processor_parts import ChatPartsAdapter


@register_adapter
class Qwen2VLAdapter(ChatPartsAdapter):
    family: ClassVar[str] = "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl", "qwen2_5_vl")
    vlm_classes: ClassVar[dict[str, str]] = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    image_placeholder: ClassVar[str] = "<|image_pad|>"
    layout: ClassVar[str] = "Qwen2-VL"

    def _encode_vlm(
        self, prompts: list[str], images: list[Any], answers: list[str] | None
    ) -> dict[str, torch.Tensor]:
        image_processor = self.processor.image_processor
        vision = image_processor(images=images, return_tensors="pt")
        grid_thw = torch.as_tensor(vision["image_grid_thw"])  # [n_images, 3]
        n_tokens = (grid_thw.prod(-1) // image_processor.merge_size**2).tolist()
        expansions = [self.image_token * int(n) for n in n_tokens]
        encoded = self._encode_expanded(prompts, answers, expansions)
        encoded["pixel_values"] = vision["pixel_values"]  # [n_patches_total, C * t * p * p]
        encoded["image_grid_thw"] = grid_thw
        # 0 = text, 1 = image: the M-RoPE layout read by get_rope_index
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).long()
        return encoded

    def patch_grid(self, inputs: dict[str, torch.Tensor], row: int) -> list[tuple[int, int, bool]]:
        """The image tiles of batch row `row` in token order, each (rows, cols, newline): per temporal
        patch one (h / merge) x (w / merge) grid, (t, h, w) = the row's `image_grid_thw`, so the
        grid is not square for non-square images. Rows without image tokens have no image."""
        if "image_grid_thw" not in inputs:
            raise ModelError(
                "Qwen2-VL inputs need image_grid_thw for the patch grid: pass the dict from vlm_inputs"
            )
        has_image = (inputs["input_ids"] == self.image_token_id).any(1).tolist()  # [batch]
        if not has_image[row]:
            raise ModelError(f"batch row {row} holds no image tokens, so it has no patch grid")
        t, h, w = (int(v) for v in inputs["image_grid_thw"][sum(has_image[:row])].tolist())
        merge = int(self.model.config.vision_config.spatial_merge_size)
        return [(h // merge, w // merge, False)] * t

