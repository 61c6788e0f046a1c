"""GFL's pieces (Li et al., *Generalized Focal Loss*, NeurIPS 2020): the box as a distribution.

Each box edge is a discrete distribution over the distances ``{0, 1, ..., n}`` (``n = reg_max``)
in units of the FPN level's stride; the predicted distance is its expectation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def integral(edge_logits: Tensor, reg_max: int) -> Tensor:
    """Expected distance of each edge: ``y_hat = sum_i softmax(logits)_i * i``, ``i = 0..reg_max``.

    Args:
        edge_logits: ``[..., 4 * (reg_max + 1)]`` (four edges l, t, r, b) or ``[..., reg_max + 1]``
            (one edge).
        reg_max: the largest distance ``n`` (GFL: 16, i.e. 17 bins).
    Returns:
        ``[..., 4]`` (or ``[...]`` for one edge) distances in ``[0, reg_max]``.
    """
    n_bins = reg_max + 1
    if edge_logits.shape[-1] == 4 * n_bins:
        edge_logits = edge_logits.reshape(*edge_logits.shape[:-1], 4, n_bins)
    elif edge_logits.shape[-1] != n_bins:
        raise ValueError(
            f"edge_logits has {edge_logits.shape[-1]} entries in its last dimension; expected "
            f"reg_max + 1 = {n_bins} (one edge) or 4 * (reg_max + 1) = {4 * n_bins} (four edges)"
        )
    bins = torch.arange(n_bins, dtype=edge_logits.dtype, device=edge_logits.device)
    return F.softmax(edge_logits, dim=-1) @ bins


def distance_to_distribution(distance: Tensor, reg_max: int) -> Tensor:
    """Inverse of :func:`integral`: the two-bin distribution whose expectation is ``distance``.

    ``y`` in ``[0, n)`` puts ``(y_r - y)`` on bin ``y_l = floor(y)`` and ``(y - y_l)`` on
    ``y_r = y_l + 1`` (this is DFL's target). Returns ``[..., n + 1]`` probabilities.
    """
    if (distance < 0).any() or (distance >= reg_max).any():
        raise ValueError(f"distances must lie in [0, reg_max={reg_max}); clamp them first (GFL uses reg_max - 0.01)")
    left = distance.floor().long()
    w_left = (left + 1).to(distance.dtype) - distance
    w_right = distance - left.to(distance.dtype)
    probs = torch.zeros(*distance.shape, reg_max + 1, dtype=distance.dtype, device=distance.device)
    probs.scatter_(-1, left.unsqueeze(-1), w_left.unsqueeze(-1))
    probs.scatter_add_(-1, (left + 1).unsqueeze(-1), w_right.unsqueeze(-1))
    return probs


def distribution_focal_loss(edge_logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss, per edge.

    ``DFL(S, y) = -((y_r - y) log S_{y_l} + (y - y_l) log S_{y_r})`` with ``S = softmax(logits)``,
    ``y_l = floor(y)``, ``y_r = y_l + 1``.

    Args:
        edge_logits: ``[M, n + 1]`` logits of ``M`` edges.
        target: ``[M]`` continuous target distances in ``[0, n)``.
    Returns:
        ``[M]`` unreduced loss.
    """
    left = target.long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    return (
        F.cross_entropy(edge_logits, left, reduction="none") * w_left
        + F.cross_entropy(edge_logits, right, reduction="none") * w_right
    )


def quality_focal_loss(cls_logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss: a sigmoid focal loss whose positive target is the IoU quality ``y``.

    ``QFL(sigma) = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log sigma)`` for the labelled class of a
    positive; every other (location, class) pair has target 0: ``-sigma^beta log(1 - sigma)``.

    Args:
        cls_logits: ``[M, C]`` logits.
        labels: ``[M]`` int64 class in ``[0, C)`` for positives, ``C`` (or any value ``>= C``) for
            background.
        quality: ``[M]`` IoU targets in ``[0, 1]`` (ignored for background).
        beta: focusing parameter (2 in GFL).
    Returns:
        ``[M]`` loss summed over classes.
    """
    num_classes = cls_logits.shape[1]
    sigma = cls_logits.sigmoid()
    # negatives (and the non-labelled classes of positives): target 0
    loss = F.binary_cross_entropy_with_logits(cls_logits, torch.zeros_like(cls_logits), reduction="none") * sigma.pow(beta)
    pos = ((labels >= 0) & (labels < num_classes)).nonzero(as_tuple=True)[0]
    if pos.numel():
        pos_label = labels[pos]
        pos_logits = cls_logits[pos, pos_label]
        y = quality[pos].to(cls_logits.dtype)
        scale = (y - sigma[pos, pos_label]).abs().pow(beta)
        loss[pos, pos_label] = F.binary_cross_entropy_with_logits(pos_logits, y, reduction="none") * scale
    return loss.sum(dim=1)
