"""RetinaNet and FCOS whose box branch outputs a general distribution (GFL-style), so LD applies.

LD (METHODS.md, section 1, "Other detectors") distils each box edge as a discrete distribution
over ``{0, 1, ..., n}`` (``n = reg_max``) in units of the level's stride. These variants replace
the box branch's last conv by one with ``4 (n + 1)`` outputs per slot:

- edge distribution ``P_e = softmax(box_logits_e)``, expected distance
  ``d_e = sum_i i P_e(i)`` (in strides, :func:`kdlab.losses.gfl.integral`);
- box ``= (x - d_l s, y - d_t s, x + d_r s, y + d_b s)`` around the slot's location ``(x, y)``
  (for RetinaNet: the anchor's centre; each of its ``A`` anchors has its own distributions).

Everything else (classification, assignment, post-processing) stays the detector's own. The
losses are the detector's, with GIoU on the decoded boxes, plus GFL's Distribution Focal Loss
on the positives (weight 0.25):
``DFL(S, y) = -((y_r - y) log S(y_l) + (y - y_l) log S(y_r))``, ``y`` the GT edge distance in
strides clamped to ``[0, n - 0.01]``, averaged over the four edges.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdlab.losses.gfl import distribution_focal_loss, integral
from kdlab.models.box_ops import bbox2distance, distance2bbox
from kdlab.models.common import SlotLayout
from kdlab.models.fcos import FCOS, FCOSCriterion
from kdlab.models.layers import conv_tower, group_norm
from kdlab.models.outputs import DenseOutput
from kdlab.models.retinanet import (
    RetinaNet,
    RetinaNetCriterion,
    gather_matched_gt_boxes,
    require_assignment,
)
from kdlab.utils.dist import reduce_normalizer


class DistributionBoxHead(nn.Module):
    """Box branch with ``4 (reg_max + 1)`` logits per anchor (and, for FCOS, a centre-ness logit).

    Args:
        in_channels: FPN width.
        num_anchors: anchors per location ``A``.
        reg_max: largest distance ``n`` in strides (``n + 1`` bins per edge).
        num_convs: 3x3 conv + norm + ReLU layers before the predictions.
        norm_layer: norm after each conv (``None``: no norm).
        with_centerness: also predict FCOS's centre-ness from the same tower.
    """

    def __init__(self, in_channels: int, num_anchors: int, reg_max: int, num_convs: int = 4,
                 norm_layer=None, with_centerness: bool = False):
        super().__init__()
        self.conv = conv_tower(in_channels, num_convs, norm_layer, init_std=None)  # initialised below, with the predictors
        self.reg_max = reg_max
        self.num_anchors = num_anchors
        self.bbox_dist = nn.Conv2d(in_channels, num_anchors * 4 * (reg_max + 1), 3, padding=1)
        self.bbox_ctrness = nn.Conv2d(in_channels, num_anchors, 3, padding=1) if with_centerness else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(box_logits [B, N, 4 (n + 1)], centerness [B, N] or None)``, slots ordered (level, y, x, anchor)."""
        box_logits, centerness = [], []
        for feature in features:
            tower = self.conv(feature)
            box_logits.append(_flatten(self.bbox_dist(tower), self.num_anchors))
            if self.bbox_ctrness is not None:
                centerness.append(_flatten(self.bbox_ctrness(tower), self.num_anchors)[..., 0])
        return torch.cat(box_logits, dim=1), torch.cat(centerness, dim=1) if centerness else None


def _flatten(maps: Tensor, num_anchors: int) -> Tensor:
    """``[B, A K, H, W]`` -> ``[B, H W A, K]`` (torchvision's slot order)."""
    batch, channels, height, width = maps.shape
    per_anchor = channels // num_anchors
    return maps.view(batch, num_anchors, per_anchor, height, width).permute(0, 3, 4, 1, 2).reshape(batch, -1, per_anchor)


