"""LD's Valuable Localization Region (VLR): where the teacher's box distributions are worth
distilling although the location is not a positive.

For each GT box ``g`` with ATSS threshold ``thr_g = mean + std`` of its candidates' IoUs, a
location whose anchor ``a`` satisfies::

    alpha * thr_g  <=  DIoU(a, g)  <  thr_g          (alpha = 0.25)

lies in ``g``'s VLR. DIoU is taken with **every** anchor of the image (not only the candidates).
A location in several VLRs takes the GT with the highest IoU. The paper uses the region as a
binary mask; the released code stores that IoU and uses it as a per-location weight: both are
offered (``weighting="mask" | "iou"``).

Paper vs released code (METHODS.md §1): the released "DIoU" is ``inter / area(a) - rho^2 / c^2``
(an IoF over the anchor's area, then DIoU's penalty; :func:`kdlab.models.box_ops.distance_box_iof`),
so its region is ``alpha * thr_g <= IoF(a, g) - rho^2/c^2 < thr_g``. ``rule="diou"`` (the paper, the
default) or ``rule="iof_diou"`` (the released code, LD's ``variant="official"``). The thresholds
``thr_g`` and the IoU that ranks GTs and weights locations are the true IoU under both rules.

Anchor-free heads (FCOS) have no anchor box for the DIoU: the released code uses the negative
locations whose point lies inside a GT box, weighted by the student's max class score
(:func:`anchor_free_vlr`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou, distance_box_iou

from kdlab.models.atss import atss_assign
from kdlab.models.box_ops import distance_box_iof, points_in_boxes
from kdlab.models.outputs import DenseOutput

VLR_WEIGHTINGS = ("mask", "iou")
# the overlap the region bounds: the paper's DIoU, or the released code's IoF minus the DIoU penalty
VLR_RULES = {"diou": distance_box_iou, "iof_diou": distance_box_iof}


@dataclass
class VLR:
    """The valuable localization region of one image (``N`` locations).

    Attributes:
        weight: ``[N]`` per-location weight: 1 (mask) or the IoU with the assigned GT (iou),
            0 outside the region.
        matched_gt: ``[N]`` int64 index of the GT whose VLR the location belongs to, ``-1`` outside.
        iou: ``[N]`` IoU of the location's anchor with that GT (0 outside).
    """

    weight: Tensor
    matched_gt: Tensor
    iou: Tensor

    @property
    def mask(self) -> Tensor:
        """``[N]`` bool, locations in the region."""
        return self.matched_gt >= 0


def candidate_iou_threshold(anchors: Tensor, gt_boxes: Tensor, candidate_idx: Tensor) -> Tensor:
    """ATSS threshold of each GT: ``thr_g = mean(IoU(C_g, g)) + std(IoU(C_g, g))``.

    ``std`` is the unbiased one, as in ATSS's reference code.

    Args:
        anchors: ``[N, 4]`` xyxy anchor boxes.
        gt_boxes: ``[G, 4]`` xyxy GT boxes.
        candidate_idx: ``[G, K]`` indices into ``anchors`` of each GT's ATSS candidates.

    Returns:
        ``[G]`` thresholds.
    """
    if candidate_idx.shape[0] != gt_boxes.shape[0]:
        raise ValueError(f"candidate_idx has {candidate_idx.shape[0]} rows for {gt_boxes.shape[0]} GT boxes")
    if gt_boxes.shape[0] == 0:
        return anchors.new_zeros((0,))
    ious = box_iou(anchors, gt_boxes)  # [N, G]
    candidate_ious = ious[candidate_idx, torch.arange(gt_boxes.shape[0], device=anchors.device)[:, None]]  # [G, K]
    return candidate_ious.mean(dim=1) + candidate_ious.std(dim=1)


def valuable_localization_region(
    anchors: Tensor, gt_boxes: Tensor, iou_thr: Tensor, alpha: float = 0.25, weighting: str = "mask",
    rule: str = "diou",
) -> VLR:
    """The VLR of one image: ``alpha * thr_g <= DIoU(anchor, g) < thr_g``, highest-IoU GT wins.

    Leading batch dimensions are allowed on the GT side (``[..., G, 4]``, ``[..., G]``): the anchors
    are shared, so a batch is one call (pad with zero boxes and threshold 0: they are in no region).

    Args:
        anchors: ``[N, 4]`` xyxy anchor box of every location (input pixels).
        gt_boxes: ``[G, 4]`` (or ``[..., G, 4]``) xyxy GT boxes (``G`` may be 0).
        iou_thr: ``[G]`` (or ``[..., G]``) ATSS threshold of each GT (``DenseAssignment.iou_thr`` or
            :func:`candidate_iou_threshold`).
        alpha: lower bound of the region as a fraction of the threshold (LD: 0.25).
        weighting: ``"mask"`` (paper: weight 1 in the region) or ``"iou"`` (released code: the IoU
            with the assigned GT).
        rule: the overlap bounded by the thresholds: ``"diou"`` (paper, ``IoU - rho^2/c^2``) or
            ``"iof_diou"`` (released code, ``inter / area(anchor) - rho^2/c^2``).

    Returns:
        :class:`VLR` with ``[N]`` (or ``[..., N]``) weight, matched GT and IoU.
    """
    if weighting not in VLR_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {VLR_WEIGHTINGS}, got {weighting!r}")
    if rule not in VLR_RULES:
        raise ValueError(f"VLR rule must be one of {tuple(VLR_RULES)}, got {rule!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if gt_boxes.dim() < 2 or gt_boxes.shape[-1] != 4 or iou_thr.shape != gt_boxes.shape[:-1]:
        raise ValueError(f"iou_thr has shape {tuple(iou_thr.shape)}; expected {tuple(gt_boxes.shape[:-1])}, one per GT box "
                         f"of gt_boxes {tuple(gt_boxes.shape)}")
    batch_shape, num_gt, num_locations = gt_boxes.shape[:-2], gt_boxes.shape[-2], anchors.shape[0]
    if num_gt == 0:
        zeros = anchors.new_zeros((*batch_shape, num_locations))
        return VLR(weight=zeros, matched_gt=torch.full(zeros.shape, -1, dtype=torch.long, device=anchors.device), iou=zeros)
    anchors, flat_gt, iou_thr = anchors.float(), gt_boxes.float().reshape(-1, 4), iou_thr.float()
    ious = box_iou(anchors, flat_gt).reshape(num_locations, *batch_shape, num_gt).movedim(0, -2)  # [..., N, G]
    overlap = VLR_RULES[rule](anchors, flat_gt).reshape(num_locations, *batch_shape, num_gt).movedim(0, -2)  # [..., N, G]
    thr = iou_thr[..., None, :]  # [..., 1, G]
    in_region = (overlap >= alpha * thr) & (overlap < thr)  # [..., N, G]
    # a location in several GTs' regions takes the GT with the highest IoU
    best_iou, best_gt = torch.where(in_region, ious, torch.full_like(ious, -1.0)).max(dim=-1)  # [..., N]
    inside = in_region.any(dim=-1)
    matched_gt = torch.where(inside, best_gt, torch.full_like(best_gt, -1))
    iou = torch.where(inside, best_iou, torch.zeros_like(best_iou))
    weight = inside.float() if weighting == "mask" else iou
    return VLR(weight=weight, matched_gt=matched_gt, iou=iou)


def anchor_free_vlr(points: Tensor, gt_boxes: Tensor, pos_mask: Tensor, student_cls_logits: Tensor) -> Tensor:
    """The released code's VLR for anchor-free heads (FCOS): negatives inside a GT box.

    ``w_i = max_c sigma(s_cls[i, c])`` (detached) for every location ``i`` that is not a positive and
    whose point lies strictly inside at least one GT box; 0 elsewhere.

    Args:
        points: ``[N, 2]`` location centres ``(x, y)``.
        gt_boxes: ``[G, 4]`` xyxy GT boxes.
        pos_mask: ``[N]`` bool, the positives of the detector's own assignment.
        student_cls_logits: ``[N, C]`` the student's class logits.

    Returns:
        ``[N]`` weights.
    """
    if gt_boxes.shape[0] == 0:
        return points.new_zeros((points.shape[0],))
    region = points_in_boxes(points, gt_boxes).any(dim=1) & ~pos_mask
    score = student_cls_logits.detach().float().sigmoid().max(dim=1).values
    return torch.where(region, score, torch.zeros_like(score))


def vlr_weights(output: DenseOutput, alpha: float = 0.25, weighting: str = "mask", atss_topk: int = 9,
                rule: str = "diou") -> Tensor:
    """Per-location VLR weights of a batch, from a detector's output and its assignment.

    - Anchor-based heads (``output.anchors`` present): :func:`valuable_localization_region` with the
      thresholds of the ATSS assignment (``assignment.iou_thr``); heads assigned otherwise (e.g.
      RetinaNet's max-IoU rule) get the ATSS thresholds computed here with ``atss_topk`` candidates
      per level, as the released code does.
    - Anchor-free heads (``output.anchors is None``, FCOS): :func:`anchor_free_vlr`.

    Args:
        output: the student's :class:`~kdlab.models.outputs.DenseOutput`, computed with targets.
        alpha, weighting, rule: see :func:`valuable_localization_region` (``rule``: anchor-based heads only).
        atss_topk: ATSS candidates per level when the assignment carries no thresholds.

    Returns:
        ``[B, N]`` weights (0 outside the region).
    """
    assignment = output.assignment
    if assignment is None:
        raise ValueError("the VLR needs the student's label assignment: run the student with targets")
    if output.anchors is None:
        return torch.stack([anchor_free_vlr(output.points, gt_boxes, assignment.pos_mask[b], output.cls_logits[b])
                            for b, gt_boxes in enumerate(assignment.gt_boxes)])  # [B, N]
    # one call for the batch: GTs padded to the largest count with zero boxes of threshold 0 (in no region)
    num_images, max_gt = len(assignment.gt_boxes), max([len(g) for g in assignment.gt_boxes] + [0])
    padded_gt = output.anchors.new_zeros((num_images, max_gt, 4))
    padded_thr = output.anchors.new_zeros((num_images, max_gt))
    for b, gt_boxes in enumerate(assignment.gt_boxes):
        if assignment.iou_thr is not None:
            iou_thr = assignment.iou_thr[b]
        else:
            iou_thr = atss_assign(output.anchors, output.num_per_level, gt_boxes.float(), atss_topk).iou_thr
        padded_gt[b, : len(gt_boxes)] = gt_boxes
        padded_thr[b, : len(gt_boxes)] = iou_thr
    return valuable_localization_region(output.anchors, padded_gt, padded_thr, alpha, weighting, rule).weight  # [B, N]
