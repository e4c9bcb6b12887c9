"""LLaVA-NeXT (llava-hf `LlavaNextForConditionalGeneration`): LLaVA prompts, anyres image tokens.

The image-token count depends on each image's size: 576-style base tokens, plus the anyres tiles
cropped to the image's aspect ratio, plus one `image_newline` per row of patches; all of these
positions hold the image token id. `image_sizes` comes out of `vlm_inputs` with `pixel_values`
and must be passed on every re-run.
"""

from __future__ import annotations

from typing import ClassVar

from mmdiff.models.base import register_adapter
from mmdiff.models.llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family: ClassVar[str] = "llava_next"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    vlm_classes: ClassVar[dict[str, str]] = {"llava_next": "LlavaNextForConditionalGeneration"}
