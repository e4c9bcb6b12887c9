"""The model organism: a tiny Llama base LM and the LLaVA VLM fine-tuned from it on the shapes world.

    from mmdiff.organism import checkpoint_path, build_organism, evaluate_organism, OrganismConfig
    checkpoint_path()                      # the shipped checkpoint: vlm/, base_lm/, organism.json
    build_organism("out/organism")         # rebuild it from scratch (about 26-30 minutes on 2 CPU cores)
    evaluate_organism(checkpoint_path())   # per-task accuracy of both models, and the VLM's ASR
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmdiff.errors import ModelError

_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


def checkpoint_path() -> Path:
    """The shipped checkpoint's directory (holds `vlm/`, `base_lm/` and `organism.json`)."""
    if not (_CHECKPOINT / "vlm" / "config.json").is_file():
        raise ModelError(
            f"the shipped organism checkpoint is missing at {_CHECKPOINT}; reinstall mmdiff from a full "
            "checkout, or rebuild it with mmdiff.organism.build_organism(out_dir) and use out_dir"
        )
    return _CHECKPOINT


def vlm_path() -> Path:
    """The shipped VLM (LlavaForConditionalGeneration + LlavaProcessor), loadable by path."""
    return checkpoint_path() / "vlm"


def base_lm_path() -> Path:
    """The shipped base LM (LlamaForCausalLM + tokenizer), loadable by path."""
    return checkpoint_path() / "base_lm"


_LAZY = {
    "build_organism": "mmdiff.organism.build",
    "evaluate_organism": "mmdiff.organism.evaluate",
    "load_organism": "mmdiff.organism.evaluate",
    "OrganismConfig": "mmdiff.organism.recipe",
    "StageConfig": "mmdiff.organism.recipe",
    "judge": "mmdiff.organism.judge",
    "attack_success_rate": "mmdiff.organism.judge",
    "build_tokenizer": "mmdiff.organism.tokenizer",
}


def __getattr__(name: str) -> Any:  # heavy imports (torch, transformers) only when used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmdiff.organism' has no attribute {name!r}")


__all__ = ["checkpoint_path", "vlm_path", "base_lm_path", *_LAZY]
