"""PaliGemma / PaliGemma 2 (`PaliGemmaForConditionalGeneration`, Gemma / Gemma 2 text model).

Prompt "answer en {question}": the processor puts the image tokens first, then BOS, the prefix and
"\\n", and returns `token_type_ids` (0 = prefix, attended bidirectionally with the image; 1 = the
answer suffix, causal), which must be passed with every forward. The base LM sees
"<bos>{caption}\\nanswer en {question}\\n": the caption takes the image's place.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mmdiff.models.base import register_adapter
from mmdiff.models.hf_adapter import HFAdapter


@register_adapter
class PaliGemmaAdapter(HFAdapter):
    family: ClassVar[str] = "paligemma"
    model_types: ClassVar[tuple[str, ...]] = ("paligemma",)
    vlm_classes: ClassVar[dict[str, str]] = {"paligemma": "PaliGemmaForConditionalGeneration"}
    answer_separator: ClassVar[str] = ""  # the prefix already ends with "\n"

    def vlm_prompt(self, question: str) -> str:
        # the processor inserts BOS after the image tokens and "\n" after the prefix
        return f"{self.image_token}answer en {question}"

    def base_prompt(self, caption: str, question: str) -> str:
        return f"{caption}\nanswer en {question}\n"

    def patch_grid(self, inputs: dict[str, torch.Tensor], row: int) -> list[tuple[int, int, bool]]:
        """The image tiles of batch row `row` in token order, each (rows, cols, newline): SigLIP's
        square grid of (image_size / patch_size)^2 patches, no CLS token."""
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return [(side, side, False)]

    def _encode_vlm(
        self, prompts: list[str], images: list[Any], answers: list[str] | None
    ) -> dict[str, torch.Tensor]:
        # the processor appends answer + EOS as a causal suffix and builds labels itself
        kwargs: dict[str, Any] = {
            "images": images,
            "text": prompts,
            "return_tensors": "pt",
            "padding": True,
        }
        if answers is not None:
            kwargs["suffix"] = answers
        encoded = dict(self.processor(**kwargs))
        if answers is None:
            encoded.pop("labels", None)
        else:
            encoded["labels"] = torch.as_tensor(encoded["labels"]).masked_fill(
                torch.as_tensor(encoded["attention_mask"]) == 0, -100
            )
        return encoded
