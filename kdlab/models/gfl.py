"""GFL (GFocal v1) detector: ResNet + FPN + a shared head that predicts, per location, a
joint class-quality score (trained with QFL) and four edge distributions (trained with DFL + GIoU).

See ``kdlab/losses/gfl.py`` for the distribution maths and ``kdlab/models/gfl_criterion.py`` for
the loss. The forward returns a :class:`~kdlab.models.outputs.DenseOutput` with everything LD needs:
FPN features, classification and edge-distribution logits per location, points, strides, levels,
ATSS anchors, decoded boxes and (with targets) the ATSS assignment with candidates and thresholds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdlab.losses.gfl import integral
from kdlab.models.atss import atss_assign
from kdlab.models.backbone import ResNetFPN
from kdlab.models.base import Detector
from kdlab.models.box_ops import distance2bbox
from kdlab.models.common import postprocess_dense
from kdlab.models.layers import Scale, conv_tower, group_norm
from kdlab.models.outputs import DenseAssignment, DenseOutput, FeatureOutput
from kdlab.models.priors import grid_priors


class GFLHead(nn.Module):
    """Shared GFL head: ``num_convs`` 3x3 conv + GN + ReLU towers for classification and regression.

    Per level ``l`` it outputs ``[B, num_classes, H_l, W_l]`` class logits and
    ``[B, 4 * (reg_max + 1), H_l, W_l]`` edge-distribution logits.
    """

    def __init__(self, channels: int, num_classes: int, num_convs: int = 4, reg_max: int = 16,
                 num_levels: int = 5, use_gn: bool = True, prior_prob: float = 0.01):
        super().__init__()
        norm = group_norm if use_gn else None
        # initialised below with the predictors (one pass over all convs: the seeded init of stored runs)
        self.cls_convs = conv_tower(channels, num_convs, norm, init_std=None)
        self.reg_convs = conv_tower(channels, num_convs, norm, init_std=None)
        self.gfl_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_maps, reg_maps = [], []
        for feature, scale in zip(features, self.scales):
            cls_maps.append(self.gfl_cls(self.cls_convs(feature)))
            reg_maps.append(scale(self.gfl_reg(self.reg_convs(feature))))
        return cls_maps, reg_maps


def flatten_levels(maps: list[Tensor]) -> Tensor:
    """``[B, K, H_l, W_l]`` per level -> ``[B, sum_l H_l W_l, K]`` (row-major over y, x)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


