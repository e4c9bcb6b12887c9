"""Tiny random-init checkpoints of every supported VLM family, built locally (no download).

`build_tiny(family, out_dir)` writes `out_dir/vlm` (the VLM and its processor) and `out_dir/base`
(a causal LM with the same text config and its tokenizer) with `save_pretrained`, so tests load
them by path through `load_adapter` exactly as they would load a real checkpoint. They use the
same HF classes as the real models; only the sizes are tiny (hidden 32, 3 layers, 16-pixel images).
The tokenizers are byte-level BPE trained in memory on a fixed corpus, with each family's special
tokens and, where the family has one, its chat template.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmdiff.atomic import atomic_dir
from mmdiff.errors import ModelError

VLM_SUBDIR = "vlm"
BASE_SUBDIR = "base"

HIDDEN = 32
LAYERS = 3
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
IMAGE_SIZE = 16
PATCH = 4

# Words the tiny tokenizers learn as whole tokens, so prompts in tests stay short.
_CORPUS = [
    "USER: ASSISTANT: yes no Yes No answer en",
    "Is the red circle left of the blue square? yes",
    "Is the green triangle above the yellow star? no",
    "What colour is the square? red blue green yellow",
    "What word is written in the image? cat dog stop",
    "A red circle to the left of a blue square. A small green triangle below a star.",
    "Describe the positions of all objects in the image. behind in front of next to on top of under",
    "You are a helpful assistant. system user assistant",
] + ["yes no Yes No\nyes\nno\nYes\nNo"] * 8


@dataclass(frozen=True)
class _Tokens:
    """The special tokens a family's tokenizer carries."""

    bos: str | None
    eos: str
    pad: str
    image: str
    add_bos: bool
    extra: tuple[str, ...] = ()  # further special tokens (chat and vision markers)


