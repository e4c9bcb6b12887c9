"""The held-out evaluation of a study's SAEs: FVU by token type, L0 and dead fraction per role and
model side, the decoder cosine of each trained SAE to its warm start, and the spliced-in next-token
loss. Returns rows and tensors; `training_report.write_training_report` turns them into files."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class HeldOutEvaluation:
    """What `evaluate_study_saes` measured: rows of `heldout_table`, cosines, spliced-in losses."""

    rows: list[dict[str, Any]]  # one per (role, side, layer): FVU by token type, L0, dead fraction
    cosines: dict[str, dict[int, Tensor]]  # role -> layer -> [d_sae] decoder cosine to the warm start
    spliced: list[dict[str, Any]] | None  # one per (role, side, layer), or None when not measured


def evaluate_study_saes(
    saes: Mapping[str, Mapping[int, Any]],
    warm: Mapping[str, Mapping[int, Any]],
    layers: Sequence[int],
    heldout: Mapping[str, Any],
    *,
    adapter: Any = None,
    records: Sequence[Any] = (),
    batch_size: int = 8,
    exclude_special: bool = True,
    spliced: bool = True,
    progress: bool = False,
) -> HeldOutEvaluation:
    """Every role's SAEs on the held-out activations (`heldout`: {"base": ..., "vlm": ...}): the base
    role on the base LM, every role on the VLM; decoder cosines of the roles with a warm start
    (`warm`: role -> layer -> SAE); with `spliced`, the spliced-in loss on `records`."""
    from mmdiff.sae.metrics import decoder_cosine, evaluate_saes

    rows = []
    for side, roles in (("base", ["base"]), ("vlm", list(saes))):
        evals = evaluate_saes(
            {(role, L): (saes[role][L], L) for role in roles for L in layers},
            heldout[side],
            exclude_special=exclude_special,
        )
        rows += [{"regime": role, "side": side, **ev.row()} for (role, _), ev in evals.items()]
    cosines = {
        role: {L: decoder_cosine(saes[role][L], init[L]) for L in layers}
        for role, init in warm.items()
        if init
    }
    spliced_rows = None
    if spliced:
        spliced_rows = spliced_loss_rows(
            adapter, "base", records, {"base": saes["base"]}, batch_size, exclude_special, progress
        )
        spliced_rows += spliced_loss_rows(
            adapter, "vlm", records, saes, batch_size, exclude_special, progress
        )
    return HeldOutEvaluation(rows, cosines, spliced_rows)


def _to_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}


def spliced_loss_rows(
    adapter: Any,
    side: str,
    records: Sequence[Any],
    saes: Mapping[str, Mapping[int, Any]],
    batch_size: int,
    exclude_special: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Spliced-in CE (clean / SAE / zero, fraction recovered) of every role's SAE on one model side,
    in one pass over the records, scored where the side was trained to predict (TRAINED_TARGETS:
    the VLM on the answers, the base LM on all text; the `targets` column says which)."""
    from mmdiff.sae.metrics import TRAINED_TARGETS, spliced_losses

    backbone = adapter.backbone(side)
    device = next(backbone.model.parameters()).device
    make = adapter.vlm_inputs if side == "vlm" else adapter.base_inputs
    answered = all(r.answers for r in records)  # else no answer to append: score the text tokens
    targets = TRAINED_TARGETS[side] if answered else "text"

    starts = range(0, len(records), batch_size)

    def batches(bar: Any, task: Any) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for s in starts:
            inputs = make(records[s : s + batch_size], with_answer=answered)
            yield _to_device(inputs, device), adapter.token_types(inputs, side=side).to(device)
            bar.update(task, advance=1)

    keyed = {(role, L): (sae, L) for role, by_layer in saes.items() for L, sae in by_layer.items()}
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"spliced-in loss ({side})", total=len(starts))
        results = spliced_losses(
            backbone, keyed, batches(bar, task), exclude_special=exclude_special, targets=targets
        )
    return [{"regime": role, "side": side, **r.row()} for (role, _), r in results.items()]
