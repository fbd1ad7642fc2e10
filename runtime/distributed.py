"""Several processes through torch.distributed: which rank this is, its share of the samples, exact reductions.

optc has no scheduler or transport of its own. Under `torchrun` (or any launcher that sets
`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`), `init_from_env()` joins the
process group through torch.distributed's `env://` rendezvous: gloo on CPU, NCCL when CUDA is
available (each process on the GPU `LOCAL_RANK`). Without `WORLD_SIZE` (or with 1) everything
here is the single-process identity.

Calibration sample i goes to rank i mod WORLD_SIZE (`shard`). Statistics are then combined so that
every rank holds the same result and it matches the single-process one:

* maxima, minima and integer counts are exact whatever the order (`maximum`, `minimum`, `sum_int`);
* floating-point sums are accumulated in float64 and the per-rank partial sums are added in rank
  order, ((p0 + p1) + p2) + ..., passed along the ranks (`sum_in_rank_order`), so every run with
  the same world size gives the same bits, and they differ from the single-process sum only by
  float64 rounding (far below the float32 the statistics are used in).
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch

from optc.errors import OptcError, first_line

T = TypeVar("T")

#: How long a rank waits for the others in one collective (rank 0 exporting a large model while the
#: others wait for the cache is the longest); torchrun stops every rank when one fails anyway.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=6)


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        """The process that writes the outputs and reports (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError as exc:
        raise OptcError(f"{name}={text!r} is not an integer (it is set by torchrun for several processes)") from exc


def requested_world() -> World:
    """The world the launcher describes in the environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise OptcError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process of the run")
    return World(rank, size, _env_int("LOCAL_RANK", rank))


def init_from_env() -> World:
    """Join the process group the launcher set up (once per process); the single-process world without one."""
    world = requested_world()
    if not world.distributed:
        return world
    import torch.distributed as dist

    if not dist.is_available():
        raise OptcError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
            backend = "nccl"
        else:
            backend = "gloo"
        try:
            dist.init_process_group(backend=backend, init_method="env://", rank=world.rank, world_size=world.size,
                                    timeout=COLLECTIVE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - rendezvous failures come in several types
            detail = first_line(exc, limit=None)
            raise OptcError(f"cannot join the torch.distributed process group ({backend}, env://): {detail}") from exc
        atexit.register(_leave)
    return World(dist.get_rank(), dist.get_world_size(), world.local_rank)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> World:
    """The world this process joined (`init_from_env`); one process when it joined none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    return World()


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's share of `items`: item i when i mod WORLD_SIZE is the rank (all of them in one process)."""
    world = current()
    for index, item in enumerate(items):
        if index % world.size == world.rank:
            yield item


def barrier() -> None:
    """Wait until every rank reaches this point (nothing in one process)."""
    if current().distributed:
        import torch.distributed as dist

        dist.barrier()


def _device() -> torch.device:
    """Where collectives take their tensors: the process's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op_name: str) -> torch.Tensor:
    if not current().distributed:
        return tensor
    import torch.distributed as dist

    work = tensor.to(_device()).contiguous().clone()
    dist.all_reduce(work, op=getattr(dist.ReduceOp, op_name))
    return work.to(tensor.device)


def maximum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over the ranks (exact)."""
    return _all_reduce(tensor, "MAX")


def minimum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum over the ranks (exact)."""
    return _all_reduce(tensor, "MIN")


def sum_int(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of an integer tensor over the ranks (exact in any order)."""
    if tensor.is_floating_point():
        raise TypeError("sum_int takes integer tensors; use sum_in_rank_order for floating point")
    return _all_reduce(tensor.to(torch.int64), "SUM")


def sum_in_rank_order(tensor: torch.Tensor) -> torch.Tensor:
    """The float64 sum over the ranks, added in rank order ((p0 + p1) + p2 ...), the same bits on every rank.

    The running sum travels from rank 0 to the last rank, each adding its own part, and the last
    rank broadcasts it; memory holds two copies of the tensor whatever the number of ranks.
    """
    partial = tensor.to(torch.float64)
    world = current()
    if not world.distributed:
        return partial
    import torch.distributed as dist

    device = _device()
    running = partial.to(device).contiguous()
    if world.rank > 0:
        received = torch.empty_like(running)
        dist.recv(received, src=world.rank - 1)
        running = received.add_(running)
    if world.rank < world.size - 1:
        dist.send(running, dst=world.rank + 1)
    dist.broadcast(running, src=world.size - 1)
    return running.to(tensor.device)


#: Tensor dtypes `share_out` carries, by code.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
           torch.int32, torch.int64, torch.bool)
_MAX_RANK = 8


def share_out(items: Sequence[T], compute: Callable[[T], tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
    """`compute(item)` for every item, in order, on every rank, each computed by one rank (item i on rank
    i mod N) and broadcast to the others. `compute` returns the same number of tensors for every item.

    The ranks work in rounds of N items (one each), so memory holds N results at a time. The tensors
    arrive bit for bit as the rank that computed them made them.
    """
    world = current()
    if not world.distributed:
        for item in items:
            yield compute(item)
        return
    for start in range(0, len(items), world.size):
        mine = compute(items[start + world.rank]) if start + world.rank < len(items) else None
        for owner in range(min(world.size, len(items) - start)):
            yield _broadcast_tuple(mine if owner == world.rank else None, owner)


def _broadcast_tuple(tensors: tuple[torch.Tensor, ...] | None, src: int) -> tuple[torch.Tensor, ...]:
    import torch.distributed as dist

    device = _device()
    count = torch.tensor([len(tensors) if tensors is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(count, src=src)
    header = torch.zeros(int(count[0]), _MAX_RANK + 2, dtype=torch.int64, device=device)
    if tensors is not None:
        for i, t in enumerate(tensors):
            if t.dim() > _MAX_RANK:
                raise ValueError(f"share_out carries tensors of rank up to {_MAX_RANK}, got {t.dim()}")
            header[i, 0] = _DTYPES.index(t.dtype)
            header[i, 1] = t.dim()
            header[i, 2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(header, src=src)
    out = []
    for i in range(int(count[0])):
        dtype, rank = _DTYPES[int(header[i, 0])], int(header[i, 1])
        shape = [int(d) for d in header[i, 2:2 + rank]]
        if tensors is not None:
            data = tensors[i].detach().to(device).contiguous()
        else:
            data = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(data, src=src)
        out.append(data)
    return tuple(out)


__all__ = [
    "World",
    "barrier",
    "current",
    "init_from_env",
    "maximum",
    "minimum",
    "requested_world",
    "shard",
    "share_out",
    "sum_in_rank_order",
    "sum_int",
]
