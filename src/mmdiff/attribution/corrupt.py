"""The corrupt run: image-token inputs of decoder layer 0 replaced by their mean over a calibration set.

The k-th image token gets the mean of the k-th image tokens, so every position stays where it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mmdiff.attribution._common import StopForward, batches
from mmdiff.progress import progress_bar
from mmdiff.data.records import Record
from mmdiff.errors import DataError, ModelError
from mmdiff.models.base import Backbone, VLMAdapter


@dataclass
class VisualMean:
    """Mean hidden state entering decoder layer 0 at image-token positions, per image-token index."""

    per_position: torch.Tensor  # [K, d_model] mean of the k-th image token over the records that have one
    counts: torch.Tensor  # [K] int64 records that contributed to each index
    overall: torch.Tensor  # [d_model] mean over all image tokens (for indices past K)

    def for_count(self, n: int) -> torch.Tensor:
        """[n, d_model] replacement for a row with n image tokens: per-index means, the overall
        mean where no calibration record had that many image tokens."""
        out = self.overall.expand(n, -1).clone()
        k = min(n, self.per_position.shape[0])
        have = self.counts[:k] > 0
        out[:k][have] = self.per_position[:k][have]
        return out


@contextmanager
def layer0_input(backbone: Backbone, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Rewrite the hidden states entering decoder layer 0 ([batch, seq, d_model] -> same)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise ModelError(
                f"{type(module).__name__} was called without hidden_states; this architecture needs its own "
                "layer-0 hook"
            )
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    handle = backbone.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def visual_embedding_mean(
    adapter: VLMAdapter, records: Sequence[Record], *, batch_size: int = 8, progress: bool = True
) -> VisualMean:
    """The corrupt run's replacement: per image-token index, the mean layer-0 input over `records`.

    One forward per batch, stopped at decoder layer 0. Records with different image-token counts
    (LLaVA-NeXT anyres, Qwen2-VL) contribute to the indices they have.
    """
    records = list(records)
    if not records:
        raise DataError("visual_embedding_mean needs calibration records with images; got none")
    backbone = adapter.vlm
    sums = torch.zeros(0, backbone.d_model, dtype=torch.float64)
    counts = torch.zeros(0, dtype=torch.long)
    seen: dict[str, torch.Tensor] = {}

    def grab(h: torch.Tensor) -> torch.Tensor:
        seen["h"] = h.detach()
        raise StopForward

    with progress_bar(progress) as bar, layer0_input(backbone, grab), torch.no_grad():
        task = bar.add_task("visual embedding mean", total=len(records))
        for chunk in batches(records, batch_size):
            inputs = adapter.vlm_inputs(chunk)
            try:
                backbone.model(**inputs, use_cache=False)
            except StopForward:
                pass
            h = seen.pop("h")  # [batch, seq, d_model]
            mask = adapter.image_token_mask(inputs["input_ids"]).to(h.device)  # [batch, seq]
            for row in range(h.shape[0]):
                x = h[row][mask[row]].double().cpu()  # [n_image, d_model]
                n = x.shape[0]
                if n > sums.shape[0]:
                    grow = n - sums.shape[0]
                    sums = torch.cat([sums, torch.zeros(grow, sums.shape[1], dtype=sums.dtype)])
                    counts = torch.cat([counts, torch.zeros(grow, dtype=counts.dtype)])
                sums[:n] += x
                counts[:n] += 1
            bar.advance(task, len(chunk))
    if int(counts.sum()) == 0:
        raise DataError(
            "the calibration records produced no image tokens: visual_embedding_mean needs records with images"
        )
    per_position = sums / counts.clamp_min(1)[:, None]
    overall = (sums.sum(0) / counts.sum()).float()
    dtype = backbone.dtype
    return VisualMean(per_position.to(dtype), counts, overall.to(dtype))


def visual_replacement(
    visual_mean: VisualMean, image_mask: torch.Tensor, d_model: int, dtype: torch.dtype
) -> torch.Tensor:
    """[batch, seq, d_model]: each row's image positions filled with the per-index means (0 elsewhere)."""
    if visual_mean.overall.shape[-1] != d_model:
        raise DataError(
            f"the visual mean has d_model {visual_mean.overall.shape[-1]}, the model {d_model}: was it "
            "computed with another model?"
        )
    out = torch.zeros(*image_mask.shape, d_model, dtype=dtype, device=image_mask.device)
    for row in range(image_mask.shape[0]):
        n = int(image_mask[row].sum())
        if n:
            out[row, image_mask[row]] = visual_mean.for_count(n).to(device=out.device, dtype=dtype)
    return out
