"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Prompt: the chat template, "<|vision_start|><|image_pad|><|vision_end|>{question}" in a user turn.
Each image becomes t*h*w / merge^2 `<|image_pad|>` tokens, (t, h, w) = `image_grid_thw` from the
image processor. M-RoPE positions are computed from `image_grid_thw` and `mm_token_type_ids`, so
both come out of `vlm_inputs` and must be passed on every re-run or patch.

The text expansion is done here, from the image processor and the tokenizer, instead of through
`Qwen2VLProcessor`: that processor insists on a video processor, which transformers only builds
when torchvision is installed, and videos are not used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmdiff.errors import ModelError
from mmdiff.models.base import register_adapter
from mmdiff.models.hf_adapter import HFAdapter, _add_bos, _answer_labels, _answer_lengths
from mmdiff.models.loading import load_tokenizer, pretrained_call


@dataclass
class QwenVLProcessor:
    """The parts of a Qwen2-VL processor that image+text prompts need."""

    image_processor: Any
    tokenizer: Any
    chat_template: str | None
    image_token: str = "<|image_pad|>"

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, **kwargs
        )


@register_adapter
class Qwen2VLAdapter(HFAdapter):
    family: ClassVar[str] = "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl", "qwen2_5_vl")
    vlm_classes: ClassVar[dict[str, str]] = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    answer_separator: ClassVar[str] = ""  # the template ends with "assistant\n"

    @classmethod
    def load_processor(
        cls, vlm: str | Path, *, local_files_only: bool | None, trust_remote_code: bool
    ) -> Any:
        from transformers import AutoImageProcessor

        image_processor = pretrained_call(
            AutoImageProcessor.from_pretrained,
            vlm,
            "image processor",
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
        tokenizer = load_tokenizer(
            vlm, local_files_only=local_files_only, trust_remote_code=trust_remote_code
        )
        template = getattr(tokenizer, "chat_template", None) or _processor_chat_template(
            vlm, local_files_only
        )
        if not template:
            raise ModelError(
                f"{vlm}: no chat template found (neither in the tokenizer nor in chat_template.json / "
                "chat_template.jinja), and Qwen2-VL prompts are built with it"
            )
        return QwenVLProcessor(image_processor, tokenizer, template)

    def vlm_prompt(self, question: str) -> str:
        return self.chat_prompt([{"type": "image"}, {"type": "text", "text": question}])

    def base_prompt(self, caption: str, question: str) -> str:
        return self.chat_prompt([{"type": "text", "text": f"{caption}\n{question}"}])

    def _encode_vlm(
        self, prompts: list[str], images: list[Any], answers: list[str] | None
    ) -> dict[str, torch.Tensor]:
        image_processor = self.processor.image_processor
        vision = image_processor(images=images, return_tensors="pt")
        grid_thw = torch.as_tensor(vision["image_grid_thw"])  # [n_images, 3]
        n_tokens = (grid_thw.prod(-1) // image_processor.merge_size**2).tolist()
        texts = self._with_answers(prompts, answers, self.tokenizer)
        placeholder = self.image_token
        expanded = []
        for text, n in zip(texts, n_tokens):
            if text.count(placeholder) != 1:
                raise ModelError(
                    f"expected one {placeholder} placeholder per prompt, found {text.count(placeholder)} "
                    f"in {text!r}: does the chat template render images as Qwen2-VL's does?"
                )
            expanded.append(text.replace(placeholder, placeholder * int(n)))
        encoded = dict(
            self.tokenizer(
                expanded,
                return_tensors="pt",
                padding=True,
                add_special_tokens=_add_bos(texts, self.tokenizer),
            )
        )
        encoded["pixel_values"] = vision["pixel_values"]  # [n_patches_total, C * t * p * p]
        encoded["image_grid_thw"] = grid_thw
        # 0 = text, 1 = image: the M-RoPE layout read by get_rope_index
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).long()
        if answers is not None:
            encoded["labels"] = _answer_labels(
                encoded, _answer_lengths(prompts, texts, self.tokenizer)
            )
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


def _processor_chat_template(vlm: str | Path, local_files_only: bool | None) -> str | None:
    """The chat template stored beside the processor (chat_template.jinja or chat_template.json)."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = pretrained_call(
                cached_file,
                vlm,
                name,
                local_files_only=local_files_only,
                filename=name,
                _raise_exceptions_for_missing_entries=False,
            )
        except ModelError:
            path = None
        if path:
            text = Path(path).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None
