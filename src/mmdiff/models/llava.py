"""LLaVA-1.5 / LLaVA-MORE (llava-hf `LlavaForConditionalGeneration`) and the model organism.

Prompt: the processor's chat template where the checkpoint has one, else the LLaVA-1.5 format
"USER: <image>\\n{question} ASSISTANT:". The base LM sees "USER: {caption}\\n{question} ASSISTANT:".
The processor expands the one image placeholder to (image_size / patch)^2 image tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mmdiff.models.base import register_adapter
from mmdiff.models.hf_adapter import HFAdapter


@register_adapter
class LlavaAdapter(HFAdapter):
    family: ClassVar[str] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    vlm_classes: ClassVar[dict[str, str]] = {"llava": "LlavaForConditionalGeneration"}

    def vlm_prompt(self, question: str) -> str:
        if self.has_chat_template():
            return self.chat_prompt([{"type": "image"}, {"type": "text", "text": question}])
        return f"USER: {self.image_token}\n{question} ASSISTANT:"

    def base_prompt(self, caption: str, question: str) -> str:
        if self.has_chat_template():
            return self.chat_prompt([{"type": "text", "text": f"{caption}\n{question}"}])
        return f"USER: {caption}\n{question} ASSISTANT:"

    def patch_grid(self, inputs: dict[str, torch.Tensor], row: int) -> list[tuple[int, int, bool]]:
        """The image tiles of batch row `row` in token order, each (rows, cols, newline): one square
        grid of (image_size / patch_size)^2 patches; the "full" strategy's CLS token comes first as a
        1x1 tile. newline is True where each row of the tile ends with an extra (newline) token."""
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        tiles = [(side, side, False)]
        if getattr(self.model.config, "vision_feature_select_strategy", "default") == "full":
            tiles.insert(0, (1, 1, False))
        return tiles
