"""Structured detector outputs: everything a distiller may need, in one typed place.

Conventions shared by every dense detector in kdlab (GFL, RetinaNet, FCOS, ...):

- ``B`` images per batch, ``N`` prediction slots per image, flattened over FPN levels in
  order P3, P4, ... and, inside a level, row-major over ``(y, x)`` then over the ``A`` anchors
  of a location (``N = sum_l H_l * W_l * A``). Teacher and student built with the same
  strides, anchors and input size have the same ``N`` and the same slot order, so their
  predictions correspond slot by slot.
- Boxes are ``(x1, y1, x2, y2)`` in pixels of the network input (the resized, unpadded image).
- Class labels are contiguous ``0 .. C-1``; ``C`` (== ``num_classes``) means background.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class DenseAssignment:
    """Label assignment of a dense detector for one batch.

    Attributes:
        labels: ``[B, N]`` int64, class of the assigned GT, ``num_classes`` for background.
        matched_gt: ``[B, N]`` int64, index into that image's ``gt_boxes``; ``-1`` if negative.
        pos_mask: ``[B, N]`` bool, positives (``matched_gt >= 0``).
        gt_boxes: per image ``[G_i, 4]`` xyxy ground-truth boxes (input pixels).
        gt_labels: per image ``[G_i]`` contiguous labels.
        ious: optional ``[B, N]`` IoU of each slot's anchor with its matched GT (0 if negative).
        candidate_idx: ATSS only, per image ``[G_i, K]`` slot indices of the candidates
            (top-k closest locations per level, ``K = sum_l min(k, N_l)``).
        iou_thr: ATSS only, per image ``[G_i]`` threshold ``mean + std`` of the candidates' IoU.
        ignore_mask: optional ``[B, N]`` bool, slots excluded from the classification loss
            (e.g. RetinaNet's between-threshold anchors).
    """

    labels: Tensor
    matched_gt: Tensor
    pos_mask: Tensor
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    ious: Tensor | None = None
    candidate_idx: list[Tensor] | None = None
    iou_thr: list[Tensor] | None = None
    ignore_mask: Tensor | None = None


@dataclass
class DenseOutput:
    """What one forward pass of a dense (one-stage) detector returns.

    Attributes:
        features: FPN maps, one ``[B, C_fpn, H_l, W_l]`` tensor per level (P3 first).
        cls_logits: ``[B, N, num_classes]`` raw classification logits (sigmoid-based heads).
        box_regression: ``[B, N, 4]`` the head's box output in its own parametrisation:
            GFL/FCOS ``(l, t, r, b)`` distances in units of the level's stride, RetinaNet
            ``(dx, dy, dw, dh)`` deltas w.r.t. the anchor.
        pred_boxes: ``[B, N, 4]`` decoded boxes, xyxy in input pixels.
        points: ``[N, 2]`` location centres ``(x, y)`` in input pixels.
        anchors: ``[N, 4]`` xyxy anchor box of each slot (GFL/ATSS: the square
            ``octave_base_scale * stride`` anchor; anchor-free heads: ``None``).
        strides: ``[N]`` float, stride of each slot's level.
        levels: ``[N]`` int64, FPN level index of each slot (0 = P3).
        num_per_level: number of slots per level (``sum == N``).
        image_sizes: ``(h, w)`` of each unpadded input image.
        box_logits: ``[B, N, 4 * (reg_max + 1)]`` edge-distribution logits for
            distribution heads (GFL and the GFL-style RetinaNet/FCOS variants), else ``None``.
        centerness: ``[B, N]`` centre-ness logits (FCOS), else ``None``.
        assignment: the label assignment, present when the forward was given targets.
        extras: detector-specific tensors (documented by each detector).
    """

    features: list[Tensor]
    cls_logits: Tensor
    box_regression: Tensor
    pred_boxes: Tensor
    points: Tensor
    anchors: Tensor | None
    strides: Tensor
    levels: Tensor
    num_per_level: list[int]
    image_sizes: list[tuple[int, int]]
    box_logits: Tensor | None = None
    centerness: Tensor | None = None
    assignment: DenseAssignment | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return self.cls_logits.shape[1]

    def detach(self) -> "DenseOutput":
        """A copy whose tensors are detached (used for the teacher's output)."""
        kwargs = {}
        for f in fields(self):
            kwargs[f.name] = _detach(getattr(self, f.name))
        return DenseOutput(**kwargs)


def _detach(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value
