"""Train one TopK SAE per layer from one stream of activations: warm start or random init, masking
regimes, AuxK for dead latents, unit-norm decoder rows, per-step metrics, kill-safe checkpoints.

The loop is short on purpose (STYLE.md): the token stream (`shuffled_batches`), the loss
(`topk_loss`), the decoder constraint (`constrain_decoder_grad`), the dead-latent bookkeeping
(`DeadLatents`) and the checkpoint (`save_checkpoint` / `load_checkpoint`) are separate functions.

Masking regimes choose the tokens that enter the loss (METHOD.md §1). A TopK SAE is a per-token
function, so encoding positions whose loss is masked out would change nothing but the cost: like
sparsify, the trainer drops them before the SAE, and `batch_size` counts loss tokens.

Resume is exact: the token order is a deterministic function of (seed, position), where a position
is (epoch, source item, shuffle block, batches taken from the block) plus the few leftover tokens
that opened the block; a checkpoint holds that position, the SAE weights, the optimizer state, the
dead-latent counters and the RNG states. A run killed at any moment and restarted with the same
arguments continues from the last checkpoint and ends with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mmdiff.activations import ActivationBatch
from mmdiff.atomic import atomic_dir, save_safetensors, write_parquet
from mmdiff.errors import ConfigError, DataError, SAEError
from mmdiff.models.base import TokenType
from mmdiff.sae.kernels import sparse_decode

Regime = Literal["full", "image", "text", "random"]
REGIMES: tuple[str, ...] = ("full", "image", "text", "random")
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "train_metrics.parquet"


@dataclass
class TrainConfig:
    """How to train the SAEs of one regime (one SAE per layer, all from the same token stream)."""

    k: int = 50
    """Active latents per token of the TopK SAE (warm starts are converted to TopK with this k)."""
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(d_sae / 2**14) per layer, as sparsify."""
    batch_size: int = 4096
    """Tokens per optimisation step (tokens that count in the loss)."""
    total_tokens: int = 10_000_000
    """Training stops after this many tokens (steps = total_tokens // batch_size)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss that teaches dead latents to explain the residual (Gao et al.)."""
    dead_tokens_threshold: int = 10_000_000
    """A latent is dead once it has not fired for this many training tokens."""
    regime: Regime = "full"
    """Tokens in the loss: full = all non-special, image = image tokens, text = non-image non-special;
    random = random init instead of warm start, on `random_tokens` tokens."""
    random_tokens: Literal["full", "image", "text"] = "full"
    """Which tokens the `random` control trains on."""
    exclude_special: bool = True
    """BOS, padding and other special tokens never enter training (their norms are huge)."""
    seed: int = 0
    """Seeds the random init and the token order; same seed and data = same SAEs."""
    d_sae: int | None = None
    """Latents of a randomly initialised SAE; None = the warm start's, else expansion_factor * d_in."""
    expansion_factor: int = 8
    """d_sae = expansion_factor * d_in for a random init without warm start or d_sae."""
    buffer_tokens: int = 1 << 16
    """Shuffle-buffer size in tokens: whole source batches are pooled, permuted and drained."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warmup over this many steps (a function of the step, so resume-exact)."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoint: bool = False
    """Keep the last checkpoint (weights + optimizer) after training ends instead of deleting it."""
    bf16: bool = True
    """bf16 autocast for the SAE forward where the hardware has it (CUDA with bf16); fp32 elsewhere."""
    log_every: int = 10
    """Record the per-step metrics every this many steps (and at the last step)."""
    device: str | None = None
    """Where the SAEs train; None = where the warm start lives, else cpu."""

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ConfigError(f"TrainConfig.regime must be one of {REGIMES}, found {self.regime!r}")
        if self.random_tokens not in ("full", "image", "text"):
            raise ConfigError(
                f"TrainConfig.random_tokens must be full, image or text, found {self.random_tokens!r}"
            )
        for name in (
            "k",
            "batch_size",
            "total_tokens",
            "buffer_tokens",
            "log_every",
            "expansion_factor",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, found {getattr(self, name)!r}")
        if self.buffer_tokens < self.batch_size:
            raise ConfigError(
                f"TrainConfig.buffer_tokens ({self.buffer_tokens}) must be >= batch_size ({self.batch_size}): "
                "the shuffle buffer has to hold at least one batch"
            )
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be positive or None, found {self.lr!r}")

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def trajectory_key(self) -> dict[str, Any]:
        """The fields that decide the training trajectory; a checkpoint only resumes under the same."""
        skip = {"total_tokens", "checkpoint_every", "keep_checkpoint", "log_every", "device"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def default_lr(d_sae: int) -> float:
    """sparsify's layer-scaled default: 2e-4 / sqrt(d_sae / 2**14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def regime_token_types(
    regime: str, exclude_special: bool = True, random_tokens: str = "full"
) -> tuple[int, ...]:
    """The TokenType values whose positions count in the loss under a masking regime."""
    if regime == "random":
        regime = random_tokens
    text, image, special = int(TokenType.TEXT), int(TokenType.IMAGE), int(TokenType.SPECIAL)
    if regime == "full":
        return (text, image) if exclude_special else (text, image, special)
    if regime == "image":
        return (image,)
    if regime == "text":
        return (text,) if exclude_special else (text, special)
    raise ConfigError(f"unknown masking regime {regime!r}; expected one of {REGIMES}")


# =============================================================================================
# the token stream: any source -> selected tokens -> deterministic shuffle blocks -> batches
# =============================================================================================


