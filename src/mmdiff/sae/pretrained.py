"""Pretrained base-LM SAEs (Llama Scope, Gemma Scope, SAELens or mmdiff folders) as a study's `base`
role: checked against the base LM, then saved natively beside the roles trained here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmdiff.errors import SAEError
from mmdiff.sae.trainer import TrainResult


def import_base_saes(
    base_saes: Mapping[int, Any], layers: Sequence[int], role_dir: Path, d_in: int | None = None
) -> TrainResult:
    """Pretrained base-LM SAEs as the `base` role: checked, then saved natively to role_dir/layer_<L>/."""
    from mmdiff.sae import load_sae
    from mmdiff.sae.base import SAE

    missing = [L for L in layers if L not in base_saes]
    if missing:
        raise SAEError(
            f"no pretrained base SAE for layers {missing} (given: {sorted(base_saes)}); "
            "give one per study layer or leave base_saes unset to train them"
        )
    saes, dirs = {}, {}
    for L in layers:
        given = base_saes[L]
        sae = given if isinstance(given, SAE) else load_sae(given, d_in=d_in, layer=L)
        if d_in is not None and sae.cfg.d_in != d_in:
            raise SAEError(
                f"the base SAE for layer {L} expects d_in={sae.cfg.d_in}, the base LM's hidden size "
                f"is {d_in}: is this SAE for another model?"
            )
        sae.check_finite(f"base SAE for layer {L}")
        saes[L], dirs[L] = sae, Path(sae.save(role_dir / f"layer_{L}"))
    return TrainResult(saes, [], role_dir, dirs, steps=0, tokens=0)
