"""FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019) on torchvision.

:class:`FCOS` *is* torchvision's ``FCOS`` (same modules and ``state_dict``; its COCO weights
load unchanged) with kdlab's forward returning a :class:`~kdlab.models.outputs.DenseOutput`;
:class:`FCOSCriterion` computes torchvision's three loss terms from it.

One slot per location (``A = 1``). Torchvision gives each location a square "anchor" whose side
is the level's stride; the head predicts ``(l, t, r, b)`` distances from the location to the
box edges in units of that side (ReLU'd), so ``box = (x - l s, y - t s, x + r s, y + b s)``.

Assignment (torchvision's centre sampling, per image):

1. location inside the GT box, and its centre distance ``max(|x - cx|, |y - cy|) < 1.5 s``;
2. scale range: ``m = max(l, t, r, b)`` in pixels must satisfy ``4 s < m < 8 s`` (no lower
   bound on the first level, no upper bound on the last);
3. among several GTs the one with the smallest area wins.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import fcos as tv_fcos
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from kdlab.models.base import Criterion, Detector
from kdlab.models.common import (
    batch_anchors,
    check_batch,
    normalise_image_sizes,
    postprocess_torchvision_dense,
    slot_layout,
)
from kdlab.models.outputs import DenseAssignment, DenseOutput, FeatureOutput
from kdlab.models.retinanet import gather_matched_gt_boxes, require_assignment, restrict_class_outputs_
from kdlab.utils.dist import reduce_normalizer


class FCOS(tv_fcos.FCOS, Detector):
    """Torchvision's FCOS whose forward returns a :class:`DenseOutput`.

    Args:
        backbone: FPN backbone returning an ordered dict of maps, with ``out_channels``.
        num_classes: number of sigmoid class outputs ``C`` (torchvision's COCO weights: 91).
        strides: nominal stride of each level; also the side of its square anchor.
        class_names: optional name of each label.
        **torchvision_kwargs: passed to torchvision's ``FCOS`` (``head``,
            ``center_sampling_radius``, ``score_thresh``, ``nms_thresh``, ``detections_per_img``,
            ``topk_candidates``, ``min_size`` / ``max_size`` ...).

    ``DenseOutput`` fields: ``box_regression`` ``(l, t, r, b)`` in units of the stride,
    ``centerness`` ``[B, N]`` logits, ``anchors`` ``None`` (anchor-free; the stride-sized
    squares torchvision decodes with are ``extras["anchor_boxes"]`` ``[N, 4]``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        class_names: list[str] | None = None,
        **torchvision_kwargs,
    ):
        if "anchor_generator" not in torchvision_kwargs:
            sizes = tuple((s,) for s in strides)
            torchvision_kwargs["anchor_generator"] = tv_fcos.AnchorGenerator(sizes, ((1.0,),) * len(sizes))
        super().__init__(backbone, num_classes, **torchvision_kwargs)
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.class_names = list(class_names) if class_names is not None else None

    def forward_features(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> FeatureOutput:
        """Backbone and FPN only (:meth:`kdlab.models.base.Detector.forward_features`)."""
        check_batch(type(self).__name__, images, image_sizes, None, self.num_classes)
        features = list(self.backbone(images).values())
        return FeatureOutput(features, [int(s) for s in self.strides[:len(features)]],
                             [tuple(size) for size in image_sizes], type(self).__name__)

    def forward(
        self, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None = None
    ) -> DenseOutput:
        """Run backbone, FPN and head on a padded batch (see :meth:`RetinaNet.forward`)."""
        check_batch(type(self).__name__, images, image_sizes, targets, self.num_classes)
        features = list(self.backbone(images).values())
        cls_logits, box_regression, centerness, box_logits = self.run_head(features)
        anchor_boxes = batch_anchors(self.anchor_generator, images, features)  # [N, 4], side = stride
        layout = slot_layout(anchor_boxes, features, self.strides, 1)
        return DenseOutput(
            features=features, cls_logits=cls_logits, box_regression=box_regression,
            pred_boxes=self.box_coder.decode(box_regression, anchor_boxes),  # broadcast over the batch
            anchors=None, **layout.output_fields(), image_sizes=normalise_image_sizes(image_sizes),
            box_logits=box_logits, centerness=centerness,
            assignment=self.assign(anchor_boxes, layout.num_per_level, targets) if targets is not None else None,
            extras={"anchor_boxes": anchor_boxes}, assign_rule=("center", 0.0), source=type(self).__name__,
        )

    def run_head(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(cls_logits [B, N, C], box_regression [B, N, 4], centerness [B, N], box_logits or None)``, float32."""
        head_outputs = self.head(features)
        return (head_outputs["cls_logits"].float(), head_outputs["bbox_regression"].float(),
                head_outputs["bbox_ctrness"][..., 0].float(), None)

    @torch.no_grad()
    def assign(self, anchor_boxes: Tensor, num_per_level: list[int], targets: list[dict]) -> DenseAssignment:
        """Torchvision's centre-sampling assignment (see the module docstring).

        Args:
            anchor_boxes: ``[N, 4]`` stride-sized squares centred on the locations.
            num_per_level: locations per level.
            targets: per image ``boxes`` ``[G_i, 4]`` and ``labels`` ``[G_i]``.
        """
        centers = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2  # [N, 2]
        sides = anchor_boxes[:, 2] - anchor_boxes[:, 0]  # [N] = stride
        lower = sides * 4
        lower[: num_per_level[0]] = 0
        upper = sides * 8
        upper[-num_per_level[-1]:] = float("inf")
        matches = []
        for target in targets:
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:
                matches.append(torch.full((len(centers),), -1, dtype=torch.int64, device=centers.device))
                continue
            gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [G, 2]
            near_center = (centers[:, None, :] - gt_centers[None]).abs().max(dim=2).values < (
                self.center_sampling_radius * sides[:, None]
            )  # [N, G]
            x, y = centers[:, None, 0], centers[:, None, 1]
            edge_dist = torch.stack(
                [x - gt_boxes[None, :, 0], y - gt_boxes[None, :, 1], gt_boxes[None, :, 2] - x, gt_boxes[None, :, 3] - y],
                dim=2,
            )  # [N, G, 4] = (l, t, r, b) in pixels
            candidate = near_center & (edge_dist.min(dim=2).values > 0)
            max_dist = edge_dist.max(dim=2).values
            candidate &= (max_dist > lower[:, None]) & (max_dist < upper[:, None])
            # smallest GT wins: score 1e8 - area for candidates, 0 otherwise (torchvision's trick)
            areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
            score = candidate.to(torch.float32) * (1e8 - areas[None, :])
            best_score, match = score.max(dim=1)
            match[best_score < 1e-5] = -1
            matches.append(match)
        return DenseAssignment.from_matches(torch.stack(matches), targets, self.num_classes)  # [B, N]

    @torch.no_grad()
    def postprocess(self, output: DenseOutput) -> list[dict[str, Tensor]]:
        """Torchvision's post-processing with score ``sqrt(sigma(cls) * sigma(centerness))``."""
        scores = torch.sqrt(torch.sigmoid(output.cls_logits) * torch.sigmoid(output.centerness)[..., None])
        return postprocess_torchvision_dense(self, output, scores)

    def build_criterion(self) -> "FCOSCriterion":
        return FCOSCriterion(self.num_classes)

    @torch.no_grad()
    def restrict_classes_(self, columns: Tensor) -> "FCOS":
        """Keep only the class outputs ``columns`` (in place); see :meth:`RetinaNet.restrict_classes_`."""
        return restrict_class_outputs_(self, columns)


class FCOSCriterion(Criterion):
    """Torchvision's FCOS loss from a :class:`DenseOutput` with its assignment.

    With ``n = max(1, #positives in the batch)``:

    - ``classification = 1/n sum_{slots} sum_c FL(p, y)`` (focal loss, ``alpha = 0.25``, ``gamma = 2``);
    - ``bbox_regression = 1/n sum_{positives} (1 - GIoU(b, g))``;
    - ``bbox_ctrness = 1/n sum_{positives} BCE(c, c*)`` with the centre-ness target
      ``c* = sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of the GT's edge distances.

    ``n`` goes through ``reduce_normalizer`` so that DDP equals one big batch (identical in one process).
    """

    def __init__(self, num_classes: int, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.weight_dict = {"classification": 1.0, "bbox_regression": 1.0, "bbox_ctrness": 1.0}

    def forward(self, output: DenseOutput, targets: list[dict]) -> dict[str, Tensor]:
        assignment = require_assignment(output)
        pos_mask = assignment.pos_mask  # [B, N]
        num_pos = reduce_normalizer(pos_mask.sum().to(output.cls_logits.dtype))

        onehot = torch.zeros_like(output.cls_logits)  # [B, N, C]
        onehot[pos_mask, assignment.labels[pos_mask]] = 1.0
        classification = sigmoid_focal_loss(
            output.cls_logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum"
        ) / num_pos

        matched_gt_boxes = gather_matched_gt_boxes(assignment)  # [P, 4]
        bbox_regression = generalized_box_iou_loss(
            output.pred_boxes[pos_mask], matched_gt_boxes, reduction="sum"
        ) / num_pos

        points = output.points.expand(pos_mask.shape[0], -1, -1)[pos_mask]  # [P, 2]
        ctrness_target = centerness_target(points, matched_gt_boxes)
        bbox_ctrness = F.binary_cross_entropy_with_logits(
            output.centerness[pos_mask], ctrness_target, reduction="sum"
        ) / num_pos
        return {"classification": classification, "bbox_regression": bbox_regression, "bbox_ctrness": bbox_ctrness}


def centerness_target(points: Tensor, gt_boxes: Tensor) -> Tensor:
    """``[P]`` centre-ness ``sqrt(min(l, r)/max(l, r) * min(t, b)/max(t, b))`` of points in their GT boxes.

    Args:
        points: ``[P, 2]`` ``(x, y)`` inside the boxes.
        gt_boxes: ``[P, 4]`` xyxy.
    """
    left_right = torch.stack([points[:, 0] - gt_boxes[:, 0], gt_boxes[:, 2] - points[:, 0]], dim=1)
    top_bottom = torch.stack([points[:, 1] - gt_boxes[:, 1], gt_boxes[:, 3] - points[:, 1]], dim=1)
    return torch.sqrt(
        (left_right.min(dim=1).values / left_right.max(dim=1).values)
        * (top_bottom.min(dim=1).values / top_bottom.max(dim=1).values)
    )