@dataclass
class TokenBatch:
    """Flat tokens of several layers: acts[L] [n, d], token_types [n]."""

    acts: dict[int, Tensor]
    token_types: Tensor

    @property
    def n(self) -> int:
        return int(self.token_types.shape[0])

    def take(self, index: Tensor) -> TokenBatch:
        return TokenBatch({L: a[index] for L, a in self.acts.items()}, self.token_types[index])

    @staticmethod
    def cat(parts: Sequence[TokenBatch]) -> TokenBatch:
        layers = list(parts[0].acts)
        return TokenBatch(
            {L: torch.cat([p.acts[L] for p in parts]) for L in layers},
            torch.cat([p.token_types for p in parts]),
        )


def as_token_batch(item: Any, layers: Sequence[int], token_types: tuple[int, ...]) -> TokenBatch:
    """The tokens of one source item whose type is in `token_types`, for `layers`.

    Accepts an `ActivationBatch` ([batch, seq, d] per layer; padding dropped) or a flat batch as the
    activation store yields it (`StoreBatch`, or a mapping with "acts" and "token_types"): acts a
    {layer: [n, d]} dict (or one [n, d] tensor when one layer is trained) and token_types [n].
    """
    if isinstance(item, ActivationBatch):
        keep = item.attention_mask.bool() & torch.isin(
            item.token_types, torch.tensor(token_types, dtype=item.token_types.dtype)
        )
        acts_src, types = item.acts, item.token_types
    else:
        acts_src = item.get("acts") if isinstance(item, Mapping) else getattr(item, "acts", None)
        types = (
            item.get("token_types")
            if isinstance(item, Mapping)
            else getattr(item, "token_types", None)
        )
        if acts_src is None or types is None:
            raise DataError(
                f"expected ActivationBatch or a flat token batch with acts and token_types, found "
                f"{type(item).__name__}; pass mmdiff.capture.iter_activations(...) or an ActivationStore"
            )
        if isinstance(acts_src, Tensor):
            if len(layers) != 1:
                raise DataError(
                    f"the source gives one layer's tokens per batch, but layers {list(layers)} are trained"
                )
            acts_src = {layers[0]: acts_src}
        keep = torch.isin(types, torch.tensor(token_types, dtype=types.dtype))
    missing = [L for L in layers if L not in acts_src]
    if missing:
        raise DataError(
            f"the activations hold layers {sorted(acts_src)}, training needs {list(layers)}: capture layers {missing}"
        )
    return TokenBatch({L: acts_src[L][keep] for L in layers}, types[keep].to(torch.int8))


@dataclass
class StreamPosition:
    """Where the token stream is: enough to rebuild the exact same remaining batches."""

    epoch: int = 0
    item: int = 0  # source items of this epoch consumed before the current block
    block: int = 0  # index of the current shuffle block (seeds its permutation)
    offset: int = 0  # batches already taken from the current block
    carry: TokenBatch | None = None  # leftover tokens (< batch_size) that open the current block

    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "item": self.item,
            "block": self.block,
            "offset": self.offset,
        }
        if self.carry is not None:
            state["carry_types"] = self.carry.token_types
            state["carry_acts"] = {str(L): a for L, a in self.carry.acts.items()}
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> StreamPosition:
        carry = None
        if "carry_types" in state:
            carry = TokenBatch(
                {int(L): a for L, a in state["carry_acts"].items()}, state["carry_types"]
            )
        return cls(
            int(state["epoch"]),
            int(state["item"]),
            int(state["block"]),
            int(state["offset"]),
            carry,
        )


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of its parts (stable across processes and runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_store(data: Any) -> bool:
    return hasattr(data, "iter_batches") and hasattr(data, "count_tokens")


def _open_source(
    data: Any,
    layers: Sequence[int],
    token_types: tuple[int, ...],
    epoch: int,
    item: int,
    seed: int,
    batch_size: int,
) -> Iterator[Any]:
    """A fresh iterator over the source for `epoch`, with the first `item` items skipped."""
    if _is_store(data):
        # The store reads its shards in an order seeded per epoch, already filtered by token type.
        it = data.iter_batches(
            list(layers),
            batch_size,
            token_types=token_types,
            shuffle=True,
            buffer_tokens=batch_size,
            seed=derived_seed(seed, "store", epoch),
        )
    else:
        it = iter(data)
    for _ in range(item):
        if next(it, None) is None:
            raise DataError(
                f"cannot resume: the data yields fewer than {item} items in epoch {epoch}, but the "
                "checkpoint consumed that many; pass the same data that the checkpointed run used"
            )
    return it


def shuffled_batches(
    data: Any,
    layers: Sequence[int],
    token_types: tuple[int, ...],
    batch_size: int,
    buffer_tokens: int,
    seed: int,
    start: StreamPosition | None = None,
) -> Iterator[tuple[TokenBatch, StreamPosition]]:
    """(batch of exactly batch_size tokens, position after it), forever or until one-shot data ends.

    Blocks of at least `buffer_tokens` tokens (leftover + whole source items) are permuted by a
    generator seeded with (seed, block index) and drained in batches; the leftover opens the next
    block. A re-iterable source (a list, an ActivationStore, an object with __iter__) starts a new
    epoch when it ends; a one-shot iterator ends the stream.
    """
    pos = start or StreamPosition()
    one_shot = not _is_store(data) and iter(data) is data
    epoch, item, block, skip, carry = pos.epoch, pos.item, pos.block, pos.offset, pos.carry
    it = _open_source(data, layers, token_types, epoch, item, seed, batch_size)
    epoch_tokens, fresh_epoch = 0, item == 0
    while True:
        opened = StreamPosition(epoch, item, block, 0, carry)
        parts = [carry] if carry is not None else []
        n, exhausted = (carry.n if carry is not None else 0), False
        while n < buffer_tokens:
            raw = next(it, None)
            if raw is None:
                if one_shot:
                    exhausted = True
                    break
                if fresh_epoch and epoch_tokens == 0:
                    raise DataError(
                        f"the data yields no training tokens of types {token_types} in a whole epoch: "
                        "check the masking regime (e.g. `image` on text-only data) and exclude_special"
                    )
                epoch, item, epoch_tokens, fresh_epoch = epoch + 1, 0, 0, True
                it = _open_source(data, layers, token_types, epoch, 0, seed, batch_size)
                continue
            item += 1
            tb = as_token_batch(raw, layers, token_types)
            epoch_tokens += tb.n
            if tb.n:
                parts.append(tb)
                n += tb.n
        if n < batch_size:
            return
        buf = TokenBatch.cat(parts)
        perm = torch.randperm(
            n, generator=torch.Generator().manual_seed(derived_seed(seed, "block", block))
        )
        n_batches = n // batch_size
        for j in range(skip, n_batches):
            yield (
                buf.take(perm[j * batch_size : (j + 1) * batch_size]),
                dataclasses.replace(opened, offset=j + 1),
            )
        skip = 0
        carry = buf.take(perm[n_batches * batch_size :]) if n % batch_size else None
        block += 1
        if exhausted:
            return


# =============================================================================================
# SAEs: warm start, random init, decoder constraint
# =============================================================================================


def warm_start_sae(init: Any, layer: int, k: int, device: str | None = None) -> Any:
    """A trainable TopK copy of a warm-start SAE (an SAE object or a `load_sae`-readable path).

    Other architectures (JumpReLU checkpoints of Llama / Gemma Scope, ReLU, BatchTopK) go through
    `to_topk`. The copy is float32 with unit-norm decoder rows, each row's norm folded into its
    encoder column and bias so that every latent still writes the same vector
    (f_i d_i = (n_i f_i)(d_i / n_i)).
    """
    from mmdiff.sae.base import SAE, SAEConfig
    from mmdiff.sae.topk import TopKSAE

    if isinstance(init, SAE):
        sae = init
        if sae.cfg.hook_layer is not None and sae.cfg.hook_layer != layer:
            raise SAEError(
                f"the warm start given for layer {layer} was trained at layer {sae.cfg.hook_layer}: "
                "pass each layer its own SAE"
            )
    else:
        from mmdiff.sae import load_sae

        sae = load_sae(init, layer=layer)
    if sae.cfg.architecture != "topk":  # JumpReLU (Llama / Gemma Scope), ReLU, BatchTopK
        from mmdiff.sae import to_topk

        sae = to_topk(sae, k=k)
    cfg = SAEConfig.from_dict(
        {
            **sae.cfg.to_dict(),
            "architecture": "topk",
            "k": k,
            "dtype": "float32",
            "decoder_norm_gating": False,
            "hook_layer": layer,
            "device": device or str(sae.W_enc.device),
        }
    )
    out = TopKSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(out, name).copy_(getattr(sae, name).float())
        fold_decoder_norms_(out)
    return out


@torch.no_grad()
def fold_decoder_norms_(sae: Any) -> None:
    """Make decoder rows unit-norm without changing what each active latent writes."""
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-12)  # [d_sae]
    sae.W_enc.mul_(norms[None, :])
    sae.b_enc.mul_(norms)
    sae.W_dec.div_(norms[:, None])


