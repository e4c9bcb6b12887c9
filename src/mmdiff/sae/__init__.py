"""Sparse autoencoders: architectures (one file each), the TopK fast path, checkpoint formats.

    from mmdiff.sae import load_sae, SAEConfig, build_sae, to_topk
"""

from mmdiff.sae.base import SAE, SAEConfig, SAEOutput, build_sae
from mmdiff.sae.batchtopk import BatchTopKSAE
from mmdiff.sae.formats import detect_format, load_sae
from mmdiff.sae.formats.convert import to_topk
from mmdiff.sae.jumprelu import JumpReLUSAE
from mmdiff.sae.registry import get_sae_class, register_sae_class, registered_architectures
from mmdiff.sae.relu import ReLUSAE
from mmdiff.sae.topk import TopKSAE

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAEConfig",
    "SAEOutput",
    "TopKSAE",
    "build_sae",
    "detect_format",
    "get_sae_class",
    "load_sae",
    "register_sae_class",
    "registered_architectures",
    "to_topk",
]
