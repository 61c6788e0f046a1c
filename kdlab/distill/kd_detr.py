"""KD-DETR: knowledge distillation for DETRs with consistent distillation points (Wang et al., CVPR 2024;
METHODS.md §3), and the baseline it argues against.

DETR students and teachers predict unordered sets from their own queries: query ``q`` of the teacher
and query ``q`` of the student look at different things, so there are no corresponding predictions to
distil. KD-DETR feeds the **same** extra queries, the *distillation points*, to both decoders (a
separate decoder pass over each model's own encoder memory, ``forward(..., extra_queries=...)``), so
their outputs correspond point by point:

- **specific points**: the teacher's learned anchor queries (detached), where the teacher looks;
- **general points**: fresh random anchors every iteration (``N(0, 1)`` in inverse-sigmoid space),
  shared by teacher and student, which cover the image at large.

At each point ``p``, for every student decoder layer ``l`` against the teacher's final layer
(:mod:`kdlab.losses.kd_detr`), with the foreground weight ``w_p = max_c σ(t_pc)`` (detached):

- ``loss_kdd_{set}_cls  = Σ_l Σ_p w_p · T² · KL(softmax_T(t_p) ‖ softmax_T(s_p^l)) / B``  (``T = 10``)
- ``loss_kdd_{set}_l1   = Σ_l Σ_p w_p ‖b_s^l − b_t‖₁ / Σ_p w_p``  (L1 norm over cxcywh, weight 5)
- ``loss_kdd_{set}_giou = Σ_l Σ_p w_p (1 − GIoU(b_s^l, b_t)) / Σ_p w_p``              (weight 2)

for ``set`` in ``specific`` and ``general``; classification weight 1 for each set. Paper vs code: the
released code sums the classification term over the points of its batch (8 images per GPU); kdlab
divides by the number of images ``B`` so the term does not grow with the batch (``variant="official"``:
the sum). The released box term takes the *mean* of the four coordinates' absolute differences
(``F.l1_loss(..., reduction="none").mean(1)`` in its ``kd_loss.py``), a quarter of the L1 norm of the
paper's equation and of DETR's own ``loss_bbox``, which kdlab uses; ``variant="official"`` takes the
mean. Never are GT boxes fed in place of the shared points (the released denoising path does,
which breaks the correspondence).

:class:`MatchedQueryKD` is the baseline: distil through the *detection* queries, after pairing the
teacher's predictions with the student's by Hungarian matching (per image and student layer, DETR's
matching cost with the teacher's prediction as the target) or, as the released code's logit KD does,
through the ground truth both are matched to (``pairing="ground_truth"``). The pairs it distils are
inconsistent: different queries that happen to predict similar things.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from kdlab.distill.base import DistillCriterion
from kdlab.distill.common import check_teacher_student
from kdlab.losses.kd_detr import foreground_weight, point_box_l1, point_giou, point_kl, weighted_mean
from kdlab.models.base import Detector
from kdlab.models.detr_criterion import HungarianMatcher, hungarian_match
from kdlab.utils.dist import reduce_mean, reduce_normalizer

KD_DETR_VARIANTS = ("kdlab", "official")
POINT_SETS = ("specific", "general")


class KDDETR(DistillCriterion):
    """KD-DETR with specific and general distillation points (see the module docstring).

    Args:
        student, teacher: DETR-family detectors (``output_kind == "set"``, e.g. ``dab_detr``) with the
            same classes; the teacher exposes ``query_anchors``.
        specific: distil at the teacher's anchor queries.
        general: distil at fresh random anchors.
        num_general: general points per iteration (300).
        num_specific: use the teacher's first ``k`` anchors (``None``: all of them).
        weighting: the foreground weight ``w_p`` (off: every point counts 1).
        temperature: ``T`` of the classification term (10).
        cls_weight, l1_weight, giou_weight: term weights (1, 5, 2); 0 switches a term off.
        variant: ``"kdlab"`` (classification term per image, L1 norm of the box difference) or ``"official"``
            (the released code: classification summed over the batch, box L1 the mean of the 4 coordinates).
    """

    name = "kd_detr"
    method = "KD-DETR"
    supported_kinds = ("set",)

    def __init__(self, student: Detector, teacher: Detector, *, specific: bool = True, general: bool = True,
                 num_general: int = 300, num_specific: int | None = None, weighting: bool = True,
                 temperature: float = 10.0, cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 variant: Literal["kdlab", "official"] = "kdlab"):
        super().__init__(student, teacher)  # first: a non-DETR model is refused by its output kind
        check_teacher_student(student, teacher, self.method, ("num_classes",))
        if variant not in KD_DETR_VARIANTS:
            raise ValueError(f"KD-DETR variant must be one of {KD_DETR_VARIANTS}, got {variant!r}")
        if not (specific or general):
            raise ValueError("KD-DETR needs at least one set of distillation points: specific=True or general=True")
        if num_general < 1 or (num_specific is not None and num_specific < 1):
            raise ValueError(f"num_general and num_specific must be >= 1, got {num_general}, {num_specific}")
        if not temperature > 0 or min(cls_weight, l1_weight, giou_weight) < 0:
            raise ValueError("KD-DETR needs temperature > 0 and non-negative weights")
        teacher_anchors = getattr(teacher, "query_anchors", None)
        if specific and not isinstance(teacher_anchors, Tensor):
            raise ValueError(f"KD-DETR's specific points are the teacher's anchor queries, but the teacher "
                             f"({type(teacher).__name__}) has no query_anchors")
        self.sets = [s for s, on in (("specific", specific), ("general", general)) if on]
        self.num_general, self.num_specific = num_general, num_specific
        self.weighting, self.temperature, self.variant = weighting, float(temperature), variant
        weights = {"cls": cls_weight, "l1": l1_weight, "giou": giou_weight}
        self.weight_dict = {f"loss_kdd_{s}_{k}": float(w) for s in self.sets for k, w in weights.items() if w > 0}
        _warn_one_class(student, self.method, cls_weight)

    def points(self, teacher: Detector, device: torch.device) -> dict[str, Tensor]:
        """This step's distillation points, ``{set: [P, 4]}`` anchors in inverse-sigmoid space.

        The general points are drawn from the global torch RNG, so a resumed run draws the same ones.
        """
        points = {}
        if "specific" in self.sets:
            anchors = teacher.query_anchors.detach()
            points["specific"] = anchors if self.num_specific is None else anchors[: self.num_specific]
        if "general" in self.sets:
            points["general"] = torch.randn(self.num_general, 4, device=device)
        return points

    def shared_inputs(self, images: Tensor, targets: list[dict], student: Detector, teacher: Detector) -> dict:
        """The same points for both decoders: ``forward(..., extra_queries={set: anchors})``."""
        return {"extra_queries": self.points(teacher, images.device)}

    def forward(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted terms (the keys of ``weight_dict``)."""
        terms: dict[str, Tensor] = {}
        for point_set in self.sets:
            for who, out in (("student", student_out), ("teacher", teacher_out)):
                if point_set not in getattr(out, "extra", {}):
                    raise ValueError(f"{self.method}: the {who}'s output has no '{point_set}' query pass; run it with "
                                     "the points of shared_inputs() (DistillationTask does)")
            student_pass, teacher_pass = student_out.extra[point_set], teacher_out.extra[point_set]
            terms.update(self.point_terms(point_set, student_pass.layer_logits, student_pass.layer_boxes,
                                          teacher_pass.layer_logits[-1], teacher_pass.layer_boxes[-1]))
        return terms

    def point_terms(self, point_set: str, student_logits: Tensor, student_boxes: Tensor, teacher_logits: Tensor,
                    teacher_boxes: Tensor) -> dict[str, Tensor]:
        """Every student layer ``[L, B, P, ·]`` against the teacher's final layer ``[B, P, ·]``."""
        if self.weighting:
            weight = foreground_weight(teacher_logits)  # [B, P], detached, from the teacher's final layer
        else:
            weight = torch.ones(teacher_logits.shape[:-1], device=teacher_logits.device)
        batch = teacher_logits.shape[0]
        images = 1.0 if self.variant == "official" else reduce_normalizer(torch.tensor(float(batch), device=weight.device))
        weight_sum = reduce_mean(weight.sum()).clamp(min=1e-6)
        terms = {}
        prefix = f"loss_kdd_{point_set}_"
        if prefix + "cls" in self.weight_dict:
            kl = point_kl(student_logits, teacher_logits.expand_as(student_logits), self.temperature)  # [L, B, P]
            terms[prefix + "cls"] = (weight * kl).sum() / images
        if prefix + "l1" in self.weight_dict:
            l1 = point_box_l1(student_boxes, teacher_boxes.expand_as(student_boxes))
            if self.variant == "official":  # the released kd_loss.py: mean over the 4 coordinates
                l1 = l1 / 4
            terms[prefix + "l1"] = sum(weighted_mean(layer, weight, weight_sum) for layer in l1)
        if prefix + "giou" in self.weight_dict:
            giou = point_giou(student_boxes, teacher_boxes.expand_as(student_boxes))
            terms[prefix + "giou"] = sum(weighted_mean(layer, weight, weight_sum) for layer in giou)
        return terms


