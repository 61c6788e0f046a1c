"""Per-image groups of different sizes (GIs, boxes) laid out as a padded ``[B, K]`` grid."""

from __future__ import annotations

import torch
from torch import Tensor


def padded_layout(counts: list[int], device: torch.device | str | None = None) -> tuple[Tensor, Tensor, int]:
    """Where each element of a ragged batch goes in a padded grid of ``K = max(counts)`` per group.

    Args:
        counts: elements per group (image), in order; the elements are concatenated group by group.

    Returns:
        ``slot`` ``[sum(counts)]`` int64, each element's flat index into the ``[B * K]`` grid;
        ``valid`` ``[B, K]`` bool, which grid cells hold an element; and ``K``.
    """
    width = max(counts, default=0)
    column = torch.arange(width, device=device)
    valid = column[None] < torch.tensor(counts, device=device, dtype=torch.int64)[:, None]  # [B, K]
    slot = valid.flatten().nonzero().flatten()  # row-major: group by group, in order within a group
    return slot, valid, width
