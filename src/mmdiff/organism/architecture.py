"""The organism's model classes from its recipe: a Llama base LM and the LLaVA VLM around it."""

from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mmdiff.organism.recipe import OrganismConfig
from mmdiff.organism.tokenizer import BOS, EOS, IMAGE, PAD

# CLIP's normalisation constants: the processor and the training loop must agree on them.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def base_lm_config(cfg: OrganismConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        tie_word_embeddings=False,
        initializer_range=cfg.init_std,
        rope_theta=cfg.rope_theta,
    )


def vision_config(cfg: OrganismConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.vision_d_model,
        intermediate_size=cfg.vision_d_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_d_model,
    )


def vlm_config(cfg: OrganismConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    text = base_lm_config(cfg, tokenizer)
    return LlavaConfig(
        vision_config=vision_config(cfg),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=cfg.n_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        # the tower is ours and shallow: its last layer is the one trained to feed the LM
        vision_feature_layer=-1,
        tie_word_embeddings=False,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
    )


def build_base_lm(cfg: OrganismConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(base_lm_config(cfg, tokenizer))


def sincos_positions(side: int, dim: int, base: float = 100.0) -> torch.Tensor:
    """2-D sine-cosine position features of a side x side patch grid, in raster order: (side**2, dim).

    A quarter of the dimensions each holds sin and cos of the row and of the column at dim / 4
    frequencies from 1 down to 1 / base radians per patch (MAE's fixed 2-D embedding, with a base
    fit for an 8-patch side, where MAE's 10,000 leaves most features flat). Each row has norm
    sqrt(dim / 2).
    """
    if dim % 4:
        raise ValueError(f"sincos_positions needs a dimension divisible by 4, got {dim}")
    q = dim // 4
    omega = base ** (-torch.arange(q, dtype=torch.float64) / q)
    rows = torch.arange(side, dtype=torch.float64).repeat_interleave(side)[:, None] * omega
    cols = torch.arange(side, dtype=torch.float64).repeat(side)[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


def build_vlm_from_base(cfg: OrganismConfig, tokenizer: PreTrainedTokenizerFast, base: LlamaForCausalLM) -> LlavaForConditionalGeneration:
    """A LLaVA model whose language model starts as an exact copy of `base`."""
    torch.manual_seed(cfg.seed + 1)
    vlm = LlavaForConditionalGeneration(vlm_config(cfg, tokenizer))
    vlm.model.language_model.load_state_dict(base.model.state_dict())
    vlm.lm_head.load_state_dict(base.lm_head.state_dict())
    if cfg.vision_positions == "sincos":
        positions = vlm.model.vision_tower.embeddings.position_embedding.weight
        with torch.no_grad():
            positions[0].zero_()  # the CLS token, dropped by the "default" feature strategy
            positions[1:].copy_(sincos_positions(cfg.patches_per_side, cfg.vision_d_model))
    return vlm


def build_processor(cfg: OrganismConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        image_token=IMAGE,
    )
