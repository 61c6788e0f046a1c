"""GID's three distillation losses and its response masks (METHODS.md §2), one equation per function.

Notation: ``K`` general instances (GIs), ``f_t^k``/``f_s^k`` their RoIAligned teacher/student
features (``C x S x S``), ``M`` masked head outputs. Every normaliser can be given explicitly so
that the distiller can pass a count averaged over processes (``kdlab.utils.dist.reduce_mean``):
then a run on ``W`` processes equals one process with the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.common import zero_with_grad
from kdlab.models.box_ops import points_in_boxes
from kdlab.utils.ragged import padded_layout

MASK_RULES = ("anchor_iou", "center")


def gi_feature_loss(teacher_features: Tensor, student_features: Tensor,
                    num_instances: Tensor | float | None = None) -> Tensor:
    """Feature-based loss: squared L2 between GI features, averaged over GIs and cells.

    ``L_feature = 1 / (K S²) Σ_k Σ_{cells} ||f_t^k − f_s^k||²`` (the squared norm runs over channels).

    Args:
        teacher_features: ``[K, C, S, S]`` pooled teacher features.
        student_features: ``[K, C, S, S]`` pooled (and adapted) student features.
        num_instances: ``K`` to divide by (default: ``teacher_features.shape[0]``, at least 1).

    Returns:
        scalar loss (0 when ``K == 0``).
    """
    if teacher_features.shape != student_features.shape:
        raise ValueError(
            f"GI feature shapes differ: teacher {tuple(teacher_features.shape)}, student {tuple(student_features.shape)} "
            "(an adapter must map the student's channels to the teacher's)"
        )
    if teacher_features.shape[0] == 0:
        return zero_with_grad(student_features)
    cells = teacher_features.shape[-2] * teacher_features.shape[-1]
    if num_instances is None:
        num_instances = teacher_features.shape[0]
    squared_error = (student_features.float() - teacher_features.float()).pow(2).sum()
    return squared_error / (torch.as_tensor(num_instances).clamp(min=1) * cells)


def normalized_distances(features: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise Euclidean distances divided by their off-diagonal mean.

    ``ψ(f^i, f^j) = ||f^i − f^j||₂ / μ``, ``μ = 1 / (K² − K) Σ_{i≠j} ||f^i − f^j||₂``.

    Args:
        features: ``[K, D]`` flattened GI features (``K >= 2``).

    Returns:
        ``[K, K]`` normalised distances (0 on the diagonal); scaling ``features`` leaves it unchanged.
    """
    num = features.shape[0]
    # ||a − b||² = ||a||² + ||b||² − 2 a·b: no [K, K, D] intermediate (K can be 10 x batch size);
    # the clamp keeps sqrt's gradient finite at zero distances (the diagonal)
    features = features - features.mean(dim=0, keepdim=True)  # distances are shift-invariant; less cancellation
    sq_norms = features.pow(2).sum(dim=1)
    squared = sq_norms[:, None] + sq_norms[None, :] - 2.0 * features @ features.T
    off_diagonal = ~torch.eye(num, dtype=torch.bool, device=features.device)
    distances = squared.clamp(min=eps).sqrt() * off_diagonal
    mean_distance = distances.sum() / (num * num - num)
    return distances / mean_distance.clamp(min=eps)


def gi_relation_loss(teacher_features: Tensor, student_features: Tensor, beta: float = 1.0) -> Tensor:
    """Relation-based loss over the ``K² − K`` ordered GI pairs of one group.

    ``L_relation = 1 / (K² − K) Σ_{i≠j} smoothL1_β( ψ(f_t^i, f_t^j) − ψ(f_s^i, f_s^j) )``, ``β = 1``,
    with ``ψ`` from :func:`normalized_distances`. Teacher and student may have different
    feature sizes: each network's distances are computed in its own space.

    Args:
        teacher_features: ``[K, ...]`` teacher GI features (flattened inside).
        student_features: ``[K, ...]`` student GI features.
        beta: smooth-L1 transition point.

    Returns:
        scalar loss; 0 (still in the graph) when ``K < 3``, as the paper skips such groups.
    """
    num = teacher_features.shape[0]
    if student_features.shape[0] != num:
        raise ValueError(f"relation loss needs as many teacher as student GIs, got {num} and {student_features.shape[0]}")
    if num < 3:
        return zero_with_grad(student_features)
    teacher_psi = normalized_distances(teacher_features.reshape(num, -1).float())
    student_psi = normalized_distances(student_features.reshape(num, -1).float())
    # the diagonal is 0 on both sides, so summing all K² entries and dividing by K² − K is the off-diagonal mean
    return F.smooth_l1_loss(student_psi, teacher_psi, beta=beta, reduction="sum") / (num * num - num)


