"""Distillation parts that belong to no single method: teacher/student checks, FPN box pooling,
slot masks on feature maps, the FPN width of a model.

Box geometry (points in boxes, IoUs) is in :mod:`kdlab.models.box_ops` and ``torchvision.ops``;
a zero that keeps the graph connected is :func:`kdlab.losses.common.zero_with_grad`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper

from kdlab.models.outputs import DenseOutput
from kdlab.utils.roi_align import roi_align_per_image

MODEL_ATTRIBUTES = {"num_classes": "number of classes", "reg_max": "reg_max (bins per edge - 1)", "strides": "FPN strides"}
ROI_ALIGN_IMPLS = ("auto", "separable", "torchvision")
# "auto": kdlab's separable RoIAlign on CPU maps up to this many cells, torchvision's above and on GPU
# (benchmarks/bench_roi_align.py: the separable one is several times faster on small maps on CPU, its cost
# grows with H * W per box while torchvision's does not)
SEPARABLE_MAX_CELLS = 64 * 64  # benchmarks/results/roi_align_cpu.md: separable wins up to 64², loses from 100²


def check_teacher_student(student: nn.Module, teacher: nn.Module, method: str,
                          attributes: tuple[str, ...] = ("num_classes", "reg_max", "strides")) -> None:
    """Raise a ``ValueError`` when ``teacher`` cannot be distilled into ``student`` by ``method``.

    Checks that they are separate models and agree on what they declare (``attributes`` among
    ``num_classes``, ``reg_max``, ``strides``); the outputs are checked again at every step
    (:func:`check_corresponding_slots`).
    """
    if student is teacher:
        raise ValueError(f"{method}: teacher and student are the same module; for self-distillation pass a separately "
                         "trained copy of the student's architecture as the teacher (e.g. copy.deepcopy + load)")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError(f"{method}: teacher and student share {len(shared)} parameter tensors; the teacher must be a "
                         "separate model")
    for attr in attributes:
        s_value, t_value = getattr(student, attr, None), getattr(teacher, attr, None)
        if s_value is not None and t_value is not None and _as_tuple(s_value) != _as_tuple(t_value):
            raise ValueError(f"{method}: teacher/student mismatch in {MODEL_ATTRIBUTES[attr]}: student {attr}={s_value}, "
                             f"teacher {attr}={t_value}; {method} needs the same value on both")


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def check_corresponding_slots(student: DenseOutput, teacher: DenseOutput, method: str,
                              need_box_logits: bool = False) -> None:
    """Raise a ``ValueError`` unless two dense outputs predict slot by slot at the same places
    (same classes, levels, strides and points; with ``need_box_logits``, distribution heads of the
    same ``reg_max``)."""
    if need_box_logits:
        s_bins = student.require("box_logits", method, "student").shape[-1]
        t_bins = teacher.require("box_logits", method, "teacher").shape[-1]
        if s_bins != t_bins:
            raise ValueError(f"{method}: teacher/student mismatch in reg_max: student box_logits have {s_bins} = 4 * "
                             f"({s_bins // 4 - 1} + 1) entries per slot, teacher {t_bins} = 4 * ({t_bins // 4 - 1} + 1)")
    if student.cls_logits.shape[-1] != teacher.cls_logits.shape[-1]:
        raise ValueError(f"{method}: teacher/student mismatch in the number of classes: student "
                         f"{student.cls_logits.shape[-1]}, teacher {teacher.cls_logits.shape[-1]}")
    if list(student.num_per_level) != list(teacher.num_per_level):
        raise ValueError(f"{method}: teacher/student mismatch in the slot layout: slots per FPN level student "
                         f"{student.num_per_level}, teacher {teacher.num_per_level} (same strides, anchors per "
                         "location and input size are needed)")
    if not torch.equal(student.strides, teacher.strides):
        raise ValueError(f"{method}: teacher/student mismatch in strides: the slots' strides differ")
    if not torch.equal(student.points, teacher.points):
        raise ValueError(f"{method}: teacher/student mismatch in the slot layout: the slots' points differ")
    if student.cls_logits.shape[:2] != teacher.cls_logits.shape[:2]:
        raise ValueError(f"{method}: teacher/student mismatch in batch/slots: student "
                         f"{tuple(student.cls_logits.shape[:2])}, teacher {tuple(teacher.cls_logits.shape[:2])}")


def pool_fpn_boxes(
    features: list[Tensor],
    strides: list[int],
    boxes: list[Tensor],
    output_size: int = 10,
    sampling_ratio: int = 2,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    impl: str = "auto",
) -> Tensor:
    """RoIAlign every box on the FPN level chosen by its size (FPN paper, Eq. 1).

    ``k = clamp(floor(k0 + log2(sqrt(w h) / 224)), k_min, k_max)``, ``k0 = 4``, where level ``k``
    has stride ``2^k`` (P3 = stride 8); then ``roi_align(..., aligned=True)`` on that level.

    Args:
        features: FPN maps ``[B, C, H_l, W_l]``, finest first.
        strides: stride of each map (consecutive powers of two).
        boxes: per image ``[K_i, 4]`` xyxy boxes in input pixels.
        output_size: ``S``.
        sampling_ratio: sampling points per bin side.
        canonical_scale, canonical_level: the FPN rule's ``224`` and ``k0``.
        impl: ``"separable"`` (:func:`kdlab.utils.roi_align.roi_align_per_image`: torchvision's
            values as two matrix products, a dense backward), ``"torchvision"``
            (``torchvision.ops.roi_align``) or ``"auto"``: per level, separable on CPU maps of at
            most :data:`SEPARABLE_MAX_CELLS` cells, torchvision's otherwise (large maps, GPU).

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
    flat = torch.cat([b.float() for b in boxes])  # [M, 4]; float32 even for bf16 maps (1 px matters)
    image_of = torch.cat([torch.full((b.shape[0],), i, dtype=torch.int64, device=flat.device)
                          for i, b in enumerate(boxes)])
    mapper = LevelMapper(first, int(log_strides[-1]), canonical_scale, canonical_level)
    levels = mapper([flat]) if flat.shape[0] else flat.new_zeros(0, dtype=torch.int64)  # [M], 0 = finest
    pooled, order = [], []
    for level, (feature, stride) in enumerate(zip(features, strides)):
        idx = torch.where(levels == level)[0]  # ascending, so still in image order
        if idx.numel():
            counts = torch.bincount(image_of[idx], minlength=len(boxes)).tolist()
            per_image = list(flat[idx].split(counts))
            if resolve_roi_align_impl(impl, feature) == "separable":
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


