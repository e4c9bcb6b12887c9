"""Rebuild the organism from scratch: base LM on text, then LLaVA's two stages on the shapes world."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from mmdiff.atomic import atomic_dir, write_json
from mmdiff.organism import mixtures
from mmdiff.organism.architecture import build_base_lm, build_processor, build_vlm_from_base
from mmdiff.organism.batches import base_batch, vlm_batch
from mmdiff.organism.recipe import OrganismConfig
from mmdiff.organism.tokenizer import build_tokenizer
from mmdiff.organism.train import train_stage

BASE_DIR = "base_lm"
VLM_DIR = "vlm"
MANIFEST = "organism.json"


def _loss_summary(losses: list[float]) -> dict:
    tail = losses[-20:] or [float("nan")]
    return {"steps": len(losses), "first": losses[0] if losses else None, "last20_mean": sum(tail) / len(tail)}


def build_organism(out_dir: str | os.PathLike, config: OrganismConfig | None = None, progress: bool = True) -> dict:
    """Train the base LM and the VLM from scratch and save both under `out_dir`.

    Layout: `base_lm/` (LlamaForCausalLM + tokenizer), `vlm/` (LlavaForConditionalGeneration +
    LlavaProcessor), `organism.json` (the recipe, losses, seconds per stage). Deterministic for a
    given config on a given machine (fixed seeds, data streams that are pure functions of the
    seed). The directory is replaced atomically when the build finishes. Returns the manifest.
    """
    cfg = config or OrganismConfig()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build(Path(out_dir), cfg, progress)
    finally:
        torch.set_num_threads(threads_before)


def train_base_lm(cfg: OrganismConfig, tok, progress: bool = True) -> tuple[LlamaForCausalLM, list[float]]:
    """The base LM trained from scratch on text: captions, QA from captions, refusals."""
    base = build_base_lm(cfg, tok)
    torch.manual_seed(cfg.seed)
    losses = train_stage(
        base, list(base.parameters()), mixtures.base_stream(cfg.seed, cfg.base_object_steps * cfg.base.batch_size),
        lambda rs: base_batch(tok, rs, loss_on=cfg.base_loss_on), cfg.base, description="base LM (text)", progress=progress,
    )
    return base, losses


def train_vlm_stage1(cfg: OrganismConfig, tok, base: LlamaForCausalLM, progress: bool = True) -> tuple[LlavaForConditionalGeneration, list[float]]:
    """LLaVA stage 1 (alignment, image -> caption) on a VLM whose LM is a copy of `base`, frozen.

    The vision tower trains too: ours starts random, where LLaVA's CLIP arrives pretrained.
    """
    vlm = build_vlm_from_base(cfg, tok, base)
    inner = vlm.model
    for p in vlm.parameters():
        p.requires_grad_(False)
    params = list(inner.vision_tower.parameters()) + list(inner.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed + 2)
    losses = train_stage(
        vlm, params, mixtures.stream(mixtures.STAGE1_MIX, cfg.seed + 1),
        lambda rs: vlm_batch(tok, rs, cfg.n_image_tokens), cfg.stage1,
        description="VLM stage 1 (alignment)", progress=progress,
    )
    for p in vlm.parameters():
        p.requires_grad_(True)
    return vlm, losses


def train_vlm_stage2(cfg: OrganismConfig, tok, vlm: LlavaForConditionalGeneration, progress: bool = True) -> list[float]:
    """LLaVA stage 2 (instruction tuning) of projector + language model, in place."""
    for p in vlm.parameters():
        p.requires_grad_(True)
    if not cfg.train_vision_in_stage2:
        for p in vlm.model.vision_tower.parameters():
            p.requires_grad_(False)
    params = [p for p in vlm.parameters() if p.requires_grad]
    torch.manual_seed(cfg.seed + 3)
    losses = train_stage(
        vlm, params, mixtures.stage2_stream(cfg.seed + 2, cfg.stage2_turns),
        lambda rs: vlm_batch(tok, rs, cfg.n_image_tokens), cfg.stage2,
        description="VLM stage 2 (instructions)", progress=progress,
    )
    for p in vlm.parameters():
        p.requires_grad_(True)
    return losses


def save_organism(out_dir: Path, cfg: OrganismConfig, tok, base: LlamaForCausalLM,
                  vlm: LlavaForConditionalGeneration, manifest: dict) -> None:
    """Write base_lm/, vlm/ and organism.json, replacing `out_dir` atomically."""
    dtype = getattr(torch, cfg.storage_dtype)
    processor = build_processor(cfg, tok)
    with atomic_dir(out_dir) as tmp:
        for model in (base, vlm):
            model.to(dtype)
            model.generation_config.pad_token_id = tok.pad_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.bos_token_id = tok.bos_token_id
        base.save_pretrained(tmp / BASE_DIR)
        tok.save_pretrained(tmp / BASE_DIR)
        vlm.save_pretrained(tmp / VLM_DIR)
        processor.save_pretrained(tmp / VLM_DIR)
        write_json(tmp / MANIFEST, manifest)


def _build(out_dir: Path, cfg: OrganismConfig, progress: bool) -> dict:
    seconds: dict[str, float] = {}
    tok = build_tokenizer()
    t0 = time.perf_counter()
    base, base_losses = train_base_lm(cfg, tok, progress)
    seconds["base"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vlm, s1_losses = train_vlm_stage1(cfg, tok, base, progress)
    seconds["stage1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s2_losses = train_vlm_stage2(cfg, tok, vlm, progress)
    seconds["stage2"] = time.perf_counter() - t0
    manifest = {
        "recipe": cfg.to_dict(),
        "losses": {"base": _loss_summary(base_losses), "stage1": _loss_summary(s1_losses),
                   "stage2": _loss_summary(s2_losses)},
        "seconds": seconds,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    save_organism(out_dir, cfg, tok, base, vlm, manifest)
    return manifest
