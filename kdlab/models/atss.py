"""ATSS label assignment (Zhang et al., *Bridging the Gap Between Anchor-based and Anchor-free
Detection via Adaptive Training Sample Selection*, CVPR 2020), as GFL uses it.

For each GT box ``g``:

1. candidates ``C_g``: on every FPN level, the ``k = 9`` locations whose anchor centre is closest to the
   centre of ``g`` (L2 distance);
2. threshold ``t_g = mean(IoU(C_g, g)) + std(IoU(C_g, g))`` (unbiased std, as in the reference code);
3. positives of ``g``: candidates with ``IoU >= t_g`` whose anchor centre lies inside ``g``
   (every side further than 0.01 px from the centre).

A location that is a positive of several GTs takes the one with the highest IoU. The candidates and
thresholds are returned too: LD's valuable localization region is defined from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou


@dataclass
class ATSSResult:
    """ATSS assignment of one image (``N`` locations, ``G`` ground-truth boxes).

    Attributes:
        matched_gt: ``[N]`` int64 index of the assigned GT, ``-1`` for negatives.
        ious: ``[N, G]`` IoU of every anchor with every GT.
        candidate_idx: ``[G, K]`` location indices of each GT's candidates (``K = sum_l min(k, N_l)``).
        iou_thr: ``[G]`` the threshold ``mean + std`` of each GT's candidate IoUs.
    """

    matched_gt: Tensor
    ious: Tensor
    candidate_idx: Tensor
    iou_thr: Tensor


def atss_assign(anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, topk: int = 9) -> ATSSResult:
    """Assign ``N`` anchors to ``G`` GT boxes with ATSS.

    Args:
        anchors: ``[N, 4]`` xyxy anchor boxes, concatenated over levels in ``num_per_level`` order.
        num_per_level: number of anchors on each level.
        gt_boxes: ``[G, 4]`` xyxy GT boxes (``G`` may be 0).
        topk: candidates per level and GT.
    """
    num_anchors = anchors.shape[0]
    num_gt = gt_boxes.shape[0]
    if num_gt == 0:
        return ATSSResult(
            matched_gt=torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device),
            ious=anchors.new_zeros((num_anchors, 0)),
            candidate_idx=torch.zeros((0, 0), dtype=torch.long, device=anchors.device),
            iou_thr=anchors.new_zeros((0,)),
        )
    ious = box_iou(anchors, gt_boxes)  # [N, G]
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # [N, 2]
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [G, 2]
    distances = torch.cdist(anchor_centres, gt_centres)  # [N, G]

    candidates = []
    start = 0
    for n_level in num_per_level:
        k = min(topk, n_level)
        _, idx = distances[start : start + n_level].topk(k, dim=0, largest=False)  # [k, G]
        candidates.append(idx + start)
        start += n_level
    candidate_idx = torch.cat(candidates, dim=0)  # [K, G]
    gt_range = torch.arange(num_gt, device=anchors.device)
    candidate_ious = ious[candidate_idx, gt_range]  # [K, G]
    iou_thr = candidate_ious.mean(0) + candidate_ious.std(0)  # [G]
    is_pos = candidate_ious >= iou_thr[None, :]

    # the candidate's anchor centre must lie inside the GT box
    cx = anchor_centres[candidate_idx, 0]  # [K, G]
    cy = anchor_centres[candidate_idx, 1]
    inside = torch.stack(
        [cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy], dim=0
    ).amin(dim=0) > 0.01
    is_pos &= inside

    # keep the IoU only where (anchor, GT) is a positive pair; the highest IoU wins
    pos_ious = torch.full_like(ious, -1.0)  # [N, G]
    pos_anchor = candidate_idx[is_pos]
    pos_gt = gt_range.expand_as(candidate_idx)[is_pos]
    pos_ious[pos_anchor, pos_gt] = ious[pos_anchor, pos_gt]
    best_iou, best_gt = pos_ious.max(dim=1)
    matched_gt = torch.where(best_iou >= 0, best_gt, torch.full_like(best_gt, -1))
    return ATSSResult(matched_gt=matched_gt, ious=ious, candidate_idx=candidate_idx.t().contiguous(), iou_thr=iou_thr)
