"""How good an SAE is: FVU (overall and by token type), L0, dead fraction, spliced-in next-token
loss against clean and zero-ablation, and decoder cosine to the warm-start SAE (docs/method.md#held-out-metrics-and-spliced-loss).

Everything here returns numbers or tensors; tables, plots and files live in `training_report.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmdiff.activations import ActivationBatch
from mmdiff.errors import ModelError, SAEError
from mmdiff.models.base import Backbone, TokenType

# token-type groups FVU is reported on; "all" = every token the SAE is evaluated on
TOKEN_GROUPS: dict[str, tuple[int, ...]] = {
    "image": (int(TokenType.IMAGE),),
    "text": (int(TokenType.TEXT),),
}


# ---------------------------------------------------------------------------------------------
# the SAE seen through the shared contract (mmdiff.sae.base.SAE): forward(x) -> SAEOutput
# ---------------------------------------------------------------------------------------------


def sae_forward(sae: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat [..., d_in], feature_acts [..., d_sae]) of an SAE on x [..., d_in]."""
    out = sae(x)
    x_hat = getattr(out, "x_hat", None)
    acts = getattr(out, "feature_acts", None)
    if x_hat is None or acts is None:
        raise SAEError(
            f"expected the SAE's forward to return an SAEOutput with x_hat and feature_acts, found "
            f"{type(out).__name__}; pass an mmdiff.sae SAE (load one with mmdiff.sae.load_sae)"
        )
    return x_hat, acts


def _sae_d_in(sae: nn.Module) -> int | None:
    cfg = getattr(sae, "cfg", None)
    return getattr(cfg, "d_in", None)


