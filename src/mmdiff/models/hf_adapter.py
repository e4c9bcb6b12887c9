"""What every Hugging Face VLM family shares: loading, padding, answers, token types, yes/no ids.

A family file subclasses `HFAdapter`, names its HF classes and model types, and writes its prompt
format (`vlm_prompt`, `base_prompt`); it overrides `_encode_vlm` only when its processor needs
more than `processor(images=..., text=...)`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmdiff.data.records import Record
from mmdiff.errors import DataError, ModelError
from mmdiff.models.base import Backbone, Side, TokenType, VLMAdapter
from mmdiff.models.loading import load_model, load_processor, load_tokenizer, read_config

YES_VARIANTS = ("yes", "Yes", " yes", " Yes", "YES", " YES")
NO_VARIANTS = ("no", "No", " no", " No", "NO", " NO")


class HFAdapter(VLMAdapter):
    """An adapter over one HF `*ForConditionalGeneration` VLM and its base `*ForCausalLM`."""

    # model_type -> transformers class name of the VLM
    vlm_classes: ClassVar[dict[str, str]]
    # text between the prompt and the appended answer ("ASSISTANT:" + " " + "yes")
    answer_separator: ClassVar[str] = " "

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        base_model: torch.nn.Module | None = None,
        base_tokenizer: Any = None,
        *,
        name: str = "",
    ) -> None:
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.vlm = Backbone.from_causal_lm(model)
        self.base = Backbone.from_causal_lm(base_model) if base_model is not None else None
        self.base_tokenizer = base_tokenizer
        if self.base is not None:
            self._check_pair()
        self._special_cache: dict[Side, torch.Tensor] = {}

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        vlm: str | Path,
        base_lm: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        local_files_only: bool | None = None,
        trust_remote_code: bool = False,
    ) -> HFAdapter:
        """Load the VLM with its processor, and the base LM with its tokenizer when `base_lm` is given."""
        import transformers

        options = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
        config = read_config(vlm, **options)
        if config.model_type not in cls.vlm_classes:
            raise ModelError(
                f"{vlm}: model_type {config.model_type!r} is not a {cls.family} checkpoint "
                f"(expected one of {sorted(cls.vlm_classes)}); let load_adapter pick the family"
            )
        vlm_class = getattr(transformers, cls.vlm_classes[config.model_type])
        model = load_model(vlm_class, vlm, dtype=dtype, device=device, what="VLM", **options)
        processor = cls.load_processor(vlm, **options)
        base_model = base_tokenizer = None
        if base_lm is not None:
            base_model = load_model(
                transformers.AutoModelForCausalLM,
                base_lm,
                dtype=dtype,
                device=device,
                what="base LM",
                **options,
            )
            base_tokenizer = load_tokenizer(base_lm, what="base LM tokenizer", **options)
        return cls(model, processor, base_model, base_tokenizer, name=str(vlm))

    @classmethod
    def load_processor(
        cls, vlm: str | Path, *, local_files_only: bool | None, trust_remote_code: bool
    ) -> Any:
        return load_processor(
            vlm, local_files_only=local_files_only, trust_remote_code=trust_remote_code
        )

    def _check_pair(self) -> None:
        assert self.base is not None
        if (self.base.d_model, self.base.num_layers) != (self.vlm.d_model, self.vlm.num_layers):
            raise ModelError(
                f"the base LM ({type(self.base.model).__name__}, d_model {self.base.d_model}, "
                f"{self.base.num_layers} layers) does not match the VLM's language model (d_model "
                f"{self.vlm.d_model}, {self.vlm.num_layers} layers): is it the LM this VLM was built from?"
            )

    # ---- prompts -------------------------------------------------------------------------------

    @property
    def image_token_id(self) -> int:
        config = self.model.config
        token_id = getattr(config, "image_token_id", None)
        if token_id is None:
            token_id = getattr(config, "image_token_index", None)
        if token_id is None:
            raise ModelError(
                f"{type(config).__name__} has neither image_token_id nor image_token_index"
            )
        return int(token_id)

    @property
    def image_token(self) -> str:
        return str(
            getattr(self.processor, "image_token", None)
            or self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        )

    def has_chat_template(self) -> bool:
        return bool(
            getattr(self.processor, "chat_template", None)
            or getattr(self.tokenizer, "chat_template", None)
        )

    def chat_prompt(self, content: list[dict[str, Any]]) -> str:
        """One user turn rendered with the processor's chat template, ready for the assistant's reply."""
        messages = [{"role": "user", "content": content}]
        template_owner = (
            self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        )
        text = template_owner.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return text[0] if isinstance(text, list) else str(text)

    @abstractmethod
    def vlm_prompt(self, question: str) -> str:
        """The (image, question) prompt, with the image placeholder the processor expands."""

    @abstractmethod
    def base_prompt(self, caption: str, question: str) -> str:
        """The (caption, question) prompt for the base LM: the caption takes the image's place."""

    # ---- inputs --------------------------------------------------------------------------------

    def vlm_inputs(
        self, records: Sequence[Record], *, with_answer: bool = False
    ) -> dict[str, torch.Tensor]:
        """Left-padded VLM inputs for (image, question): **-passable to the VLM.

        With `with_answer`, the first answer and EOS follow the prompt and `labels` holds them
        (-100 elsewhere), so `model(**inputs).loss` is the teacher-forced answer loss.
        """
        records = _check_records(records)
        prompts = [self.vlm_prompt(r.question) for r in records]
        images = [r.load_image() for r in records]
        answers = [_first_answer(r) for r in records] if with_answer else None
        encoded = self._encode_vlm(prompts, images, answers)
        return self._to_device(encoded, self.vlm)

    def base_inputs(
        self, records: Sequence[Record], *, with_answer: bool = False
    ) -> dict[str, torch.Tensor]:
        """Left-padded base-LM inputs for (caption, question), in the VLM's prompt shape."""
        tokenizer = self._require_base_tokenizer()
        records = _check_records(records)
        prompts = [self.base_prompt(r.require_caption(), r.question) for r in records]
        answers = [_first_answer(r) for r in records] if with_answer else None
        encoded = self._encode_texts(
            prompts,
            answers,
            tokenizer,
            lambda texts, bos: tokenizer(
                texts, return_tensors="pt", padding=True, add_special_tokens=bos
            ),
        )
        return self._to_device(encoded, self.backbone("base"))

    def _encode_vlm(
        self, prompts: list[str], images: list[Any], answers: list[str] | None
    ) -> dict[str, torch.Tensor]:
        return self._encode_texts(
            prompts,
            answers,
            self.tokenizer,
            lambda texts, bos: self.processor(
                images=images, text=texts, return_tensors="pt", padding=True, add_special_tokens=bos
            ),
        )

    def _encode_texts(
        self,
        prompts: list[str],
        answers: list[str] | None,
        tokenizer: Any,
        encode: Callable[[list[str], bool], Any],
    ) -> dict[str, torch.Tensor]:
        """`encode(texts, add_special_tokens)` of the prompts (+ answers and EOS), with `labels`
        on the answer positions when answers are given."""
        texts = self._with_answers(prompts, answers, tokenizer)
        encoded = dict(encode(texts, _add_bos(texts, tokenizer)))
        if answers is not None:
            encoded["labels"] = _answer_labels(encoded, _answer_lengths(prompts, texts, tokenizer))
        return encoded

    def _with_answers(
        self, prompts: list[str], answers: list[str] | None, tokenizer: Any
    ) -> list[str]:
        if answers is None:
            return list(prompts)
        eos = tokenizer.eos_token or ""
        return [p + self.answer_separator + a + eos for p, a in zip(prompts, answers)]

    def _to_device(self, encoded: dict[str, Any], backbone: Backbone) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in encoded.items():
            value = torch.as_tensor(value)
            if value.is_floating_point():
                value = value.to(device=backbone.device, dtype=backbone.dtype)
            else:
                value = value.to(backbone.device)
            out[key] = value
        return out

    def _require_base_tokenizer(self) -> Any:
        if self.base_tokenizer is None:
            raise ModelError("this adapter was loaded without a base LM; pass base_lm= to load one")
        return self.base_tokenizer

    # ---- token types and answer tokens ---------------------------------------------------------

    def _tokenizer(self, side: Side) -> Any:
        return self.tokenizer if side == "vlm" else self._require_base_tokenizer()

    def special_token_ids(self, side: Side = "vlm") -> torch.Tensor:
        """Ids labelled SPECIAL: BOS/EOS/pad/unk, every added special token (chat and vision markers)."""
        if side not in self._special_cache:
            tokenizer = self._tokenizer(side)
            ids = {int(i) for i in tokenizer.all_special_ids if i is not None}
            for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
                if getattr(token, "special", False):
                    ids.add(int(token_id))
            if side == "vlm":
                ids.discard(self.image_token_id)
            self._special_cache[side] = torch.tensor(sorted(ids), dtype=torch.long)
        return self._special_cache[side]

    def token_types(self, inputs: dict[str, torch.Tensor], side: Side = "vlm") -> torch.Tensor:
        """[batch, seq] int8: IMAGE where input_ids == image_token_id (VLM side only), SPECIAL for
        padding and special tokens, TEXT elsewhere."""
        input_ids = inputs["input_ids"]
        types = torch.full(
            input_ids.shape, int(TokenType.TEXT), dtype=torch.int8, device=input_ids.device
        )
        special = torch.isin(input_ids, self.special_token_ids(side).to(input_ids.device))
        types[special] = int(TokenType.SPECIAL)
        if side == "vlm":
            types[input_ids == self.image_token_id] = int(TokenType.IMAGE)
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None:
            types[attention_mask == 0] = int(TokenType.SPECIAL)
        return types

    def yes_no_token_ids(self, side: Side = "vlm") -> tuple[list[int], list[int]]:
        """Ids of the yes and no variants that are single tokens in the side's vocabulary."""
        tokenizer = self._tokenizer(side)
        yes = _single_token_ids(tokenizer, YES_VARIANTS, "yes")
        no = _single_token_ids(tokenizer, NO_VARIANTS, "no")
        if not yes or not no:
            raise ModelError(
                f"the {side} tokenizer has no single-token variant of "
                f"{'yes' if not yes else 'no'} (tried {YES_VARIANTS if not yes else NO_VARIANTS}), "
                "so yes/no answers cannot be scored by next-token probability"
            )
        return yes, no


