"""SAE training over torch.distributed ranks: layers sharded across ranks, or plain data parallel.

The loop is `sae/trainer.py:train_saes`, the same one a single process runs; this module holds its
two torchrun strategies (`LayerSharded`, `DataParallel`: how a step is distributed) and the
collectives they use. Both modes run the same data-parallel input: rank r draws its own stream of
batch_size / world_size tokens per step from its slice of the data (`shard_source`, `token_stream`),
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
    shard_records,
)
from mmdiff.errors import ConfigError, DataError
from mmdiff.sae.checkpoint import CHECKPOINT_DIR
from mmdiff.sae.loss import DeadLatents, constrain_decoder_grad, topk_loss
from mmdiff.sae.stream import CapturedActivations, TokenBatch, is_store
from mmdiff.sae.trainer import (
    Local,
    TrainConfig,
    TrainResult,
    bf16_autocast,
    gather_trained_saes,
    lr_at,
    train_saes,
)

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
        group["lr"] = lr_at(step, base_lrs[L], cfg.lr_warmup_steps)
        sae = saes[L]
        with bf16_autocast(device, cfg.bf16):
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
# the strategies: how `train_saes` distributes a step over the ranks
# =============================================================================================


class _Ranks(Local):
    """What both torchrun strategies share: this rank's slice of the data, per-rank checkpoints that
    resume from the newest step every rank holds, and a one-shot source that ends on all ranks."""

    mode: str = ""

    def __init__(self, presharded: bool = False) -> None:
        self.ctx = context()
        if not self.ctx.distributed:
            raise ConfigError(
                f"{type(self).__name__} trains over the ranks of torchrun, but this process is not "
                "one of them: call init_distributed() under torchrun, or use the local strategy"
            )
        self.world_size, self.rank, self.is_main = self.ctx.world_size, self.ctx.rank, self.ctx.is_main
        self.presharded = presharded
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.ctx.backend == "nccl"
            else torch.device("cpu")
        )

    @property
    def layout(self) -> str:
        return f"{self.mode}_world{self.world_size}"

    def describe(self) -> str:
        return f" ({self.mode}, rank {self.rank}/{self.world_size})"

    def metadata(self) -> dict[str, Any]:
        return {"distributed": {"mode": self.mode, "world_size": self.world_size}}

    def configure(self, cfg: TrainConfig, layers: Sequence[int]) -> TrainConfig:
        if cfg.device is None:  # this rank's device
            cfg = dataclasses.replace(cfg, device=str(self.ctx.device))
        return cfg

    def local_data(self, data: Any) -> Any:
        return data if self.presharded else shard_source(data, self.rank, self.world_size)

    def _rank_dir(self, out_dir: Path) -> Path:
        return out_dir / CHECKPOINT_DIR / self.layout / f"rank_{self.rank}"

    def resume_point(self, out_dir: Path) -> Path | None:
        rank_dir = self._rank_dir(out_dir)
        step = _resume_step(rank_dir.parent, rank_dir, self.layout)
        return None if step is None else rank_dir / f"step_{step:09d}"

    def save_checkpoint(self, out_dir: Path, step: int, write: Callable[[Path], None]) -> None:
        rank_dir = self._rank_dir(out_dir)
        write(rank_dir / f"step_{step:09d}")
        barrier()  # every rank holds `step` now: older checkpoints can go
        _prune(rank_dir, step)

    def data_ended(self, ended: bool, one_shot: bool) -> bool:
        if one_shot:  # a one-shot source may end on one rank only: all ranks stop together
            flag = torch.tensor([float(ended)], device=self.comm_device)
            return bool(all_reduce_max(flag).item())
        if ended:
            raise DataError(f"rank {self.rank}'s re-iterable data ended; this should not happen")
        return False

    def barrier(self) -> None:
        barrier()


class LayerSharded(_Ranks):
    """Layer L's SAE trains on rank `layer_owners(layers, world)[L]`; each step gathers every rank's
    tokens of L to its owner, which takes one ordinary `train_step` on the effective batch."""

    mode = "layers"

    def owned_layers(self, layers: Sequence[int]) -> list[int]:
        if self.world_size > len(layers):
            raise ConfigError(
                f"mode='layers' gives each rank at least one layer's SAE, but {self.world_size} ranks "
                f"share {len(layers)} layers: use mode='ddp', or train more layers / on fewer ranks"
            )
        self.owners = layer_owners(layers, self.world_size)
        return [L for L in layers if self.owners[L] == self.rank]

    def effective_batch(self, batch: TokenBatch) -> TokenBatch:
        return gather_to_owners(batch, self.owners, self.ctx, self.comm_device)

    def all_metrics(self, metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(
            (row for part in all_gather_object(metrics) for row in part),
            key=lambda r: (r["step"], r["layer"]),
        )


class DataParallel(_Ranks):
    """Every rank trains every layer's SAE on its local tokens; gradients are all-reduced so a step
    is the effective batch's step (`ddp_train_step`). Rank 0 writes the SAEs."""

    mode = "ddp"

    def init_decoder_bias_(self, saes: Mapping[int, Any], batch: TokenBatch, device: torch.device) -> None:
        n_global = batch.n * self.world_size
        ddp_init_decoder_bias_(saes, batch, device, n_global)

    def step(
        self, saes: Mapping[int, Any], optimizer: torch.optim.Optimizer, dead: DeadLatents,
        batch: TokenBatch, cfg: TrainConfig, step: int, base_lrs: Mapping[int, float],
        device: torch.device, log: bool,
    ) -> list[dict[str, Any]]:  # fmt: skip
        return ddp_train_step(
            saes, optimizer, dead, batch, cfg, step, base_lrs, device, cfg.batch_size, log
        )

    def writes_saes(self) -> bool:
        return self.is_main


STRATEGIES: dict[str, type[_Ranks]] = {"layers": LayerSharded, "ddp": DataParallel}


def training_strategy(mode: Mode = "layers", presharded: bool = False) -> Local:
    """How `train_saes` distributes a step in this process: `Local()` outside torchrun, else the
    strategy of `mode` ("layers": `LayerSharded`; "ddp": `DataParallel`)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, found {mode!r}")
    return STRATEGIES[mode](presharded) if context().distributed else Local()


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
    """`train_saes` over the ranks of torchrun with the strategy of `mode` (see `training_strategy`).

    Every rank calls it with the same arguments. `data` is the whole source (split here with
    `shard_source`), or this rank's slice with presharded=True. cfg.batch_size is the effective
    batch (all ranks together) and must be divisible by the world size; cfg.device None = this
    rank's device. With gather_saes=True the result holds every layer's SAE (and warm start), the
    others loaded from the folders their ranks wrote: what a study needs for its evaluation.
    """
    strategy = training_strategy(mode, presharded)
    result = train_saes(init, data, layers, cfg, out_dir, progress, strategy=strategy, on_step=on_step)
    return gather_trained_saes(result, init, cfg) if gather_saes else result
