"""General Instance Selection Module (GISM) of GID (Dai et al., CVPR 2021; METHODS.md §2).

Teacher and student dense heads share their anchor/location layout, so prediction slot ``r`` of
the teacher and slot ``r`` of the student look at the same place. GISM keeps the slots where the
two *disagree* most, without looking at the ground truth: the selected boxes ("general
instances", GIs) can be objects, parts of objects or pure background.

Per image and every iteration:

1. GI score of each slot ``r`` (:func:`general_instance_scores`), the paper's
   ``P_GI^r = max_c |P_t^{rc} - P_s^{rc}|`` or the released code's ``|max_c P_t^{rc} - max_c P_s^{rc}|``;
2. GI box: the teacher's decoded box if ``max_c P_t^{rc} > max_c P_s^{rc}``, else the student's;
3. keep the ``pre_nms_topk`` (3000) best, clip to the image, drop boxes with a side below
   ``min_size``, class-agnostic NMS at IoU 0.3, keep the best ``k`` (10).

Paper vs released code: kdlab keeps a side equal to ``min_size`` (torchvision's
``remove_small_boxes``); the released code drops it (detectron2's ``Boxes.nonempty(threshold)``
keeps sides ``> threshold``): ``strict_min_size=True``, GID's ``variant="official"``.

For Faster R-CNN the class scores are replaced by the RPN objectness ``P = σ(objectness)`` and
the boxes are the RPN's decoded anchors: GISM reads every output through its dense stage
(:func:`gism_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou, clip_boxes_to_image, nms, remove_small_boxes

from kdlab.models.outputs import DetectorOutput


GI_SCORE_VARIANTS = ("paper", "official")
# kinds returned by general_instance_kinds (the paper's Fig. 4 colours)
GI_POSITIVE, GI_SEMI, GI_BACKGROUND = 0, 1, 2
GI_KIND_NAMES = ("positive", "semi-positive", "background")


@dataclass
class GeneralInstances:
    """The general instances of one batch, per image (everything detached).

    Attributes:
        boxes: per image ``[K_i, 4]`` xyxy GI boxes in input pixels, best score first (``K_i <= k``).
        scores: per image ``[K_i]`` GI scores.
        from_teacher: per image ``[K_i]`` bool, ``True`` where the box is the teacher's prediction.
        slots: per image ``[K_i]`` int64 index of the prediction slot each GI came from.
    """

    boxes: list[Tensor]
    scores: list[Tensor]
    from_teacher: list[Tensor]
    slots: list[Tensor]

    @property
    def counts(self) -> list[int]:
        """Number of GIs of each image."""
        return [int(b.shape[0]) for b in self.boxes]


def gism_inputs(output, who: str) -> tuple[Tensor, Tensor]:
    """Per-slot probabilities ``[B, N, C]`` and decoded boxes ``[B, N, 4]`` that GISM compares, detached.

    They come from the output's dense stage (:meth:`~kdlab.models.outputs.DetectorOutput.dense_slots`):
    a one-stage head's class scores, or for Faster R-CNN the RPN's objectness (``C = 1``) and its
    decoded anchors.
    """
    if not isinstance(output, DetectorOutput):
        raise TypeError(f"GISM needs the {who}'s kdlab detector output (a DetectorOutput), got {type(output).__name__}")
    slots = output.dense_slots("GISM", who)
    return slots.cls_logits.detach().float().sigmoid(), slots.pred_boxes.detach().float()


def general_instance_scores(teacher_probs: Tensor, student_probs: Tensor, variant: str = "paper") -> tuple[Tensor, Tensor]:
    """GI score of every slot, and which side's box it would take.

    ``paper``:    ``P_GI^r = max_c |P_t^{rc} - P_s^{rc}|``
    ``official``: ``P_GI^r = |max_c P_t^{rc} - max_c P_s^{rc}|`` (the released reproduction)

    Box choice (both variants): ``B_GI^r = B_t^r`` if ``max_c P_t^{rc} > max_c P_s^{rc}`` else ``B_s^r``.

    Args:
        teacher_probs: ``[..., N, C]`` teacher class probabilities ``σ(logits)``.
        student_probs: ``[..., N, C]`` student class probabilities.
        variant: ``"paper"`` or ``"official"``.

    Returns:
        ``scores`` ``[..., N]`` and ``teacher_higher`` ``[..., N]`` bool.
    """
    if variant not in GI_SCORE_VARIANTS:
        raise ValueError(f"GI score variant must be one of {GI_SCORE_VARIANTS}, got {variant!r}")
    if teacher_probs.shape != student_probs.shape:
        raise ValueError(
            f"teacher and student predictions must correspond slot by slot: teacher {tuple(teacher_probs.shape)}, "
            f"student {tuple(student_probs.shape)} (same strides, anchors, classes and input size needed)"
        )
    teacher_max = teacher_probs.amax(dim=-1)  # amax: no argmax computed
    student_max = student_probs.amax(dim=-1)
    if variant == "paper":
        scores = (teacher_probs - student_probs).abs().amax(dim=-1)
    else:
        scores = (teacher_max - student_max).abs()
    return scores, teacher_max > student_max


def select_from_scores(
    scores: Tensor,
    boxes: Tensor,
    from_teacher: Tensor,
    image_sizes: list[tuple[int, int]],
    *,
    k: int = 10,
    nms_iou: float = 0.3,
    pre_nms_topk: int = 3000,
    min_size: float = 10.0,
    strict_min_size: bool = False,
) -> GeneralInstances:
    """GISM's filtering, per image: top-``pre_nms_topk``, clip, min size, NMS, top-``k``.

    The ranking runs on the whole batch at once; clipping and NMS run image by image, on the best
    ``64 k`` candidates first and deeper only when they leave fewer than ``k`` survivors (the
    same GIs as ranking all ``pre_nms_topk``, tested).

    Args:
        scores: ``[B, N]`` GI scores.
        boxes: ``[B, N, 4]`` GI boxes (xyxy input pixels).
        from_teacher: ``[B, N]`` bool, whether each box is the teacher's.
        image_sizes: ``(h, w)`` of each unpadded image (boxes are clipped to it).
        k: GIs kept per image after NMS.
        nms_iou: IoU threshold of the class-agnostic NMS.
        pre_nms_topk: best slots kept per image before NMS.
        min_size: boxes with a side shorter than this (pixels, after clipping) are dropped.
        strict_min_size: drop a side equal to ``min_size`` too (the released code).

    Returns:
        :class:`GeneralInstances`, best score first in each image, at most ``k`` per image.
    """
    limit = min(pre_nms_topk, scores.shape[1])
    # NMS keeps k of ~3000 candidates, and greedy NMS on a prefix of the ranking decides exactly as
    # the full run there (nms_first_k): rank only the best 64 k first, and an image whose
    # candidates leave fewer than k survivors is ranked again 4x deeper, up to pre_nms_topk.
    depth = min(limit, 64 * k)
    top_scores, slots = scores.topk(depth, dim=1)  # [B, P], sorted
    result = GeneralInstances([], [], [], [])
    for b in range(scores.shape[0]):
        image_scores, image_slots, image_depth = top_scores[b], slots[b], depth
        while True:
            image_boxes, valid = clip_and_filter(boxes[b, image_slots], image_sizes[b], min_size, strict_min_size)
            idx = valid.nonzero().flatten()
            keep = idx[nms_first_k(image_boxes[idx], image_scores[idx], nms_iou, k)]
            if keep.numel() >= k or image_depth >= limit:
                break
            image_depth = min(limit, 4 * image_depth)
            image_scores, image_slots = scores[b].topk(image_depth)
        result.boxes.append(image_boxes[keep])
        result.scores.append(image_scores[keep])
        result.from_teacher.append(from_teacher[b, image_slots[keep]])
        result.slots.append(image_slots[keep])
    return result


def clip_and_filter(boxes: Tensor, image_size: tuple[int, int], min_size: float,
                    strict: bool = False) -> tuple[Tensor, Tensor]:
    """Boxes ``[P, 4]`` clipped to the image (``clip_boxes_to_image``) and a ``[P]`` mask of those
    with both sides ``>= min_size`` (``remove_small_boxes``), or ``> min_size`` with ``strict``
    (detectron2's ``Boxes.nonempty(threshold)``, the released GID code); a NaN box is dropped too."""
    boxes = clip_boxes_to_image(boxes, image_size)
    if strict:
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        return boxes, (widths > min_size) & (heights > min_size)
    valid = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    valid[remove_small_boxes(boxes, min_size)] = True
    return boxes, valid


def nms_first_k(boxes: Tensor, scores: Tensor, iou_threshold: float, k: int, first_prefix: int = 16) -> Tensor:
    """``torchvision.ops.nms(boxes, scores, iou_threshold)[:k]`` for boxes sorted by decreasing score.

    Greedy NMS decides on a box from the boxes before it only, so NMS on a prefix of the sorted
    list keeps exactly the full run's survivors within that prefix. GISM needs only the first
    ``k`` (10) of ~3000 candidates: NMS runs on the first ``first_prefix * k`` boxes and on a
    4x longer prefix only while fewer than ``k`` survive (same result, a fraction of the cost).

    Args:
        boxes: ``[P, 4]`` boxes, sorted by decreasing ``scores``.
        scores: ``[P]`` their scores.
        iou_threshold: NMS IoU threshold.
        k: survivors wanted.

    Returns:
        ``[min(k, survivors)]`` int64 indices into ``boxes``, best first.
    """
    prefix = first_prefix * k
    while True:
        keep = nms(boxes[:prefix], scores[:prefix], iou_threshold)
        if keep.numel() >= k or prefix >= boxes.shape[0]:
            return keep[:k]
        prefix *= 4


@torch.no_grad()
def select_general_instances(
    teacher_out,
    student_out,
    *,
    k: int = 10,
    nms_iou: float = 0.3,
    pre_nms_topk: int = 3000,
    min_size: float = 10.0,
    variant: str = "paper",
    strict_min_size: bool = False,
) -> GeneralInstances:
    """Select the general instances of a batch (GISM, see the module docstring).

    Args:
        teacher_out: the teacher's output (any :class:`~kdlab.models.outputs.DetectorOutput` with a dense stage).
        student_out: the student's output, same kind and slot layout.
        k: GIs per image (10 in the paper).
        nms_iou: NMS IoU threshold (0.3).
        pre_nms_topk: slots kept before NMS (3000).
        min_size: smallest GI box side in input pixels (10 in the released code).
        variant: GI score, ``"paper"`` (``max_c |P_t - P_s|``) or ``"official"`` (``|max P_t - max P_s|``).
        strict_min_size: keep only sides ``> min_size`` (the released code) instead of ``>= min_size``.

    Returns:
        :class:`GeneralInstances` with per-image boxes, scores, side and slot.
    """
    if k < 1 or pre_nms_topk < 1:
        raise ValueError(f"k and pre_nms_topk must be >= 1, got k={k}, pre_nms_topk={pre_nms_topk}")
    if not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
    teacher_probs, teacher_boxes = gism_inputs(teacher_out, "teacher")
    student_probs, student_boxes = gism_inputs(student_out, "student")
    scores, teacher_higher = general_instance_scores(teacher_probs, student_probs, variant)  # [B, N]
    gi_boxes = torch.where(teacher_higher[..., None], teacher_boxes, student_boxes)  # [B, N, 4]
    image_sizes = [tuple(size) for size in student_out.image_sizes]
    if len(image_sizes) != scores.shape[0]:
        raise ValueError(f"the output has {len(image_sizes)} image_sizes for a batch of {scores.shape[0]} images")
    return select_from_scores(scores, gi_boxes, teacher_higher, image_sizes, k=k, nms_iou=nms_iou,
                              pre_nms_topk=pre_nms_topk, min_size=min_size, strict_min_size=strict_min_size)


def general_instance_kinds(gi_boxes: Tensor, gt_boxes: Tensor, positive_iou: float = 0.7,
                           background_iou: float = 0.3) -> Tensor:
    """Relation of each GI to the ground truth, as the paper colours them.

    ``positive`` if ``max_g IoU(GI, g) >= positive_iou``, ``background`` if ``< background_iou``,
    ``semi-positive`` in between. GISM never uses this: it is for analysis and the notebook.

    Args:
        gi_boxes: ``[K, 4]`` GI boxes.
        gt_boxes: ``[G, 4]`` ground-truth boxes (``G`` may be 0: every GI is background).

    Returns:
        ``[K]`` int64 in ``{GI_POSITIVE, GI_SEMI, GI_BACKGROUND}``.
    """
    best_iou = gi_boxes.new_zeros(gi_boxes.shape[0])
    if gt_boxes.numel() and gi_boxes.numel():
        best_iou = box_iou(gi_boxes.float(), gt_boxes.float()).max(dim=1).values
    kinds = torch.full((gi_boxes.shape[0],), GI_SEMI, dtype=torch.int64, device=gi_boxes.device)
    kinds[best_iou >= positive_iou] = GI_POSITIVE
    kinds[best_iou < background_iou] = GI_BACKGROUND
    return kinds
