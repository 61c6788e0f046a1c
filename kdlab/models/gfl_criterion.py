"""GFL's detection loss: QFL (1.0) + GIoU (2.0) + DFL (0.25), normalised as the reference code does.

- QFL is summed over all locations and classes and divided by the number of positives.
- GIoU and DFL are computed on positives, each weighted by the student's own (detached) max class score
  at that location, and divided by the sum of those weights (clamped to >= 1). DFL is averaged over the
  four edges.

Normalisers go through :func:`kdlab.utils.dist.reduce_normalizer`, so ``W`` processes with ``b`` images each
give the gradient of one process with ``W * b`` images.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from kdlab.losses.gfl import distribution_focal_loss, quality_focal_loss
from kdlab.models.base import Criterion
from kdlab.models.box_ops import aligned_box_iou, bbox2distance, distance2bbox
from kdlab.models.outputs import DenseOutput
from kdlab.utils.dist import reduce_normalizer


def gather_matched_gt(gt_boxes: list[Tensor], image_idx: Tensor, gt_idx: Tensor) -> Tensor:
    """``gt_boxes[image_idx[i]][gt_idx[i]]`` for every ``i``, without a Python loop -> ``[P, 4]``."""
    counts = torch.tensor([len(g) for g in gt_boxes], device=image_idx.device)
    offsets = torch.cumsum(counts, 0) - counts
    all_gt = torch.cat([g.reshape(-1, 4) for g in gt_boxes])
    return all_gt[offsets[image_idx] + gt_idx]


def positive_box_targets(output: DenseOutput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flat indices of the positives, their points and GT boxes (both in stride units), and strides.

    Returns:
        ``pos_idx`` ``[P]`` into the flattened ``B * N`` slots, ``points`` ``[P, 2]``,
        ``gt_boxes`` ``[P, 4]``, ``strides`` ``[P]``.
    """
    assignment = output.assignment
    num_slots = assignment.matched_gt.shape[1]
    pos_b, pos_n = assignment.pos_mask.nonzero(as_tuple=True)
    gt_boxes = gather_matched_gt(assignment.gt_boxes, pos_b, assignment.matched_gt[pos_b, pos_n])
    strides = output.strides[pos_n]
    points = output.points[pos_n] / strides[:, None]
    return pos_b * num_slots + pos_n, points, gt_boxes / strides[:, None], strides


class GFLCriterion(Criterion):
    """GFL loss. Returns unweighted ``loss_qfl``, ``loss_giou``, ``loss_dfl``.

    Args:
        num_classes: ``C``.
        reg_max: ``n`` (bins ``0..n``).
        loss_weights: ``(qfl, giou, dfl)``, GFL's ``(1.0, 2.0, 0.25)``.
    """

    def __init__(self, num_classes: int, reg_max: int = 16, loss_weights: tuple[float, float, float] = (1.0, 2.0, 0.25)):
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.weight_dict = {"loss_qfl": loss_weights[0], "loss_giou": loss_weights[1], "loss_dfl": loss_weights[2]}

    def forward(self, output: DenseOutput, targets: list[dict]) -> dict[str, Tensor]:
        if output.assignment is None:
            raise ValueError("GFLCriterion needs the ATSS assignment: call the detector with targets")
        assignment = output.assignment
        cls_logits = output.cls_logits.float().flatten(0, 1)  # [B*N, C]
        box_logits = output.box_logits.float().flatten(0, 1)  # [B*N, 4*(n+1)]
        labels = assignment.labels.flatten()  # [B*N]

        pos_idx, points, gt_boxes, _ = positive_box_targets(output)
        num_pos = reduce_normalizer(torch.tensor(float(pos_idx.numel()), device=cls_logits.device))

        quality = torch.zeros_like(labels, dtype=cls_logits.dtype)
        if pos_idx.numel():
            pos_ltrb = output.box_regression.float().flatten(0, 1)[pos_idx]  # [P, 4] stride units
            pos_boxes = distance2bbox(points, pos_ltrb)
            # the location weight: the student's own max class score, detached (GFL's DFL/GIoU weight)
            weight = cls_logits[pos_idx].detach().sigmoid().max(dim=1).values  # [P]
            quality[pos_idx] = aligned_box_iou(pos_boxes.detach(), gt_boxes).clamp(min=0)
            loss_giou = (generalized_box_iou_loss(pos_boxes, gt_boxes, reduction="none") * weight).sum()
            target_ltrb = bbox2distance(points, gt_boxes, self.reg_max - 0.01)  # [P, 4]
            dfl = distribution_focal_loss(box_logits[pos_idx].reshape(-1, self.reg_max + 1), target_ltrb.reshape(-1))
            loss_dfl = (dfl.reshape(-1, 4).mean(dim=1) * weight).sum()
            weight_sum = weight.sum()
        else:
            loss_giou = loss_dfl = box_logits.sum() * 0.0
            weight_sum = cls_logits.new_zeros(())
        weight_norm = reduce_normalizer(weight_sum)
        loss_qfl = quality_focal_loss(cls_logits, labels, quality).sum() / num_pos
        return {"loss_qfl": loss_qfl, "loss_giou": loss_giou / weight_norm, "loss_dfl": loss_dfl / weight_norm}
