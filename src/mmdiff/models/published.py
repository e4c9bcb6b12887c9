"""The published config.json of each supported family's real checkpoints, and their base LMs.

`mmdiff plan` sizes a study from these when the checkpoint is not on disk yet (`published_config`
finds one by hub id or by the folder name a config gives), and the tests build the real
architectures from them on the meta device. Each dict holds what the published config.json sets; a
few defaults the class would fill in are written out so the sizes are read here.
"""

from __future__ import annotations

LLAMA31_8B = {  # meta-llama/Llama-3.1-8B config.json
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
CLIP_L_336 = {  # openai/clip-vit-large-patch14-336, as the llava-hf checkpoints embed it
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}
LLAVA_MORE_8B = {  # aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning, llava-hf layout
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 128256,
    "image_seq_length": 576,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "torch_dtype": "bfloat16",
    "text_config": {
        **{k: v for k, v in LLAMA31_8B.items() if k != "architectures"},
        "vocab_size": 128320,
    },
    "vision_config": CLIP_L_336,
}
VICUNA_7B = {  # lmsys/vicuna-7b-v1.5 (Llama 2 7B), the base LM of LLaVA-1.5-7B
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "torch_dtype": "float16",
}
LLAVA15_7B = {  # llava-hf/llava-1.5-7b-hf
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "torch_dtype": "float16",
    "vocab_size": 32064,
    "text_config": {**{k: v for k, v in VICUNA_7B.items() if k != "architectures"}, "vocab_size": 32064},
    "vision_config": CLIP_L_336,
}
MISTRAL_7B = {  # mistralai/Mistral-7B-Instruct-v0.2, the base LM of LLaVA-NeXT (Mistral)
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "rms_norm_eps": 1e-05,
    "torch_dtype": "bfloat16",
}
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAVA_NEXT_MISTRAL_7B = {  # llava-hf/llava-v1.6-mistral-7b-hf
    "architectures": ["LlavaNextForConditionalGeneration"],
    "model_type": "llava_next",
    "image_token_index": 32000,
    "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS,
    "image_seq_length": 576,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "torch_dtype": "float16",
    "text_config": {**{k: v for k, v in MISTRAL_7B.items() if k != "architectures"}, "vocab_size": 32064},
    "vision_config": CLIP_L_336,
}
GEMMA2_2B = {  # google/gemma-2-2b config.json
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 256000,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
    "max_position_embeddings": 8192,
    "torch_dtype": "float32",
}


def paligemma2_3b(image_size: int = 224) -> dict:
    """google/paligemma2-3b-{pt,mix}-{224,448,896}: the same model but for the image size."""
    n_tokens = (image_size // 14) ** 2
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "image_token_index": 257152,
        "hidden_size": 2048,
        "projection_dim": 2304,
        "torch_dtype": "bfloat16",
        "text_config": {
            **{k: v for k, v in GEMMA2_2B.items() if k != "architectures"},
            "vocab_size": 257216,
            "num_image_tokens": n_tokens,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
            "image_size": image_size,
            "num_image_tokens": n_tokens,
            "projection_dim": 2304,
            "vision_use_head": False,
        },
    }


PALIGEMMA2_3B = paligemma2_3b(224)  # google/paligemma2-3b-mix-224 config.json
QWEN2_7B = {  # Qwen/Qwen2-7B, the base LM of Qwen2-VL-7B
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN2_VL_7B = {  # Qwen/Qwen2-VL-7B-Instruct (the flat layout as published)
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    **{k: v for k, v in QWEN2_7B.items() if k not in ("architectures", "model_type")},
    "max_position_embeddings": 32768,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
}
QWEN2_VL_PREPROCESSOR = {  # Qwen/Qwen2-VL-7B-Instruct preprocessor_config.json
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
}
QWEN3_1_7B = {  # Qwen/Qwen3-1.7B, the base LM of InternVL3.5-2B
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
INTERNVL3_5_2B = {  # OpenGVLab/InternVL3_5-2B-HF
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl",
    "downsample_ratio": 0.5,
    "image_seq_length": 256,
    "image_token_id": 151671,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "torch_dtype": "bfloat16",
    "text_config": {k: v for k, v in QWEN3_1_7B.items() if k != "torch_dtype"},
    "vision_config": {  # InternViT-300M-448px-V2.5
        "model_type": "internvl_vision",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": [448, 448],
        "patch_size": [14, 14],
        "attention_bias": True,
        "norm_type": "layer_norm",
        "use_qk_norm": False,
        "layer_scale_init_value": 0.1,
        "use_mean_pooling": True,
    },
}
INTERNVL_PREPROCESSOR = {  # its preprocessor_config.json (crop_to_patches is the processor's)
    "size": {"height": 448, "width": 448},
    "min_patches": 1,
    "max_patches": 12,
}


PUBLISHED: dict[str, dict] = {
    "meta-llama/Llama-3.1-8B": LLAMA31_8B,
    "aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning": LLAVA_MORE_8B,
    "lmsys/vicuna-7b-v1.5": VICUNA_7B,
    "llava-hf/llava-1.5-7b-hf": LLAVA15_7B,
    "mistralai/Mistral-7B-Instruct-v0.2": MISTRAL_7B,
    "llava-hf/llava-v1.6-mistral-7b-hf": LLAVA_NEXT_MISTRAL_7B,
    "google/gemma-2-2b": GEMMA2_2B,
    **{
        f"google/paligemma2-3b-{kind}-{size}": paligemma2_3b(size)
        for kind in ("pt", "mix")
        for size in (224, 448, 896)
    },
    "Qwen/Qwen2-7B": QWEN2_7B,
    "Qwen/Qwen2-VL-7B-Instruct": QWEN2_VL_7B,
    "Qwen/Qwen3-1.7B": QWEN3_1_7B,
    "OpenGVLab/InternVL3_5-2B-HF": INTERNVL3_5_2B,
}
"""Hub id -> published config.json."""

PREPROCESSORS: dict[str, dict] = {
    "Qwen/Qwen2-VL-7B-Instruct": QWEN2_VL_PREPROCESSOR,
    "OpenGVLab/InternVL3_5-2B-HF": INTERNVL_PREPROCESSOR,
}
"""Hub id -> the image-processor settings that decide image-token counts."""


def published_id(path_or_id: str) -> str | None:
    """The hub id of a known checkpoint named by hub id or by its folder name (last path part)."""
    text = str(path_or_id).rstrip("/")
    if text in PUBLISHED:
        return text
    name = text.rsplit("/", 1)[-1].lower()
    matches = [hub_id for hub_id in PUBLISHED if hub_id.rsplit("/", 1)[-1].lower() == name]
    return matches[0] if len(matches) == 1 else None
