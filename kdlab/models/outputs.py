"""Structured detector outputs: everything a distiller may need, in one typed place.

Every output class implements :class:`DetectorOutput`, the small interface distillers read:

- ``features`` (FPN maps, finest first) with ``feature_strides`` and ``image_sizes``;
- ``dense_slots()``: the per-slot predictions of the detector's dense stage as a :class:`DenseOutput`
  (one-stage detectors: the output itself; Faster R-CNN: its RPN);
- ``require(name, method, who)``: a field a method needs, or one clear :class:`MissingOutputError`
  naming the method, the model and the missing piece.

A distiller never asks which detector produced an output. The kinds are ``"dense"``
(:class:`DenseOutput`), ``"two_stage"`` (:class:`~kdlab.models.faster_rcnn_outputs.TwoStageOutput`)
and ``"set"`` (:class:`~kdlab.models.detr_outputs.SetOutput`, DETR-style set prediction).

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

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

PIECES = {
    "box_logits": "edge-distribution box logits (a GFL-style head: GFL, or RetinaNet/FCOS built with reg_max)",
    "anchors": "anchor boxes (an anchor-based head; FCOS is anchor-free)",
    "assignment": "the label assignment (run the detector with targets)",
    "centerness": "centre-ness logits (FCOS)",
    "dense_slots": "per-slot predictions of a dense stage (a one-stage head or an RPN)",
}
"""What each piece a method can require is, for the error message."""


class MissingOutputError(ValueError):
    """A detector's output lacks a piece that a distillation method reads."""


class DetectorOutput:
    """The interface every kdlab detector output offers to distillers (see the module docstring).

    Subclasses are dataclasses with ``features``, ``feature_strides`` and ``image_sizes``; they set
    ``kind`` and may override ``detector_name`` and ``dense_slots``.
    """

    kind: ClassVar[str] = "?"

    @property
    def detector_name(self) -> str:
        """What produced the output, for messages (e.g. ``"RetinaNet"``)."""
        return type(self).__name__

    # every output also offers ``feature_strides``: the stride of each map of ``features`` in input
    # pixels (a property of the dense and two-stage outputs, a field of the set-prediction output)

    def dense_slots(self, method: str = "this method", who: str = "model") -> "DenseOutput":
        """The per-slot predictions of the detector's dense stage (:class:`DenseOutput`)."""
        raise MissingOutputError(f"{method} needs {PIECES['dense_slots']} from the {who}, but the {who}'s output "
                                 f"({self.detector_name}) has none")

    def require(self, name: str, method: str, who: str) -> Any:
        """``getattr(self, name)``, or a :class:`MissingOutputError` naming ``method``, ``who`` and the piece."""
        value = getattr(self, name, None)
        if value is None:
            piece = PIECES.get(name, name)
            raise MissingOutputError(f"{method} needs {piece} from the {who}, but the {who}'s output "
                                     f"({self.detector_name}) has no {name}")
        return value

    def detach(self):
        """A copy whose tensors are detached (nested dataclasses, lists, tuples and dicts included)."""
        return _detach(self)


def _detach(value):
    if isinstance(value, Tensor):
        return value.detach()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _detach(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@dataclass
class FeatureOutput(DetectorOutput):
    """A detector's FPN maps and nothing else (:meth:`kdlab.models.base.Detector.forward_features`): what a
    teacher computes for a method that reads only its features (DRKD), its heads and post-processing
    skipped. The maps are those of the full forward, bit for bit.

    Attributes:
        features: FPN maps, finest first, ``[B, C, H_l, W_l]``.
        feature_strides: stride of each map in input pixels, as the full output reports them.
        image_sizes: ``(h, w)`` of each unpadded image.
        source: the detector's class name (for messages).
    """

    kind: ClassVar[str] = "features"
    features: list[Tensor]
    feature_strides: list[int]
    image_sizes: list[tuple[int, int]]
    source: str = "?"

    @property
    def detector_name(self) -> str:
        return f"{self.source}, FPN maps only"


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

    @classmethod
    def from_matches(cls, matched_gt: Tensor, targets: list[dict], num_classes: int, **extra) -> "DenseAssignment":
        """The assignment of ``matched_gt`` ``[B, N]`` (GT index per slot, negative = none): each
        positive slot takes its GT's label, the others ``num_classes``; ``extra`` sets optional fields."""
        pos_mask = matched_gt >= 0
        matched_gt = torch.where(pos_mask, matched_gt, torch.full_like(matched_gt, -1))
        labels = torch.full_like(matched_gt, num_classes)
        for i, target in enumerate(targets):
            labels[i, pos_mask[i]] = target["labels"][matched_gt[i, pos_mask[i]]]
        return cls(labels=labels, matched_gt=matched_gt, pos_mask=pos_mask, gt_boxes=[t["boxes"] for t in targets],
                   gt_labels=[t["labels"] for t in targets], **extra)


@dataclass
class DenseOutput(DetectorOutput):
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
        assign_rule: the detector's own rule tying a slot to a box, as GID's response mask uses
            it: ``("anchor_iou", t)`` (anchor IoU >= t) or ``("center", 0)`` (location inside);
            ``None``: ``("anchor_iou", 0.5)`` with anchors, ``("center", 0)`` without.
        source: what produced the output (for messages), e.g. ``"RetinaNet"``.
    """

    kind: ClassVar[str] = "dense"

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
    assign_rule: tuple[str, float] | None = None
    source: str = "a dense detector"

    @property
    def num_slots(self) -> int:
        return self.cls_logits.shape[1]

    @property
    def detector_name(self) -> str:
        return self.source

    @property
    def feature_strides(self) -> list[int]:
        """Stride of each FPN level, read from the first slot of each level."""
        starts = [0]
        for n in self.num_per_level[:-1]:
            starts.append(starts[-1] + n)
        return [int(self.strides[s]) for s in starts]

    @property
    def response_rule(self) -> tuple[str, float]:
        """``assign_rule``, or the rule implied by the slots (see the attribute)."""
        if self.assign_rule is not None:
            return self.assign_rule
        return ("center", 0.0) if self.anchors is None else ("anchor_iou", 0.5)

    def dense_slots(self, method: str = "this method", who: str = "model") -> "DenseOutput":
        return self
