"""What one forward pass of kdlab's Faster R-CNN returns: both stages, exposed.

Conventions: ``B`` images; ``A`` RPN anchors per image, flattened over FPN levels (P2 first)
and, inside a level, row-major over ``(y, x)`` then over the anchors of a location (the order
of torchvision's ``concat_box_prediction_layers``); ``R`` RoIs, image by image (image 0's RoIs
first, ``rois_per_image`` of them). Boxes are xyxy in input pixels.

Box-head class columns follow torchvision: column 0 is the background and kdlab label ``l`` is
column ``l + label_offset`` (``label_offset`` is 1, or 0 for a model that keeps torchvision's
label space, e.g. COCO weights, whose label 0 is the background slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from kdlab.models.outputs import DenseOutput, DetectorOutput


def inferred_strides(features: list[Tensor], image_sizes: list[tuple[int, int]]) -> list[int]:
    """Stride of each map as torchvision's ``MultiScaleRoIAlign`` infers it:
    ``2^round(log2(image side / map side))`` with the largest unpadded image height."""
    max_height = max(h for h, _ in image_sizes)
    return [2 ** round(math.log2(max_height / f.shape[-2])) for f in features]


@dataclass
class RPNAssignment:
    """The RPN's anchor labels and the anchors sampled for its loss.

    Attributes:
        objectness_targets: ``[B, A]`` float, 1 object (IoU >= 0.7, or a GT's best anchor),
            0 background (IoU < 0.3), -1 ignored.
        matched_gt: ``[B, A]`` int64 index into the image's GT boxes for objects, else -1.
        sampled_pos: ``[B, A]`` bool, objects drawn for the loss (at most 128 per image).
        sampled_neg: ``[B, A]`` bool, backgrounds drawn for the loss (256 minus the positives).
    """

    objectness_targets: Tensor
    matched_gt: Tensor
    sampled_pos: Tensor
    sampled_neg: Tensor


@dataclass
class RoIAssignment:
    """The RoIs sampled for the box head's loss (proposals plus the GT boxes themselves).

    Attributes:
        labels: ``[R]`` int64 kdlab label of the matched GT (IoU >= 0.5), ``num_classes`` for
            background (IoU < 0.5).
        matched_gt: ``[R]`` int64 index into the image's GT boxes, -1 for background.
        regression_targets: ``[R, 4]`` encoded GT w.r.t. the RoI (``BoxCoder(10, 10, 5, 5)``;
            meaningless for background rows, as in torchvision).
    """

    labels: Tensor
    matched_gt: Tensor
    regression_targets: Tensor


@dataclass
class TwoStageOutput(DetectorOutput):
    """Faster R-CNN's internals for one batch.

    Its dense stage is the RPN: :meth:`dense_slots` presents the RPN's anchors, objectness (one
    class) and deltas as a :class:`~kdlab.models.outputs.DenseOutput`, which is what GID distils
    for two-stage detectors (METHODS.md §2).

    Attributes:
        features: FPN maps ``[B, C_fpn, H_l, W_l]`` (P2 ... P5 and the max-pooled P6 used by
            the RPN only).
        feature_names: torchvision's name of each map (``"0"`` ... ``"3"``, ``"pool"``).
        rpn_objectness: ``[B, A]`` objectness logits.
        rpn_deltas: ``[B, A, 4]`` anchor deltas ``(dx, dy, dw, dh)`` (``BoxCoder`` weights 1).
        anchors: ``[A, 4]`` xyxy anchors (the same for every image of the batch).
        anchor_levels: ``[A]`` int64 FPN level of each anchor (0 = P2).
        num_anchors_per_level: anchors per level (``sum == A``).
        proposals: per image ``[P_i, 4]`` RPN proposals after NMS (detached).
        proposal_scores: per image ``[P_i]`` their objectness probabilities.
        rois: per image ``[R_i, 4]`` boxes the box head ran on: the sampled proposals (+GT)
            when the forward had targets, else all proposals.
        roi_features: ``[R, C_fpn, 7, 7]`` RoIAlign features of the RoIs (``R = sum R_i``).
        box_features: ``[R, D]`` the box head's representation (``D = 1024``).
        class_logits: ``[R, K]`` softmax logits, column 0 = background (see module docstring).
        box_deltas: ``[R, 4 K]`` class-specific deltas (``BoxCoder(10, 10, 5, 5)``).
        image_sizes: ``(h, w)`` of each unpadded image.
        label_offset: kdlab label ``l`` is class column ``l + label_offset``.
        gt_boxes, gt_labels: per image targets (kdlab labels) when the forward had targets.
        rpn_assignment, roi_assignment: present when the forward had targets.
        rpn_box_coder_weights: the RPN's ``BoxCoder`` weights (torchvision's ``(1, 1, 1, 1)``).
        rpn_positive_iou: the RPN's positive IoU threshold (0.7), its own rule for a slot and a box.
    """

    kind: ClassVar[str] = "two_stage"

    features: list[Tensor]
    feature_names: list[str]
    rpn_objectness: Tensor
    rpn_deltas: Tensor
    anchors: Tensor
    anchor_levels: Tensor
    num_anchors_per_level: list[int]
    proposals: list[Tensor]
    proposal_scores: list[Tensor]
    rois: list[Tensor]
    roi_features: Tensor
    box_features: Tensor
    class_logits: Tensor
    box_deltas: Tensor
    image_sizes: list[tuple[int, int]]
    label_offset: int = 1
    gt_boxes: list[Tensor] | None = None
    gt_labels: list[Tensor] | None = None
    rpn_assignment: RPNAssignment | None = None
    roi_assignment: RoIAssignment | None = None
    rpn_box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    rpn_positive_iou: float = 0.7

    @property
    def rois_per_image(self) -> list[int]:
        return [len(r) for r in self.rois]

    @property
    def detector_name(self) -> str:
        return "Faster R-CNN (two-stage)"

    @property
    def feature_strides(self) -> list[int]:
        """Stride of each map, inferred as torchvision's ``MultiScaleRoIAlign`` does:
        ``2^round(log2(image side / map side))`` with the largest unpadded image height."""
        return inferred_strides(self.features, self.image_sizes)

    def dense_slots(self, method: str = "this method", who: str = "model") -> DenseOutput:
        """The RPN as a dense detector: ``cls_logits`` ``[B, A, 1]`` objectness, ``box_regression``
        its deltas, ``pred_boxes`` every anchor's decoded box, the anchors with their levels."""
        return self._rpn_slots

    @cached_property
    def _rpn_slots(self) -> DenseOutput:
        # built once and cached, whoever asks first: GISM asks under ``torch.no_grad()``, and a view made
        # there would be cut from the graph for every later reader (GID's response loss on the RPN
        # objectness got no gradient that way); ops on tensors without grad still build no graph
        with torch.enable_grad():
            return self._build_rpn_slots()

    def _build_rpn_slots(self) -> DenseOutput:
        strides = torch.tensor(self.feature_strides, dtype=self.anchors.dtype, device=self.anchors.device)
        return DenseOutput(
            features=self.features, cls_logits=self.rpn_objectness[..., None], box_regression=self.rpn_deltas,
            pred_boxes=decode_rpn_boxes(self.rpn_deltas, self.anchors, self.rpn_box_coder_weights),
            points=(self.anchors[:, :2] + self.anchors[:, 2:]) / 2, anchors=self.anchors,
            strides=strides[self.anchor_levels], levels=self.anchor_levels,
            num_per_level=list(self.num_anchors_per_level), image_sizes=self.image_sizes,
            assign_rule=("anchor_iou", self.rpn_positive_iou), source="Faster R-CNN's RPN",
        )


def decode_rpn_boxes(rpn_deltas: Tensor, anchors: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Every anchor's RPN box (the proposal before top-k and NMS), in float32.

    ``cx = cx_a + dx w_a``, ``w = w_a exp(dw)`` (same for y, h): torchvision's ``BoxCoder`` with
    the RPN's weights.

    Args:
        rpn_deltas: ``[B, A, 4]`` RPN deltas.
        anchors: ``[A, 4]`` xyxy anchors, the same for every image.

    Returns:
        ``[B, A, 4]`` xyxy boxes.
    """
    batch, num_anchors, _ = rpn_deltas.shape
    flat = BoxCoder(weights=weights).decode_single(rpn_deltas.float().reshape(-1, 4), anchors.float().repeat(batch, 1))
    return flat.view(batch, num_anchors, 4)
