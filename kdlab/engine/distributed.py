"""Process setup: devices, ``torchrun`` process groups, seeding.

``torchrun --nproc_per_node=W -m kdlab train cfg.yaml`` starts ``W`` processes with the
environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed`
reads them and joins the process group (``nccl`` on CUDA, ``gloo`` on CPU). Without them it is a
single process and nothing is initialised.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process runs.

    Attributes:
        rank: global rank (0 writes files and prints).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: this process' device.
        owns_group: the process group was created by :func:`init_distributed` (and is
            destroyed by :func:`cleanup_distributed`).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; ``"cuda"`` -> ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; use device=auto or cpu")
    return device


def init_distributed(device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group if the environment describes one.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (with ``torchrun`` and CUDA, each
            process takes GPU ``LOCAL_RANK``).

    Returns:
        The :class:`DistContext`; the backend is ``nccl`` for CUDA devices, ``gloo`` otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_obj = resolve_device(device, local_rank)
    if device_obj.type == "cuda":
        torch.cuda.set_device(device_obj)
    owns_group = False
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif world_size > 1:
        backend = "nccl" if device_obj.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        owns_group = True
    return DistContext(rank, world_size, local_rank, device_obj, owns_group)


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, pick deterministic kernels.

    On CPU the training step is deterministic for a fixed thread count. On CUDA, cuDNN autotuning
    is switched off and ``torch.use_deterministic_algorithms(warn_only=True)`` flags the rest.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