# ---------------------------------------------------------------------------------------------
# FVU
# ---------------------------------------------------------------------------------------------


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over tokens.

    x, x_hat: [n_tokens, d]. The mean is the per-dimension mean over the n tokens.
    """
    if x.shape != x_hat.shape or x.ndim != 2:
        raise ValueError(
            f"fvu expects x and x_hat of the same [n, d] shape, found {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
    acc = FVUAccumulator()
    acc.update(x, x_hat)
    return acc.value()


@dataclass
class FVUAccumulator:
    """Streaming FVU over many batches, exact in float64 (sum||x-mean||^2 = sum||x||^2 - n||mean||^2)."""

    n: int = 0
    sse: float = 0.0  # sum ||x - x_hat||^2
    sum_x: torch.Tensor | None = None  # [d] float64
    sum_sq: float = 0.0  # sum ||x||^2

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add tokens x, x_hat: [n, d]."""
        if x.shape[0] == 0:
            return
        x64, xh64 = x.detach().double(), x_hat.detach().double()
        self.n += x.shape[0]
        self.sse += float((x64 - xh64).pow(2).sum())
        s = x64.sum(0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float(x64.pow(2).sum())

    def total_variance(self) -> float:
        if self.n == 0 or self.sum_x is None:
            return 0.0
        return self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n

    def value(self) -> float:
        """FVU, or NaN when there are no tokens or the tokens have no variance."""
        var = self.total_variance()
        if self.n == 0 or var <= 0.0:
            return float("nan")
        return self.sse / var


def fvu_by_token_type(
    x: torch.Tensor, x_hat: torch.Tensor, token_types: torch.Tensor
) -> dict[str, float]:
    """FVU over all given tokens and within each token type ("image", "text").

    x, x_hat: [n, d]; token_types: [n] TokenType values. Each group's FVU uses the group's own mean,
    so a group is explained relative to its own variance. A group with no tokens gives NaN.
    """
    if token_types.shape != x.shape[:1]:
        raise ValueError(
            f"token_types must be [n]={tuple(x.shape[:1])}, found {tuple(token_types.shape)}"
        )
    out = {"all": fvu(x, x_hat)}
    for name, types in TOKEN_GROUPS.items():
        keep = torch.isin(
            token_types, torch.tensor(types, dtype=token_types.dtype, device=token_types.device)
        )
        out[name] = fvu(x[keep], x_hat[keep])
    return out


# ---------------------------------------------------------------------------------------------
# L0 and dead latents
# ---------------------------------------------------------------------------------------------


def l0(feature_acts: torch.Tensor) -> float:
    """Mean number of non-zero latents per token; feature_acts: [n, d_sae]."""
    if feature_acts.shape[0] == 0:
        return float("nan")
    return float((feature_acts != 0).sum(-1).double().mean())


def dead_fraction(fire_counts: torch.Tensor) -> float:
    """Share of latents that never fired over a window; fire_counts: [d_sae] firings in the window."""
    return float((fire_counts == 0).double().mean())


# ---------------------------------------------------------------------------------------------
# held-out evaluation of one SAE on a stream of ActivationBatches
# ---------------------------------------------------------------------------------------------


@dataclass
class SAEEvaluation:
    """An SAE's reconstruction quality on held-out tokens of one layer."""

    layer: int
    n_tokens: int
    n_image_tokens: int
    n_text_tokens: int
    fvu: float
    fvu_image: float
    fvu_text: float
    l0: float
    dead_fraction: float  # latents that never fired over all evaluated tokens
    fire_counts: torch.Tensor = field(repr=False)  # [d_sae] tokens on which each latent fired

    def row(self) -> dict[str, Any]:
        """A flat dict for a table (without the per-latent counts)."""
        d = asdict(self)
        d.pop("fire_counts")
        return d


def evaluation_tokens(
    batch: Any, layer: int, exclude_special: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(acts [n, d], token_types [n]) of the tokens an SAE is evaluated on.

    batch: an ActivationBatch ([batch, seq, d] per layer) or a flat batch of the activation store
    (`StoreBatch`: acts {layer: [n, d]} or one [n, d] tensor, token_types [n]; no padding).
    Padding never counts; special tokens (BOS, ...) only when exclude_special is False.
    """
    acts = batch.acts if isinstance(batch.acts, Mapping) else {layer: batch.acts}
    if layer not in acts:
        raise SAEError(
            f"the activation batch has layers {sorted(acts)}, not layer {layer}; capture that layer"
        )
    mask = getattr(batch, "attention_mask", None)
    keep = torch.ones_like(batch.token_types, dtype=torch.bool) if mask is None else mask.bool()
    if exclude_special:
        keep = keep & (batch.token_types != int(TokenType.SPECIAL))
    return acts[layer][keep], batch.token_types[keep]


def _held_out_batches(batches: Any, layers: list[int]) -> Iterable[Any]:
    """Iterate an ActivationStore in stored order, or any iterable of batches as given."""
    if hasattr(batches, "iter_batches") and hasattr(batches, "count_tokens"):
        return batches.iter_batches(layers, 4096, shuffle=False)
    return batches


class _SAEEvalAccumulator:
    """Running sums of one SAE's held-out metrics on one layer."""

    def __init__(self, sae: nn.Module, layer: int) -> None:
        self.sae, self.layer = sae, layer
        self.accs = {name: FVUAccumulator() for name in ("all", *TOKEN_GROUPS)}
        self.l0_sum, self.fire_counts = 0.0, None

    @torch.no_grad()
    def update(self, x: torch.Tensor, types: torch.Tensor) -> None:
        """x: [n, d] tokens of this layer; types: [n] TokenType values."""
        if x.shape[0] == 0:
            return
        d_in = _sae_d_in(self.sae)
        if d_in is not None and x.shape[-1] != d_in:
            raise SAEError(
                f"SAE for layer {self.layer} expects d_in={d_in}, the activations have "
                f"d={x.shape[-1]}: is this SAE for another model?"
            )
        param = next(self.sae.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        x_hat, acts = sae_forward(self.sae, x)
        types = types.to(x.device)
        self.accs["all"].update(x, x_hat)
        for name, tt in TOKEN_GROUPS.items():
            keep = torch.isin(types, torch.tensor(tt, dtype=types.dtype, device=types.device))
            self.accs[name].update(x[keep], x_hat[keep])
        fired = (acts != 0).sum(0).cpu()
        self.fire_counts = fired if self.fire_counts is None else self.fire_counts + fired
        self.l0_sum += float((acts != 0).sum())

    def result(self) -> SAEEvaluation:
        n = self.accs["all"].n
        if n == 0 or self.fire_counts is None:
            raise SAEError(
                f"no tokens to evaluate the layer-{self.layer} SAE on: the held-out batches are empty after masking"
            )
        return SAEEvaluation(
            layer=self.layer,
            n_tokens=n,
            n_image_tokens=self.accs["image"].n,
            n_text_tokens=self.accs["text"].n,
            fvu=self.accs["all"].value(),
            fvu_image=self.accs["image"].value(),
            fvu_text=self.accs["text"].value(),
            l0=self.l0_sum / n,
            dead_fraction=dead_fraction(self.fire_counts),
            fire_counts=self.fire_counts,
        )


def evaluate_saes(
    saes: Mapping[Any, tuple[nn.Module, int]],
    batches: Iterable[ActivationBatch],
    *,
    exclude_special: bool = True,
) -> dict[Any, SAEEvaluation]:
    """`evaluate_sae` for many SAEs in one pass over the held-out batches.

    saes: {key: (sae, layer)}, e.g. {("full", 12): (sae, 12)}; returns {key: SAEEvaluation}.
    batches: ActivationBatches, flat store batches, or an `ActivationStore`.
    """
    accs = {key: _SAEEvalAccumulator(sae, layer) for key, (sae, layer) in saes.items()}
    for batch in _held_out_batches(batches, sorted({acc.layer for acc in accs.values()})):
        for acc in accs.values():
            acc.update(*evaluation_tokens(batch, acc.layer, exclude_special))
    return {key: acc.result() for key, acc in accs.items()}


def evaluate_sae(
    sae: nn.Module,
    batches: Iterable[ActivationBatch],
    layer: int,
    *,
    exclude_special: bool = True,
) -> SAEEvaluation:
    """FVU (all / image / text), L0 and dead fraction of `sae` on held-out batches of one layer."""
    return evaluate_saes({0: (sae, layer)}, batches, exclude_special=exclude_special)[0]


# ---------------------------------------------------------------------------------------------
# spliced-in next-token loss
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def replace_layer_output(
    backbone: Backbone,
    layer: int,
    replace: Callable[[torch.Tensor], torch.Tensor],
    positions: torch.Tensor | None = None,
) -> Iterator[None]:
    """Within the block, the output of decoder layer `layer` is replaced by replace(h) at `positions`.

    h: [batch, seq, d_model]; positions: [batch, seq] bool (None = every position). A forward hook
    on `backbone.layers[layer]`; it handles layers returning a tensor or a tuple (hidden, ...).
    """
    if not 0 <= layer < len(backbone.layers):
        raise ModelError(
            f"layer {layer} is out of range: the backbone has {len(backbone.layers)} decoder layers"
        )

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output  # [batch, seq, d_model]
        new = replace(hidden).to(hidden.dtype)
        if positions is not None:
            if positions.shape != hidden.shape[:2]:
                raise ModelError(
                    f"splice positions are {tuple(positions.shape)}, the layer output is "
                    f"{tuple(hidden.shape[:2])} [batch, seq]: pass one mask entry per input token"
                )
            new = torch.where(positions.to(hidden.device)[..., None], new, hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = backbone.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def next_token_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor
) -> float:
    """Mean CE of predicting input_ids[:, t+1] from logits[:, t], over targets where target_mask[:, t+1].

    logits: [batch, seq, vocab]; input_ids, target_mask: [batch, seq].
    """
    mask = target_mask[:, 1:].bool()
    if not mask.any():
        raise ValueError(
            "no target tokens to score: target_mask selects nothing after the first position"
        )
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)  # [batch, seq-1, vocab]
    nll = -lp.gather(-1, input_ids[:, 1:, None].to(lp.device)).squeeze(-1)
    return float(nll[mask.to(nll.device)].mean())


SPLICE_TARGETS: dict[str, str] = {
    "text": "every text token (the language-modelling objective)",
    "answer": "the answer tokens (labels != -100: the answer and its EOS)",
}
"""Which next tokens the spliced-in loss is scored on. A side is scored where its training made the
prediction meaningful: a VLM instruction-tuned on answers has no reason to predict the question's
words (on the organism its CE there is worse than uniform), so its fraction recovered would not be
a fraction."""

TRAINED_TARGETS: dict[str, str] = {"base": "text", "vlm": "answer"}
"""The default targets per model side: the base LM was pretrained on all text, the VLM's
instruction tuning (and the organism's stage 2) trained it on the answers."""


@dataclass
class SplicedLoss:
    """Next-token CE with the hook point clean, replaced by the SAE reconstruction, and zeroed."""

    layer: int
    ce_clean: float
    ce_sae: float
    ce_zero: float
    n_targets: int
    targets: str = "text"  # which next tokens were scored: a key of SPLICE_TARGETS

    @property
    def fraction_recovered(self) -> float:
        """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = as good as clean, 0 = as bad as zeroing."""
        denom = self.ce_zero - self.ce_clean
        return float("nan") if denom == 0 else (self.ce_zero - self.ce_sae) / denom

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "fraction_recovered": self.fraction_recovered}


def _model_logits(backbone: Backbone, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = backbone.model(**{k: v for k, v in inputs.items() if k != "labels"})
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ModelError(
            f"the backbone's model returned {type(out).__name__} without logits; spliced loss needs a causal-LM head"
        )
    return logits


def _check_targets(targets: str) -> str:
    if targets not in SPLICE_TARGETS:
        raise ModelError(f"targets must be one of {sorted(SPLICE_TARGETS)}, got {targets!r}")
    return targets


def _splice_masks(
    inputs: Mapping[str, torch.Tensor],
    token_types: torch.Tensor | None,
    exclude_special: bool,
    targets: str = "text",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, splice positions, target positions), each [batch, seq]."""
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ModelError("spliced loss needs input_ids among the model inputs to score next tokens")
    attn = inputs.get("attention_mask")
    attn = torch.ones_like(input_ids, dtype=torch.bool) if attn is None else attn.bool()
    answer = None
    if _check_targets(targets) == "answer":
        labels = inputs.get("labels")
        if labels is None:
            raise ModelError(
                "targets='answer' scores the answer tokens, but the inputs have no labels: build them "
                "with the answers appended (adapter.vlm_inputs(records, with_answer=True))"
            )
        answer = attn & (labels != -100).to(attn.device)
    if token_types is None:
        return input_ids, attn, attn if answer is None else answer
    if token_types.shape != input_ids.shape:
        raise ModelError(
            f"token_types are {tuple(token_types.shape)}, input_ids {tuple(input_ids.shape)}: "
            "they must match"
        )
    token_types = token_types.to(attn.device)
    positions = attn & (token_types != int(TokenType.SPECIAL)) if exclude_special else attn
    return input_ids, positions, attn & (token_types == int(TokenType.TEXT)) if answer is None else answer


def _reconstruction(
    sae: nn.Module | Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(sae, nn.Module) and hasattr(sae, "W_dec"):

        def reconstruct(h: torch.Tensor) -> torch.Tensor:
            return sae_forward(sae, h.to(next(sae.parameters()).dtype))[0]

        return reconstruct
    return sae  # type: ignore[return-value]


@torch.no_grad()
def spliced_losses(
    backbone: Backbone,
    saes: Mapping[Any, tuple[nn.Module | Callable[[torch.Tensor], torch.Tensor], int]],
    batches: Iterable[tuple[Mapping[str, torch.Tensor], torch.Tensor | None]],
    *,
    exclude_special: bool = True,
    targets: str = "text",
) -> dict[Any, SplicedLoss]:
    """Spliced-in loss of many SAEs ({key: (sae, layer)}) over (inputs, token_types) batches.

    targets: which next tokens are scored (SPLICE_TARGETS): "text", or "answer" (the positions
    where inputs["labels"] != -100; labels never reach the model). Per batch the clean run happens
    once and the zero-ablated run once per layer, so n SAEs over m layers cost 1 + m + n forward
    passes, not 3n. Batch CEs are weighted by their target counts.
    """
    _check_targets(targets)
    layers = sorted({layer for _, layer in saes.values()})
    sums = {key: [0.0, 0.0, 0.0] for key in saes}  # target-weighted CE clean / sae / zero
    n = 0
    for inputs, types in batches:
        input_ids, positions, scored = _splice_masks(inputs, types, exclude_special, targets)
        n_targets = int(scored[:, 1:].sum())
        if n_targets == 0:
            continue
        clean = next_token_ce(_model_logits(backbone, inputs), input_ids, scored)
        zero = {}
        for layer in layers:
            with replace_layer_output(backbone, layer, torch.zeros_like, positions):
                zero[layer] = next_token_ce(_model_logits(backbone, inputs), input_ids, scored)
        for key, (sae, layer) in saes.items():
            with replace_layer_output(backbone, layer, _reconstruction(sae), positions):
                ce = next_token_ce(_model_logits(backbone, inputs), input_ids, scored)
            for i, value in enumerate((clean, ce, zero[layer])):
                sums[key][i] += value * n_targets
        n += n_targets
    if n == 0:
        raise ValueError(f"no batches (or no {targets} target tokens) to compute the spliced loss on")
    return {
        key: SplicedLoss(saes[key][1], c / n, s_ / n, z / n, n, targets)
        for key, (c, s_, z) in sums.items()
    }


def spliced_loss(
    backbone: Backbone,
    layer: int,
    sae: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    token_types: torch.Tensor | None = None,
    *,
    exclude_special: bool = True,
    targets: str = "text",
) -> SplicedLoss:
    """CE of the model on `inputs` clean, with the SAE reconstruction spliced in at layer L, and with
    layer L's output zero-ablated (docs/method.md#held-out-metrics-and-spliced-loss).

    inputs: the model's keyword inputs (input_ids [batch, seq], attention_mask, pixel_values, ...;
    `labels` [batch, seq] for targets="answer"). token_types: [batch, seq] TokenType labels.
    Splicing and zeroing touch the positions the SAE is trained on (non-padding; non-special when
    exclude_special). targets="text" scores the text tokens (image and special tokens are not
    predicted; without token_types every non-padding position counts); targets="answer" scores the
    answer tokens, where labels != -100 (TRAINED_TARGETS: what a VLM was trained to predict).
    `sae` is an mmdiff SAE or any function x [..., d] -> x_hat [..., d].
    """
    if not 0 <= layer < len(backbone.layers):
        raise ModelError(
            f"layer {layer} is out of range: the backbone has {len(backbone.layers)} decoder layers"
        )
    _splice_masks(inputs, token_types, exclude_special, targets)  # input errors before any forward
    return spliced_losses(
        backbone, {0: (sae, layer)}, [(inputs, token_types)], exclude_special=exclude_special,
        targets=targets,
    )[0]  # fmt: skip


def spliced_loss_over_batches(
    backbone: Backbone,
    layer: int,
    sae: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[Mapping[str, torch.Tensor], torch.Tensor | None]],
    *,
    exclude_special: bool = True,
    targets: str = "text",
) -> SplicedLoss:
    """`spliced_loss` over several (inputs, token_types) batches, weighted by their target counts."""
    return spliced_losses(
        backbone, {0: (sae, layer)}, batches, exclude_special=exclude_special, targets=targets
    )[0]


# ---------------------------------------------------------------------------------------------
# decoder cosine to the warm start
# ---------------------------------------------------------------------------------------------


def decoder_cosine(sae: nn.Module, init: nn.Module) -> torch.Tensor:
    """[d_sae] cosine of each latent's decoder row to the same latent's row in the warm-start SAE."""
    a, b = sae.W_dec.detach().double(), init.W_dec.detach().double().to(sae.W_dec.device)
    if a.shape != b.shape:
        raise SAEError(
            f"decoder cosine needs index-aligned SAEs of the same shape, found W_dec {tuple(a.shape)} "
            f"and warm start {tuple(b.shape)}: was this SAE warm-started from that one?"
        )
    return F.cosine_similarity(a, b, dim=-1, eps=1e-12).float()


def mean_decoder_cosine(sae: nn.Module, init: nn.Module) -> float:
    """Mean over latents of `decoder_cosine`: one number per layer."""
    return float(decoder_cosine(sae, init).mean())