def random_sae(
    d_in: int,
    d_sae: int,
    k: int,
    layer: int,
    seed: int,
    device: str = "cpu",
    like: Any = None,
    purpose: str = "init",
) -> Any:
    """A randomly initialised TopK SAE (the `random` control, or a first SAE with no warm start).

    Unit-norm random decoder rows, encoder = decoder transpose, zero biases; b_dec is set to the
    mean of the first training batch by the trainer. `like` copies hook names / model name. The
    init is seeded by (seed, purpose, layer): the `random` control and a base SAE trained from
    scratch with the same seed must not start from the same weights.
    """
    from mmdiff.sae.base import SAEConfig
    from mmdiff.sae.topk import TopKSAE

    base = like.cfg.to_dict() if like is not None else {}
    keep = {k_: base[k_] for k_ in ("hook_name", "model_name") if k_ in base}
    cfg = SAEConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        hook_layer=layer,
        device=device,
        norm_scale=float(base.get("norm_scale", 1.0)),
        apply_b_dec_to_input=True,
        metadata={"init": "random", "seed": seed, "init_purpose": purpose},
        **keep,
    )
    sae = TopKSAE(cfg)
    sae.init_weights(seed=derived_seed(seed, purpose, layer))
    return sae


def constrain_decoder_grad(sae: Any) -> None:
    """Remove from each decoder row's gradient its component along the row (rows stay unit-norm)."""
    if sae.W_dec.grad is None:
        return
    with torch.no_grad():
        parallel = (sae.W_dec.grad * sae.W_dec).sum(-1, keepdim=True)  # [d_sae, 1]
        sae.W_dec.grad.sub_(parallel * sae.W_dec)


# =============================================================================================
# the loss
# =============================================================================================


@dataclass
class StepOut:
    """One SAE's loss on one batch, and what the bookkeeping needs."""

    loss: Tensor  # scalar: fvu + auxk_alpha * auxk
    fvu: Tensor
    auxk: Tensor
    l0: Tensor  # mean non-zero latents per token
    top_indices: Tensor  # [n, k]
    top_values: Tensor  # [n, k]


