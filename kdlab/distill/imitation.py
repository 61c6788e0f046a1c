"""The baselines of LD's central comparison: feature imitation on four regions, and plain class KD.

Feature imitation (all four classes): an adapter maps the student's FPN channels to the teacher's
(a shared 1x1 conv; none when the widths are equal, as in the released code), and the loss is the
squared error over the selected locations of every FPN level::

    L_im = sum_l sum_{b,y,x} m_l[b,y,x] * ||adapt(S_l)[b,:,y,x] - T_l[b,:,y,x]||^2 / (C_t * max(sum m, 1))

i.e. a mean over the selected (location, channel) entries (the released ``IMLoss`` is an MSE
averaged per level and summed over levels; kdlab averages over all levels at once). Released
weight 2.0. The region ``m`` is what differs:

- :class:`FitNet`: every location (Romero et al., whole FPN maps);
- :class:`InsideGTImitation`: locations whose point lies inside a GT box;
- :class:`FineGrainedImitation`: anchors with ``IoU(a, g) > psi * max_a' IoU(a', g)`` for some GT
  ``g``, ``psi = 0.5`` (Wang et al., CVPR 2019);
- :class:`GIImitation`: the general-instance locations: per image and level, GISM's score
  ``max_c |sigma(t_c) - sigma(s_c)|`` and box rule (:mod:`kdlab.distill.gism`), NMS at 0.3, top 10
  (GID's selection as the LD code uses it; the released code runs it per level over the whole
  batch at once, kdlab per image).

:class:`ClassificationKD`: ``T^2``-scaled KL between softmax_T class distributions (the formula
of :func:`kdlab.losses.ld.ld_kl_div`), averaged over the positives (or every slot).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou, nms

from kdlab.distill.base import DistillCriterion
from kdlab.distill.common import (
    check_corresponding_slots,
    check_teacher_student,
    fpn_channels,
    slot_mask_to_locations,
)
from kdlab.distill.gism import general_instance_scores
from kdlab.losses.ld import ld_kl_div
from kdlab.models.base import Detector
from kdlab.models.box_ops import points_in_boxes
from kdlab.models.outputs import DenseOutput
from kdlab.utils.dist import reduce_normalizer


def masked_feature_mse(student_features: list[Tensor], teacher_features: list[Tensor], masks: list[Tensor]) -> Tensor:
    """Mean squared error over the masked (location, channel) entries of all levels (see module docstring).

    Args:
        student_features: per level ``[B, C, H_l, W_l]`` (already adapted to the teacher's width).
        teacher_features: per level ``[B, C, H_l, W_l]``.
        masks: per level ``[B, H_l, W_l]`` bool or float weights.
    """
    total, count = None, None
    for s, t, m in zip(student_features, teacher_features, masks):
        m = m.to(s.dtype)
        sq = ((s.float() - t.detach().float()) ** 2).sum(dim=1)  # [B, H, W], summed over channels
        level_sum, level_count = (sq * m).sum(), m.sum() * s.shape[1]
        total = level_sum if total is None else total + level_sum
        count = level_count if count is None else count + level_count
    return total / reduce_normalizer(count)


class FeatureImitation(DistillCriterion):
    """Feature imitation on a region chosen by :meth:`region` (subclasses); term ``loss_imitation``.

    Args:
        student, teacher: dense detectors with the same strides.
        weight: loss weight (2.0, the released ``IMLoss`` weight).
        student_channels, teacher_channels: FPN widths, when not readable from ``model.backbone``.
        adapter: ``"auto"`` (1x1 conv only when the widths differ), ``"conv"`` (always) or ``"none"``.
    """

    check_classes = False
    supported_kinds = ("dense",)

    def __init__(self, student: Detector, teacher: Detector, *, weight: float = 2.0, student_channels: int | None = None,
                 teacher_channels: int | None = None, adapter: str = "auto"):
        check_teacher_student(student, teacher, self.method, ("num_classes", "strides") if self.check_classes else ("strides",))
        super().__init__(student, teacher)
        if weight < 0:
            raise ValueError(f"imitation weight must be >= 0, got {weight}")
        if adapter not in ("auto", "conv", "none"):
            raise ValueError(f"adapter must be 'auto', 'conv' or 'none', got {adapter!r}")
        c_student = fpn_channels(student, student_channels)
        c_teacher = fpn_channels(teacher, teacher_channels)
        if adapter == "none" and c_student != c_teacher:
            raise ValueError(f"adapter='none' needs equal FPN widths; student {c_student}, teacher {c_teacher}")
        use_conv = adapter == "conv" or (adapter == "auto" and c_student != c_teacher)
        self.adapter = nn.Conv2d(c_student, c_teacher, kernel_size=1) if use_conv else nn.Identity()
        self.weight_dict = {"loss_imitation": float(weight)}

    def region(self, student_out: DenseOutput, teacher_out: DenseOutput, targets: list[dict]) -> list[Tensor]:
        """Per level ``[B, H_l, W_l]`` bool mask of the imitated locations."""
        raise NotImplementedError

    def forward(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:
        student_out = student_out.dense_slots(self.method, "student")
        teacher_out = teacher_out.dense_slots(self.method, "teacher")
        if len(student_out.features) != len(teacher_out.features):
            raise ValueError(f"teacher/student mismatch in FPN levels: {len(student_out.features)} vs {len(teacher_out.features)}")
        for level, (s, t) in enumerate(zip(student_out.features, teacher_out.features)):
            if s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
                raise ValueError(f"teacher/student mismatch in FPN level {level}: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        masks = self.region(student_out, teacher_out, targets)
        adapted = [self.adapter(f) for f in student_out.features]
        return {"loss_imitation": masked_feature_mse(adapted, teacher_out.features, masks)}


class FitNet(FeatureImitation):
    """FitNets: imitate the whole FPN maps."""

    name, method = "fitnet", "FitNets imitation"

    def region(self, student_out, teacher_out, targets):
        return [torch.ones(f.shape[0], *f.shape[-2:], dtype=torch.bool, device=f.device) for f in student_out.features]


class InsideGTImitation(FeatureImitation):
    """Imitate the locations whose point lies strictly inside a GT box."""

    name, method = "inside_gt", "inside-GT imitation"

    def region(self, student_out, teacher_out, targets):
        slot_mask = torch.stack([points_in_boxes(student_out.points, t["boxes"].to(student_out.points)).any(dim=1)
                                 for t in targets])
        return slot_mask_to_locations(slot_mask, student_out)


def fine_grained_mask(anchors: Tensor, gt_boxes: Tensor, psi: float = 0.5) -> Tensor:
    """``[N]`` bool: ``IoU(a, g) > psi * max_a' IoU(a', g)`` for at least one GT ``g`` (Wang et al.)."""
    if gt_boxes.shape[0] == 0:
        return torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    ious = box_iou(anchors, gt_boxes)  # [N, G]
    return (ious > psi * ious.max(dim=0).values[None, :]).any(dim=1)


class FineGrainedImitation(FeatureImitation):
    """Fine-grained imitation: near-object anchors (``psi = 0.5`` of each GT's best anchor IoU)."""

    name, method = "fine_grained", "fine-grained imitation"

    def __init__(self, student: Detector, teacher: Detector, *, psi: float = 0.5, **options):
        super().__init__(student, teacher, **options)
        if not 0 <= psi <= 1:
            raise ValueError(f"psi must lie in [0, 1], got {psi}")
        self.psi = psi

    def region(self, student_out, teacher_out, targets):
        if student_out.anchors is None:
            raise ValueError("fine-grained imitation needs anchor boxes; the student's output has anchors=None (anchor-free head)")
        slot_mask = torch.stack([fine_grained_mask(student_out.anchors, t["boxes"].to(student_out.anchors), self.psi)
                                 for t in targets])
        return slot_mask_to_locations(slot_mask, student_out)


def general_instance_slots(student_scores: Tensor, teacher_scores: Tensor, student_boxes: Tensor, teacher_boxes: Tensor,
                           iou_threshold: float = 0.3, top_k: int = 10) -> Tensor:
    """Indices of the general instances among ``M`` slots (one image, one level).

    GISM's score and box rule (:func:`kdlab.distill.gism.general_instance_scores`): score
    ``max_c |P_t[r, c] - P_s[r, c]|``, the teacher's box where its max score is the higher one,
    else the student's; then NMS at ``iou_threshold`` and the best ``top_k``.

    Args:
        student_scores, teacher_scores: ``[M, C]`` sigmoid class scores.
        student_boxes, teacher_boxes: ``[M, 4]`` decoded xyxy boxes.

    Returns:
        ``[K]`` int64 slot indices, ``K <= top_k``, by decreasing GI score.
    """
    gi_score, teacher_higher = general_instance_scores(teacher_scores, student_scores)
    gi_boxes = torch.where(teacher_higher[:, None], teacher_boxes, student_boxes)
    return nms(gi_boxes.float(), gi_score.float(), iou_threshold)[:top_k]


class GIImitation(FeatureImitation):
    """Imitate the general-instance locations (per image and level: NMS 0.3, top 10)."""

    name, method = "gi_imitation", "GI imitation"
    check_classes = True

    def __init__(self, student: Detector, teacher: Detector, *, iou_threshold: float = 0.3, top_k: int = 10, **options):
        super().__init__(student, teacher, **options)
        self.iou_threshold, self.top_k = iou_threshold, top_k

    @torch.no_grad()
    def region(self, student_out, teacher_out, targets):
        check_corresponding_slots(student_out, teacher_out, self.method)
        student_scores = student_out.cls_logits.float().sigmoid()  # [B, N, C]
        teacher_scores = teacher_out.cls_logits.float().sigmoid()
        slot_mask = torch.zeros(student_scores.shape[:2], dtype=torch.bool, device=student_scores.device)
        for b in range(slot_mask.shape[0]):
            start = 0
            for n_level in student_out.num_per_level:
                level = slice(start, start + n_level)
                keep = general_instance_slots(student_scores[b, level], teacher_scores[b, level], student_out.pred_boxes[b, level],
                                              teacher_out.pred_boxes[b, level], self.iou_threshold, self.top_k)
                slot_mask[b, start + keep] = True
                start += n_level
        return slot_mask_to_locations(slot_mask, student_out)


class ClassificationKD(DistillCriterion):
    """Plain logit KD on classification: ``T^2 * mean_c KL(softmax_T(t) || softmax_T(s))`` per slot.

    Term ``loss_cls_kd``, averaged over the region's slots.

    Args:
        student, teacher: dense detectors with the same classes and slot layout.
        weight: loss weight (10, LD's Main KD weight).
        temperature: ``T`` (2).
        region: ``"positives"`` (the student's assignment) or ``"all"`` slots.
    """

    name, method = "cls_kd", "classification KD"
    supported_kinds = ("dense",)

    def __init__(self, student: Detector, teacher: Detector, *, weight: float = 10.0, temperature: float = 2.0,
                 region: str = "positives"):
        check_teacher_student(student, teacher, self.method, ("num_classes", "strides"))
        super().__init__(student, teacher)
        if region not in ("positives", "all"):
            raise ValueError(f"region must be 'positives' or 'all', got {region!r}")
        if weight < 0 or not temperature > 0:
            raise ValueError(f"need weight >= 0 and temperature > 0, got weight={weight}, temperature={temperature}")
        self.temperature, self.region = float(temperature), region
        self.weight_dict = {"loss_cls_kd": float(weight)}

    def forward(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:
        student_out = student_out.dense_slots(self.method, "student")
        teacher_out = teacher_out.dense_slots(self.method, "teacher")
        check_corresponding_slots(student_out, teacher_out, self.method)
        if self.region == "positives":
            mask = student_out.require("assignment", self.method, "student").pos_mask  # [B, N]
        else:
            mask = torch.ones(student_out.cls_logits.shape[:2], dtype=torch.bool, device=student_out.cls_logits.device)
        kd = ld_kl_div(student_out.cls_logits[mask], teacher_out.cls_logits[mask], self.temperature)  # [M]
        count = reduce_normalizer(torch.tensor(float(kd.numel()), device=kd.device))
        return {"loss_cls_kd": kd.sum() / count}
