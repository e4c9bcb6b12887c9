"""Train one TopK SAE per layer from one stream of activations: warm start or random init, masking
regimes, AuxK for dead latents, unit-norm decoder rows, per-step metrics, kill-safe checkpoints.

The loop is short on purpose, so a reader can hold it in their head; what it calls lives beside it, one concept per file:
the token stream (`sae/stream.py`: `shuffled_batches`), the initial SAEs (`sae/warm_start.py`:
`build_saes`), the loss, the decoder constraint and the dead-latent bookkeeping (`sae/loss.py`:
`topk_loss`, `constrain_decoder_grad`, `DeadLatents`), the checkpoint (`sae/checkpoint.py`:
`save_checkpoint` / `load_checkpoint`), the settings (`sae/train_config.py`: `TrainConfig`). It
is the only training loop: how a step is distributed is a strategy object (`Local` here;
`mmdiff/parallel/train.py` holds the torchrun ones). The study recipe on top is `sae/study_saes.py`.

Masking regimes choose the tokens that enter the loss (docs/method.md#sae-architectures-and-training). A TopK SAE is a per-token
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
import itertools
import math
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmdiff.atomic import write_parquet
from mmdiff.errors import ConfigError, DataError
from mmdiff.models.base import TokenType
from mmdiff.sae.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_dims,
    data_fingerprint,
    init_fingerprint,
    load_checkpoint,
    recover_checkpoint,
    save_checkpoint,
)
from mmdiff.sae.loss import DeadLatents, constrain_decoder_grad, topk_loss
from mmdiff.sae.stream import StreamPosition, TokenBatch, is_store, shuffled_batches
from mmdiff.sae.train_config import REGIMES, Regime, TrainConfig  # noqa: F401  (re-exported)
from mmdiff.sae.warm_start import build_saes

METRICS_FILE = "train_metrics.parquet"


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


def bf16_autocast(device: torch.device, enabled: bool):
    """bf16 autocast where the device has it (CUDA with bf16), a no-op context elsewhere."""
    use = enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def lr_at(step: int, base: float, warmup: int) -> float:
    """The learning rate of `step` under a linear warmup (a function of the step: resume-exact)."""
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


def make_optimizer(saes: Mapping[int, Any], layers: Sequence[int], lrs: Mapping[int, float]) -> torch.optim.Adam:
    """Adam over the SAEs of `layers`, one parameter group (and learning rate) per layer.

    The fused implementation is used where torch has it for the parameters' device: same update,
    one kernel per group instead of a loop over tensors (about 8x cheaper per step on a CPU).
    """
    groups = [{"params": list(saes[L].parameters()), "lr": lrs[L]} for L in layers]
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam([{**g, "params": list(g["params"])} for g in groups])


class Local:
    """How a training step is distributed: here, not at all. One process trains every layer's SAE.

    `train_saes` is the one training loop; a strategy answers its few questions about ranks (which
    data this process reads, which layers it trains, the effective batch of a step, the step itself,
    where checkpoints go, who writes what). `mmdiff.parallel.train` holds the strategies for the
    ranks of torchrun (`LayerSharded`, `DataParallel`), subclasses of this one.
    """

    world_size, rank, is_main = 1, 0, True

    def describe(self) -> str:
        """What the progress bar says about the distribution ('' here)."""
        return ""

    def metadata(self) -> dict[str, Any]:
        """Extra entries of each trained SAE's metadata."""
        return {}

    def configure(self, cfg: TrainConfig, layers: Sequence[int]) -> TrainConfig:
        """The config the loop runs with (a strategy may set the device or check the world size)."""
        return cfg

    def local_data(self, data: Any) -> Any:
        """The part of the training source this process reads."""
        return data

    def owned_layers(self, layers: Sequence[int]) -> list[int]:
        """The layers whose SAEs this process trains (and holds optimizer state for)."""
        return list(layers)

    def resume_point(self, out_dir: Path) -> Path | None:
        """The checkpoint folder to resume from, or None to start from scratch."""
        ckpt = out_dir / CHECKPOINT_DIR
        recover_checkpoint(ckpt)
        return ckpt if (ckpt / "state.pt").is_file() else None

    def save_checkpoint(self, out_dir: Path, step: int, write: Callable[[Path], None]) -> None:
        """Write this process's checkpoint of `step` with write(folder)."""
        write(out_dir / CHECKPOINT_DIR)

    def data_ended(self, ended: bool, one_shot: bool) -> bool:
        """Whether the loop stops because the data ran out (ranks agree on it)."""
        return ended

    def effective_batch(self, batch: TokenBatch) -> TokenBatch:
        """The tokens this process's SAEs train on in one step."""
        return batch

    def init_decoder_bias_(self, saes: Mapping[int, Any], batch: TokenBatch, device: torch.device) -> None:
        init_decoder_bias_(saes, batch, device)

    def step(
        self, saes: Mapping[int, Any], optimizer: torch.optim.Optimizer, dead: DeadLatents,
        batch: TokenBatch, cfg: TrainConfig, step: int, base_lrs: Mapping[int, float],
        device: torch.device, log: bool,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """One optimisation step of this process's SAEs; metrics rows of the logged steps."""
        return train_step(saes, optimizer, dead, batch, cfg, step, base_lrs, device, log)

    def writes_saes(self) -> bool:
        """Whether this process writes the SAE folders of the layers it trained."""
        return True

    def all_metrics(self, metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every layer's metrics rows, from this process's (here: all of them)."""
        return metrics

    def barrier(self) -> None:
        """Wait for every process (here: nothing to wait for)."""


def train_saes(
    init: Mapping[int, Any] | None,
    data: Iterable[Any] | Any,
    layers: Sequence[int],
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    *,
    strategy: Local | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train one TopK SAE per layer on one stream of activations; write them to out_dir/layer_<L>/.

    init: warm-start SAEs (or `load_sae`-readable paths) per layer, or None for a random init.
    data: ActivationBatches (e.g. `mmdiff.capture.iter_activations(...)`, many layers per forward
    pass), flat store batches, or an `ActivationStore`. To resume exactly, pass the same data again:
    a re-iterable yields the same items in the same order each time. A checkpoint in
    out_dir/checkpoint/ (written every cfg.checkpoint_every steps) is resumed automatically.
    Writes out_dir/layer_<L>/ (native SAE folders) and out_dir/train_metrics.parquet.
    strategy: how a step is distributed; None = `Local()` (one process). Under torchrun pass one of
    `mmdiff.parallel.train`'s, on every rank with the same arguments. `on_step(step)` runs after
    every step. The result's `saes` holds the SAEs this process trained; `metrics` and `sae_dirs`
    cover every layer.
    """
    strategy = strategy or Local()
    layers = sorted({int(L) for L in layers})
    if not layers:
        raise ConfigError("train_saes needs at least one layer")
    cfg, out_dir = strategy.configure(cfg, layers), Path(out_dir)
    local, mine = strategy.local_data(data), strategy.owned_layers(layers)
    resume_dir = strategy.resume_point(out_dir)
    sources = {"data": data_fingerprint(local), "init": init_fingerprint(init)}
    random_init = init is None or cfg.regime == "random"
    one_shot = not is_store(local) and iter(local) is local
    first: list[tuple[TokenBatch, StreamPosition]] = []
    stream: Iterator[tuple[TokenBatch, StreamPosition]] | None = None
    dims = checkpoint_dims(resume_dir, mine) if resume_dir is not None else None
    if init is None and dims is None:  # the width comes from the data: peek at the first batch
        stream = token_stream(local, layers, cfg, strategy.world_size)
        first = [nxt] if (nxt := next(stream, None)) is not None else []
        if not first:
            raise DataError(
                f"the data yields fewer than {cfg.batch_size // strategy.world_size} tokens of "
                f"types {regime_token_types(cfg.regime, cfg.exclude_special, cfg.random_tokens)}"
                + (f" on rank {strategy.rank}" if strategy.world_size > 1 else "")
            )
        dims = {L: int(first[0][0].acts[L].shape[-1]) for L in layers}
    saes, warm = build_saes({L: init[L] for L in mine if L in init} if init is not None else None,
                            dims, mine, cfg)  # fmt: skip
    device = next(iter(saes.values())).W_dec.device
    base_lrs = {L: cfg.lr or default_lr(saes[L].cfg.d_sae) for L in mine}
    optimizer = make_optimizer(saes, mine, base_lrs)
    dead = DeadLatents(
        {L: torch.zeros(saes[L].cfg.d_sae, dtype=torch.long, device=device) for L in mine},
        cfg.dead_tokens_threshold,
    )
    step, tokens, position, metrics = 0, 0, StreamPosition(), []
    if resume_dir is not None:
        state, dead, position = load_checkpoint(resume_dir, saes, optimizer, cfg, sources)
        step, tokens, metrics = int(state["step"]), int(state["tokens"]), list(state["metrics"])
    if stream is None:
        stream = token_stream(local, layers, cfg, strategy.world_size, position)
    batches = itertools.chain(first, stream)
    resumed_from, total_steps, data_ran_out = step, cfg.total_steps, False

    def checkpoint() -> None:
        strategy.save_checkpoint(out_dir, step, lambda folder: save_checkpoint(
            folder, saes, optimizer, dead, position, step, tokens, metrics, cfg, sources))  # fmt: skip

    label = cfg.regime + strategy.describe()
    with training_progress(label, mine, total_steps, step, progress and strategy.is_main) as (bar, task):
        while step < total_steps:
            nxt = next(batches, None)
            if strategy.data_ended(nxt is None, one_shot):
                data_ran_out = True
                break
            batch, position = nxt
            batch = strategy.effective_batch(batch)
            if step == 0 and random_init:
                strategy.init_decoder_bias_(saes, batch, device)
            log = (step + 1) % cfg.log_every == 0 or step + 1 == total_steps
            rows = strategy.step(saes, optimizer, dead, batch, cfg, step, base_lrs, device, log)
            step, tokens = step + 1, tokens + cfg.batch_size
            if log:
                metrics.extend({"step": step, "tokens": tokens, **r} for r in rows)
                bar.update(task, info=" ".join(f"L{r['layer']} fvu={r['fvu']:.3f}" for r in rows))
            bar.update(task, completed=step)
            if on_step is not None:
                on_step(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                checkpoint()
    if cfg.keep_checkpoint:
        checkpoint()
    return finish_training(
        saes, warm, metrics, out_dir, step, tokens, resumed_from, data_ran_out, cfg, layers, strategy
    )


def token_stream(
    data: Any,
    layers: Sequence[int],
    cfg: TrainConfig,
    world_size: int = 1,
    start: StreamPosition | None = None,
) -> Iterator[tuple[TokenBatch, StreamPosition]]:
    """The shuffled training batches of one process: cfg.batch_size / world_size loss tokens each.

    Every rank seeds its shuffle with cfg.seed (the ranks hold different tokens; a common seed keeps
    a store's shard order, and so its partition into ranks, the same everywhere).
    """
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"batch_size={cfg.batch_size} must be divisible by the {world_size} ranks: each rank "
            "draws batch_size / world_size tokens per step"
        )
    local_batch = cfg.batch_size // world_size
    buffer = max(cfg.buffer_tokens // world_size, local_batch)
    types = regime_token_types(cfg.regime, cfg.exclude_special, cfg.random_tokens)
    return shuffled_batches(data, layers, types, local_batch, buffer, cfg.seed, start)


def gather_trained_saes(
    result: TrainResult, init: Mapping[int, Any] | None, cfg: TrainConfig
) -> TrainResult:
    """The result with every layer's SAE (and warm start): the layers another rank trained are
    loaded from the folders it wrote, onto this process's device. A no-op in one process."""
    others = [L for L in result.sae_dirs if L not in result.saes]
    if not others:
        return result
    from mmdiff.sae import load_sae

    device = next(iter(result.saes.values())).W_dec.device
    for L in others:
        result.saes[L] = load_sae(result.sae_dirs[L], layer=L, device=device)
    if init is not None:  # the warm starts of the other layers too (decoder cosines)
        cfg = dataclasses.replace(cfg, device=str(device))
        result.init.update(build_saes({L: init[L] for L in others}, None, others, cfg)[1])
    return result


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
        group["lr"] = lr_at(step, base_lrs[L], cfg.lr_warmup_steps)
        sae = saes[L]
        x = batch.acts[L].to(device=device, dtype=torch.float32)  # [batch_size, d_in]
        with bf16_autocast(device, cfg.bf16):
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


METRICS_COLUMNS = ("step", "tokens", "layer", "loss", "fvu", "auxk_loss", "l0", "dead_fraction", "lr")
"""Columns of train_metrics.parquet, one row per logged step and layer."""


def stamp_training_metadata(
    saes: Mapping[int, Any], warm: Mapping[int, Any], cfg: "TrainConfig", step: int, tokens: int,
    **extra: Any,
) -> None:
    """Record in each SAE's metadata how it was trained (regime, tokens, steps, warm start, ...)."""
    for sae in saes.values():
        sae.cfg.metadata = {
            **sae.cfg.metadata,
            "regime": cfg.regime,
            "train_tokens": tokens,
            "train_steps": step,
            "warm_start": bool(warm) and cfg.regime != "random",
            **extra,
        }


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
    layers: Sequence[int],
    strategy: Local,
) -> TrainResult:
    """Write the SAE folders and (main process) the metrics table of every layer; drop the
    checkpoints unless asked to keep them."""
    import pandas as pd

    stamp_training_metadata(saes, warm, cfg, step, tokens, **strategy.metadata())
    if strategy.writes_saes():
        for L, sae in saes.items():
            sae.save(out_dir / f"layer_{L}")
    metrics = strategy.all_metrics(metrics)
    strategy.barrier()  # every SAE folder is written before the run is reported finished
    if strategy.is_main:
        write_parquet(out_dir / METRICS_FILE, pd.DataFrame(metrics, columns=list(METRICS_COLUMNS)))
        if not cfg.keep_checkpoint:
            shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return TrainResult(
        dict(saes), metrics, out_dir, {L: out_dir / f"layer_{L}" for L in layers}, steps=step,
        tokens=tokens, resumed_from_step=resumed_from, data_ran_out=data_ran_out, init=warm,
    )  # fmt: skip