def topk_loss(sae: Any, x: Tensor, dead_mask: Tensor | None, auxk_alpha: float) -> StepOut:
    """FVU of the TopK reconstruction plus AuxK: the top d_in/2 dead latents fit the residual.

    x: [n, d_in] (model units); dead_mask: [d_sae] bool. The reconstruction goes through the SAE's
    own forward (the k-sparse kernel); AuxK computes pre-activations of the dead latents only. As in
    Gao et al. / sparsify, AuxK is scaled by min(n_dead / k_aux, 1) and normalised by the batch's
    total variance.
    """
    out = sae(x)
    x_hat, top_values, top_indices = (
        out.x_hat,
        out.top_values,
        out.top_indices,
    )  # [n, d_in], [n, k], [n, k]
    total_variance = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    e = x - x_hat
    fvu = e.pow(2).sum() / total_variance
    auxk = fvu.new_zeros(())
    if dead_mask is not None and auxk_alpha > 0 and (n_dead := int(dead_mask.sum())) > 0:
        dead_idx = dead_mask.nonzero().squeeze(-1)  # [n_dead]
        k_aux = max(1, x.shape[-1] // 2)
        scale = min(n_dead / k_aux, 1.0)
        k_aux = min(k_aux, n_dead)
        dead_pre = sae.sae_in(x) @ sae.W_enc[:, dead_idx] + sae.b_enc[dead_idx]  # [n, n_dead]
        aux_values, local = dead_pre.topk(k_aux, dim=-1, sorted=False)  # [n, k_aux]
        # the residual e already contains b_dec, so the dead latents' write carries none
        e_hat = sparse_decode(dead_idx[local], aux_values.relu(), sae.W_dec) / sae.cfg.norm_scale
        auxk = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
    loss = fvu + auxk_alpha * auxk
    l0 = (top_values != 0).sum(-1).float().mean()
    return StepOut(loss, fvu, auxk, l0, top_indices, top_values)


@dataclass
class DeadLatents:
    """Tokens since each latent last fired, per layer; dead = over the threshold."""

    since_fired: dict[int, Tensor]  # layer -> [d_sae] int64
    threshold: int

    def mask(self, layer: int) -> Tensor:
        return self.since_fired[layer] > self.threshold

    def update(self, layer: int, top_indices: Tensor, top_values: Tensor, n_tokens: int) -> None:
        counts = self.since_fired[layer]
        counts += n_tokens
        counts[top_indices[top_values > 0]] = 0

    def fraction(self, layer: int) -> float:
        return float(self.mask(layer).double().mean())


# =============================================================================================
# checkpoints
# =============================================================================================


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    folder: Path,
    saes: Mapping[int, Any],
    optimizer: torch.optim.Optimizer,
    dead: DeadLatents,
    position: StreamPosition,
    step: int,
    tokens: int,
    metrics: list[dict[str, Any]],
    cfg: TrainConfig,
    sources: Mapping[str, str | None] | None = None,
) -> None:
    """Atomically replace `folder` with weights, optimizer, RNG, data position, step and metrics.

    sources: content keys of the data and the warm start ({"data": ..., "init": ...}), so that a
    checkpoint never resumes on other data or from another warm start.
    """
    with atomic_dir(folder) as tmp:
        save_safetensors(
            tmp / "saes.safetensors",
            {
                f"{L}.{name}": t.detach().cpu()
                for L, s in saes.items()
                for name, t in s.state_dict().items()
            },
        )
        state = {
            "step": step,
            "tokens": tokens,
            "position": position.to_state(),
            "optimizer": optimizer.state_dict(),
            "since_fired": {str(L): t.cpu() for L, t in dead.since_fired.items()},
            "rng": _rng_state(),
            "metrics": metrics,
            "trajectory": cfg.trajectory_key(),
            "layers": sorted(saes),
            "sources": dict(sources or {}),
        }
        with open(tmp / "state.pt", "wb") as fh:
            torch.save(state, fh)


def load_checkpoint(
    folder: Path,
    saes: Mapping[int, Any],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    sources: Mapping[str, str | None] | None = None,
) -> tuple[dict[str, Any], DeadLatents, StreamPosition]:
    """Load a checkpoint into `saes` and `optimizer`; the state dict, dead counters and position."""
    from safetensors.torch import load_file

    state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    if state["layers"] != sorted(saes):
        raise ConfigError(
            f"the checkpoint in {folder} trains layers {state['layers']}, this run {sorted(saes)}: "
            "use another out_dir or the same layers"
        )
    if state["trajectory"] != cfg.trajectory_key():
        diff = sorted(
            k for k in cfg.trajectory_key() if state["trajectory"].get(k) != cfg.trajectory_key()[k]
        )
        raise ConfigError(
            f"the checkpoint in {folder} was trained with other settings ({diff}); "
            "resume with the same TrainConfig, or delete the checkpoint to start over"
        )
    for name, key in (sources or {}).items():
        stored = state.get("sources", {}).get(name)
        if key is not None and stored is not None and key != stored:
            raise ConfigError(
                f"the checkpoint in {folder} was trained on another {name} "
                f"({'warm-start SAEs' if name == 'init' else 'activation source'}); resume with "
                "the same one, or delete the checkpoint to start over"
            )
    weights = load_file(str(folder / "saes.safetensors"))
    for L, sae in saes.items():
        sae.load_state_dict({name: weights[f"{L}.{name}"] for name in sae.state_dict()})
    optimizer.load_state_dict(state["optimizer"])
    device = next(iter(saes.values())).W_dec.device
    dead = DeadLatents(
        {int(L): t.to(device) for L, t in state["since_fired"].items()}, cfg.dead_tokens_threshold
    )
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state, dead, StreamPosition.from_state(state["position"])


# =============================================================================================
# content keys of the data and the warm start (a checkpoint resumes only on the same)
# =============================================================================================


def _tensor_digest(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes())


def data_fingerprint(data: Any) -> str | None:
    """A content key of a training source, or None when it cannot be told without consuming it.

    A store: the hash of its manifest (which lists every shard's hash). A live capture: the record
    ids, side, layers and model path. An in-memory list of batches: the bytes of its tensors.
    One-shot iterators and other iterables: None (not checked).
    """
    from mmdiff.atomic import sha256_file, sha256_json

    if _is_store(data) and hasattr(data, "root"):
        return "store:" + sha256_file(Path(data.root) / "manifest.json")
    if isinstance(data, CapturedActivations):
        model = data.adapter.backbone(data.side).model
        name = str(getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__))
        ids = [getattr(r, "id", repr(r)) for r in data.records]
        return "capture:" + sha256_json([ids, data.side, data.layers, name])
    if isinstance(data, (list, tuple)):
        h = hashlib.sha256()
        for item in data:
            acts = item.get("acts") if isinstance(item, Mapping) else getattr(item, "acts", None)
            acts = acts if isinstance(acts, Mapping) else {0: acts}
            types = item.get("token_types") if isinstance(item, Mapping) else item.token_types
            for key in sorted(acts):
                _tensor_digest(h, acts[key])
            _tensor_digest(h, types)
            if getattr(item, "attention_mask", None) is not None:
                _tensor_digest(h, item.attention_mask)
        return "list:" + h.hexdigest()
    return None


