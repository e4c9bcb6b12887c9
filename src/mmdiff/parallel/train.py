"""SAE training over torch.distributed ranks: layers sharded across ranks, or plain data parallel.

Both modes run the same data-parallel input: rank r draws its own stream of
batch_size / world_size tokens per step from its slice of the data (`shard_source`, `rank_stream`),
so the effective batch of a step is the concatenation of every rank's local batch (rank order).

- mode="layers": layer L's SAE lives on rank `layer_owners(layers, world)[L]` (round robin). Each
  step every rank sends its local tokens of layer L to L's owner (`torch.distributed.gather`), and
  the owner takes one ordinary `train_step` on the full effective batch. Memory per rank: the SAEs
  of its layers (and their Adam state) only; traffic per step: each token's activations once.
- mode="ddp": every rank holds every layer's SAE and computes the loss of its local tokens; the loss
  is normalised by the effective batch's total variance (two small all-reduces), so the sum of the
  ranks' gradients (all-reduced, asynchronously, layer by layer) is the gradient of the effective
  batch's loss. Memory per rank: every SAE; traffic per step: every gradient.

Either way a step equals a single-process step on the effective batch (up to floating-point
summation order), which tests/test_distributed.py checks against `train_saes` for both modes.

Checkpoints are per rank: out_dir/checkpoint/<mode>_world<N>/rank_<r>/step_<s>/ (each a
`save_checkpoint` folder: the rank's SAEs, Adam state, dead-latent counters, the rank's stream
position). A rank deletes its older checkpoints only after every rank has written the newer one
(a barrier), so after a kill of any rank at any moment the ranks share at least one step; a restart
with the same arguments resumes all ranks from the newest shared step.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mmdiff.distributed import (
    DistContext,
    all_gather_cat,
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    context,
    on_main,
    shard_records,
)
from mmdiff.errors import ConfigError, DataError
from mmdiff.sae.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_dims,
    data_fingerprint,
    init_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from mmdiff.sae.loss import DeadLatents, constrain_decoder_grad, topk_loss
from mmdiff.sae.stream import (
    CapturedActivations,
    StreamPosition,
    TokenBatch,
    is_store,
    shuffled_batches,
)
from mmdiff.sae.trainer import (
    METRICS_COLUMNS,
    METRICS_FILE,
    TrainConfig,
    TrainResult,
    _autocast,
    _lr_at,
    default_lr,
    init_decoder_bias_,
    make_optimizer,
    regime_token_types,
    stamp_training_metadata,
    train_saes,
    train_step,
    training_progress,
)
from mmdiff.sae.warm_start import build_saes

Mode = Literal["layers", "ddp"]
MODES: tuple[str, ...] = ("layers", "ddp")


# =============================================================================================
# what each rank reads and owns
# =============================================================================================


def layer_owners(layers: Sequence[int], world_size: int) -> dict[int, int]:
    """Layer -> the rank that trains its SAE in mode "layers": round robin over the sorted layers."""
    return {L: i % world_size for i, L in enumerate(sorted({int(L) for L in layers}))}


class RankStore:
    """An ActivationStore seen by one rank: every `iter_batches` reads shards r, r + world, ...

    The shard order is shuffled with the seed the trainer passes, the same on every rank, so the
    ranks' shards partition the store in every epoch.
    """

    def __init__(self, store: Any, rank: int, world_size: int) -> None:
        n = len(getattr(store, "shards", ()))
        if n < world_size:
            raise DataError(
                f"the activation store at {getattr(store, 'root', '?')} has {n} shards, fewer than "
                f"the {world_size} ranks: every rank needs at least one shard; capture with a smaller "
                "shard_tokens or train on fewer ranks"
            )
        self.store, self.rank, self.world_size = store, rank, world_size

    def iter_batches(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return self.store.iter_batches(*args, rank=self.rank, world_size=self.world_size, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def shard_source(data: Any, rank: int, world_size: int) -> Any:
    """This rank's slice of a training source: a store's shards, a capture's records, a list's items.

    - an ActivationStore (or anything with iter_batches / count_tokens): shards rank, rank + world, ...
    - `CapturedActivations` (live capture): the same capture over `shard_records(records)`;
    - a list or tuple of batches: items rank, rank + world, ...
    Other iterables cannot be split without running them on every rank: shard them yourself and
    pass presharded=True to `train_saes_distributed`.
    """
    if world_size == 1:
        return data
    if is_store(data):
        return RankStore(data, rank, world_size)
    if isinstance(data, CapturedActivations):
        mine = shard_records(data.records, rank, world_size)
        if not mine:
            raise DataError(f"{len(data.records)} records cannot feed {world_size} ranks")
        return CapturedActivations(
            data.adapter, mine, data.layers, data.side, data.batch_size, data.progress and rank == 0
        )
    if isinstance(data, (list, tuple)):
        mine = list(data)[rank::world_size]
        if not mine:
            raise DataError(
                f"{len(data)} batches cannot feed {world_size} ranks: give at least one per rank"
            )
        return mine
    raise DataError(
        f"cannot split a {type(data).__name__} across ranks: pass an ActivationStore, "
        "CapturedActivations or a list of batches, or give each rank its own data with presharded=True"
    )


def rank_stream(
    local_data: Any,
    layers: Sequence[int],
    cfg: TrainConfig,
    world_size: int,
    start: StreamPosition | None = None,
) -> Iterator[tuple[TokenBatch, StreamPosition]]:
    """A rank's token stream: batches of cfg.batch_size / world_size tokens from its slice.

    The shuffle is seeded with cfg.seed on every rank (the ranks hold different tokens; a common
    seed keeps a store's shard order, and so its partition into ranks, the same everywhere). With
    world_size 1 this is exactly `train_saes`'s stream.
    """
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"batch_size={cfg.batch_size} must be divisible by the {world_size} ranks: each rank "
            "draws batch_size / world_size tokens per step"
        )
    local_batch = cfg.batch_size // world_size
    buffer = max(cfg.buffer_tokens // world_size, local_batch)
    types = regime_token_types(cfg.regime, cfg.exclude_special, cfg.random_tokens)
    return shuffled_batches(local_data, layers, types, local_batch, buffer, cfg.seed, start)


# =============================================================================================
# collectives of one step
# =============================================================================================


def gather_to_owners(
    batch: TokenBatch, owners: Mapping[int, int], ctx: DistContext, comm_device: torch.device
) -> TokenBatch:
    """The effective batch of the layers this rank owns: every rank's local tokens, rank order.

    One `torch.distributed.gather` per owning rank, of its layers stacked: [n_local, n_owned, d].
    """
    import torch.distributed as dist

    mine: dict[int, Tensor] = {}
    for owner in range(ctx.world_size):
        owned = [L for L in sorted(owners) if owners[L] == owner]
        if not owned:
            continue
        send = torch.stack([batch.acts[L] for L in owned], 1).to(
            comm_device, non_blocking=True
        )  # [n_local, m, d]
        parts = (
            [torch.empty_like(send) for _ in range(ctx.world_size)] if owner == ctx.rank else None
        )
        dist.gather(send, parts, dst=owner)
        if parts is not None:
            full = torch.cat(parts)  # [n_local * world, m, d]
            mine = {L: full[:, i] for i, L in enumerate(owned)}
    types = all_gather_cat(batch.token_types.to(comm_device))  # [n_local * world], rank order
    return TokenBatch(mine, types.to(batch.token_types.device))


@torch.no_grad()
def ddp_init_decoder_bias_(
    saes: Mapping[int, Any], batch: TokenBatch, device: torch.device, n_global: int
) -> None:
    """b_dec = mean of the first effective batch (all ranks' tokens), in the SAE's scaled units."""
    order = sorted(saes)
    sums = torch.stack([batch.acts[L].to(device, torch.float32).sum(0) for L in order])  # [m, d]
    all_reduce_sum(sums)
    for i, L in enumerate(order):
        saes[L].b_dec.copy_(sums[i] / n_global * saes[L].cfg.norm_scale)


def _total_variances(xs: Sequence[Tensor], n_global: int) -> tuple[Tensor, Tensor]:
    """(local, global) total variance per layer, [m] each, without a host synchronisation.

    local = sum ||x - mean_local||^2 (what `topk_loss` divides by); global = the same over the
    effective batch, from an all-reduce of the sums and then of the squared deviations.
    """
    sums = all_reduce_sum(torch.stack([x.sum(0) for x in xs]))  # [m, d]
    mean = sums / n_global
    tv = all_reduce_sum(torch.stack([(x - mean[i]).pow(2).sum() for i, x in enumerate(xs)]))
    local = torch.stack([(x - x.mean(0)).pow(2).sum().clamp_min(1e-12) for x in xs])
    return local, tv.clamp_min(1e-12)


def ddp_train_step(
    saes: Mapping[int, Any],
    optimizer: torch.optim.Optimizer,
    dead: DeadLatents,
    batch: TokenBatch,
    cfg: TrainConfig,
    step: int,
    base_lrs: Mapping[int, float],
    device: torch.device,
    n_global: int,
    log: bool = True,
) -> list[dict[str, Any]]:
    """One data-parallel Adam step: the gradient of the effective batch's loss on every rank.

    The local loss is rescaled by local / global total variance, so the SUM over ranks of the local
    gradients is the effective batch's gradient; each layer's gradients are all-reduced
    asynchronously while the next layer computes. Dead-latent counters are updated with the latents
    that fired on any rank. No host synchronisation except the metrics of logged steps.
    """
    import torch.distributed as dist

    order = sorted(saes)
    optimizer.zero_grad(set_to_none=True)
    # pinned host batches (Prefetcher) copy asynchronously; the cast runs on the device
    xs = [batch.acts[L].to(device, non_blocking=True).float() for L in order]  # [n_local, d] each
    local_tv, global_tv = _total_variances(xs, n_global)
    scale = local_tv / global_tv  # [m]
    handles, fired, parts = [], {}, []
    for i, (group, L) in enumerate(zip(optimizer.param_groups, order)):
        group["lr"] = _lr_at(step, base_lrs[L], cfg.lr_warmup_steps)
        sae = saes[L]
        with _autocast(device, cfg.bf16):
            out = topk_loss(sae, xs[i], dead.mask(L), cfg.auxk_alpha)
        (out.loss * scale[i]).backward()
        for p in sae.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            handles.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))
        hit = (out.top_values > 0).to(torch.int32).flatten()  # [n_local * k]
        fired[L] = torch.zeros(sae.cfg.d_sae, dtype=torch.int32, device=device).scatter_add_(
            0, out.top_indices.flatten(), hit
        )  # [d_sae]: how often each latent fired here
        if log:
            parts.append(
                torch.stack(
                    [
                        out.loss.detach() * scale[i],
                        out.fvu.detach() * scale[i],
                        out.auxk.detach() * scale[i],
                        out.l0.detach() * xs[i].shape[0],
                    ]
                ).float()
            )
    sizes = [fired[L].numel() for L in order]
    fired_all = all_reduce_sum(torch.cat([fired[L] for L in order])).split(sizes)  # [d_sae] each
    for h in handles:
        h.wait()
    for i, L in enumerate(order):
        constrain_decoder_grad(saes[L])
        counts = dead.since_fired[L]
        counts.copy_(torch.where(fired_all[i] > 0, torch.zeros_like(counts), counts + n_global))
    optimizer.step()
    for sae in saes.values():
        sae.set_decoder_norm_to_unit_norm()
    if not log:
        return []
    totals = all_reduce_sum(torch.stack(parts)).tolist()  # [m, 4]: the only host sync, logged steps
    return [
        {
            "layer": L,
            "loss": totals[i][0],
            "fvu": totals[i][1],
            "auxk_loss": totals[i][2],
            "l0": totals[i][3] / n_global,
            "dead_fraction": dead.fraction(L),
            "lr": optimizer.param_groups[i]["lr"],
        }
        for i, L in enumerate(order)
    ]


# =============================================================================================
# per-rank checkpoints
# =============================================================================================


def _step_dirs(folder: Path) -> dict[int, Path]:
    """Complete step checkpoints in a rank's folder (atomic_dir renames whole folders into place)."""
    out = {}
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith("step_") and (p / "state.pt").is_file():
                out[int(p.name.removeprefix("step_"))] = p
    return out


def _prune(folder: Path, keep: int | None) -> None:
    """Delete every step checkpoint but `keep`, and temp folders a killed writer left."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        stale_step = p.name.startswith("step_") and (keep is None or p.name != f"step_{keep:09d}")
        if (stale_step or p.name.startswith(".")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _resume_step(ckpt_root: Path, rank_dir: Path, layout: str) -> int | None:
    """The newest step every rank has a checkpoint of (None: start from scratch); prunes the rest."""
    parent = ckpt_root.parent
    others = (
        [p.name for p in parent.iterdir() if p.is_dir() and p.name != layout]
        if parent.is_dir()
        else []
    )
    if others:
        raise ConfigError(
            f"{parent} holds checkpoints of another layout ({others}; this run is {layout!r}): resume "
            "with the same mode and number of ranks, or delete the folder to start over"
        )
    steps = all_gather_object(sorted(_step_dirs(rank_dir)))
    common = set(steps[0]).intersection(*map(set, steps[1:]))
    step = max(common) if common else None
    _prune(rank_dir, step)
    barrier()
    return step


# =============================================================================================
# the loop
# =============================================================================================


def train_saes_distributed(
    init: Mapping[int, Any] | None,
    data: Any,
    layers: Sequence[int],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    mode: Mode = "layers",
    presharded: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    gather_saes: bool = False,
) -> TrainResult:
    """`train_saes` over the ranks of torchrun: one TopK SAE per layer, written to out_dir/layer_<L>/.

    Every rank calls it with the same arguments. `data` is the whole source (split here with
    `shard_source`), or this rank's slice with presharded=True. mode="layers" trains each layer's
    SAE on one rank (see `layer_owners`); mode="ddp" trains every SAE on every rank with all-reduced
    gradients. cfg.batch_size is the effective batch (all ranks together) and must be divisible by
    the world size; cfg.device None = this rank's device. `on_step(step)` runs after every step.

    Returns this rank's TrainResult: `saes` holds the SAEs it trained (mode layers: its own layers;
    ddp: all), or every layer's with gather_saes=True (the others loaded from the folders their
    ranks wrote, onto this rank's device: what a study needs for its held-out evaluation);
    `metrics` and `sae_dirs` cover every layer. In a single process this is `train_saes`.
    """
    ctx = context()
    layers = sorted({int(L) for L in layers})
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, found {mode!r}")
    if not layers:
        raise ConfigError("train_saes_distributed needs at least one layer")
    if not ctx.distributed:
        return train_saes(init, data, layers, cfg, out_dir, progress)
    world, rank = ctx.world_size, ctx.rank
    if mode == "layers" and world > len(layers):
        raise ConfigError(
            f"mode='layers' gives each rank at least one layer's SAE, but {world} ranks share "
            f"{len(layers)} layers: use mode='ddp', or train more layers / on fewer ranks"
        )
    if cfg.device is None:
        cfg = dataclasses.replace(cfg, device=str(ctx.device))
    out_dir = Path(out_dir)
    local = data if presharded else shard_source(data, rank, world)
    owners = layer_owners(layers, world)
    mine = layers if mode == "ddp" else [L for L in layers if owners[L] == rank]
    layout = f"{mode}_world{world}"
    ckpt_root = out_dir / CHECKPOINT_DIR / layout
    rank_dir = ckpt_root / f"rank_{rank}"
    resume_at = _resume_step(ckpt_root, rank_dir, layout)
    sources = {"data": data_fingerprint(local), "init": init_fingerprint(init)}
    random_init = init is None or cfg.regime == "random"
    one_shot = not is_store(local) and iter(local) is local

    first: list[tuple[TokenBatch, StreamPosition]] = []
    stream = None
    if resume_at is not None:
        dims = checkpoint_dims(rank_dir / f"step_{resume_at:09d}", mine)
    elif init is None:  # the width comes from the data: peek at the first local batch
        stream = rank_stream(local, layers, cfg, world)
        first = [nxt] if (nxt := next(stream, None)) is not None else []
        if not first:
            raise DataError(
                f"rank {rank}'s data yields fewer than {cfg.batch_size // world} tokens"
            )
        dims = {L: int(first[0][0].acts[L].shape[-1]) for L in layers}
    else:
        dims = None
    init_mine = {L: init[L] for L in mine if L in init} if init is not None else None
    if init is not None and len(init_mine) < len(mine):
        raise ConfigError(f"no warm-start SAE for layers {sorted(set(mine) - set(init))}")
    saes, warm = build_saes(init_mine, dims, mine, cfg)
    device = next(iter(saes.values())).W_dec.device
    comm_device = (
        torch.device("cuda", torch.cuda.current_device())
        if ctx.backend == "nccl"
        else torch.device("cpu")
    )
    base_lrs = {L: cfg.lr or default_lr(saes[L].cfg.d_sae) for L in mine}
    optimizer = make_optimizer(saes, mine, base_lrs)
    dead = DeadLatents(
        {L: torch.zeros(saes[L].cfg.d_sae, dtype=torch.long, device=device) for L in mine},
        cfg.dead_tokens_threshold,
    )
    step, tokens, position, metrics = 0, 0, StreamPosition(), []
    if resume_at is not None:
        state, dead, position = load_checkpoint(
            rank_dir / f"step_{resume_at:09d}", saes, optimizer, cfg, sources
        )
        step, tokens, metrics = int(state["step"]), int(state["tokens"]), list(state["metrics"])
    if stream is None:
        stream = rank_stream(local, layers, cfg, world, position)
    batches = itertools.chain(first, stream)
    resumed_from, total_steps, data_ran_out = step, cfg.total_steps, False

    with training_progress(f"{cfg.regime} ({mode}, rank {rank}/{world})", mine, total_steps, step,
                           progress and ctx.is_main) as (bar, task):  # fmt: skip
        while step < total_steps:
            nxt = next(batches, None)
            if one_shot:  # a one-shot source may end on one rank only: all ranks stop together
                ended = all_reduce_max(torch.tensor([float(nxt is None)], device=comm_device))
                if bool(ended.item()):
                    data_ran_out = True
                    break
            elif nxt is None:
                raise DataError(f"rank {rank}'s re-iterable data ended; this should not happen")
            batch, position = nxt
            log = (step + 1) % cfg.log_every == 0 or step + 1 == total_steps
            if mode == "layers":
                full = gather_to_owners(batch, owners, ctx, comm_device)
                if step == 0 and random_init:
                    init_decoder_bias_(saes, full, device)
                rows = train_step(saes, optimizer, dead, full, cfg, step, base_lrs, device, log)
            else:
                if step == 0 and random_init:
                    ddp_init_decoder_bias_(saes, batch, device, cfg.batch_size)
                rows = ddp_train_step(
                    saes, optimizer, dead, batch, cfg, step, base_lrs, device, cfg.batch_size, log
                )
            step, tokens = step + 1, tokens + cfg.batch_size
            if log:
                metrics.extend({"step": step, "tokens": tokens, **r} for r in rows)
            bar.update(task, completed=step)
            if on_step is not None:
                on_step(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(rank_dir / f"step_{step:09d}", saes, optimizer, dead, position,
                                step, tokens, metrics, cfg, sources)  # fmt: skip
                barrier()  # every rank holds `step` now: older checkpoints can go
                _prune(rank_dir, step)
    if cfg.keep_checkpoint:
        save_checkpoint(rank_dir / f"step_{step:09d}", saes, optimizer, dead, position, step,
                        tokens, metrics, cfg, sources)  # fmt: skip
        barrier()
        _prune(rank_dir, step)
    result = _finish(saes, warm, metrics, out_dir, step, tokens, resumed_from, data_ran_out, cfg,
                     mode, layers, ctx)  # fmt: skip
    others = [L for L in layers if L not in result.saes]
    if gather_saes and others:
        from mmdiff.sae import load_sae

        for L in others:
            result.saes[L] = load_sae(out_dir / f"layer_{L}", layer=L, device=device)
        if init is not None:  # the warm starts of the other layers too (decoder cosines)
            result.init.update(build_saes({L: init[L] for L in others}, None, others, cfg)[1])
    return result


def _finish(
    saes: dict[int, Any],
    warm: dict[int, Any],
    metrics: list[dict[str, Any]],
    out_dir: Path,
    step: int,
    tokens: int,
    resumed_from: int,
    data_ran_out: bool,
    cfg: TrainConfig,
    mode: str,
    layers: list[int],
    ctx: DistContext,
) -> TrainResult:
    """Each layer's SAE written by the rank that trained it (ddp: rank 0); rank 0 writes the metrics
    table of all layers and drops the checkpoints (unless cfg.keep_checkpoint)."""
    import pandas as pd

    from mmdiff.atomic import write_parquet

    stamp_training_metadata(saes, warm, cfg, step, tokens,
                            distributed={"mode": mode, "world_size": ctx.world_size})
    if mode == "layers" or ctx.is_main:
        for L, sae in saes.items():
            sae.save(out_dir / f"layer_{L}")
    if mode == "layers":
        metrics = sorted(
            (row for part in all_gather_object(metrics) for row in part),
            key=lambda r: (r["step"], r["layer"]),
        )
    def write() -> None:
        write_parquet(out_dir / METRICS_FILE, pd.DataFrame(metrics, columns=list(METRICS_COLUMNS)))
        if not cfg.keep_checkpoint:
            shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)

    barrier()  # every SAE folder is written before rank 0 reports the run finished
    on_main(write)
    return TrainResult(
        dict(saes),
        metrics,
        out_dir,
        {L: out_dir / f"layer_{L}" for L in layers},
        step,
        tokens,
        resumed_from,
        data_ran_out,
        init=warm,
    )
