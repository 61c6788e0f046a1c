"""GID: General Instance Distillation for object detection (Dai et al., CVPR 2021; METHODS.md §2).

Dense detectors resist plain logit KD: almost every location is easy background, so a loss
averaged over all locations is dominated by it. GID distils only at a handful of *general
instances* (GIs) per image, the places where teacher and student disagree most
(:mod:`kdlab.distill.gism`), with three losses (:mod:`kdlab.losses.gid`):

- **feature**: RoIAlign each GI on the FPN level its size selects (the FPN rule), ``10 x 10``,
  sampling ratio 2, aligned; squared L2 to the teacher's after a 1x1 adapter when the channel
  counts differ (weight 5e-4);
- **relation**: normalised pairwise distances among the GIs' pooled features, smooth-L1 between
  teacher and student (weight 40); per image (paper) or over the whole batch (released code);
- **response**: on the head outputs that the detector's own assignment rule would tie to a GI
  (RetinaNet: anchors with IoU >= 0.5; FCOS: locations inside; Faster R-CNN: RPN anchors with
  IoU >= 0.7, the RPN's own positive threshold), BCE to the teacher's sigmoid (weight 0.1) and
  L1 on the box outputs (weight 1.0).

``variant="official"`` switches the GI score and the relation scope to the released code's
choices; each can also be set alone (``gi_score``, ``relation_scope``). A weight of 0 switches a
term off (it is then neither computed nor logged).

Teachers: any trained detector of the student's family whose predictions correspond slot by slot
(same strides, anchors and classes; the FPN widths may differ). On shapes: the project's teachers
(``configs/shapes_gid_*_teacher.yaml``). On COCO, torchvision's weights through the zoo, e.g.
``teacher = build_detector("retinanet_resnet50_fpn", 91, weights="COCO_V1")`` with a
``build_detector("retinanet", 91, backbone="resnet18", ...)`` student (torchvision's 91 COCO slots,
anchors ``4 * stride`` x 3 scales x 3 ratios on both); or restrict both to a dataset's classes
with ``restrict_classes_``. A mismatch raises a ``ValueError`` naming both shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper

from kdlab.distill.base import Distiller
from kdlab.distill.gism import GeneralInstances, general_instance_kinds, select_general_instances
from kdlab.losses.gid import (
    MASK_RULES,
    gi_feature_loss,
    gi_relation_loss,
    gi_relation_loss_groups,
    response_cls_loss,
    response_mask,
    response_reg_loss,
    zero_with_grad,
)
from kdlab.models.base import Detector
from kdlab.models.outputs import DenseOutput
from kdlab.utils.dist import reduce_mean
from kdlab.utils.roi_align import roi_align_per_image

__all__ = ["GID", "select_general_instances", "general_instance_kinds", "pool_gi_features", "response_mask",
           "level_strides", "GeneralInstances"]

GID_VARIANTS = ("paper", "official")
RELATION_SCOPES = ("image", "batch")
ROI_ALIGN_IMPLS = ("separable", "torchvision")


def is_two_stage(output) -> bool:
    """Whether ``output`` is a two-stage (RPN) output rather than a :class:`DenseOutput`."""
    return not isinstance(output, DenseOutput) and hasattr(output, "rpn_objectness")


def level_strides(output) -> list[int]:
    """Stride of each FPN map in ``output.features``.

    Dense outputs carry the strides of their slots. For a two-stage output the stride is
    inferred as torchvision's ``MultiScaleRoIAlign`` does: ``2^round(log2(image side / map side))``
    with the largest unpadded image side.
    """
    if isinstance(output, DenseOutput):
        offsets = [0]
        for n in output.num_per_level[:-1]:
            offsets.append(offsets[-1] + n)
        return [int(output.strides[o]) for o in offsets]
    max_height = max(h for h, _ in output.image_sizes)
    return [2 ** round(math.log2(max_height / f.shape[-2])) for f in output.features]


def pool_gi_features(
    features: list[Tensor],
    strides: list[int],
    gi_boxes: list[Tensor],
    output_size: int = 10,
    sampling_ratio: int = 2,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    impl: str = "separable",
) -> Tensor:
    """RoIAlign every GI on the FPN level chosen by its size (FPN paper, Eq. 1).

    ``k = clamp(floor(k0 + log2(sqrt(w h) / 224)), k_min, k_max)``, ``k0 = 4``, where level ``k``
    has stride ``2^k`` (P3 = stride 8); then ``roi_align(..., aligned=True)`` on that level.
    ``impl="separable"`` computes it with :func:`kdlab.utils.roi_align.roi_align_per_image`
    (torchvision's values; a dense backward ~5x faster on CPU than torchvision's serial one, and
    deterministic on GPU); ``impl="torchvision"`` calls ``torchvision.ops.roi_align``.

    Args:
        features: FPN maps ``[B, C, H_l, W_l]``, finest first.
        strides: stride of each map (powers of two).
        gi_boxes: per image ``[K_i, 4]`` xyxy boxes in input pixels.
        output_size: ``S`` (10 in the released code).
        sampling_ratio: sampling points per bin side (2).
        impl: ``"separable"`` or ``"torchvision"`` (same numbers).

    Returns:
        ``[sum_i K_i, C, S, S]`` float32 pooled features, images in batch order.
    """
    if len(features) != len(strides):
        raise ValueError(f"got {len(features)} feature maps but {len(strides)} strides")
    if impl not in ROI_ALIGN_IMPLS:
        raise ValueError(f"impl must be one of {ROI_ALIGN_IMPLS}, got {impl!r}")
    log_strides = [math.log2(s) for s in strides]
    first = int(log_strides[0])
    if any(not ls.is_integer() for ls in log_strides) or log_strides != list(range(first, first + len(strides))):
        raise ValueError(f"FPN strides must be consecutive powers of two, got {strides}")
    boxes = torch.cat([b.float() for b in gi_boxes])  # [M, 4]; float32 even for bf16 maps (1 px matters)
    image_of = torch.cat([torch.full((b.shape[0],), i, dtype=torch.int64, device=boxes.device)
                          for i, b in enumerate(gi_boxes)])
    mapper = LevelMapper(first, int(log_strides[-1]), canonical_scale, canonical_level)
    levels = mapper([boxes]) if boxes.shape[0] else boxes.new_zeros(0, dtype=torch.int64)  # [M], 0 = finest
    pooled, order = [], []
    for level, (feature, stride) in enumerate(zip(features, strides)):
        idx = torch.where(levels == level)[0]  # ascending, so still in image order
        if idx.numel():
            counts = torch.bincount(image_of[idx], minlength=len(gi_boxes)).tolist()
            per_image = list(boxes[idx].split(counts))
            if impl == "separable":
                pooled.append(roi_align_per_image(feature, per_image, 1.0 / stride, output_size, sampling_ratio))
            else:
                pooled.append(roi_align(feature.float(), per_image, output_size, 1.0 / stride, sampling_ratio, aligned=True))
            order.append(idx)
    if not pooled:
        return features[0].new_zeros(0, features[0].shape[1], output_size, output_size, dtype=torch.float32)
    # back to batch order with a gather (cheaper to differentiate than writing into a zero tensor)
    inverse = torch.empty_like(levels)
    inverse[torch.cat(order)] = torch.arange(levels.numel(), device=levels.device)
    return torch.cat(pooled)[inverse]


def response_outputs(output) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """``(logits [B, N, C], box outputs [B, N, 4], anchors [N, 4] or None, points [N, 2])`` GID distils."""
    if isinstance(output, DenseOutput):
        return output.cls_logits, output.box_regression, output.anchors, output.points
    anchors = output.anchors  # Faster R-CNN: only the RPN is distilled
    return output.rpn_objectness[..., None], output.rpn_deltas, anchors, (anchors[:, :2] + anchors[:, 2:]) / 2


def default_mask_rule(output) -> tuple[str, float]:
    """The detector's own assignment rule for the response mask: ``(rule, iou_threshold)``.

    Two-stage output: the RPN's anchors, positive at IoU >= 0.7. Dense output without anchors
    (FCOS): location inside the box. Dense output with anchors (RetinaNet): IoU >= 0.5.
    """
    if is_two_stage(output):
        return "anchor_iou", 0.7
    if output.anchors is None:
        return "center", 0.0
    return "anchor_iou", 0.5


@torch.no_grad()
def feature_channels(detector: nn.Module, image_size: int = 256) -> int:
    """Channels of a detector's FPN maps: ``detector.backbone.out_channels`` (kdlab's and
    torchvision's FPN backbones), else read from one forward pass on a blank image."""
    channels = getattr(getattr(detector, "backbone", None), "out_channels", None)
    if isinstance(channels, int):
        return channels
    device = next(detector.parameters()).device
    was_training = detector.training
    detector.eval()
    try:
        output = detector(torch.zeros(1, 3, image_size, image_size, device=device), [(image_size, image_size)])
    finally:
        detector.train(was_training)
    return int(output.features[0].shape[1])