def init_fingerprint(init: Mapping[int, Any] | None) -> str | None:
    """A content key of warm-start SAEs (objects: their tensors; paths: their files)."""
    from mmdiff.atomic import sha256_tree

    if init is None:
        return None
    h = hashlib.sha256()
    for layer in sorted(init):
        given = init[layer]
        h.update(f"layer {layer}".encode())
        if isinstance(given, (str, Path)):
            h.update(sha256_tree(given).encode())
        else:
            for name, t in sorted(given.state_dict().items()):
                h.update(name.encode())
                _tensor_digest(h, t)
    return h.hexdigest()


# =============================================================================================
# the loop
# =============================================================================================


@dataclass
class TrainResult:
    """Trained SAEs, their per-step metrics and where they were written."""

    saes: dict[int, Any]
    metrics: list[dict[str, Any]]  # one row per (logged step, layer)
    out_dir: Path
    sae_dirs: dict[int, Path]
    steps: int
    tokens: int
    resumed_from_step: int = 0
    data_ran_out: bool = False  # a one-shot data iterator ended before total_tokens
    reloaded: bool = False  # finished earlier with the same settings, data and warm start
    init: dict[int, Any] = field(default_factory=dict, repr=False)  # warm-start SAEs (for cosines)


def build_saes(
    init: Mapping[int, Any] | None,
    dims: Mapping[int, int] | None,
    layers: Sequence[int],
    cfg: TrainConfig,
) -> tuple[dict[int, Any], dict[int, Any]]:
    """(trainable TopK SAEs, frozen warm-start SAEs) per layer, following the regime.

    dims: d_in per layer, needed only for a random init without warm start.
    """
    warm: dict[int, Any] = {}
    if init is not None:
        missing = [L for L in layers if L not in init]
        if missing:
            raise SAEError(
                f"no warm-start SAE for layers {missing} (have {sorted(init)}); pass one per trained layer"
            )
        warm = {L: warm_start_sae(init[L], L, cfg.k, cfg.device) for L in layers}
    if warm and cfg.regime != "random":
        return warm, warm_copies(warm)
    if warm:
        dims = {L: warm[L].cfg.d_in for L in layers}
    if dims is None:
        raise SAEError("a random init needs the activation width: pass dims or a warm start")
    device = cfg.device or (str(next(iter(warm.values())).W_dec.device) if warm else "cpu")
    saes = {}
    for L in layers:
        d_sae = warm[L].cfg.d_sae if warm else (cfg.d_sae or cfg.expansion_factor * dims[L])
        if cfg.k > d_sae:
            raise ConfigError(f"k={cfg.k} is larger than d_sae={d_sae} at layer {L}")
        saes[L] = random_sae(
            dims[L],
            d_sae,
            cfg.k,
            L,
            cfg.seed,
            device,
            like=warm.get(L),
            purpose="random control" if cfg.regime == "random" else "init",
        )
    return saes, warm_copies(warm)


def warm_copies(warm: Mapping[int, Any]) -> dict[int, Any]:
    """Frozen copies of the warm-start SAEs, to measure the decoder cosine after training."""
    import copy

    return {L: copy.deepcopy(s).requires_grad_(False) for L, s in warm.items()}


def _autocast(device: torch.device, enabled: bool):
    use = enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def _lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


