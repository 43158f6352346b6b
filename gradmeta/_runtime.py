"""Process-level helpers: torch thread counts, ``torchrun`` process groups, the environment record."""
from __future__ import annotations

import contextlib
import os
import platform

import torch

__all__ = ["torch_threads", "distributed_context", "environment"]


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (``None`` or 0: leave it), restoring it after."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def distributed_context(backend: str | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the default process group is created here if none
    exists yet, with ``backend`` (default: NCCL when CUDA is available, else gloo). Outside
    ``torchrun``: ``(0, 1)``.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def environment() -> dict:
    """Versions and device of this process (recorded next to results)."""
    import numpy

    from . import __version__

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "numpy": numpy.__version__, "gradmeta": __version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
