"""The organism's word-level tokenizer and its two prompt formats.

One token per word of the shapes world (captions, questions, answers), lower-cased, split on
whitespace and punctuation, so "yes" and "no" are single tokens and a generated answer decodes back
to the canonical text. Saved as tokenizer.json + tokenizer_config.json: AutoTokenizer loads it.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mmdiff.data import shapes

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)
PROMPT_WORDS: tuple[str, ...] = ("user", "assistant")

# The fixed prompt formats (the LLaVA adapter uses the same ones).
VLM_PROMPT = "USER: <image>\n{question} ASSISTANT:"
BASE_PROMPT = "USER: {caption}\n{question} ASSISTANT:"
TEXT_PROMPT = "USER: {question} ASSISTANT:"  # a bare text request, no image and no caption
LOOKUP_PROMPT = "USER: {caption}\n{cue}"  # the base LM's look-up completions (organism.mixtures)
FOLLOW_UP_PROMPT = TEXT_PROMPT  # a later turn of a VLM conversation (LLaVA v1 template) reads as a bare request


def vlm_prompt(question: str) -> str:
    return VLM_PROMPT.format(question=question)


def base_prompt(caption: str | None, question: str) -> str:
    if caption is None:
        return TEXT_PROMPT.format(question=question)
    return BASE_PROMPT.format(caption=caption, question=question)


def follow_up_prompt(question: str) -> str:
    """A later turn of a stage-2 conversation, after the previous answer's EOS (no BOS)."""
    return FOLLOW_UP_PROMPT.format(question=question)


def lookup_prompt(caption: str, cue: str) -> str:
    return LOOKUP_PROMPT.format(caption=caption, cue=cue)


def vocabulary() -> list[str]:
    """Special tokens first (ids 0-4), then the prompt words and every word of the shapes world."""
    words = sorted(set(PROMPT_WORDS) | set(shapes.vocabulary()))
    return list(SPECIAL_TOKENS) + words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh word-level tokenizer over `vocabulary()`; BOS is prepended, EOS is the answer's end."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    return fast
