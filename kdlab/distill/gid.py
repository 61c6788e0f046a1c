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

``variant="official"`` switches four choices to the released code's, each also settable alone:
the GI score (``gi_score``), the relation scope (``relation_scope``), GISM's minimum side (sides
``> min_size`` kept instead of ``>= min_size``: ``strict_min_size``) and the response mask of the
anchor-IoU rule, which also keeps each GI's best-overlapping anchors below the threshold as
RetinaNet's matcher does (``response_low_quality``; the RPN's matcher allows them too). A weight of 0
switches a term off (it is then neither computed nor logged).

Teachers: any trained detector of the student's family whose predictions correspond slot by slot
(same strides, anchors and classes; the FPN widths may differ). On shapes: the project's teachers
(``configs/shapes_gid_*_teacher.yaml``). On COCO, torchvision's weights through the zoo, e.g.
``teacher = build_detector("retinanet_resnet50_fpn", 91, weights="COCO_V1")`` with a
``build_detector("retinanet", 91, backbone="resnet18", ...)`` student (torchvision's 91 COCO slots,
anchors ``4 * stride`` x 3 scales x 3 ratios on both); or restrict both to a dataset's classes
with ``restrict_classes_``. A mismatch raises a ``ValueError`` naming both shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdlab.distill.base import DistillCriterion
from kdlab.distill.common import ROI_ALIGN_IMPLS, check_teacher_student, fpn_channels, pool_fpn_boxes
from kdlab.distill.gism import GeneralInstances, general_instance_kinds, select_general_instances
from kdlab.losses.common import zero_with_grad
from kdlab.losses.gid import (
    MASK_RULES,
    gi_feature_loss,
    gi_relation_loss,
    gi_relation_loss_groups,
    response_cls_loss,
    response_mask,
    response_reg_loss,
)
from kdlab.models.base import Detector
from kdlab.utils.dist import reduce_mean

__all__ = ["GID", "select_general_instances", "general_instance_kinds", "response_mask", "GeneralInstances"]

GID_VARIANTS = ("paper", "official")
RELATION_SCOPES = ("image", "batch")


