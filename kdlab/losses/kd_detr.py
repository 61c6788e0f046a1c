"""KD-DETR's losses at the distillation points (METHODS.md §3), one equation per function.

Notation: ``P`` distillation points (queries fed to both decoders), ``s`` / ``t`` the student's and
the teacher's outputs at those points (class logits ``[P, C]``, boxes ``[P, 4]`` normalised cxcywh),
``w_p = max_c σ(t_pc)`` the teacher's foreground confidence at point ``p`` (detached).

- classification ``w_p · T² · KL(softmax_T(t_p) ‖ softmax_T(s_p))``, KL averaged over the ``C`` classes
  (:func:`point_kl`, the released code's ``F.kl_div(...).mean(1) · T²``);
- boxes ``Σ_p w_p ‖b_s − b_t‖₁ / Σ_p w_p`` (:func:`point_box_l1` then :func:`weighted_mean`) and
  ``Σ_p w_p (1 − GIoU(b_s, b_t)) / Σ_p w_p`` (:func:`point_giou`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss

from kdlab.losses.ld import ld_kl_div


def foreground_weight(teacher_logits: Tensor) -> Tensor:
    """``w_p = max_c σ(t_pc)``, detached: points where the teacher sees an object count more.

    Args:
        teacher_logits: ``[..., P, C]`` the teacher's sigmoid class logits at the points.

    Returns:
        ``[..., P]`` float32 weights in ``(0, 1)``.
    """
    return teacher_logits.detach().float().sigmoid().amax(dim=-1)


def point_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 10.0) -> Tensor:
    """Classification distillation at each point: ``T² · 1/C Σ_c p_c (log p_c − log q_c)`` with
    ``p = softmax(t / T)``, ``q = softmax(s / T)`` over the ``C`` classes (the released code's
    ``F.kl_div(...).mean(1) · T²``; :func:`kdlab.losses.ld.ld_kl_div`, which LD uses on box edges).
    With one class both distributions are ``[1]`` and the term is 0.

    Args:
        student_logits, teacher_logits: ``[..., P, C]``.

    Returns:
        ``[..., P]`` per-point losses.
    """
    return ld_kl_div(student_logits.float(), teacher_logits.detach().float(), temperature)


def point_box_l1(student_boxes: Tensor, teacher_boxes: Tensor) -> Tensor:
    """``‖b_s − b_t‖₁ = Σ_k |b_s,k − b_t,k|`` per point over the four normalised cxcywh coordinates
    (DETR's ``loss_bbox`` per box). Returns ``[..., P]``."""
    return (student_boxes.float() - teacher_boxes.detach().float()).abs().sum(dim=-1)


def point_giou(student_boxes: Tensor, teacher_boxes: Tensor) -> Tensor:
    """``1 − GIoU(b_s, b_t)`` per point (boxes normalised cxcywh). Returns ``[..., P]``."""
    shape = student_boxes.shape[:-1]
    s = box_convert(student_boxes.float().reshape(-1, 4), "cxcywh", "xyxy")
    t = box_convert(teacher_boxes.detach().float().reshape(-1, 4), "cxcywh", "xyxy")
    return generalized_box_iou_loss(s, t, reduction="none").view(shape)


def weighted_mean(values: Tensor, weights: Tensor, normalizer: Tensor | None = None) -> Tensor:
    """``Σ_p w_p v_p / Σ_p w_p`` (the box terms; ``normalizer`` replaces ``Σ w`` when given, e.g. a
    mean over processes). The normaliser is clamped at ``1e-6``, so no points give 0."""
    if normalizer is None:
        normalizer = weights.sum()
    return (weights * values).sum() / torch.as_tensor(normalizer).clamp(min=1e-6)
