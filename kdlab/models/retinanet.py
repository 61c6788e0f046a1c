"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) on torchvision.

:class:`RetinaNet` *is* torchvision's ``RetinaNet`` (same modules, so the same ``state_dict``
and torchvision's COCO weights load as they are) with kdlab's forward: it takes the padded,
normalised batch and returns a :class:`~kdlab.models.outputs.DenseOutput` holding the FPN
features, per-anchor logits and deltas, the anchors, the decoded boxes and, given targets,
the max-IoU label assignment. The loss is :class:`RetinaNetCriterion`, which computes exactly
torchvision's two terms from that output.

Assignment (torchvision's ``Matcher(0.5, 0.4, allow_low_quality_matches=True)``): an anchor
is positive for the GT it overlaps most when ``IoU >= 0.5``, negative when ``IoU < 0.4``,
ignored in between; each GT also claims the anchor(s) with which it has its highest IoU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.ops import (
    box_iou,
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)

from kdlab.models.base import Criterion, Detector
from kdlab.models.common import (
    SlotLayout,
    batch_anchors,
    check_batch,
    normalise_image_sizes,
    postprocess_torchvision_dense,
    slot_layout,
)
from kdlab.models.outputs import DenseAssignment, DenseOutput, FeatureOutput

IOU_BOX_LOSSES = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}