class GID(DistillCriterion):
    """General Instance Distillation (see the module docstring).

    Args:
        student: RetinaNet, FCOS or Faster R-CNN (any detector whose output is a ``DenseOutput``
            or a two-stage output with RPN fields).
        teacher: trained detector of the same family (same strides, anchors and classes).
        feature_weight: feature loss weight (5e-4; 0 = off).
        relation_weight: relation loss weight (40; 0 = off).
        response_cls_weight: response BCE weight (0.1; 0 = off).
        response_reg_weight: response L1 weight (1.0; 0 = off).
        variant: ``"paper"`` or ``"official"``: the defaults of ``gi_score``, ``relation_scope``,
            ``strict_min_size`` and ``response_low_quality``.
        gi_score: ``"paper"`` (``max_c |P_t - P_s|``) or ``"official"`` (``|max P_t - max P_s|``).
        relation_scope: ``"image"`` (paper) or ``"batch"`` (released code: all GIs of the batch).
        strict_min_size: GISM keeps sides ``> min_size`` (released code, detectron2's ``nonempty``)
            instead of ``>= min_size``; ``None``: ``True`` for ``variant="official"``.
        response_low_quality: the anchor-IoU response mask also keeps each GI's best-overlapping
            anchors (the matcher's low-quality matches); ``None``: ``True`` for ``variant="official"``.
        num_instances: GIs per image ``K`` (10).
        nms_iou: GISM's NMS threshold (0.3).
        pre_nms_topk: GISM's pre-NMS candidates (3000).
        min_size: smallest GI side in input pixels (10 in the released code, which trains at 800 px).
        roi_output_size: ``S`` of the pooled GI features (10).
        roi_sampling_ratio: RoIAlign sampling ratio (2).
        roi_align_impl: ``"auto"`` (default), ``"separable"`` or ``"torchvision"``; see
            :func:`kdlab.distill.common.pool_fpn_boxes`.
        adapter_kernel_size: 1 or 3, the student adapter applied to the pooled features.
        always_adapt: add an adapter even when the channel counts match.
        response_mask_rule: ``"anchor_iou"`` / ``"center"``; ``None``: the student's own rule.
        response_iou: anchor IoU threshold of the mask; ``None``: the detector's own (0.5; RPN 0.7).
        student_channels, teacher_channels: FPN widths (``None``: read from the model).
    """

    # GISM, the feature and relation terms read the teacher's FPN maps and the response terms its dense stage
    # (Faster R-CNN: the RPN): a two-stage teacher skips its proposals and RoI head
    teacher_dense_only = True

    name = "gid"
    method = "GID"
    supported_kinds = ("dense", "two_stage")

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
        strict_min_size: bool | None = None,
        response_low_quality: bool | None = None,
        num_instances: int = 10,
        nms_iou: float = 0.3,
        pre_nms_topk: int = 3000,
        min_size: float = 10.0,
        roi_output_size: int = 10,
        roi_sampling_ratio: int = 2,
        roi_align_impl: str = "auto",
        adapter_kernel_size: int = 1,
        always_adapt: bool = False,
        response_mask_rule: str | None = None,
        response_iou: float | None = None,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ):
        check_teacher_student(student, teacher, self.method, ("num_classes",))
        super().__init__(student, teacher)
        if getattr(student, "output_kind", "dense") != getattr(teacher, "output_kind", "dense"):
            raise ValueError(f"GID compares teacher and student slot by slot: both must be of one family, got a "
                             f"{type(student).__name__} student and a {type(teacher).__name__} teacher")
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
        self.weight_dict = {name: float(w) for name, w in weights.items() if w > 0}
        official = variant == "official"
        self.strict_min_size = official if strict_min_size is None else bool(strict_min_size)
        self.response_low_quality = official if response_low_quality is None else bool(response_low_quality)
        self.gism_options = dict(k=num_instances, nms_iou=nms_iou, pre_nms_topk=pre_nms_topk, min_size=min_size,
                                 variant=self.gi_score, strict_min_size=self.strict_min_size)
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
        if "loss_gid_feature" in self.weight_dict:
            student_channels = fpn_channels(student, student_channels)
            teacher_channels = fpn_channels(teacher, teacher_channels)
            if always_adapt or student_channels != teacher_channels:
                self.adapter = nn.Conv2d(student_channels, teacher_channels, adapter_kernel_size,
                                         padding=adapter_kernel_size // 2)
        # the latest batch's GIs and response mask [B, N], for analysis and the notebook
        self.last_instances: GeneralInstances | None = None
        self.last_response_mask: Tensor | None = None

    def forward(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted GID terms of the enabled parts (keys of ``weight_dict``)."""
        enabled = self.weight_dict
        instances = select_general_instances(teacher_out, student_out, **self.gism_options)
        self.last_instances = instances
        terms: dict[str, Tensor] = {}
        if "loss_gid_feature" in enabled or "loss_gid_relation" in enabled:
            pool = dict(output_size=self.roi_output_size, sampling_ratio=self.roi_sampling_ratio,
                        impl=self.roi_align_impl)
            student_feats = pool_fpn_boxes(student_out.features, student_out.feature_strides, instances.boxes, **pool)
            with torch.no_grad():
                teacher_feats = pool_fpn_boxes(teacher_out.features, teacher_out.feature_strides, instances.boxes, **pool)
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
        """BCE and L1 between the student's and the teacher's dense-stage outputs at the masked slots
        (Faster R-CNN: the RPN's objectness and deltas)."""
        student = student_out.dense_slots(self.method, "student")
        teacher = teacher_out.dense_slots(self.method, "teacher")
        if student.cls_logits.shape != teacher.cls_logits.shape:
            raise ValueError(
                f"GID: student and teacher head outputs must correspond slot by slot: student "
                f"{tuple(student.cls_logits.shape)}, teacher {tuple(teacher.cls_logits.shape)}"
            )
        rule, iou = student.response_rule
        rule = self.response_mask_rule or rule
        iou = iou if self.response_iou is None else self.response_iou
        mask = response_mask(student.anchors, student.points, instances.boxes, rule, iou,
                             low_quality=self.response_low_quality)  # [B, N]
        self.last_response_mask = mask
        num_masked = reduce_mean(mask.sum().float())
        terms = {}
        if "loss_gid_cls" in self.weight_dict:
            terms["loss_gid_cls"] = response_cls_loss(student.cls_logits[mask], teacher.cls_logits[mask], num_masked)
        if "loss_gid_reg" in self.weight_dict:
            terms["loss_gid_reg"] = response_reg_loss(student.box_regression[mask], teacher.box_regression[mask], num_masked)
        return terms
