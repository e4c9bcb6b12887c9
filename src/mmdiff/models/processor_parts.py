"""Adapters whose processor is rebuilt from its parts: the image processor, tokenizer, chat template.

Qwen2-VL's and InternVL's processors cannot be built without a video processor, which transformers
only makes when torchvision is installed, and videos are not used here. Their adapters load these
parts instead and expand the image placeholder themselves, the same way for tiny and real
checkpoints. Their prompts are chat turns ending in "assistant\n", so answers follow directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmdiff.errors import ModelError
from mmdiff.models.hf_adapter import HFAdapter
from mmdiff.models.loading import load_tokenizer, pretrained_call


@dataclass
class ProcessorParts:
    """The parts of a VLM processor that image+text prompts need."""

    image_processor: Any
    tokenizer: Any
    chat_template: str | None
    image_token: str  # the placeholder the chat template writes for one image

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, **kwargs
        )


class ChatPartsAdapter(HFAdapter):
    """An HF adapter over `ProcessorParts`: chat-template prompts, image placeholders expanded here."""

    image_placeholder: ClassVar[str]  # what the chat template writes for one image
    layout: ClassVar[str]  # the family's name in error messages
    answer_separator: ClassVar[str] = ""  # the template ends with "assistant\n"

    @classmethod
    def load_processor(
        cls, vlm: str | Path, *, local_files_only: bool | None, trust_remote_code: bool
    ) -> Any:
        return load_processor_parts(
            vlm,
            cls.image_placeholder,
            cls.layout,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )

    def vlm_prompt(self, question: str) -> str:
        return self.chat_prompt([{"type": "image"}, {"type": "text", "text": question}])

    def base_prompt(self, caption: str, question: str) -> str:
        return self.chat_prompt([{"type": "text", "text": f"{caption}\n{question}"}])

    def _encode_expanded(
        self, prompts: list[str], answers: list[str] | None, expansions: list[str]
    ) -> dict[str, torch.Tensor]:
        """Tokenized prompts (+ answers and labels) whose one image placeholder each is replaced
        by `expansions[row]`: for processors rebuilt from their parts (`ProcessorParts`)."""
        placeholder = self.image_token

        def expand(texts: list[str]) -> list[str]:
            for text in texts:
                if text.count(placeholder) != 1:
                    raise ModelError(
                        f"expected one {placeholder} placeholder per prompt, found "
                        f"{text.count(placeholder)} in {text!r}: does the chat template render "
                        f"images as {self.layout}'s does?"
                    )
            return [t.replace(placeholder, e) for t, e in zip(texts, expansions)]

        return self._encode_texts(
            prompts,
            answers,
            self.tokenizer,
            lambda texts, bos: self.tokenizer(
                expand(texts), return_tensors="pt", padding=True, add_special_tokens=bos
            ),
        )


def load_processor_parts(
    vlm: str | Path,
    image_token: str,
    family: str,
    *,
    local_files_only: bool | None,
    trust_remote_code: bool,
) -> ProcessorParts:
    """The image processor, tokenizer and chat template saved with checkpoint `vlm`."""
    # From its module, not the package: transformers 5.6-5.17 mark the package-level name as
    # needing torchvision (its file mentions TorchvisionBackend; fixed in 5.18), so without
    # torchvision `transformers.AutoImageProcessor` is a placeholder that raises ImportError.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    options = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    image_processor = pretrained_call(
        AutoImageProcessor.from_pretrained, vlm, "image processor", **options
    )
    tokenizer = load_tokenizer(vlm, **options)
    template = getattr(tokenizer, "chat_template", None) or _processor_chat_template(
        vlm, local_files_only
    )
    if not template:
        raise ModelError(
            f"{vlm}: no chat template found (neither in the tokenizer nor in chat_template.json / "
            f"chat_template.jinja), and {family} prompts are built with it"
        )
    return ProcessorParts(image_processor, tokenizer, template, image_token)


def _processor_chat_template(vlm: str | Path, local_files_only: bool | None) -> str | None:
    """The chat template stored beside the processor (chat_template.jinja or chat_template.json)."""
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