class DistributionRetinaNet(RetinaNet):
    """RetinaNet with a distribution box branch (see the module docstring).

    Args:
        backbone, num_classes, strides, class_names, **torchvision_kwargs: as :class:`RetinaNet`.
        reg_max: largest edge distance ``n`` in strides.
        head_convs: conv layers of the box tower.
        head_norm_layer: norm of the box tower (``None``: none, as torchvision's v1 head).

    ``DenseOutput``: ``box_logits`` ``[B, N, 4 (n + 1)]``; ``box_regression`` the expected
    ``(l, t, r, b)`` in strides from the anchor's centre.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, reg_max: int = 16, head_convs: int = 4,
                 head_norm_layer=None, **kwargs):
        kwargs.setdefault("box_loss", "giou")
        super().__init__(backbone, num_classes, **kwargs)
        if self.box_loss == "l1":
            raise ValueError("DistributionRetinaNet regresses distances, not deltas: box_loss must be an IoU loss")
        self.reg_max = reg_max
        self.head.regression_head = DistributionBoxHead(
            backbone.out_channels, self.anchors_per_location, reg_max, head_convs, head_norm_layer
        )

    def run_head(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        cls_logits = self.head.classification_head(features).float()
        box_logits, _ = self.head.regression_head(features)
        box_logits = box_logits.float()  # decoded in float32 (see RetinaNet.run_head)
        return cls_logits, integral(box_logits, self.reg_max), box_logits

    def decode_boxes(self, box_regression: Tensor, anchors: Tensor, layout: SlotLayout) -> Tensor:
        return distance2bbox(layout.points, box_regression * layout.strides[:, None])

    def build_criterion(self) -> "DistributionRetinaNetCriterion":
        return DistributionRetinaNetCriterion(self.num_classes, self.reg_max, box_loss=self.box_loss)


class DistributionRetinaNetCriterion(RetinaNetCriterion):
    """RetinaNet's focal and IoU losses (per-image normalised) plus ``bbox_dfl`` (weight 0.25)."""

    def __init__(self, num_classes: int, reg_max: int, box_loss: str = "giou", dfl_weight: float = 0.25):
        super().__init__(num_classes, box_loss=box_loss)
        self.reg_max = reg_max
        self.weight_dict = {**self.weight_dict, "bbox_dfl": dfl_weight}

    def forward(self, output: DenseOutput, targets: list[dict]) -> dict[str, Tensor]:
        terms = super().forward(output, targets)
        pos_mask = require_assignment(output).pos_mask
        per_image_norm = pos_mask.sum(dim=1).clamp(min=1).to(output.box_logits.dtype)
        dfl = dfl_per_positive(output, self.reg_max)  # [P]
        image_of_positive = pos_mask.nonzero()[:, 0]
        terms["bbox_dfl"] = (dfl / per_image_norm[image_of_positive]).sum() / pos_mask.shape[0]
        return terms


class DistributionFCOS(FCOS):
    """FCOS with a distribution box branch (see the module docstring).

    Args:
        backbone, num_classes, strides, class_names, **torchvision_kwargs: as :class:`FCOS`.
        reg_max: largest edge distance ``n`` in strides (FCOS's regression range tops at
            ``8 s`` per level, except the last level; 16 covers it).
        head_convs: conv layers of the box tower.
        head_norm_layer: norm of the box tower (default :func:`~kdlab.models.layers.group_norm`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, reg_max: int = 16, head_convs: int = 4,
                 head_norm_layer=None, **kwargs):
        super().__init__(backbone, num_classes, **kwargs)
        self.reg_max = reg_max
        norm = head_norm_layer if head_norm_layer is not None else group_norm
        self.head.regression_head = DistributionBoxHead(
            backbone.out_channels, 1, reg_max, head_convs, norm, with_centerness=True
        )

    def run_head(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cls_logits = self.head.classification_head(features).float()
        box_logits, centerness = self.head.regression_head(features)
        box_logits = box_logits.float()  # decoded in float32 (see RetinaNet.run_head)
        return cls_logits, integral(box_logits, self.reg_max), centerness.float(), box_logits

    def build_criterion(self) -> "DistributionFCOSCriterion":
        return DistributionFCOSCriterion(self.num_classes, self.reg_max)


class DistributionFCOSCriterion(FCOSCriterion):
    """FCOS's three losses plus ``bbox_dfl`` (weight 0.25), normalised by the batch's positives."""

    def __init__(self, num_classes: int, reg_max: int, dfl_weight: float = 0.25):
        super().__init__(num_classes)
        self.reg_max = reg_max
        self.weight_dict = {**self.weight_dict, "bbox_dfl": dfl_weight}

    def forward(self, output: DenseOutput, targets: list[dict]) -> dict[str, Tensor]:
        terms = super().forward(output, targets)
        pos_mask = require_assignment(output).pos_mask
        num_pos = reduce_normalizer(pos_mask.sum().to(output.box_logits.dtype))
        terms["bbox_dfl"] = dfl_per_positive(output, self.reg_max).sum() / num_pos
        return terms


def dfl_per_positive(output: DenseOutput, reg_max: int) -> Tensor:
    """``[P]`` DFL of every positive slot, averaged over its four edges.

    The target of edge ``e`` is the GT's distance from the slot's location in strides,
    clamped to ``[0, reg_max - 0.01]`` (GFL's clamp, so bin ``floor(y) + 1`` exists).
    """
    assignment = require_assignment(output)
    pos_mask = assignment.pos_mask
    batch = pos_mask.shape[0]
    points = output.points.expand(batch, -1, -1)[pos_mask]  # [P, 2]
    strides = output.strides.expand(batch, -1)[pos_mask]  # [P]
    targets = bbox2distance(points, gather_matched_gt_boxes(assignment)) / strides[:, None]
    targets = targets.clamp(min=0, max=reg_max - 0.01)  # [P, 4]
    edge_logits = output.box_logits[pos_mask].reshape(-1, reg_max + 1)  # [4 P, n + 1]
    return distribution_focal_loss(edge_logits, targets.reshape(-1)).view(-1, 4).mean(dim=1)
