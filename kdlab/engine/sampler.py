"""A deterministic, resumable batch sampler with ``DistributedSampler`` semantics.

Epoch ``e`` visits the dataset in the order ``randperm(n, seed + e)`` (a function of the seed
and the epoch only, exactly ``torch.utils.data.DistributedSampler``'s order). With ``W``
processes:

- training: the order is padded by repeating its head to a multiple of ``W`` and rank ``r`` takes
  positions ``r, r + W, r + 2W, ...`` (every rank gets the same number of batches);
- evaluation: no shuffle, no padding, rank ``r`` takes images ``r, r + W, ...`` (nothing is
  dropped or counted twice).

Consecutive ``batch_size`` indices of a rank's share form its batches, so batch ``j`` of the
``W`` ranks together holds the same images as batch ``j`` of one process with batch size
``W * batch_size``. :meth:`set_epoch` can start an epoch at batch ``k`` (mid-epoch resume).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices, one list per batch of this process.

    Args:
        num_samples: dataset length ``n``.
        batch_size: images per batch on this process.
        shuffle: training order (shuffled and padded) if ``True``, evaluation order otherwise.
        seed: base seed of the per-epoch permutation.
        rank: this process' rank.
        world_size: number of processes ``W``.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"ResumableBatchSampler: the dataset is empty (num_samples={num_samples})")
        if batch_size < 1:
            raise ValueError(f"ResumableBatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableBatchSampler: rank {rank} is not in [0, {world_size})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_batch`` (0-based) on."""
        if not 0 <= start_batch <= self.batches_per_epoch():
            raise ValueError(f"start_batch {start_batch} is outside [0, {self.batches_per_epoch()}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def rank_indices(self) -> list[int]:
        """This rank's dataset indices for the current epoch, in visiting order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
            total = math.ceil(self.num_samples / self.world_size) * self.world_size
            order += (order * math.ceil(total / len(order)))[: total - len(order)]  # pad with the head
        else:
            order = list(range(self.num_samples))
        return order[self.rank :: self.world_size]

    def batches_per_epoch(self) -> int:
        """Batches of this rank in a whole epoch."""
        if self.shuffle:
            per_rank = math.ceil(self.num_samples / self.world_size)
        else:
            per_rank = len(range(self.rank, self.num_samples, self.world_size))
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        indices = self.rank_indices()
        for start in range(self.start_batch * self.batch_size, len(indices), self.batch_size):
            yield indices[start : start + self.batch_size]

    def __len__(self) -> int:
        """Batches left in the current epoch (from ``start_batch``)."""
        return self.batches_per_epoch() - self.start_batch