class RetinaNet(tv_retinanet.RetinaNet, Detector):
    """Torchvision's RetinaNet whose forward returns a :class:`DenseOutput`.

    Args:
        backbone: FPN backbone returning an ordered dict of maps, with ``out_channels``.
        num_classes: number of sigmoid class outputs ``C`` (labels ``0 .. C-1``; torchvision's
            COCO weights have 91, slot ``k`` = COCO category id ``k``).
        strides: nominal stride of each FPN level (used for ``DenseOutput.strides``).
        box_loss: ``"l1"`` on deltas (torchvision's v1) or ``"giou"`` / ``"diou"`` / ``"ciou"``
            on decoded boxes (v2 uses ``"giou"``).
        class_names: optional name of each label (for notebooks).
        **torchvision_kwargs: passed to torchvision's ``RetinaNet`` (``anchor_generator``,
            ``head``, ``score_thresh``, ``nms_thresh``, ``detections_per_img``,
            ``fg_iou_thresh``, ``bg_iou_thresh``, ``topk_candidates``, and ``min_size`` /
            ``max_size`` / ``image_mean`` / ``image_std`` for its raw-image transform).

    ``DenseOutput`` fields: ``box_regression`` are torchvision's ``(dx, dy, dw, dh)`` deltas
    (``BoxCoder`` weights 1); ``anchors`` are torchvision's, ``A = 9`` per location by default,
    slot order (level, y, x, anchor); ``assignment.ious`` is each positive anchor's IoU with
    its GT and ``assignment.ignore_mask`` the between-threshold anchors.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        box_loss: str = "l1",
        class_names: list[str] | None = None,
        **torchvision_kwargs,
    ):
        super().__init__(backbone, num_classes, **torchvision_kwargs)
        if box_loss not in ("l1", *IOU_BOX_LOSSES):
            raise ValueError(f"box_loss must be 'l1', 'giou', 'diou' or 'ciou', got {box_loss!r}")
        self.head.regression_head._loss_type = box_loss  # what torchvision's own loss reads
        self.box_loss = box_loss
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def anchors_per_location(self) -> int:
        return self.anchor_generator.num_anchors_per_location()[0]

    def forward_features(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> FeatureOutput:
        """Backbone and FPN only (:meth:`kdlab.models.base.Detector.forward_features`)."""
        check_batch(type(self).__name__, images, image_sizes, None, self.num_classes)
        features = list(self.backbone(images).values())
        return FeatureOutput(features, [int(s) for s in self.strides[:len(features)]],
                             [tuple(size) for size in image_sizes], type(self).__name__)

    def forward(
        self, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None = None
    ) -> DenseOutput:
        """Run backbone, FPN and head on a padded batch.

        Args:
            images: ``[B, 3, H, W]`` normalised, padded batch.
            image_sizes: ``(h, w)`` of each unpadded image.
            targets: optional, per image ``boxes`` ``[G, 4]`` and ``labels`` ``[G]``; when
                given, the output carries the label assignment.
        """
        check_batch(type(self).__name__, images, image_sizes, targets, self.num_classes)
        features = list(self.backbone(images).values())
        cls_logits, box_regression, box_logits = self.run_head(features)  # [B, N, C], [B, N, 4], optional
        anchors = batch_anchors(self.anchor_generator, images, features)  # [N, 4]
        layout = slot_layout(anchors, features, self.strides, self.anchors_per_location)
        return DenseOutput(
            features=features, cls_logits=cls_logits, box_regression=box_regression,
            pred_boxes=self.decode_boxes(box_regression, anchors, layout), anchors=anchors, **layout.output_fields(),
            image_sizes=normalise_image_sizes(image_sizes), box_logits=box_logits,
            assignment=self.assign(anchors, targets) if targets is not None else None,
            assign_rule=("anchor_iou", float(self.proposal_matcher.high_threshold)), source=type(self).__name__,
        )

    def run_head(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(cls_logits [B, N, C], box_regression [B, N, 4], box_logits or None)``, in float32.

        Under bf16 autocast (GPU) the convs return bf16; boxes are decoded and losses computed in
        float32, since bf16 resolves only ~8 px at 1000 px (a no-op in float32).
        """
        head_outputs = self.head(features)
        return head_outputs["cls_logits"].float(), head_outputs["bbox_regression"].float(), None

    def decode_boxes(self, box_regression: Tensor, anchors: Tensor, layout: SlotLayout) -> Tensor:
        """``[B, N, 4]`` xyxy boxes from deltas: ``cx = cx_a + dx w_a``, ``w = w_a exp(dw)`` (same for y, h)."""
        batch, num_slots, _ = box_regression.shape
        flat = self.box_coder.decode_single(box_regression.reshape(-1, 4), anchors.repeat(batch, 1))
        return flat.view(batch, num_slots, 4)

    @torch.no_grad()
    def assign(self, anchors: Tensor, targets: list[dict]) -> DenseAssignment:
        """Torchvision's max-IoU assignment of every anchor (see the module docstring).

        Args:
            anchors: ``[N, 4]`` xyxy.
            targets: per image ``boxes`` ``[G_i, 4]`` and ``labels`` ``[G_i]``.
        """
        matches, best_ious = [], []
        for target in targets:
            if target["boxes"].numel() == 0:
                matches.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device))
                best_ious.append(anchors.new_zeros(anchors.shape[0]))
                continue
            iou = box_iou(target["boxes"], anchors)  # [G, N]
            matches.append(self.proposal_matcher(iou))  # GT index, -1 below 0.4, -2 between
            best_ious.append(iou.max(dim=0).values)  # a matched anchor's GT is its max-IoU GT
        match = torch.stack(matches)  # [B, N]
        return DenseAssignment.from_matches(
            match, targets, self.num_classes,
            ious=torch.where(match >= 0, torch.stack(best_ious), 0.0),
            ignore_mask=match == self.proposal_matcher.BETWEEN_THRESHOLDS,
        )

    @torch.no_grad()
    def postprocess(self, output: DenseOutput) -> list[dict[str, Tensor]]:
        """Torchvision's post-processing: score threshold, per-level top-k, class-wise NMS.

        Returns:
            per image ``boxes`` ``[K, 4]`` (input pixels), ``scores`` ``[K]``, ``labels`` ``[K]``.
        """
        return postprocess_torchvision_dense(self, output, output.cls_logits.sigmoid())

    def build_criterion(self) -> "RetinaNetCriterion":
        return RetinaNetCriterion(self.num_classes, box_loss=self.box_loss, box_coder_weights=self.box_coder.weights)

    @torch.no_grad()
    def restrict_classes_(self, columns: Tensor) -> "RetinaNet":
        """Keep only the class outputs ``columns`` (in place): label ``j`` becomes old label ``columns[j]``.

        Typical use: a COCO-trained teacher for a dataset, ``columns = coco91_columns(...)``.
        """
        return restrict_class_outputs_(self, columns, self.head.classification_head.num_anchors)


