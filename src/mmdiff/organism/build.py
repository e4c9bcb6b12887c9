"""Rebuild the organism from scratch: base LM on text, then LLaVA's two stages on the shapes world."""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

from mmdiff.atomic import atomic_dir, write_json
from mmdiff.data.shapes import world
from mmdiff.errors import ConfigError
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


BASE_PHASE_FIELDS: tuple[str, ...] = (
    "seed", "d_model", "n_layers", "n_heads", "d_mlp", "base", "base_object_steps", "base_loss_on",
    "init_std", "rope_theta", "threads",
)
"""The recipe fields that decide the base LM's first phase (`base`): two builds that agree on them
(and on the tokenizer) train byte-identical first-phase base LMs."""


def build_organism(out_dir: str | os.PathLike, config: OrganismConfig | None = None, progress: bool = True,
                   base_from: str | os.PathLike | None = None) -> dict:
    """Train the base LM and the VLM from scratch and save both under `out_dir`.

    `base_from`: a built organism whose base LM is this recipe's first phase (a recipe without
    `base_grounding`, e.g. builds 7-11, agreeing on BASE_PHASE_FIELDS): its weights replace the
    first phase, which is deterministic, so the result equals a build from scratch and saves its
    time (about 11 min on 2 cores). Anything else is refused.

    Layout: `base_lm/` (LlamaForCausalLM + tokenizer), `vlm/` (LlavaForConditionalGeneration +
    LlavaProcessor), `organism.json` (the recipe, losses, seconds per stage). Deterministic for a
    given config on a given machine (fixed seeds, data streams that are pure functions of the
    seed). The directory is replaced atomically when the build finishes. Returns the manifest.
    """
    cfg = config or OrganismConfig()
    mixtures.check_families(cfg.base_grounding_mix, cfg.stage2_mix, cfg.stage2_grounding_mix)
    if cfg.threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        warnings.warn(
            f"OMP_WAIT_POLICY=PASSIVE with {cfg.threads} threads: OpenMP's threads sleep between the "
            "build's many small kernels, and waking them costs more than the kernels (measured: stage 1 "
            "1.7 s per step at 50% system time, against 1.0 s with OpenMP's default, 2 cores otherwise "
            "idle). `import mmdiff` sets PASSIVE when the variable is unset, the right choice on a shared "
            "host; on an idle one, build with OMP_WAIT_POLICY=ACTIVE in the environment.",
            stacklevel=2)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build(Path(out_dir), cfg, progress, None if base_from is None else Path(base_from))
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


def train_base_grounding(cfg: OrganismConfig, tok, base: LlamaForCausalLM, progress: bool = True) -> list[float]:
    """The base LM's second phase (cfg.base_grounding), in place: the base mixture plus grounding
    questions and position look-ups (cfg.base_grounding_mix); no steps when the recipe has no such
    phase."""
    if cfg.base_grounding is None:
        return []
    mix = mixtures.BASE_GROUNDING_MIX if cfg.base_grounding_mix is None else cfg.base_grounding_mix
    torch.manual_seed(cfg.seed + 4)
    return train_stage(
        base, list(base.parameters()), mixtures.stream(mix, cfg.seed + 3),
        lambda rs: base_batch(tok, rs, loss_on=cfg.base_loss_on), cfg.base_grounding,
        description="base LM (grounding)", progress=progress,
    )


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