def train_saes(
    init: Mapping[int, Any] | None,
    data: Iterable[Any] | Any,
    layers: Sequence[int],
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> TrainResult:
    """Train one TopK SAE per layer on one stream of activations; write them to out_dir/layer_<L>/.

    init: warm-start SAEs (or `load_sae`-readable paths) per layer, or None for a random init.
    data: ActivationBatches (e.g. `mmdiff.capture.iter_activations(...)`, many layers per forward
    pass), flat store batches, or an `ActivationStore`. To resume exactly, pass the same data again:
    a re-iterable yields the same items in the same order each time. A checkpoint in
    out_dir/checkpoint/ (written every cfg.checkpoint_every steps) is resumed automatically.
    Writes out_dir/layer_<L>/ (native SAE folders) and out_dir/train_metrics.parquet.
    """
    layers = sorted({int(L) for L in layers})
    if not layers:
        raise ConfigError("train_saes needs at least one layer")
    out_dir, ckpt = Path(out_dir), Path(out_dir) / CHECKPOINT_DIR
    token_types = regime_token_types(cfg.regime, cfg.exclude_special, cfg.random_tokens)
    recover_checkpoint(ckpt)
    resuming = (ckpt / "state.pt").is_file()
    sources = {"data": data_fingerprint(data), "init": init_fingerprint(init)}
    random_init = init is None or cfg.regime == "random"
    first: list[tuple[TokenBatch, StreamPosition]] = []
    dims = checkpoint_dims(ckpt, layers) if resuming else None
    stream: Iterator[tuple[TokenBatch, StreamPosition]] | None = None
    if init is None and dims is None:  # the width comes from the data: peek at the first batch
        stream = shuffled_batches(
            data, layers, token_types, cfg.batch_size, cfg.buffer_tokens, cfg.seed
        )
        first = [nxt] if (nxt := next(stream, None)) is not None else []
        if not first:
            raise DataError(
                f"the data yields fewer than batch_size={cfg.batch_size} tokens of types {token_types}"
            )
        dims = {L: int(first[0][0].acts[L].shape[-1]) for L in layers}
    saes, warm = build_saes(init, dims, layers, cfg)
    device = next(iter(saes.values())).W_dec.device
    base_lrs = {L: cfg.lr or default_lr(saes[L].cfg.d_sae) for L in layers}
    optimizer = torch.optim.Adam(
        [{"params": list(saes[L].parameters()), "lr": base_lrs[L]} for L in layers]
    )
    dead = DeadLatents(
        {L: torch.zeros(saes[L].cfg.d_sae, dtype=torch.long, device=device) for L in layers},
        cfg.dead_tokens_threshold,
    )
    step, tokens, position, metrics = 0, 0, StreamPosition(), []
    if resuming:
        state, dead, position = load_checkpoint(ckpt, saes, optimizer, cfg, sources)
        step, tokens, metrics = int(state["step"]), int(state["tokens"]), list(state["metrics"])
    if stream is None:
        stream = shuffled_batches(
            data, layers, token_types, cfg.batch_size, cfg.buffer_tokens, cfg.seed, position
        )
    batches = itertools.chain(first, stream)
    resumed_from, total_steps, data_ran_out = step, cfg.total_steps, False

    with training_progress(cfg.regime, layers, total_steps, step, progress) as (bar, task):
        while step < total_steps:
            nxt = next(batches, None)
            if nxt is None:
                data_ran_out = True
                break
            batch, position = nxt
            if step == 0 and random_init:
                init_decoder_bias_(saes, batch, device)
            log = (step + 1) % cfg.log_every == 0 or step + 1 == total_steps
            rows = train_step(saes, optimizer, dead, batch, cfg, step, base_lrs, device, log)
            step, tokens = step + 1, tokens + batch.n
            if log:
                metrics.extend({"step": step, "tokens": tokens, **r} for r in rows)
                bar.update(task, info=" ".join(f"L{r['layer']} fvu={r['fvu']:.3f}" for r in rows))
            bar.update(task, completed=step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(
                    ckpt, saes, optimizer, dead, position, step, tokens, metrics, cfg, sources
                )
    if cfg.keep_checkpoint:
        save_checkpoint(ckpt, saes, optimizer, dead, position, step, tokens, metrics, cfg, sources)
    return finish_training(
        saes, warm, metrics, out_dir, step, tokens, resumed_from, data_ran_out, cfg
    )


def recover_checkpoint(ckpt: Path) -> None:
    """Put back the previous checkpoint when a kill fell between atomic_dir's two renames.

    atomic_dir moves the old folder to .<name>.old before renaming the new one into place; a kill
    in between leaves no checkpoint folder but a complete .old one, which is still a valid resume
    point.
    """
    old = ckpt.with_name(f".{ckpt.name}.old")
    if not ckpt.exists() and (old / "state.pt").is_file():
        old.rename(ckpt)


def checkpoint_dims(folder: Path, layers: Sequence[int]) -> dict[int, int]:
    """d_in per layer of the SAEs stored in a checkpoint (read from the safetensors header)."""
    from safetensors import safe_open

    with safe_open(str(folder / "saes.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        missing = [L for L in layers if f"{L}.W_enc" not in keys]
        if missing:
            raise ConfigError(
                f"the checkpoint in {folder} has no SAE for layers {missing}: use another out_dir"
            )
        return {L: int(fh.get_slice(f"{L}.W_enc").get_shape()[0]) for L in layers}


@contextlib.contextmanager
def training_progress(regime: str, layers: Sequence[int], total: int, done: int, enabled: bool):
    """A rich progress bar over training steps (disabled = no output at all)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(f"SAE {regime} layers {list(layers)}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not enabled, transient=True) as bar:
        yield bar, bar.add_task("train", total=total, completed=done, info="")


@torch.no_grad()
def init_decoder_bias_(saes: Mapping[int, Any], batch: TokenBatch, device: torch.device) -> None:
    """b_dec = mean of the first batch (in the SAE's scaled units): pre-activations start centred."""
    for L, sae in saes.items():
        sae.b_dec.copy_(
            batch.acts[L].to(device=device, dtype=torch.float32).mean(0) * sae.cfg.norm_scale
        )


def train_step(
    saes: Mapping[int, Any],
    optimizer: torch.optim.Optimizer,
    dead: DeadLatents,
    batch: TokenBatch,
    cfg: TrainConfig,
    step: int,
    base_lrs: Mapping[int, float],
    device: torch.device,
    log: bool = True,
) -> list[dict[str, Any]]:
    """One Adam step on every layer's SAE; one metrics row per layer when `log` (else none)."""
    rows = []
    optimizer.zero_grad(set_to_none=True)
    for group, L in zip(optimizer.param_groups, sorted(saes)):
        group["lr"] = _lr_at(step, base_lrs[L], cfg.lr_warmup_steps)
        sae = saes[L]
        x = batch.acts[L].to(device=device, dtype=torch.float32)  # [batch_size, d_in]
        with _autocast(device, cfg.bf16):
            out = topk_loss(sae, x, dead.mask(L), cfg.auxk_alpha)
        out.loss.backward()
        constrain_decoder_grad(sae)
        dead.update(L, out.top_indices, out.top_values, x.shape[0])
        if log:
            rows.append(
                {
                    "layer": L,
                    "loss": float(out.loss.detach()),
                    "fvu": float(out.fvu.detach()),
                    "auxk_loss": float(out.auxk.detach()),
                    "l0": float(out.l0.detach()),
                    "dead_fraction": dead.fraction(L),
                    "lr": group["lr"],
                }
            )
    optimizer.step()
    for sae in saes.values():
        sae.set_decoder_norm_to_unit_norm()
    return rows


def finish_training(
    saes: dict[int, Any],
    warm: dict[int, Any],
    metrics: list[dict[str, Any]],
    out_dir: Path,
    step: int,
    tokens: int,
    resumed_from: int,
    data_ran_out: bool,
    cfg: TrainConfig,
) -> TrainResult:
    """Write the SAE folders and the metrics table; drop the checkpoint unless asked to keep it."""
    sae_dirs = {}
    for L, sae in saes.items():
        sae.cfg.metadata = {
            **sae.cfg.metadata,
            "regime": cfg.regime,
            "train_tokens": tokens,
            "train_steps": step,
            "warm_start": bool(warm) and cfg.regime != "random",
        }
        sae_dirs[L] = Path(sae.save(out_dir / f"layer_{L}"))
    import pandas as pd

    write_parquet(
        out_dir / METRICS_FILE,
        pd.DataFrame(
            metrics,
            columns=[
                "step",
                "tokens",
                "layer",
                "loss",
                "fvu",
                "auxk_loss",
                "l0",
                "dead_fraction",
                "lr",
            ],
        ),
    )
    ckpt = out_dir / CHECKPOINT_DIR
    if not cfg.keep_checkpoint and ckpt.exists():
        shutil.rmtree(ckpt)
    return TrainResult(
        dict(saes), metrics, out_dir, sae_dirs, steps=step, tokens=tokens,
        resumed_from_step=resumed_from, data_ran_out=data_ran_out, init=warm,
    )  # fmt: skip


# =============================================================================================
# the organism recipe: base-LM SAEs first, then the four regimes on the VLM warm-started from them
# =============================================================================================

ROLES: tuple[str, ...] = ("base", "full", "image", "text", "random")
TRAIN_CONFIG_FILE = "train_config.json"


class CapturedActivations:
    """Re-iterable ActivationBatches of a model side: every pass re-runs the (deterministic) capture.

    `progress` shows capture's own bar; keep it off while the trainer's bar is live (rich shows one
    live display at a time).
    """

    def __init__(
        self,
        adapter: Any,
        records: Sequence[Any],
        layers: Sequence[int],
        side: str,
        batch_size: int,
        progress: bool = False,
    ) -> None:
        self.adapter, self.records, self.layers = adapter, list(records), list(layers)
        self.side, self.batch_size, self.progress = side, batch_size, progress

    def __iter__(self) -> Iterator[ActivationBatch]:
        from mmdiff.capture import iter_activations

        return iter(
            iter_activations(
                self.adapter, self.records, self.layers, side=self.side,
                batch_size=self.batch_size, progress=self.progress,
            )
        )  # fmt: skip


@dataclass
class StudySAEs:
    """What `train_study_saes` produced: per role (base, full, image, text, random) and layer."""

    saes: dict[str, dict[int, Any]]
    sae_dirs: dict[str, dict[int, Path]]
    results: dict[str, TrainResult]
    tables: dict[
        str, Path
    ]  # name -> Parquet / PNG path (see training_report.write_training_report)


def _role_settings(
    cfg: TrainConfig, layers: Sequence[int], data: Any, init: Mapping[int, Any] | None
) -> dict[str, Any]:
    """What a finished role's SAEs depend on: settings, data and warm start (not where they
    trained or how often they logged)."""
    return {
        "config": {**cfg.trajectory_key(), "total_tokens": cfg.total_tokens},
        "layers": list(layers),
        "data": data_fingerprint(data),
        "init": init_fingerprint(init),
    }


def _finished_role(role_dir: Path, settings: dict[str, Any]) -> bool:
    """True when role_dir holds SAEs trained with these settings; stale ones clear the folder."""
    import json

    marker = role_dir / TRAIN_CONFIG_FILE
    if not marker.is_file():
        if role_dir.exists():  # no marker: a folder of unknown provenance, never resumed
            shutil.rmtree(role_dir)
        return False
    if json.loads(marker.read_text()) != json.loads(json.dumps(settings)):
        shutil.rmtree(role_dir)  # trained on other data / settings / warm start: start over
        return False
    layers = settings["layers"]
    return (role_dir / METRICS_FILE).is_file() and all(
        (role_dir / f"layer_{L}").is_dir() for L in layers
    )


def train_role(
    role: str,
    init: Mapping[int, Any] | None,
    data: Any,
    layers: Sequence[int],
    cfg: TrainConfig,
    role_dir: Path,
    progress: bool,
    resume: bool = True,
) -> TrainResult:
    """Train (or resume, or reload when already done with the same settings) one role's SAEs.

    resume=False trains from scratch whatever the folder holds (the pipeline's --force).
    """
    from mmdiff.atomic import write_json

    if not resume and role_dir.exists():
        shutil.rmtree(role_dir)
    settings = _role_settings(cfg, layers, data, init)
    if _finished_role(role_dir, settings):
        import pandas as pd

        from mmdiff.sae import load_sae

        saes = {L: load_sae(role_dir / f"layer_{L}", layer=L) for L in layers}
        metrics = pd.read_parquet(role_dir / METRICS_FILE).to_dict("records")
        warm = {L: warm_start_sae(init[L], L, cfg.k) for L in layers} if init is not None else {}
        return TrainResult(
            saes,
            metrics,
            role_dir,
            {L: role_dir / f"layer_{L}" for L in layers},
            steps=int(metrics[-1]["step"]) if metrics else 0,
            tokens=int(metrics[-1]["tokens"]) if metrics else 0,
            init=warm,
            reloaded=True,
        )
    write_json(role_dir / TRAIN_CONFIG_FILE, settings)
    return train_saes(init, data, layers, cfg, role_dir, progress)


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
    in one pass over the records."""
    from mmdiff.sae.metrics import spliced_losses

    backbone = adapter.backbone(side)
    device = next(backbone.model.parameters()).device
    make = adapter.vlm_inputs if side == "vlm" else adapter.base_inputs

    starts = range(0, len(records), batch_size)

    def batches(bar: Any, task: Any) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for s in starts:
            inputs = make(records[s : s + batch_size])
            yield _to_device(inputs, device), adapter.token_types(inputs, side=side).to(device)
            bar.update(task, advance=1)

    keyed = {(role, L): (sae, L) for role, by_layer in saes.items() for L, sae in by_layer.items()}
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"spliced-in loss ({side})", total=len(starts))
        results = spliced_losses(
            backbone, keyed, batches(bar, task), exclude_special=exclude_special
        )
    return [{"regime": role, "side": side, **r.row()} for (role, _), r in results.items()]


def train_study_saes(
    adapter: Any,
    records_train: Sequence[Any],
    records_heldout: Sequence[Any],
    layers: Sequence[int],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    regimes: Sequence[str] = ("full", "image", "text", "random"),
    base_cfg: TrainConfig | None = None,
    capture_batch_size: int = 8,
    spliced: bool = True,
    plots: bool = True,
    progress: bool = True,
    data: Mapping[str, Any] | None = None,
    heldout: Mapping[str, Any] | None = None,
    base_saes: Mapping[int, Any] | None = None,
    resume: bool = True,
) -> StudySAEs:
    """The `train` stage of a study without pretrained SAEs (the organism).

    1. A base-LM SAE per layer, from random init, on the base LM run on caption + question
       (side="base", regime full, `base_cfg` or `cfg`).
    2. The regimes on the VLM (image + question), warm-started from the base SAEs (random: same
       shape, random init).
    Writes out_dir/saes/{base,full,image,text,random}/layer_<L>/ (native format) with each role's
    train_metrics.parquet, then the held-out tables (FVU by token type, L0, dead fraction; the
    spliced-in loss when `spliced`; decoder cosine to the base SAE) to out_dir/stats/sae_*.parquet
    and their plots to out_dir/report/sae_*.png.

    Activations come from `mmdiff.capture.iter_activations` on the adapter, unless `data` /
    `heldout` give them per side ({"base": ..., "vlm": ...}: ActivationBatch iterables or stores).
    A killed call resumes: finished roles are reloaded, the interrupted one resumes its checkpoint.
    resume=False retrains every role from scratch (wire it to the pipeline's --force); with
    resume=True a role is reloaded only when its settings, data and warm start are unchanged.
    `base_saes` ({layer: SAE or `load_sae`-readable path}, e.g. Llama Scope folders) replaces step 1:
    they are copied to out_dir/saes/base/ in their own architecture and the regimes warm-start from
    them (JumpReLU through `to_topk`).
    """
    from mmdiff.sae.metrics import decoder_cosine, evaluate_saes
    from mmdiff.sae.training_report import fvu_curves, heldout_table, write_training_report

    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        raise ConfigError(f"unknown regimes {bad}; expected some of {REGIMES}")
    layers = sorted({int(L) for L in layers})
    out_dir = Path(out_dir)
    if cfg.device is None and adapter is not None:  # train where the activations are produced
        cfg = dataclasses.replace(cfg, device=str(next(adapter.vlm.model.parameters()).device))
    if base_cfg is not None and base_cfg.device is None:
        base_cfg = dataclasses.replace(base_cfg, device=cfg.device)

    def source(
        given: Mapping[str, Any] | None, records: Sequence[Any], side: str, bar: bool
    ) -> Any:
        if given is not None and given.get(side) is not None:
            return given[side]
        return CapturedActivations(adapter, records, layers, side, capture_batch_size, bar)

    src = {side: source(data, records_train, side, False) for side in ("base", "vlm")}
    held = {side: source(heldout, records_heldout, side, progress) for side in ("base", "vlm")}

    results: dict[str, TrainResult] = {}
    if base_saes is not None:
        d_in = adapter.backbone("base").d_model if adapter is not None else None
        results["base"] = import_base_saes(base_saes, layers, out_dir / "saes" / "base", d_in)
    else:
        bcfg = base_cfg or dataclasses.replace(cfg, regime="full")
        results["base"] = train_role(
            "base", None, src["base"], layers, bcfg, out_dir / "saes" / "base", progress, resume
        )
    for regime in regimes:
        results[regime] = train_role(
            regime,
            results["base"].saes,
            src["vlm"],
            layers,
            dataclasses.replace(cfg, regime=regime),
            out_dir / "saes" / regime,
            progress,
            resume,
        )
    saes = {role: r.saes for role, r in results.items()}

    rows = []
    for side, roles in (("base", ["base"]), ("vlm", list(saes))):
        evals = evaluate_saes(
            {(role, L): (saes[role][L], L) for role in roles for L in layers},
            held[side],
            exclude_special=cfg.exclude_special,
        )
        rows += [{"regime": role, "side": side, **ev.row()} for (role, _), ev in evals.items()]
    cosines = {
        role: {L: decoder_cosine(r.saes[L], r.init[L]) for L in layers}
        for role, r in results.items()
        if r.init
    }
    spliced_df = None
    if spliced:
        import pandas as pd

        held_records = list(records_heldout)
        spliced_rows = spliced_loss_rows(
            adapter, "base", held_records, {"base": saes["base"]}, capture_batch_size,
            cfg.exclude_special, progress,
        )  # fmt: skip
        spliced_rows += spliced_loss_rows(
            adapter, "vlm", held_records, saes, capture_batch_size, cfg.exclude_special, progress
        )
        spliced_df = pd.DataFrame(spliced_rows)
    tables = write_training_report(
        out_dir / "stats",
        out_dir / "report",
        fvu_curves({role: r.metrics for role, r in results.items() if r.metrics}),
        heldout_table(rows),
        cosines,
        spliced_df,
        plots=plots,
    )
    return StudySAEs(saes, {role: r.sae_dirs for role, r in results.items()}, results, tables)