class RetinaNetCriterion(Criterion):
    """Torchvision's RetinaNet loss, computed from a :class:`DenseOutput` with its assignment.

    With ``n_i`` the positives of image ``i`` and ``B`` images:

    - ``classification = 1/B sum_i 1/max(1, n_i) sum_{a not ignored} sum_c FL(p_ac, y_ac)``,
      ``FL = -alpha_t (1 - p_t)^gamma log p_t`` (``alpha = 0.25``, ``gamma = 2``), ``y`` one-hot;
    - ``bbox_regression = 1/B sum_i 1/max(1, n_i) sum_{a positive} l(a)`` with
      ``l = |delta_a - delta*_a|_1`` (``"l1"``) or ``1 - GIoU(b_a, g_a)`` (``"giou"``).

    Normalising per image and then averaging over images makes DDP equal to one big batch
    without ``reduce_mean``: every rank averages over its images and DDP averages the ranks.
    """

    def __init__(self, num_classes: int, box_loss: str = "l1", box_coder_weights=(1.0, 1.0, 1.0, 1.0),
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.box_loss = box_loss
        self.box_coder = tv_retinanet.det_utils.BoxCoder(weights=tuple(box_coder_weights))
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.weight_dict = {"classification": 1.0, "bbox_regression": 1.0}

    def forward(self, output: DenseOutput, targets: list[dict]) -> dict[str, Tensor]:
        assignment = require_assignment(output)
        pos_mask = assignment.pos_mask  # [B, N]
        num_images = pos_mask.shape[0]
        per_image_norm = pos_mask.sum(dim=1).clamp(min=1).to(output.cls_logits.dtype)  # [B]

        onehot = torch.zeros_like(output.cls_logits)  # [B, N, C]
        onehot[pos_mask, assignment.labels[pos_mask]] = 1.0
        focal = sigmoid_focal_loss(output.cls_logits, onehot, self.focal_alpha, self.focal_gamma, reduction="none")
        valid = ~assignment.ignore_mask if assignment.ignore_mask is not None else torch.ones_like(pos_mask)
        cls_per_image = (focal.sum(dim=2) * valid).sum(dim=1)  # [B]
        classification = (cls_per_image / per_image_norm).sum() / num_images

        matched_gt_boxes = gather_matched_gt_boxes(assignment)  # [P, 4], positives in (image, slot) order
        image_of_positive = pos_mask.nonzero()[:, 0]  # [P]
        if self.box_loss == "l1":
            anchors = output.anchors.expand(num_images, -1, -1)[pos_mask]  # [P, 4]
            target_deltas = self.box_coder.encode_single(matched_gt_boxes, anchors)
            box_per_positive = (output.box_regression[pos_mask] - target_deltas).abs().sum(dim=1)
        else:
            box_per_positive = IOU_BOX_LOSSES[self.box_loss](
                output.pred_boxes[pos_mask], matched_gt_boxes, reduction="none", eps=1e-7
            )
        bbox_regression = (box_per_positive / per_image_norm[image_of_positive]).sum() / num_images
        return {"classification": classification, "bbox_regression": bbox_regression}


def require_assignment(output) -> DenseAssignment:
    """The output's assignment, or a clear error when the forward had no targets."""
    if output.assignment is None:
        raise ValueError("the detection loss needs the label assignment: call the detector with targets")
    return output.assignment


def gather_matched_gt_boxes(assignment: DenseAssignment) -> Tensor:
    """``[P, 4]`` GT box of every positive slot, in ``pos_mask.nonzero()`` order."""
    boxes = [gt[idx[pos]] for gt, idx, pos in zip(assignment.gt_boxes, assignment.matched_gt, assignment.pos_mask)]
    return torch.cat(boxes) if boxes else assignment.pos_mask.new_zeros((0, 4), dtype=torch.float32)


def restrict_class_outputs_(model: Detector, columns, num_anchors: int = 1) -> Detector:
    """Keep only the class outputs ``columns`` of a dense ``model``'s ``head.classification_head`` (in
    place; ``num_anchors`` blocks of class logits per location): label ``j`` becomes old label ``columns[j]``."""
    head = model.head.classification_head
    columns = _check_columns(columns, head.num_classes)
    rows = (torch.arange(num_anchors)[:, None] * head.num_classes + columns[None, :]).flatten()
    head.cls_logits = _take_conv_outputs(head.cls_logits, rows)
    head.num_classes = model.num_classes = len(columns)
    if model.class_names is not None:
        model.class_names = [model.class_names[c] for c in columns.tolist()]
    return model


def _check_columns(columns, num_outputs: int) -> Tensor:
    columns = torch.as_tensor(columns, dtype=torch.int64).flatten()
    if columns.numel() == 0 or columns.min() < 0 or columns.max() >= num_outputs:
        raise ValueError(f"columns must be a non-empty list of class indices in [0, {num_outputs}), got {columns.tolist()}")
    if columns.unique().numel() != columns.numel():
        raise ValueError(f"columns must not repeat a class, got {columns.tolist()}")
    return columns


def _take_conv_outputs(conv: nn.Conv2d, rows: Tensor) -> nn.Conv2d:
    """A copy of ``conv`` that keeps only the output channels ``rows``."""
    new = nn.Conv2d(conv.in_channels, len(rows), conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
    new.weight.copy_(conv.weight[rows])
    if conv.bias is not None:
        new.bias.copy_(conv.bias[rows])
    return new
