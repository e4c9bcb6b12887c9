"""VLM family adapters: `load_adapter(path_or_id)` picks the family from config.model_type.

Adding a family is one new file: subclass `HFAdapter` (or `VLMAdapter`), decorate it with
`@register_adapter`, and import it below.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmdiff.errors import ModelError
from mmdiff.models import (  # noqa: F401  (registers the families)
    internvl,
    llava,
    llava_next,
    paligemma,
    qwen2vl,
)
from mmdiff.models.base import (
    ADAPTERS,
    Backbone,
    Side,
    TokenType,
    VLMAdapter,
    adapter_for_model_type,
    register_adapter,
)
from mmdiff.models.loading import read_config

__all__ = [
    "ADAPTERS",
    "Backbone",
    "Side",
    "TokenType",
    "VLMAdapter",
    "load_adapter",
    "register_adapter",
]


def load_adapter(
    vlm_path_or_id: str | Path,
    base_lm: str | Path | None = None,
    *,
    family: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
) -> VLMAdapter:
    """The adapter of a VLM checkpoint (local path or hub id), with its base LM when given.

    The family comes from the checkpoint's config.model_type unless `family` names one of
    `ADAPTERS`. `local_files_only=None` follows HF_HUB_OFFLINE.
    """
    if family is not None:
        if family not in ADAPTERS:
            raise ModelError(f"unknown family {family!r}: expected one of {sorted(ADAPTERS)}")
        cls = ADAPTERS[family]
    else:
        config = read_config(
            vlm_path_or_id, local_files_only=local_files_only, trust_remote_code=trust_remote_code
        )
        cls = adapter_for_model_type(config.model_type)
    return cls.from_pretrained(
        vlm_path_or_id,
        base_lm,
        dtype=dtype,
        device=device,
        local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
    )