class GID(Distiller):
    """General Instance Distillation (see the module docstring).

    Args:
        student: RetinaNet, FCOS or Faster R-CNN (any detector whose output is a ``DenseOutput``
            or a two-stage output with RPN fields).
        teacher: trained detector of the same family (same strides, anchors and classes).
        feature_weight: feature loss weight (5e-4; 0 = off).
        relation_weight: relation loss weight (40; 0 = off).
        response_cls_weight: response BCE weight (0.1; 0 = off).
        response_reg_weight: response L1 weight (1.0; 0 = off).
        variant: ``"paper"`` or ``"official"``: the defaults of ``gi_score`` and ``relation_scope``.
        gi_score: ``"paper"`` (``max_c |P_t - P_s|``) or ``"official"`` (``|max P_t - max P_s|``).
        relation_scope: ``"image"`` (paper) or ``"batch"`` (released code: all GIs of the batch).
        num_instances: GIs per image ``K`` (10).
        nms_iou: GISM's NMS threshold (0.3).
        pre_nms_topk: GISM's pre-NMS candidates (3000).
        min_size: smallest GI side in input pixels (10 in the released code, which trains at 800 px).
        roi_output_size: ``S`` of the pooled GI features (10).
        roi_sampling_ratio: RoIAlign sampling ratio (2).
        roi_align_impl: ``"separable"`` (default) or ``"torchvision"``; see :func:`pool_gi_features`.
        adapter_kernel_size: 1 or 3, the student adapter applied to the pooled features.
        always_adapt: add an adapter even when the channel counts match.
        response_mask_rule: ``"anchor_iou"`` / ``"center"``; ``None``: the student's own rule.
        response_iou: anchor IoU threshold of the mask; ``None``: the detector's own (0.5; RPN 0.7).
        student_channels, teacher_channels: FPN widths (``None``: read from a forward pass).
    """

    def __init__(
        self,
        student: Detector,
        teacher: Detector,
        *,
        feature_weight: float = 5e-4,
        relation_weight: float = 40.0,
        response_cls_weight: float = 0.1,
        response_reg_weight: float = 1.0,
        variant: str = "paper",
        gi_score: str | None = None,
        relation_scope: str | None = None,
        num_instances: int = 10,
        nms_iou: float = 0.3,
        pre_nms_topk: int = 3000,
        min_size: float = 10.0,
        roi_output_size: int = 10,
        roi_sampling_ratio: int = 2,
        roi_align_impl: str = "separable",
        adapter_kernel_size: int = 1,
        always_adapt: bool = False,
        response_mask_rule: str | None = None,
        response_iou: float | None = None,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ):
        super().__init__(student, teacher)
        if getattr(student, "num_classes", None) != getattr(teacher, "num_classes", None):
            raise ValueError(f"student has {student.num_classes} classes but teacher has {teacher.num_classes}")
        if variant not in GID_VARIANTS:
            raise ValueError(f"GID variant must be one of {GID_VARIANTS}, got {variant!r}")
        self.gi_score = gi_score or variant
        self.relation_scope = relation_scope or ("batch" if variant == "official" else "image")
        if self.relation_scope not in RELATION_SCOPES:
            raise ValueError(f"relation_scope must be one of {RELATION_SCOPES}, got {self.relation_scope!r}")
        weights = {"loss_gid_feature": feature_weight, "loss_gid_relation": relation_weight,
                   "loss_gid_cls": response_cls_weight, "loss_gid_reg": response_reg_weight}
        for name, w in weights.items():
            if w < 0:
                raise ValueError(f"GID weight of {name} must be >= 0, got {w}")
        self.distill_weight_dict = {name: float(w) for name, w in weights.items() if w > 0}
        self.gism_options = dict(k=num_instances, nms_iou=nms_iou, pre_nms_topk=pre_nms_topk, min_size=min_size,
                                 variant=self.gi_score)
        self.roi_output_size, self.roi_sampling_ratio = roi_output_size, roi_sampling_ratio
        if roi_align_impl not in ROI_ALIGN_IMPLS:
            raise ValueError(f"roi_align_impl must be one of {ROI_ALIGN_IMPLS}, got {roi_align_impl!r}")
        self.roi_align_impl = roi_align_impl
        if response_mask_rule is not None and response_mask_rule not in MASK_RULES:
            raise ValueError(f"response_mask_rule must be one of {MASK_RULES}, got {response_mask_rule!r}")
        self.response_mask_rule, self.response_iou = response_mask_rule, response_iou  # None: the output's own
        if adapter_kernel_size not in (1, 3):
            raise ValueError(f"adapter_kernel_size must be 1 or 3, got {adapter_kernel_size}")
        self.adapter: nn.Module = nn.Identity()
        if "loss_gid_feature" in self.distill_weight_dict:
            student_channels = student_channels or feature_channels(student)
            teacher_channels = teacher_channels or feature_channels(teacher)
            if always_adapt or student_channels != teacher_channels:
                self.adapter = nn.Conv2d(student_channels, teacher_channels, adapter_kernel_size,
                                         padding=adapter_kernel_size // 2)
        # the latest batch's GIs and response mask [B, N], for analysis and the notebook
        self.last_instances: GeneralInstances | None = None
        self.last_response_mask: Tensor | None = None

    def distill_terms(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted GID terms of the enabled parts (keys of ``distill_weight_dict``)."""
        enabled = self.distill_weight_dict
        instances = select_general_instances(teacher_out, student_out, **self.gism_options)
        self.last_instances = instances
        terms: dict[str, Tensor] = {}
        if "loss_gid_feature" in enabled or "loss_gid_relation" in enabled:
            pool = dict(output_size=self.roi_output_size, sampling_ratio=self.roi_sampling_ratio,
                        impl=self.roi_align_impl)
            student_feats = pool_gi_features(student_out.features, level_strides(student_out), instances.boxes, **pool)
            with torch.no_grad():
                teacher_feats = pool_gi_features(teacher_out.features, level_strides(teacher_out), instances.boxes, **pool)
            if "loss_gid_feature" in enabled:
                num_gis = reduce_mean(torch.tensor(float(student_feats.shape[0]), device=student_feats.device))
                loss = gi_feature_loss(teacher_feats, self.adapter(student_feats), num_gis)
                if student_feats.shape[0] == 0:  # no GI in this batch: keep the adapter in the graph for DDP
                    loss = loss + zero_with_grad(*self.adapter.parameters(), *(f for f in student_out.features))
                terms["loss_gid_feature"] = loss
            if "loss_gid_relation" in enabled:
                terms["loss_gid_relation"] = self.relation_loss(teacher_feats, student_feats, instances.counts)
        if "loss_gid_cls" in enabled or "loss_gid_reg" in enabled:
            terms.update(self.response_losses(student_out, teacher_out, instances))
        return terms

    def relation_loss(self, teacher_feats: Tensor, student_feats: Tensor, counts: list[int]) -> Tensor:
        """Relation loss per image (mean over images with >= 3 GIs) or over the whole batch."""
        if self.relation_scope == "batch":
            return gi_relation_loss(teacher_feats, student_feats)
        loss, used = gi_relation_loss_groups(teacher_feats, student_feats, counts)
        num_images = reduce_mean(torch.tensor(float(used), device=student_feats.device)).clamp(min=1.0)
        return loss / num_images

    def response_losses(self, student_out, teacher_out, instances: GeneralInstances) -> dict[str, Tensor]:
        """BCE and L1 between student and teacher head outputs at the masked slots."""
        student_logits, student_boxes, anchors, points = response_outputs(student_out)
        teacher_logits, teacher_boxes, _, _ = response_outputs(teacher_out)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student and teacher head outputs must correspond slot by slot: student {tuple(student_logits.shape)}, "
                f"teacher {tuple(teacher_logits.shape)}"
            )
        rule, iou = default_mask_rule(student_out)
        rule = self.response_mask_rule or rule
        iou = iou if self.response_iou is None else self.response_iou
        mask = response_mask(anchors, points, instances.boxes, rule, iou)  # [B, N]
        self.last_response_mask = mask
        num_masked = reduce_mean(mask.sum().float())
        terms = {}
        if "loss_gid_cls" in self.distill_weight_dict:
            terms["loss_gid_cls"] = response_cls_loss(student_logits[mask], teacher_logits[mask], num_masked)
        if "loss_gid_reg" in self.distill_weight_dict:
            terms["loss_gid_reg"] = response_reg_loss(student_boxes[mask], teacher_boxes[mask], num_masked)
        return terms
