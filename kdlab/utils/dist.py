"""Small torch.distributed helpers that are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over processes (identity in a single process).

    Loss normalisers (number of positives, summed weights) go through this so that a run on
    ``W`` processes with ``b`` images each computes the same gradient as one process with
    ``W * b`` images: DDP averages gradients, and each rank divides by the *global* mean.
    """
    if not is_dist():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / get_world_size()


def all_gather_object(obj) -> list:
    """Gather a picklable object from every process (``[obj]`` in a single process)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_normalizer(value: torch.Tensor, minimum: float = 1.0) -> torch.Tensor:
    """A loss normaliser (number of positives, summed location weights) that makes DDP exact.

    One process with the whole batch divides by ``max(S, minimum)`` where ``S`` is the batch total.
    With ``W`` processes DDP averages the gradients of the per-rank losses, so each rank must divide
    by ``max(S, minimum) / W = max(mean_r S_r, minimum / W)``: the clamp is applied to the mean *after*
    scaling the minimum. (The reference mmdet code clamps the mean at ``minimum``, which differs from a
    single big batch whenever ``S < minimum``, e.g. early in training when GFL's weights are ~0.01.)
    """
    return reduce_mean(value.detach().float()).clamp(min=minimum / get_world_size())