def _check_records(records: Sequence[Record]) -> list[Record]:
    records = list(records)
    if not records:
        raise DataError("no records given: expected a non-empty batch of Records")
    return records


def _first_answer(record: Record) -> str:
    if not record.answers:
        raise DataError(
            f"record {record.id!r} ({record.source}) has no answers, and with_answer=True needs one "
            "to append: drop with_answer or give the record an answer"
        )
    return record.answers[0]


def _add_bos(texts: list[str], tokenizer: Any) -> bool:
    """False when the rendered prompt already starts with BOS (chat templates that write it)."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and all(t.startswith(bos) for t in texts))


def _answer_lengths(prompts: list[str], texts: list[str], tokenizer: Any) -> list[int]:
    """Number of tokens the answer (and EOS) add to each prompt.

    Image placeholders are one token in both texts, so the difference counts the answer only.
    """

    def count(batch: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]]

    return [full - prompt for full, prompt in zip(count(texts), count(prompts))]


def _answer_labels(encoded: dict[str, Any], lengths: list[int]) -> torch.Tensor:
    """[batch, seq] labels: input_ids on each row's last n (answer) positions, -100 elsewhere.

    Left padding puts every answer at the end of its row.
    """
    input_ids = torch.as_tensor(encoded["input_ids"])
    labels = torch.full_like(input_ids, -100)
    seq = input_ids.shape[1]
    for row, n in enumerate(lengths):
        if n > 0:
            labels[row, seq - n :] = input_ids[row, seq - n :]
    return labels


def _single_token_ids(tokenizer: Any, variants: Sequence[str], word: str) -> list[int]:
    found: list[int] = []
    for variant in variants:
        ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
        single = len(ids) == 1 and ids[0] not in found
        if single and tokenizer.decode(ids).strip().lower() == word:
            found.append(int(ids[0]))
    return found