class GFL(Detector):
    """Generalized Focal Loss detector (Li et al., NeurIPS 2020), GFocal v1.

    Args:
        num_classes: number of object classes ``C`` (no background class: sigmoid scores).
        backbone: ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101``.
        backbone_width: base width (64 = torchvision's ResNet; 8-32 for the CPU configurations).
        backbone_weights: torchvision ImageNet weights name (e.g. ``"IMAGENET1K_V1"``), a kdlab detector
            checkpoint (``*.pt``) whose ResNet to start from, or ``None``.
        backbone_norm: ``"frozen_bn"`` (pretrained), ``"bn"`` or ``"gn"`` (from scratch, DDP-exact).
        frozen_stages: stem + ``layer1..layer{k}`` frozen (default 1 with weights, none without).
        fpn_channels: FPN and head width (256 in the paper).
        head_convs: conv layers per head tower (4 in the paper).
        reg_max: largest edge distance in stride units (16 -> 17 bins per edge).
        octave_base_scale: ATSS anchor side = ``octave_base_scale * stride``.
        atss_topk: ATSS candidates per level.
        score_thresh, nms_thresh, pre_nms_topk, detections_per_img: post-processing (GFL's test config:
            0.05, 0.6, 1000 per level, 100).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        backbone_width: int = 64,
        backbone_weights: str | None = None,
        backbone_norm: str = "frozen_bn",
        frozen_stages: int | None = None,
        fpn_channels: int = 256,
        head_convs: int = 4,
        reg_max: int = 16,
        octave_base_scale: float = 8.0,
        atss_topk: int = 9,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        pre_nms_topk: int = 1000,
        detections_per_img: int = 100,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.octave_base_scale = octave_base_scale
        self.atss_topk = atss_topk
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.pre_nms_topk, self.detections_per_img = pre_nms_topk, detections_per_img
        self.backbone = ResNetFPN(backbone, backbone_width, backbone_norm, fpn_channels, backbone_weights, frozen_stages)
        self.strides = ResNetFPN.strides
        self.head = GFLHead(fpn_channels, num_classes, head_convs, reg_max, num_levels=len(self.strides))

    def forward_features(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> FeatureOutput:
        """Backbone and FPN only (:meth:`kdlab.models.base.Detector.forward_features`)."""
        features = self.backbone(images)
        return FeatureOutput(list(features), [int(s) for s in self.strides[:len(features)]],
                             [tuple(size) for size in image_sizes], type(self).__name__)

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None = None) -> DenseOutput:
        """Run the detector on a padded batch ``images`` ``[B, 3, H, W]``; assign labels when given targets."""
        features = self.backbone(images)
        cls_maps, reg_maps = self.head(features)
        cls_logits = flatten_levels(cls_maps)  # [B, N, C]
        box_logits = flatten_levels(reg_maps)  # [B, N, 4 * (reg_max + 1)]
        points, anchors, strides, levels, num_per_level = grid_priors(
            [tuple(f.shape[-2:]) for f in features], self.strides, self.octave_base_scale, images.device
        )
        ltrb = integral(box_logits.float(), self.reg_max)  # [B, N, 4] in stride units
        pred_boxes = distance2bbox(points, ltrb * strides[:, None])  # [B, N, 4] input pixels
        assignment = None
        if targets is not None:
            assignment = self.assign(anchors, num_per_level, targets)
        return DenseOutput(
            features=features, cls_logits=cls_logits, box_regression=ltrb, pred_boxes=pred_boxes,
            points=points, anchors=anchors, strides=strides, levels=levels, num_per_level=num_per_level,
            image_sizes=list(image_sizes), box_logits=box_logits, assignment=assignment, source="GFL",
        )

    @torch.no_grad()
    def assign(self, anchors: Tensor, num_per_level: list[int], targets: list[dict]) -> DenseAssignment:
        """ATSS assignment for each image of the batch (see :func:`kdlab.models.atss.atss_assign`)."""
        labels, matched, ious, candidates, thresholds, gt_boxes, gt_labels = [], [], [], [], [], [], []
        for target in targets:
            boxes = target["boxes"].to(anchors.device, torch.float32)
            classes = target["labels"].to(anchors.device)
            result = atss_assign(anchors, num_per_level, boxes, self.atss_topk)
            pos = result.matched_gt >= 0
            image_labels = torch.full_like(result.matched_gt, self.num_classes)
            image_labels[pos] = classes[result.matched_gt[pos]]
            matched_iou = torch.zeros(anchors.shape[0], device=anchors.device)
            matched_iou[pos] = result.ious[pos, result.matched_gt[pos]]
            labels.append(image_labels)
            matched.append(result.matched_gt)
            ious.append(matched_iou)
            candidates.append(result.candidate_idx)
            thresholds.append(result.iou_thr)
            gt_boxes.append(boxes)
            gt_labels.append(classes)
        matched_gt = torch.stack(matched)
        return DenseAssignment(
            labels=torch.stack(labels), matched_gt=matched_gt, pos_mask=matched_gt >= 0, gt_boxes=gt_boxes,
            gt_labels=gt_labels, ious=torch.stack(ious), candidate_idx=candidates, iou_thr=thresholds,
        )

    @torch.no_grad()
    def postprocess(self, output: DenseOutput) -> list[dict[str, Tensor]]:
        """Per level the ``pre_nms_topk`` slots by max score, every (slot, class) above the score
        threshold, class-wise NMS, the best ``detections_per_img`` (mmdet's GFL test pipeline).

        Scores are ``sigmoid(cls_logits)``: in GFL the class score *is* the localisation quality
        estimate (QFL), so no separate centre-ness or IoU branch multiplies it.
        """
        return postprocess_dense(output.cls_logits.float().sigmoid(), output.pred_boxes.float(), output.num_per_level,
                                 output.image_sizes, self.score_thresh, self.pre_nms_topk, self.nms_thresh,
                                 self.detections_per_img, candidates="slots")

    def build_criterion(self):
        from kdlab.models.gfl_criterion import GFLCriterion

        return GFLCriterion(self.num_classes, self.reg_max)
