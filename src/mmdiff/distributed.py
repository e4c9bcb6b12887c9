"""torch.distributed under torchrun: process-group setup, rank helpers, record sharding, collectives,
rank-0-only writes.

Every mmdiff entry point calls `init_distributed()` once. Under `torchrun` (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment) it joins the process group: gloo on CPU,
NCCL on CUDA, with the CUDA device set from LOCAL_RANK. Started any other way it does nothing and
every helper below behaves as a world of one, so the same code runs on a laptop and on a cluster.

What is sharded how (docs/distributed.md has the whole picture):
- records: `shard_records` gives rank r the records r, r + world, ... of a list every rank builds
  in the same order (checked with `check_same_everywhere`);
- per-feature statistics: each rank accumulates its records, then `parallel.stats.all_reduce_stats`;
- SAE training: `mmdiff.parallel.train` (layers sharded across ranks, or plain data parallel).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from mmdiff.errors import ConfigError

T = TypeVar("T")
TORCHRUN_VARS: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size, its local rank and compute device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable value
    backend: str | None = None  # None = single process, no process group

    @property
    def is_main(self) -> bool:
        """True on the rank that writes shared artifacts (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name} must be an integer (torchrun sets it), found {raw!r}"
        ) from None


def init_distributed(
    backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistContext:
    """Join the torchrun process group described by the environment; a no-op in a single process.

    backend: None = NCCL when CUDA is available, else gloo. The CUDA device is set from LOCAL_RANK.
    Calling it again returns the context of the group already joined. `timeout_s` bounds how long
    a collective waits for a missing rank (a killed rank fails the others instead of hanging them).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return context()
    present = [v for v in TORCHRUN_VARS if v in os.environ]
    if not present:
        return DistContext()
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(
            f"torch.distributed environment is incomplete: {present} are set but {missing} are not; "
            "start with `torchrun --nproc_per_node N -m mmdiff ...`, or unset "
            f"{present} to run as a single process"
        )
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    if world == 1:
        return DistContext(local_rank=local, device=_device_for(local, backend))
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; install a build that has it")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("backend nccl needs CUDA, which this process cannot see; use gloo")
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPUs: start at "
                "most one process per GPU (torchrun --nproc_per_node <= GPUs)"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(
        backend=backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world
    )
    # leave the group at exit: a process that exits with the group's threads alive aborts
    atexit.register(destroy_distributed)
    return context()


def _device_for(local_rank: int, backend: str | None) -> torch.device:
    if backend != "gloo" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def context() -> DistContext:
    """The current process's DistContext (a world of one when no process group is initialised)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistContext(local_rank=local, device=_device_for(local, None))
    backend = str(dist.get_backend())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device, backend)


def destroy_distributed() -> None:
    """Leave the process group (no-op when none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return context().rank


def get_world_size() -> int:
    return context().world_size


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return context().is_main


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# ---------------------------------------------------------------------------------- sharding


def shard_records(
    records: Sequence[T], rank: int | None = None, world_size: int | None = None
) -> list[T]:
    """Rank r's records: r, r + world, r + 2 world, ... (every record on exactly one rank).

    Strided, so ranks get equal counts (within one) whatever the order of lengths; deterministic
    given the list, which every rank must build in the same order (see `check_same_everywhere`).
    """
    ctx = context()
    rank = ctx.rank if rank is None else int(rank)
    world = ctx.world_size if world_size is None else int(world_size)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(
            f"rank must lie in [0, world_size) with world_size >= 1, found rank={rank}, world_size={world}"
        )
    return list(records)[rank::world]


def check_same_everywhere(value: Any, what: str) -> None:
    """Raise on every rank unless all ranks hold the same `value` (compared by a JSON hash).

    Use it on the record ids before sharding: ranks that listed a dataset in another order would
    otherwise silently capture overlapping records and miss others.
    """
    ctx = context()
    if not ctx.distributed:
        return
    key = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    keys = all_gather_object(key)
    if len(set(keys)) > 1:
        differ = [r for r, k in enumerate(keys) if k != keys[0]]
        raise ConfigError(
            f"{what} differ between ranks (ranks {differ} disagree with rank 0): every rank must "
            "build the same list in the same order; check that all nodes read the same dataset files"
        )


# ---------------------------------------------------------------------------------- collectives


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it (unchanged in a single process)."""
    import torch.distributed as dist

    if context().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks, in place."""
    import torch.distributed as dist

    if context().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects; small ones only)."""
    import torch.distributed as dist

    ctx = context()
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, rank order (same shape on every rank)."""
    import torch.distributed as dist

    ctx = context()
    if not ctx.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s obj on every rank."""
    import torch.distributed as dist

    if not context().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------- writes


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run `fn(*args, **kwargs)` on rank 0 only, then wait for every rank; rank 0's result on rank 0,
    None elsewhere. An exception on rank 0 is re-raised there after telling the other ranks, which
    raise too, so no rank waits forever at the barrier.
    """
    ctx = context()
    if not ctx.distributed:
        return fn(*args, **kwargs)
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised below after telling the others
            error = exc
    failed = broadcast_object(None if error is None else repr(error))
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"rank 0 failed while writing a shared artifact: {failed}")
    return result


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. builds a cache), the other ranks after it finished."""
    ctx = context()
    if ctx.distributed and not ctx.is_main:
        barrier()
    yield
    if ctx.distributed and ctx.is_main:
        barrier()
