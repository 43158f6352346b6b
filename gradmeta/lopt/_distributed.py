"""Splitting the inner runs of an outer trainer across processes (``torchrun``).

Every rank draws the same perturbations and batches (same generator), runs only its contiguous
share of the particles, and the ranks then

* all-reduce (sum) the per-particle contributions to the meta-gradient and the meta-loss;
* all-gather the new particle states, so every rank holds the full state (checkpoints written by
  rank 0 are complete, and a resumed run may use a different number of ranks).

The backend is gloo on CPU and NCCL when CUDA is available.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Comm", "LocalComm", "ProcessGroupComm", "comm_from_env"]


class Comm:
    """Collective operations used by the outer trainers; the base class is the single-process case."""

    rank, world_size = 0, 1

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over ranks (a new tensor)."""
        return x

    def all_gather_cat(self, x: Tensor) -> Tensor:
        """The ``x`` of every rank concatenated along axis 0 in rank order (equal shapes required)."""
        return x

    def share(self, n: int) -> slice:
        """The contiguous share of ``n`` items that this rank runs; ``n`` must divide evenly."""
        if n % self.world_size:
            raise ValueError(f"gradmeta.lopt: {n} particle pairs cannot be split evenly over {self.world_size} "
                             "ranks; choose outer.particles / 2 divisible by the number of processes")
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)


class LocalComm(Comm):
    """One process: every collective is the identity."""


class ProcessGroupComm(Comm):
    """Collectives over the default ``torch.distributed`` process group."""

    def __init__(self):
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupComm: torch.distributed is not initialized")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        y = x.detach().to(self._device).clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)

    def all_gather_cat(self, x: Tensor) -> Tensor:
        y = x.detach().to(self._device).contiguous()
        out = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(out, y)
        return torch.cat(out, 0).to(x.device)


def comm_from_env() -> Comm:
    """A :class:`ProcessGroupComm` when launched by ``torchrun`` with ``WORLD_SIZE > 1`` (the process
    group is initialised here if needed, by :func:`gradmeta._runtime.distributed_context`: gloo on
    CPU, NCCL on GPU with this rank's ``LOCAL_RANK`` device), else :class:`LocalComm`."""
    from gradmeta._runtime import distributed_context

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LocalComm()
    if not dist.is_initialized() and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _, world = distributed_context()
    return ProcessGroupComm() if world > 1 else LocalComm()
