"""The data-parallel context of this process: rank, world size and the few collectives the
trainers use outside the engine (logging sums, barriers around rank 0's writes).

With no process group (the CPU default, `cluster.num_replicas=1`) every helper is the identity,
so the in-process path pays nothing."""

from __future__ import annotations

from typing import Sequence

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def backend(cuda: bool) -> str:
    """The process group's backend: gloo on CPU; with GPUs NCCL for CUDA tensors (FSDP2's
    collectives) and gloo for the CPU tensors of the helpers below (logging sums, micro-batch
    counts), which an NCCL-only group refuses ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def initialized() -> bool:
    """Whether this process is in a process group (of any size)."""
    return _dist() is not None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def all_sum(values: Sequence[float]) -> list[float]:
    """Each value summed over the replicas (one all-reduce); the values themselves without a group."""
    d = _dist()
    if not d:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    d.all_reduce(t, op=d.ReduceOp.SUM)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the replicas, in place (a CPU tensor on gloo); `t` itself without a group."""
    d = _dist()
    if d:
        d.all_reduce(t, op=d.ReduceOp.SUM)
    return t


def all_min(value: float) -> float:
    """The smallest of the replicas' values (e.g. whether every replica found a cache entry)."""
    d = _dist()
    if not d:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    d.all_reduce(t, op=d.ReduceOp.MIN)
    return float(t.item())


def all_max(value: int) -> int:
    """The largest of the replicas' values (e.g. a micro-batch count every replica must run)."""
    d = _dist()
    if not d:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return int(t.item())


def shard_range(n: int, parts: int | None = None, index: int | None = None) -> range:
    """Replica `index`'s contiguous share of `n` items split into `parts` (default: this process's
    rank and the world size); the first `n % parts` replicas take one more."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))