PAIRINGS = ("predictions", "ground_truth")


class MatchedQueryKD(DistillCriterion):
    """The baseline KD-DETR argues against: distillation through the detection queries, with teacher and
    student predictions paired by Hungarian matching (inconsistent points; see the module docstring).

    Per image and student decoder layer ``l``, the pairs are

    - ``pairing="predictions"``: a minimum-cost one-to-one matching of the student's predictions to the
      teacher's final ones, DETR's cost with the teacher's box and top class as the target;
    - ``pairing="ground_truth"`` (the released code's logit KD): the student's and the teacher's
      predictions matched to the same ground-truth box.

    The losses on the pairs are KD-DETR's (:mod:`kdlab.losses.kd_detr`, foreground-weighted).

    Args:
        student, teacher: DETR-family detectors with the same classes.
        pairing: ``"predictions"`` or ``"ground_truth"``.
        weighting, temperature, cls_weight, l1_weight, giou_weight: as :class:`KDDETR`.
    """

    name = "detr_matched_kd"
    method = "matched-query KD"
    supported_kinds = ("set",)

    def __init__(self, student: Detector, teacher: Detector, *,
                 pairing: Literal["predictions", "ground_truth"] = "predictions", weighting: bool = True,
                 temperature: float = 10.0, cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0):
        super().__init__(student, teacher)
        check_teacher_student(student, teacher, self.method, ("num_classes",))
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if not temperature > 0 or min(cls_weight, l1_weight, giou_weight) < 0:
            raise ValueError(f"{self.method} needs temperature > 0 and non-negative weights")
        self.pairing, self.weighting, self.temperature = pairing, weighting, float(temperature)
        self.teacher_needs_targets = pairing == "ground_truth"  # the teacher's own matching to the GT
        self.matcher = HungarianMatcher()
        weights = {"loss_mkd_cls": cls_weight, "loss_mkd_l1": l1_weight, "loss_mkd_giou": giou_weight}
        self.weight_dict = {k: float(w) for k, w in weights.items() if w > 0}
        _warn_one_class(student, self.method, cls_weight)

    @torch.no_grad()
    def pairs(self, student_logits: Tensor, student_boxes: Tensor, teacher_out, targets: list[dict]
              ) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(student_idx, teacher_idx)`` of one student layer (``[B, Q, ·]`` logits and boxes)."""
        teacher_logits, teacher_boxes = teacher_out.pred_logits, teacher_out.pred_boxes
        result = []
        if self.pairing == "predictions":
            for s_logits, s_boxes, t_logits, t_boxes in zip(student_logits, student_boxes, teacher_logits, teacher_boxes):
                cost = self.matcher.cost_matrix(s_logits, s_boxes, t_logits.argmax(dim=-1), t_boxes.float())
                result.append(hungarian_match(cost))
            return result
        if teacher_out.matches is None:
            raise ValueError("pairing='ground_truth' needs the teacher's matching: run the teacher with targets")
        student_matches = self.matcher(student_logits, student_boxes, targets)
        for (s_query, s_gt), (t_query, t_gt), target in zip(student_matches, teacher_out.matches, targets):
            teacher_of_gt = torch.full((len(target["boxes"]),), -1, dtype=torch.int64)  # GT -> teacher query
            teacher_of_gt[t_gt.cpu()] = t_query.cpu()
            s_query, s_gt = s_query.cpu(), s_gt.cpu()
            paired = teacher_of_gt[s_gt] >= 0
            result.append((s_query[paired], teacher_of_gt[s_gt][paired]))
        return result

    def forward(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted terms (the keys of ``weight_dict``), summed over the student's decoder layers."""
        device = student_out.pred_logits.device
        totals = {k: student_out.pred_logits.sum() * 0.0 for k in self.weight_dict}
        batch = reduce_normalizer(torch.tensor(float(student_out.pred_logits.shape[0]), device=device))
        for s_logits, s_boxes in zip(student_out.layer_logits, student_out.layer_boxes):
            pairs = self.pairs(s_logits, s_boxes, teacher_out, targets)
            image = torch.cat([torch.full((len(s),), b, dtype=torch.int64) for b, (s, _) in enumerate(pairs)]).to(device)
            s_idx = torch.cat([s for s, _ in pairs]).to(device)
            t_idx = torch.cat([t for _, t in pairs]).to(device)
            t_logits = teacher_out.pred_logits[image, t_idx]
            t_boxes = teacher_out.pred_boxes[image, t_idx]
            weight = foreground_weight(t_logits) if self.weighting else torch.ones(t_logits.shape[0], device=device)
            weight_sum = reduce_mean(weight.sum()).clamp(min=1e-6)
            if "loss_mkd_cls" in totals:
                totals["loss_mkd_cls"] = totals["loss_mkd_cls"] + (
                    weight * point_kl(s_logits[image, s_idx], t_logits, self.temperature)).sum() / batch
            if "loss_mkd_l1" in totals:
                totals["loss_mkd_l1"] = totals["loss_mkd_l1"] + weighted_mean(
                    point_box_l1(s_boxes[image, s_idx], t_boxes), weight, weight_sum)
            if "loss_mkd_giou" in totals:
                totals["loss_mkd_giou"] = totals["loss_mkd_giou"] + weighted_mean(
                    point_giou(s_boxes[image, s_idx], t_boxes), weight, weight_sum)
        return totals


def _warn_one_class(student: Detector, method: str, cls_weight: float) -> None:
    if getattr(student, "num_classes", None) == 1 and cls_weight > 0:
        warnings.warn(f"{method}: with one class the classification term (a softmax over the classes) is always 0",
                      stacklevel=3)
