"""DRKD's three losses (METHODS.md §4), one equation per function.

Notation: ``R_s = adapt(G_s(F_s))`` and ``R_t = G_t(F_t)`` the student's (adapted) and the
teacher's graph-unit outputs on one FPN level; ``Z_s, Z_t`` the instance relation outputs and
``P_s, P_t`` the RoIAligned GT-box features of one image (``[K_i, C, S, S]``).

Three distances, selected by ``distance``:

- ``"relative"`` (kdlab's default): the paper's squared L2 divided by the teacher side's squared
  norm, ``||s − t||² / ||t||²``. A relative error does not depend on how large a teacher's
  activations are (the shapes RetinaNet teacher's FPN maps are ~20x larger than the Faster R-CNN
  teacher's), so one weight serves every teacher; and the teacher-side graph units, which train
  through this loss only, gain nothing by shrinking their output. The norm is detached.
- ``"squared"``: the squared error divided by the number of entries, an MSE.
- Both normalisers can be given explicitly (summed over the batch and averaged over processes,
  see ``kdlab.utils.dist``) so that ``W`` processes equal one process with the whole batch.
- ``"frobenius"`` (``variant="official"``): the released code's ``torch.dist(a, b, p=2)``, the
  un-squared Frobenius norm of the whole difference: not divided by anything, summed over levels
  and images. Its gradient ``(a − b) / ||a − b||`` has norm 1 whatever the difference's size.

Every function returns a scalar that is 0 *with a gradient* when there is nothing to compare.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses.common import zero_with_grad

DISTANCES = ("relative", "squared", "frobenius")


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


def teacher_energy(teacher: list[Tensor] | Tensor) -> Tensor:
    """``Σ_e t_e²`` over the teacher-side tensors, detached: the ``"relative"`` normaliser."""
    tensors = [teacher] if isinstance(teacher, Tensor) else teacher
    return sum(t.detach().float().pow(2).sum() for t in tensors)


def pixel_relation_loss(student_relation: Tensor, teacher_relation: Tensor, distance: str = "relative",
                        num_entries: Tensor | float | None = None) -> Tensor:
    """Pixel-wise relation loss of one FPN level.

    - ``"relative"``: ``L_pixel^l = Σ (R_s − R_t)² / Σ R_t²`` over ``b, c, y, x``
    - ``"squared"``: ``L_pixel^l = 1 / (B C H W) Σ_{b,c,y,x} (R_s − R_t)²``
    - ``"frobenius"`` (released): ``L_pixel^l = ||R_s − R_t||_F`` over the whole batch tensor

    Args:
        student_relation: ``[B, C, H, W]`` adapted output of the student's graph unit.
        teacher_relation: ``[B, C, H, W]`` output of the teacher's graph unit.
        distance: ``"relative"``, ``"squared"`` or ``"frobenius"``.
        num_entries: the normaliser (``"relative"``: ``Σ R_t²``; ``"squared"``: ``B C H W``);
            default: computed from the tensors.
    """
    _check_distance(distance)
    _check(student_relation, teacher_relation, "pixel relation outputs")
    if student_relation.numel() == 0:
        return zero_with_grad(student_relation)
    if distance == "frobenius":
        return frobenius_distance(student_relation, teacher_relation)
    if num_entries is None:
        num_entries = teacher_energy(teacher_relation) if distance == "relative" else student_relation.numel()
    return squared_error_sum(student_relation, teacher_relation) / torch.as_tensor(num_entries).clamp(min=1e-12)


def per_image_distance(student: list[Tensor], teacher: list[Tensor], distance: str,
                       num_entries: Tensor | float | None, what: str) -> Tensor:
    """``Σ_i Σ_e (s_ie − t_ie)² / M`` (``M``: ``Σ_i Σ_e t_ie²`` for ``"relative"``, the number of entries
    for ``"squared"``) or ``Σ_i ||s_i − t_i||_F``."""
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
        num_entries = teacher_energy(teacher) if distance == "relative" else total_entries
    return sum(squared_error_sum(s, t) for s, t in zip(student, teacher)) / torch.as_tensor(num_entries).clamp(min=1e-12)


def instance_relation_loss(student_relations: list[Tensor], teacher_relations: list[Tensor],
                           distance: str = "relative", num_entries: Tensor | float | None = None) -> Tensor:
    """Instance-wise relation loss of one FPN level over the images that have relations.

    - ``"relative"``: ``L_rel^l = Σ_i ||Z_s,i − Z_t,i||²_F / Σ_i ||Z_t,i||²_F``
    - ``"squared"``: ``L_rel^l = 1 / (Σ_i K_i C S²) Σ_i ||Z_s,i − Z_t,i||²_F``
    - ``"frobenius"`` (released): ``L_rel^l = Σ_i ||Z_s,i − Z_t,i||_F``

    Args:
        student_relations: per image ``[K_i, C, S, S]`` adapted student relation outputs.
        teacher_relations: per image ``[K_i, C, S, S]`` teacher relation outputs.
        distance: ``"relative"``, ``"squared"`` or ``"frobenius"``.
        num_entries: the normaliser (default: computed from the tensors, see :func:`per_image_distance`).

    Returns:
        scalar; 0 with a gradient when no image has an instance.
    """
    return per_image_distance(student_relations, teacher_relations, distance, num_entries, "instance relations")


def instance_feature_loss(student_features: list[Tensor], teacher_features: list[Tensor],
                          distance: str = "relative", num_entries: Tensor | float | None = None) -> Tensor:
    """Instance feature imitation on one FPN level: the GT boxes' RoIAligned features themselves.

    - ``"relative"``: ``L_feat^l = Σ_i ||P_s,i − P_t,i||²_F / Σ_i ||P_t,i||²_F``
    - ``"squared"``: ``L_feat^l = 1 / (Σ_i K_i C S²) Σ_i ||P_s,i − P_t,i||²_F``
    - ``"frobenius"`` (released ``kd_fore_loss``): ``L_feat^l = Σ_i ||P_s,i − P_t,i||_F``

    Arguments and result as :func:`instance_relation_loss`, with per image ``[K_i, C, S, S]`` adapted
    student and teacher RoI features in place of the relation outputs.
    """
    return per_image_distance(student_features, teacher_features, distance, num_entries, "instance features")