def gi_relation_loss_groups(teacher_features: Tensor, student_features: Tensor, counts: list[int],
                            beta: float = 1.0, min_instances: int = 3) -> tuple[Tensor, int]:
    """:func:`gi_relation_loss` of every group (image) at once: ``(sum over groups, groups used)``.

    The GIs of group ``g`` are rows ``sum(counts[:g]) ...`` of the features. Groups with fewer than
    ``min_instances`` GIs are skipped, as the paper does. The groups are padded to the largest
    and the padded pairs masked out, so the result equals summing :func:`gi_relation_loss` over
    the groups (tested), with a few batched matrix products instead of a loop per image.

    Args:
        teacher_features: ``[sum(counts), ...]`` teacher GI features.
        student_features: ``[sum(counts), ...]`` student GI features.
        counts: GIs per group.
        beta: smooth-L1 transition point.
        min_instances: smallest group that counts (3).

    Returns:
        the summed loss (a zero still in the student's graph when no group counts) and the number
        of groups that counted.
    """
    total = sum(counts)
    if teacher_features.shape[0] != total or student_features.shape[0] != total:
        raise ValueError(f"relation loss: counts sum to {total} but got {teacher_features.shape[0]} teacher and "
                         f"{student_features.shape[0]} student GIs")
    used = [g for g, n in enumerate(counts) if n >= min_instances]
    if not used:
        return zero_with_grad(student_features), 0
    device = student_features.device
    _, valid, width = padded_layout([counts[g] for g in used], device)  # [G, width] grid of the used groups
    offsets = torch.tensor([0, *counts[:-1]], device=device).cumsum(0)[used]  # [G] first row of each group
    rows = torch.where(valid, offsets[:, None] + torch.arange(width, device=device)[None], 0)  # padding: row 0, masked
    sizes = valid.sum(dim=1).float()  # [G]
    pairs = valid[:, :, None] & valid[:, None, :] & ~torch.eye(width, dtype=torch.bool, device=device)
    num_pairs = sizes * sizes - sizes  # [G]

    full = len(used) == len(counts) and all(n == width for n in counts)  # every group has `width` GIs: a view

    def psi(features: Tensor) -> Tensor:
        flat = features.reshape(features.shape[0], -1).float()
        flat = flat.view(len(used), width, -1) if full else flat[rows]  # [G, width, D]
        # distances are shift-invariant: centring each group (padding rows included) only limits cancellation
        flat = flat - flat.mean(dim=1, keepdim=True)
        sq_norms = flat.pow(2).sum(dim=2)
        squared = sq_norms[:, :, None] + sq_norms[:, None, :] - 2.0 * torch.bmm(flat, flat.transpose(1, 2))
        distances = squared.clamp(min=1e-12).sqrt() * pairs
        mean_distance = distances.sum(dim=(1, 2)) / num_pairs
        return distances / mean_distance.clamp(min=1e-12)[:, None, None]

    per_pair = F.smooth_l1_loss(psi(student_features), psi(teacher_features), beta=beta, reduction="none")
    return ((per_pair * pairs).sum(dim=(1, 2)) / num_pairs).sum(), len(used)


def response_cls_loss(student_logits: Tensor, teacher_logits: Tensor, num_outputs: Tensor | float | None = None) -> Tensor:
    """Response-based classification loss on the masked outputs.

    ``L_cls = 1 / M Σ_{m} Σ_c BCE(σ(s_{mc}), σ(t_{mc}))``, ``BCE(p, q) = −q log p − (1 − q) log(1 − p)``.
    Not zero at ``s = t`` (it is then the teacher's entropy) but its gradient is.

    Args:
        student_logits: ``[M, C]`` student logits of the masked slots.
        teacher_logits: ``[M, C]`` teacher logits of the same slots.
        num_outputs: ``M`` to divide by (default: ``student_logits.shape[0]``, at least 1).
    """
    return _mean_over_outputs(lambda s, t: F.binary_cross_entropy_with_logits(s, t.sigmoid(), reduction="sum"),
                              student_logits, teacher_logits, num_outputs, "logits")


