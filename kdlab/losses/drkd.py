"""DRKD's three losses (METHODS.md §4), one equation per function.

Notation: ``R_s = adapt(G_s(F_s))`` and ``R_t = G_t(F_t)`` the student's (adapted) and the
teacher's graph-unit outputs on one FPN level; ``Z_s, Z_t`` the instance relation outputs and
``P_s, P_t`` the RoIAligned GT-box features of one image (``[K_i, C, S, S]``).

Two distances, selected by ``distance``:

- ``"squared"`` (kdlab's default, the paper's squared L2): the squared error summed over the
  entries and divided by their number, i.e. an MSE. Normalised this way the terms do not grow
  with image size, channels or instances, so a weight carries over between scales. The
  normaliser can be given explicitly (a count averaged over processes, see
  ``kdlab.utils.dist.reduce_normalizer``) so that ``W`` processes equal one with the whole batch.
- ``"frobenius"`` (``variant="official"``): the released code's ``torch.dist(a, b, p=2)``, the
  un-squared Frobenius norm of the whole difference: not divided by anything, summed over levels
  and images. Its gradient ``(a − b) / ||a − b||`` has norm 1 whatever the difference's size.

Every function returns a scalar that is 0 *with a gradient* when there is nothing to compare.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses.common import zero_with_grad

DISTANCES = ("squared", "frobenius")


def _check(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"DRKD {what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ "
                         "(an adapter must map the student's channels to the teacher's)")


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def squared_error_sum(student: Tensor, teacher: Tensor) -> Tensor:
    """``Σ_e (s_e − t_e)²`` over all entries, in float32."""
    return (student.float() - teacher.float()).pow(2).sum()


def frobenius_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """``||s − t||_F = sqrt(Σ_e (s_e − t_e)²)``, the released ``torch.dist(s, t, p=2)`` (gradient 0 at 0)."""
    return torch.linalg.vector_norm(student.float() - teacher.float())


def pixel_relation_loss(student_relation: Tensor, teacher_relation: Tensor, distance: str = "squared",
                        num_entries: Tensor | float | None = None) -> Tensor:
    """Pixel-wise relation loss of one FPN level.

    - ``"squared"``: ``L_pixel^l = 1 / (B C H W) Σ_{b,c,y,x} (R_s − R_t)²``
    - ``"frobenius"`` (released): ``L_pixel^l = ||R_s − R_t||_F`` over the whole batch tensor

    Args:
        student_relation: ``[B, C, H, W]`` adapted output of the student's graph unit.
        teacher_relation: ``[B, C, H, W]`` output of the teacher's graph unit.
        distance: ``"squared"`` or ``"frobenius"``.
        num_entries: ``B C H W`` to divide by (``"squared"``; default: the tensor's size).
    """
    _check_distance(distance)
    _check(student_relation, teacher_relation, "pixel relation outputs")
    if student_relation.numel() == 0:
        return zero_with_grad(student_relation)
    if distance == "frobenius":
        return frobenius_distance(student_relation, teacher_relation)
    if num_entries is None:
        num_entries = student_relation.numel()
    return squared_error_sum(student_relation, teacher_relation) / num_entries


def per_image_distance(student: list[Tensor], teacher: list[Tensor], distance: str,
                       num_entries: Tensor | float | None, what: str) -> Tensor:
    """``Σ_i Σ_e (s_ie − t_ie)² / M`` (``"squared"``, ``M`` = all entries) or ``Σ_i ||s_i − t_i||_F``."""
    _check_distance(distance)
    if len(student) != len(teacher):
        raise ValueError(f"DRKD {what}: {len(student)} student images but {len(teacher)} teacher images")
    for s, t in zip(student, teacher):
        _check(s, t, what)
    total_entries = sum(s.numel() for s in student)
    if total_entries == 0:
        return zero_with_grad(*student) if student else torch.zeros(())
    if distance == "frobenius":
        return sum(frobenius_distance(s, t) for s, t in zip(student, teacher) if s.numel())
    if num_entries is None:
        num_entries = total_entries
    return sum(squared_error_sum(s, t) for s, t in zip(student, teacher)) / num_entries


def instance_relation_loss(student_relations: list[Tensor], teacher_relations: list[Tensor],
                           distance: str = "squared", num_entries: Tensor | float | None = None) -> Tensor:
    """Instance-wise relation loss of one FPN level over the images that have relations.

    - ``"squared"``: ``L_rel^l = 1 / (Σ_i K_i C S²) Σ_i ||Z_s,i − Z_t,i||²_F``
    - ``"frobenius"`` (released): ``L_rel^l = Σ_i ||Z_s,i − Z_t,i||_F``

    Args:
        student_relations: per image ``[K_i, C, S, S]`` adapted student relation outputs.
        teacher_relations: per image ``[K_i, C, S, S]`` teacher relation outputs.
        distance: ``"squared"`` or ``"frobenius"``.
        num_entries: ``Σ_i K_i C S²`` to divide by (``"squared"``; default: the entries given).

    Returns:
        scalar; 0 with a gradient when no image has an instance.
    """
    return per_image_distance(student_relations, teacher_relations, distance, num_entries, "instance relations")


def instance_feature_loss(student_features: list[Tensor], teacher_features: list[Tensor],
                          distance: str = "squared", num_entries: Tensor | float | None = None) -> Tensor:
    """Instance feature imitation on one FPN level: the GT boxes' RoIAligned features themselves.

    - ``"squared"``: ``L_feat^l = 1 / (Σ_i K_i C S²) Σ_i ||P_s,i − P_t,i||²_F``
    - ``"frobenius"`` (released ``kd_fore_loss``): ``L_feat^l = Σ_i ||P_s,i − P_t,i||_F``

    Args:
        student_features: per image ``[K_i, C, S, S]`` adapted student RoI features.
        teacher_features: per image ``[K_i, C, S, S]`` teacher RoI features.
        distance: ``"squared"`` or ``"frobenius"``.
        num_entries: ``Σ_i K_i C S²`` to divide by (``"squared"``; default: the entries given).

    Returns:
        scalar; 0 with a gradient when no image has an instance.
    """
    return per_image_distance(student_features, teacher_features, distance, num_entries, "instance features")