def resolve_roi_align_impl(impl: str, feature: Tensor) -> str:
    """``"separable"`` or ``"torchvision"`` for one map (see :func:`pool_fpn_boxes`)."""
    if impl != "auto":
        return impl
    small = feature.shape[-2] * feature.shape[-1] <= SEPARABLE_MAX_CELLS
    return "separable" if feature.device.type == "cpu" and small else "torchvision"


def slot_mask_to_locations(slot_mask: Tensor, output: DenseOutput) -> list[Tensor]:
    """``[B, N]`` slot mask -> per level ``[B, H_l, W_l]`` location mask (any of a location's anchors)."""
    masks, start = [], 0
    for feature, n_level in zip(output.features, output.num_per_level):
        h, w = feature.shape[-2:]
        anchors_per_location = n_level // (h * w)
        level_mask = slot_mask[:, start : start + n_level].reshape(slot_mask.shape[0], h, w, anchors_per_location)
        masks.append(level_mask.any(dim=-1))
        start += n_level
    return masks


def fpn_channels(model: nn.Module, given: int | None = None) -> int:
    """Channels of a detector's FPN maps: ``given`` when set, else ``model.backbone.out_channels``
    (kdlab's and torchvision's FPN backbones), else read from a probe pass (:func:`probe_output`)."""
    if given is not None:
        return int(given)
    channels = getattr(getattr(model, "backbone", None), "out_channels", None)
    if isinstance(channels, int):
        return channels
    return int(probe_output(model).features[0].shape[1])


@torch.no_grad()
def probe_output(model: nn.Module, image_size: int = 256):
    """The output of one eval-mode forward on a blank ``image_size`` square image (to read a model's
    FPN channels and strides before training; the model's mode is restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return model(torch.zeros(1, 3, image_size, image_size, device=device), [(image_size, image_size)])
    finally:
        model.train(was_training)
