"""Sparse autoencoders: architectures (one file each), the TopK fast path, checkpoint formats.

    from mmdiff.sae import load_sae, SAEConfig, build_sae, to_topk

The names below are imported on first use, so that the torch-free modules of the package (the training
settings in `sae/train_config.py`, which the study config is built from) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmdiff.sae.base import SAE, SAEConfig, SAEOutput, build_sae
    from mmdiff.sae.batchtopk import BatchTopKSAE
    from mmdiff.sae.formats import detect_format, load_sae
    from mmdiff.sae.formats.convert import to_topk
    from mmdiff.sae.jumprelu import JumpReLUSAE
    from mmdiff.sae.registry import get_sae_class, register_sae_class, registered_architectures
    from mmdiff.sae.relu import ReLUSAE
    from mmdiff.sae.topk import TopKSAE

_WHERE = {
    "SAE": "base",
    "SAEConfig": "base",
    "SAEOutput": "base",
    "build_sae": "base",
    "BatchTopKSAE": "batchtopk",
    "detect_format": "formats",
    "load_sae": "formats",
    "to_topk": "formats.convert",
    "JumpReLUSAE": "jumprelu",
    "get_sae_class": "registry",
    "register_sae_class": "registry",
    "registered_architectures": "registry",
    "ReLUSAE": "relu",
    "TopKSAE": "topk",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mmdiff.sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mmdiff.sae.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
