"""LD's loss (Zheng et al., *Localization Distillation for Dense Object Detection*, CVPR 2022).

A GFL-style head predicts every box edge as a discrete distribution over ``{0, 1, ..., n}``
(``n = reg_max``, in units of the level's stride). LD transfers the teacher's edge distributions
to the student with a temperature-softened KL divergence, edge by edge, exactly as knowledge
distillation transfers class distributions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ld_kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Temperature-scaled KL divergence between two discrete distributions, per distribution.

    For one edge with student logits ``s`` and teacher logits ``t`` (``K = n + 1`` bins each)::

        LD(s, t) = T^2 * (1/K) * sum_k  p_k (log p_k - log q_k),
        p = softmax(t / T),   q = softmax(s / T).

    The mean over bins (instead of KL's sum) is what the released code computes; LD's published
    loss weights (0.25) assume it. The ``T^2`` factor keeps the gradient's scale independent of
    ``T`` (Hinton et al.). The same formula on class logits is LD's "Main KD" (``K = C``, ``T = 2``).

    The teacher distribution is a constant: ``teacher_logits`` is detached here, so no gradient
    can reach the teacher even if the caller forgot ``torch.no_grad()``.

    Args:
        student_logits: ``[..., K]`` student logits (one distribution per leading index).
        teacher_logits: ``[..., K]`` teacher logits, same shape.
        temperature: ``T > 0`` (LD: 10; Main KD: 2).

    Returns:
        ``[...]`` the unreduced loss, one value per distribution (e.g. per edge).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"ld_kl_div: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [..., K]"
        )
    if not temperature > 0:
        raise ValueError(f"ld_kl_div: temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
    teacher_log_prob = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)  # log p
    student_log_prob = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # log q
    kl_per_bin = teacher_log_prob.exp() * (teacher_log_prob - student_log_prob)  # p (log p - log q)
    return kl_per_bin.mean(dim=-1) * temperature**2


def edge_ld(student_box_logits: Tensor, teacher_box_logits: Tensor, reg_max: int, temperature: float) -> Tensor:
    """LD of the four edges of each location, averaged over the edges.

    ``LD_loc = (1/4) * sum_{e in (l, t, r, b)} LD(s_e, t_e)`` (:func:`ld_kl_div` per edge).

    Args:
        student_box_logits: ``[M, 4 * (reg_max + 1)]`` edge-distribution logits of ``M`` locations.
        teacher_box_logits: ``[M, 4 * (reg_max + 1)]`` the teacher's, same locations.
        reg_max: ``n`` (``n + 1`` bins per edge).
        temperature: ``T``.

    Returns:
        ``[M]`` per-location loss.
    """
    n_bins = reg_max + 1
    if student_box_logits.shape[-1] != 4 * n_bins:
        raise ValueError(
            f"edge_ld: box logits have {student_box_logits.shape[-1]} entries per location; "
            f"expected 4 * (reg_max + 1) = {4 * n_bins}"
        )
    per_edge = ld_kl_div(
        student_box_logits.reshape(-1, 4, n_bins), teacher_box_logits.reshape(-1, 4, n_bins), temperature
    )  # [M, 4]
    return per_edge.mean(dim=1)