def _train_tokenizer(
    tokens: _Tokens, chat_template: str | None = None, vocab_size: int = 512
) -> Any:
    """A byte-level BPE tokenizer trained on `_CORPUS`, with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        t for t in ("<unk>", tokens.bos, tokens.eos, tokens.pad, tokens.image, *tokens.extra) if t
    ]
    specials = list(dict.fromkeys(specials))
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    kwargs: dict[str, Any] = {
        "tokenizer_object": backend,
        "eos_token": tokens.eos,
        "pad_token": tokens.pad,
        "unk_token": "<unk>",
        "add_bos_token": tokens.add_bos,
        "padding_side": "left",
    }
    if tokens.bos:
        kwargs["bos_token"] = tokens.bos
    if tokens.extra:
        kwargs["additional_special_tokens"] = list(tokens.extra)
    tokenizer = PreTrainedTokenizerFast(**kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _ids(tokenizer: Any, token: str) -> int:
    return int(tokenizer.convert_tokens_to_ids(token))


def _llama_text_config(
    tokenizer: Any, hidden: int = HIDDEN, layers: int = LAYERS, heads: int = HEADS
) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_vision_config(image_size: int = IMAGE_SIZE, hidden: int = HIDDEN) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=PATCH,
        projection_dim=hidden,
    )


_LLAVA_TOKENS = _Tokens(bos="<s>", eos="</s>", pad="<pad>", image="<image>", add_bos=True)

# The llava-hf LLaVA-NeXT (vicuna) chat template: "USER: <image>\n{q} ASSISTANT:".
_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _build_llava(
    seed: int,
    hidden: int = HIDDEN,
    layers: int = LAYERS,
    heads: int = HEADS,
    image_size: int = IMAGE_SIZE,
) -> tuple[Any, Any, Any, Any]:
    """LLaVA-1.5 shape: CLIP tower ((image_size / 4)^2 patches + CLS, CLS dropped), Llama text
    model, no chat template (the organism's layout). The sizes are parameters for benchmarks."""
    from transformers import (
        CLIPImageProcessor,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _train_tokenizer(_LLAVA_TOKENS)
    config = LlavaConfig(
        vision_config=_clip_vision_config(image_size, hidden),
        text_config=_llama_text_config(tokenizer, hidden, layers, heads),
        image_token_id=_ids(tokenizer, "<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // PATCH) ** 2,
    )
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    base = LlamaForCausalLM(_llama_text_config(tokenizer, hidden, layers, heads))
    return vlm, processor, base, _train_tokenizer(_LLAVA_TOKENS)


NEXT_GRID_PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def _build_llava_next(seed: int) -> tuple[Any, Any, Any, Any]:
    """LLaVA-NeXT shape: anyres tiles on a 16-pixel grid plus image_newline, vicuna chat template."""
    from transformers import (
        LlamaForCausalLM,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = _train_tokenizer(_LLAVA_TOKENS, chat_template=_LLAVA_CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(),
        text_config=_llama_text_config(tokenizer),
        image_token_index=_ids(tokenizer, "<image>"),
        image_grid_pinpoints=NEXT_GRID_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    torch.manual_seed(seed)
    vlm = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=NEXT_GRID_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    base = LlamaForCausalLM(_llama_text_config(tokenizer))
    return vlm, processor, base, _train_tokenizer(_LLAVA_TOKENS, chat_template=_LLAVA_CHAT_TEMPLATE)


_GEMMA_TOKENS = _Tokens(bos="<bos>", eos="<eos>", pad="<pad>", image="<image>", add_bos=True)


def _gemma2_text_config(tokenizer: Any) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        sliding_window=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_paligemma(seed: int) -> tuple[Any, Any, Any, Any]:
    """PaliGemma 2 shape: SigLIP tower (16 tokens), Gemma 2 text model, "answer en {q}" prompts."""
    from transformers import (
        Gemma2ForCausalLM,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tokenizer = _train_tokenizer(_GEMMA_TOKENS)
    n_image_tokens = (IMAGE_SIZE // PATCH) ** 2
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=n_image_tokens
    )
    image_processor.image_seq_length = n_image_tokens
    # the processor adds PaliGemma's <loc....> and <seg...> tokens: build it before sizing the vocab
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vision_config = SiglipVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=HIDDEN,
    )
    config = PaliGemmaConfig(
        vision_config=vision_config,
        text_config=_gemma2_text_config(tokenizer),
        image_token_index=_ids(tokenizer, "<image>"),
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
        vocab_size=len(tokenizer),
    )
    torch.manual_seed(seed)
    vlm = PaliGemmaForConditionalGeneration(config)
    base = Gemma2ForCausalLM(_gemma2_text_config(tokenizer))
    return vlm, processor, base, _train_tokenizer(_GEMMA_TOKENS)


_QWEN_TOKENS = _Tokens(
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    image="<|image_pad|>",
    add_bos=False,
    extra=("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
)

# The Qwen2-VL-Instruct chat template (images only; videos are not used here).
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_PATCH = 4
QWEN_MERGE = 2


def _qwen_sizes(tokenizer: Any) -> dict[str, Any]:
    """The text-model sizes and special ids every tiny Qwen-family model shares."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 512,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _qwen2_base_config(tokenizer: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_qwen_sizes(tokenizer))


def _qwen_text_kwargs(tokenizer: Any) -> dict[str, Any]:
    return {
        **_qwen_sizes(tokenizer),
        # M-RoPE: sections of (temporal, height, width) summing to head_dim / 2
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [1, 1, 2],
        },
    }


def _qwen_processor_parts(tokenizer: Any) -> list[Any]:
    """The image processor and the tokenizer (with the chat template), saved side by side.

    Not a Qwen2VLProcessor: that class cannot be built without torchvision (it wants a video
    processor); the Qwen adapter reads these two parts directly, as it does for real checkpoints.
    """
    from transformers import Qwen2VLImageProcessorPil

    # the PIL backend: the default one needs torchvision, which the CPU install does not have
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH,
        merge_size=QWEN_MERGE,
        temporal_patch_size=2,
        min_pixels=(QWEN_PATCH * QWEN_MERGE) ** 2,
        max_pixels=(QWEN_PATCH * QWEN_MERGE * 4) ** 2,
    )
    return [image_processor, tokenizer]


def _qwen_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "image_token_id": _ids(tokenizer, "<|image_pad|>"),
        "video_token_id": _ids(tokenizer, "<|video_pad|>"),
        "vision_start_token_id": _ids(tokenizer, "<|vision_start|>"),
        "vision_end_token_id": _ids(tokenizer, "<|vision_end|>"),
    }


_QWEN2_VL_VISION = {
    "depth": 2,
    "embed_dim": HIDDEN,
    "hidden_size": HIDDEN,
    "mlp_ratio": 2,
    "num_heads": 2,
    "patch_size": QWEN_PATCH,
    "spatial_merge_size": QWEN_MERGE,
    "temporal_patch_size": 2,
}
# Qwen2.5-VL's tower: windowed attention, full attention in block 1, an explicit output size
_QWEN2_5_VL_VISION = {
    "depth": 2,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "out_hidden_size": HIDDEN,
    "num_heads": 2,
    "patch_size": QWEN_PATCH,
    "spatial_merge_size": QWEN_MERGE,
    "temporal_patch_size": 2,
    "window_size": QWEN_PATCH * QWEN_MERGE * 2,
    "fullatt_block_indexes": [1],
}


def _build_qwen(
    seed: int, config_class: str, model_class: str, vision_config: dict[str, Any]
) -> tuple[Any, Any, Any, Any]:
    """Qwen2-VL / Qwen2.5-VL shape: 4-pixel patches merged 2x2, M-RoPE text model, Qwen chat template."""
    import transformers

    tokenizer = _train_tokenizer(_QWEN_TOKENS, chat_template=_QWEN_CHAT_TEMPLATE)
    config = getattr(transformers, config_class)(
        text_config=_qwen_text_kwargs(tokenizer),
        vision_config=dict(vision_config),
        **_qwen_ids(tokenizer),
    )
    torch.manual_seed(seed)
    vlm = getattr(transformers, model_class)(config)
    processor = _qwen_processor_parts(tokenizer)
    base = transformers.Qwen2ForCausalLM(_qwen2_base_config(tokenizer))
    return vlm, processor, base, _train_tokenizer(_QWEN_TOKENS, chat_template=_QWEN_CHAT_TEMPLATE)


def _build_qwen2_vl(seed: int) -> tuple[Any, Any, Any, Any]:
    return _build_qwen(seed, "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", _QWEN2_VL_VISION)


def _build_qwen2_5_vl(seed: int) -> tuple[Any, Any, Any, Any]:
    return _build_qwen(
        seed, "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", _QWEN2_5_VL_VISION
    )


_INTERNVL_TOKENS = _Tokens(
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    image="<IMG_CONTEXT>",
    add_bos=False,
    extra=("<|im_start|>", "<|im_end|>", "<img>", "</img>"),
)

# A Qwen-style chat template that writes one "<IMG_CONTEXT>" per image, as InternVL-HF's does.
_INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_MAX_TILES = 4


def _qwen3_text_kwargs(tokenizer: Any) -> dict[str, Any]:
    return {**_qwen_sizes(tokenizer), "head_dim": HEAD_DIM, "tie_word_embeddings": True}


def _build_internvl(seed: int) -> tuple[Any, Any, Any, Any]:
    """InternVL3.5 shape: InternViT tower on 16-pixel tiles (patch 4, pixel shuffle 0.5: 4 tokens
    per tile, up to 4 tiles + thumbnail), Qwen3 text model, Qwen chat template."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tokenizer = _train_tokenizer(_INTERNVL_TOKENS, chat_template=_INTERNVL_CHAT_TEMPLATE)
    vision_config = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
    }
    config = InternVLConfig(
        vision_config=vision_config,
        text_config={"model_type": "qwen3", **_qwen3_text_kwargs(tokenizer)},
        image_token_id=_ids(tokenizer, "<IMG_CONTEXT>"),
        image_seq_length=(IMAGE_SIZE // PATCH // 2) ** 2,
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    vlm = InternVLForConditionalGeneration(config)
    # the PIL backend: the default one needs torchvision
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        min_patches=1,
        max_patches=INTERNVL_MAX_TILES,
    )
    base = Qwen3ForCausalLM(Qwen3Config(**_qwen3_text_kwargs(tokenizer)))
    base_tokenizer = _train_tokenizer(_INTERNVL_TOKENS, chat_template=_INTERNVL_CHAT_TEMPLATE)
    return vlm, [image_processor, tokenizer], base, base_tokenizer


BUILDERS: dict[str, Callable[..., tuple[Any, Any, Any, Any]]] = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "paligemma": _build_paligemma,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "internvl": _build_internvl,
}


def build_tiny(family: str, out_dir: str | Path, *, seed: int = 0, **sizes: int) -> Path:
    """Write a tiny random-init VLM of `family` to out_dir/vlm and its base LM to out_dir/base.

    Returns out_dir. Load it with `load_adapter(out_dir / "vlm", base_lm=out_dir / "base")`, or
    `load_tiny(family, out_dir)`. An existing complete build is reused. `sizes` (hidden, layers,
    heads, image_size) are accepted by the "llava" builder only, for benchmarks.
    """
    if family not in BUILDERS:
        raise ModelError(
            f"no tiny builder for family {family!r}; expected one of {sorted(BUILDERS)}"
        )
    out = Path(out_dir)
    vlm_dir, base_dir = out / VLM_SUBDIR, out / BASE_SUBDIR
    if (vlm_dir / "config.json").is_file() and (base_dir / "config.json").is_file():
        return out
    if sizes and family != "llava":
        raise ModelError(f"only the llava builder takes sizes; got {sorted(sizes)} for {family!r}")
    vlm, processor, base, base_tokenizer = BUILDERS[family](seed, **sizes)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(vlm_dir) as tmp:
        vlm.save_pretrained(tmp)
        for part in processor if isinstance(processor, list) else [processor]:
            part.save_pretrained(tmp)
    with atomic_dir(base_dir) as tmp:
        base.save_pretrained(tmp)
        base_tokenizer.save_pretrained(tmp)
    return out


def load_tiny(family: str, out_dir: str | Path, **kwargs: Any) -> Any:
    """Build (if needed) and load the tiny `family` checkpoint through `load_adapter`."""
    from mmdiff.models import load_adapter

    root = build_tiny(family, out_dir)
    kwargs.setdefault("dtype", torch.float32)
    return load_adapter(root / VLM_SUBDIR, base_lm=root / BASE_SUBDIR, **kwargs)