def _train_vlm(cfg: OrganismConfig, tok, vlm: LlavaForConditionalGeneration, records, stage, seed: int,
               description: str, progress: bool) -> list[float]:
    """Projector and language model (and the tower, per `train_vision_in_stage2`) on `records`, in place."""
    for p in vlm.parameters():
        p.requires_grad_(True)
    if not cfg.train_vision_in_stage2:
        for p in vlm.model.vision_tower.parameters():
            p.requires_grad_(False)
    params = [p for p in vlm.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    losses = train_stage(vlm, params, records, lambda rs: vlm_batch(tok, rs, cfg.n_image_tokens), stage,
                         description=description, progress=progress)
    for p in vlm.parameters():
        p.requires_grad_(True)
    return losses


def train_vlm_stage2(cfg: OrganismConfig, tok, vlm: LlavaForConditionalGeneration, progress: bool = True) -> list[float]:
    """LLaVA stage 2 (instruction tuning) of projector + language model, in place."""
    records = mixtures.stage2_stream(cfg.seed + 2, cfg.stage2_turns,
                                     grounding_records=cfg.stage2_grounding_steps * cfg.stage2.batch_size,
                                     mix=cfg.stage2_mix)
    return _train_vlm(cfg, tok, vlm, records, cfg.stage2, cfg.seed + 3, "VLM stage 2 (instructions)", progress)


def train_vlm_stage2_grounding(cfg: OrganismConfig, tok, vlm: LlavaForConditionalGeneration,
                               progress: bool = True) -> list[float]:
    """Stage 2's second phase (cfg.stage2_grounding), in place: "where" questions alone, then the
    grounding mixture; no steps when the recipe has no such phase. Its own data seed, so it does not
    replay stage 2's records."""
    if cfg.stage2_grounding is None:
        return []
    mix = mixtures.STAGE2_GROUNDING_BUILD_MIX if cfg.stage2_grounding_mix is None else cfg.stage2_grounding_mix
    records = mixtures.stage2_stream(cfg.seed + 7, cfg.stage2_turns,
                                     grounding_records=cfg.stage2_grounding_where_steps * cfg.stage2_grounding.batch_size,
                                     mix=mix)
    return _train_vlm(cfg, tok, vlm, records, cfg.stage2_grounding, cfg.seed + 5, "VLM stage 2 (grounding)", progress)


def world_differences(manifest: dict) -> dict:
    """{setting: (the build's, now's)} for every shapes-world setting (shapes.world.settings) in which
    a built organism's manifest (organism.json "world") differs from the world records are drawn in
    now; empty when they agree or the manifest records no world."""
    built = manifest.get("world") if isinstance(manifest, dict) else None
    if not isinstance(built, dict):
        return {}
    return {k: (built.get(k), v) for k, v in world.settings().items() if built.get(k) != v}


def describe_world_differences(differ: dict) -> str:
    """world_differences in words, for the messages that report them."""
    return "; ".join(f"{k}: built with {built!r}, now {now!r}" for k, (built, now) in differ.items())


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


def load_base_phase(cfg: OrganismConfig, tok, source: Path) -> tuple[LlamaForCausalLM, dict]:
    """The first-phase base LM of a built organism (see `build_organism`'s `base_from`), with that
    build's manifest; a ConfigError says which recipe field differs."""
    try:
        manifest = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
        theirs = OrganismConfig.from_manifest(manifest)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{source} is not a built organism ({e}); give a directory build_organism wrote") from e
    if theirs.base_grounding is not None:
        raise ConfigError(f"{source}'s base LM had a grounding phase: it is not a first-phase base LM")
    if theirs.storage_dtype != "float32":
        raise ConfigError(f"{source} stores its weights in {theirs.storage_dtype}: not the exact first phase")
    differ = [f for f in BASE_PHASE_FIELDS if getattr(theirs, f) != getattr(cfg, f)]
    if differ:
        raise ConfigError(f"{source} was built with other first-phase settings ({', '.join(differ)}); "
                          "its base LM is not this recipe's: build from scratch")
    if AutoTokenizer.from_pretrained(source / BASE_DIR).get_vocab() != tok.get_vocab():
        raise ConfigError(f"{source}'s tokenizer has another vocabulary: build from scratch")
    base = LlamaForCausalLM.from_pretrained(source / BASE_DIR, dtype=torch.float32)
    return base, manifest


def _build(out_dir: Path, cfg: OrganismConfig, progress: bool, base_from: Path | None = None) -> dict:
    seconds: dict[str, float] = {}
    tok = build_tokenizer()
    t0 = time.perf_counter()
    if base_from is None:
        base, base_losses = train_base_lm(cfg, tok, progress)
        seconds["base"] = time.perf_counter() - t0
        reused = None
    else:
        base, theirs = load_base_phase(cfg, tok, base_from)
        base_losses, reused = [], str(base_from)
        seconds["base"] = theirs["seconds"]["base"]  # the first phase's time where it was trained
    t0 = time.perf_counter()
    grounding_losses = train_base_grounding(cfg, tok, base, progress)
    seconds["base_grounding"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vlm, s1_losses = train_vlm_stage1(cfg, tok, base, progress)
    seconds["stage1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s2_losses = train_vlm_stage2(cfg, tok, vlm, progress)
    seconds["stage2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s2g_losses = train_vlm_stage2_grounding(cfg, tok, vlm, progress)
    seconds["stage2_grounding"] = time.perf_counter() - t0
    manifest = {
        "recipe": cfg.to_dict(),
        # the shapes world the build drew its records in (shapes.world.settings); evaluating the
        # checkpoint in another world measures it on data it was not trained on (evaluate_organism)
        "world": world.settings(),
        "base_phase_from": reused,
        "losses": {"base": _loss_summary(base_losses) if reused is None else theirs["losses"]["base"],
                   "base_grounding": _loss_summary(grounding_losses),
                   "stage1": _loss_summary(s1_losses),
                   "stage2": _loss_summary(s2_losses),
                   "stage2_grounding": _loss_summary(s2g_losses)},
        "seconds": seconds,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        # what the seconds above were measured on
        # (the torch threads are the recipe's `threads`)
        "host": {"cpus": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or None},
    }
    save_organism(out_dir, cfg, tok, base, vlm, manifest)
    return manifest