def response_reg_loss(student_deltas: Tensor, teacher_deltas: Tensor, num_outputs: Tensor | float | None = None) -> Tensor:
    """Response-based regression loss on the masked outputs.

    ``L_reg = 1 / M Σ_{m} ||δ_s^m − δ_t^m||₁`` over the head's own box parametrisation
    (RetinaNet/RPN ``(dx, dy, dw, dh)``, FCOS ``(l, t, r, b)``).

    Args:
        student_deltas: ``[M, 4]`` student box outputs of the masked slots.
        teacher_deltas: ``[M, 4]`` teacher box outputs of the same slots.
        num_outputs: ``M`` to divide by (default: ``student_deltas.shape[0]``, at least 1).
    """
    return _mean_over_outputs(lambda s, t: F.l1_loss(s, t, reduction="sum"), student_deltas, teacher_deltas,
                              num_outputs, "box outputs")


def _mean_over_outputs(loss_sum, student: Tensor, teacher: Tensor, num_outputs: Tensor | float | None, what: str) -> Tensor:
    """``loss_sum(student, teacher) / max(1, M)`` in float32, ``M = num_outputs`` or ``student.shape[0]``."""
    if student.shape != teacher.shape:
        raise ValueError(f"response {what} differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    if num_outputs is None:
        num_outputs = student.shape[0]
    return loss_sum(student.float(), teacher.float()) / torch.as_tensor(num_outputs).clamp(min=1)


def response_mask(anchors: Tensor | None, points: Tensor, gi_boxes: list[Tensor], rule: str,
                  iou_threshold: float, low_quality: bool = False) -> Tensor:
    """Distillation mask ``[B, N]`` bool: the slots tied to some GI by the detector's own rule.

    ``anchor_iou``: ``max_k IoU(a, GI_k) >= t``; with ``low_quality`` also, for each GI, the anchors
    tied for its highest IoU, however low (RetinaNet's matcher in the released code: torchvision's
    and detectron2's ``Matcher(allow_low_quality_matches=True)``, whose mask is ``matches >= 0``;
    like them, a GI overlapping no anchor at all would keep every anchor at its maximum, 0).
    ``center``: the location lies strictly inside some GI.

    Args:
        anchors: ``[N, 4]`` anchors (``rule="anchor_iou"``).
        points: ``[N, 2]`` location centres (``rule="center"``).
        gi_boxes: per image ``[K_i, 4]`` GI boxes.
        rule: ``"anchor_iou"`` (RetinaNet, RPN) or ``"center"`` (FCOS).
        iou_threshold: IoU a slot's anchor needs with a GI (``anchor_iou`` only).
        low_quality: add each GI's best-overlapping anchors (``anchor_iou`` only; GID's official variant).
    """
    if rule == "anchor_iou":
        if anchors is None:
            raise ValueError("the 'anchor_iou' response mask needs anchors, but this detector's output has none")
        num_slots = anchors.shape[0]
    elif rule == "center":
        num_slots = points.shape[0]
    else:
        raise ValueError(f"response mask rule must be one of {MASK_RULES}, got {rule!r}")
    batch = len(gi_boxes)
    slot, valid, width = padded_layout([int(b.shape[0]) for b in gi_boxes], points.device)
    if width == 0:
        return torch.zeros(batch, num_slots, dtype=torch.bool, device=points.device)
    # every image against its own GIs only, padded to the same count: [B, K, 4] and [B, K] valid
    all_boxes = torch.cat(gi_boxes).float()
    boxes = all_boxes.new_zeros(batch * width, 4).index_copy(0, slot, all_boxes).view(batch, width, 4)
    if rule == "anchor_iou":
        gx1, gy1, gx2, gy2 = (boxes[..., i][:, None, :] for i in range(4))  # [B, 1, K] each
        # IoU >= t  <=>  inter (1 + t) >= t (area_a + area_g) when inter > 0: no division; one
        # contiguous [B, N, K] tensor per step
        ax1, ay1, ax2, ay2 = (anchors[:, i].float()[None, :, None] for i in range(4))  # [1, N, 1] each
        inter = (torch.minimum(ax2, gx2) - torch.maximum(ax1, gx1)).clamp(min=0) * \
                (torch.minimum(ay2, gy2) - torch.maximum(ay1, gy1)).clamp(min=0)  # [B, N, K]
        areas = (ax2 - ax1) * (ay2 - ay1) + (gx2 - gx1) * (gy2 - gy1)  # [B, N, K]
        hits = (inter * (1.0 + iou_threshold) >= iou_threshold * areas) & (inter > 0)
        if low_quality:
            # the IoU as torchvision's box_iou computes it (same operations, so the same ties)
            iou = inter / (areas - inter)  # [B, N, K]
            hits = hits | (iou == iou.amax(dim=1, keepdim=True))  # each GI's best anchor(s)
    else:
        hits = points_in_boxes(points.float()[None], boxes)  # [B, N, K]
    return (hits & valid[:, None, :]).any(dim=2)  # [B, N]: some GI of that image hits the slot
