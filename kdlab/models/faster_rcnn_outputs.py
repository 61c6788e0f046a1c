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

from dataclasses import dataclass, fields

from torch import Tensor


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
class TwoStageOutput:
    """Faster R-CNN's internals for one batch.

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
    """

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

    @property
    def rois_per_image(self) -> list[int]:
        return [len(r) for r in self.rois]

    def detach(self) -> "TwoStageOutput":
        """A copy whose tensors are detached (used for the teacher's output)."""
        kwargs = {f.name: _detach(getattr(self, f.name)) for f in fields(self)}
        for name in ("rpn_assignment", "roi_assignment"):
            value = kwargs[name]
            if value is not None:
                kwargs[name] = type(value)(**{f.name: _detach(getattr(value, f.name)) for f in fields(value)})
        return TwoStageOutput(**kwargs)


def _detach(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value
