"""Pieces shared by kdlab's torchvision-based detectors (RetinaNet, FCOS, Faster R-CNN).

Torchvision's detectors take a list of raw ``0..1`` images and resize, normalise and pad them
with their own ``GeneralizedRCNNTransform``. kdlab's data pipeline already produces that batch
(normalised, zero-padded to a multiple of 32, plus the unpadded ``image_sizes``), so kdlab's
detectors start at the backbone. The transform module is kept on every model (it has no
parameters) so that :func:`torchvision_preprocess` can turn raw images into exactly the batch
torchvision's own model would see: that is how the tests compare the two models on identical
inputs, and how a notebook runs a COCO-trained model on a raw photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops


def check_batch(
    name: str,
    images: Tensor,
    image_sizes: list[tuple[int, int]],
    targets: list[dict] | None,
    num_classes: int,
    first_label: int = 0,
) -> None:
    """Raise a clear error when a batch does not follow kdlab's batch format.

    Args:
        name: the detector's name, used in the messages.
        images: expected float ``[B, 3, H, W]``.
        image_sizes: expected ``B`` pairs ``(h, w)`` with ``0 < h <= H`` and ``0 < w <= W``.
        targets: optional, ``B`` dicts with ``boxes`` float ``[G, 4]`` xyxy (``x2 > x1``,
            ``y2 > y1``) and ``labels`` int64 ``[G]`` in ``[first_label, num_classes)``.
        num_classes: number of classes of the detector.
        first_label: smallest allowed label (1 for a Faster R-CNN that keeps torchvision's
            convention that label 0 is the background).
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name}: images must be a float tensor [B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: images must be floating point (normalised), got dtype {images.dtype}")
    batch, _, height, width = images.shape
    if len(image_sizes) != batch:
        raise ValueError(f"{name}: got {len(image_sizes)} image_sizes for a batch of {batch} images")
    for i, size in enumerate(image_sizes):
        h, w = int(size[0]), int(size[1])
        if not (0 < h <= height and 0 < w <= width):
            raise ValueError(f"{name}: image_sizes[{i}] = {(h, w)} must lie inside the padded batch ({height}, {width})")
    if targets is None:
        return
    if len(targets) != batch:
        raise ValueError(f"{name}: got {len(targets)} targets for a batch of {batch} images")
    for i, target in enumerate(targets):
        for key in ("boxes", "labels"):
            if key not in target:
                raise KeyError(f'{name}: targets[{i}] has no "{key}" entry')
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f'{name}: targets[{i}]["boxes"] must be a float tensor [G, 4] (xyxy), got {shape}')
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            desc = (tuple(labels.shape), labels.dtype) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f'{name}: targets[{i}]["labels"] must be int64 [{boxes.shape[0]}], got {desc}')
        if labels.numel() and (labels.min() < first_label or labels.max() >= num_classes):
            raise ValueError(
                f'{name}: targets[{i}]["labels"] must lie in [{first_label}, {num_classes}), '
                f"got values {labels.unique().tolist()}"
            )
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if degenerate.any():
            j = int(degenerate.nonzero()[0, 0])
            raise ValueError(
                f'{name}: targets[{i}]["boxes"][{j}] = {boxes[j].tolist()} has no area; every box needs '
                "x2 > x1 and y2 > y1 (the data loader should drop or repair such boxes)"
            )


def batch_anchors(anchor_generator: nn.Module, images: Tensor, features: list[Tensor]) -> Tensor:
    """Torchvision's anchors for a padded batch: ``[N, 4]`` xyxy, the same for every image.

    Torchvision's ``AnchorGenerator`` returns one copy per image; it only reads the padded size,
    so one copy is asked for. A level's locations are spaced by ``padded_size // grid_size`` and
    sit at ``(x * spacing, y * spacing)`` (no half-cell offset), torchvision's convention.
    """
    return anchor_generator(ImageList(images, [tuple(images.shape[-2:])]), features)[0]


@dataclass
class SlotLayout:
    """Where each of the ``N`` prediction slots sits (see :mod:`kdlab.models.outputs`).

    Attributes:
        points: ``[N, 2]`` location ``(x, y)`` of each slot in input pixels.
        strides: ``[N]`` float, nominal stride of the slot's level.
        levels: ``[N]`` int64, level index (0 = finest).
        num_per_level: slots per level.
    """

    points: Tensor
    strides: Tensor
    levels: Tensor
    num_per_level: list[int]

    def output_fields(self) -> dict:
        """The layout as keyword arguments of a :class:`~kdlab.models.outputs.DenseOutput`."""
        return {"points": self.points, "strides": self.strides, "levels": self.levels, "num_per_level": self.num_per_level}


def slot_layout(anchors: Tensor, features: list[Tensor], strides: tuple[int, ...], anchors_per_location: int) -> SlotLayout:
    """Describe the slots of a dense head whose ``[N, 4]`` anchors came from :func:`batch_anchors`.

    Args:
        anchors: ``[N, 4]`` torchvision anchors (``N = sum_l H_l W_l A``).
        features: the FPN maps ``[B, C, H_l, W_l]``.
        strides: nominal stride of each level (e.g. ``(8, 16, 32, 64, 128)``).
        anchors_per_location: ``A``.
    """
    if len(strides) != len(features):
        raise ValueError(f"the detector declares {len(strides)} strides {strides} but its FPN returned {len(features)} maps")
    num_per_level = [f.shape[-2] * f.shape[-1] * anchors_per_location for f in features]
    device = anchors.device
    levels = torch.repeat_interleave(torch.arange(len(features), device=device), torch.tensor(num_per_level, device=device))
    stride_values = torch.tensor(strides, dtype=anchors.dtype, device=device)[levels]
    # torchvision's anchors are centred on their location (symmetric, rounded half-sizes)
    points = (anchors[:, :2] + anchors[:, 2:]) / 2
    return SlotLayout(points=points, strides=stride_values, levels=levels, num_per_level=num_per_level)


def postprocess_torchvision_dense(model, output, scores: Tensor) -> list[dict[str, Tensor]]:
    """:func:`postprocess_dense` of ``scores`` ``[B, N, C]`` and a :class:`~kdlab.models.outputs.DenseOutput`'s
    boxes with a torchvision dense detector's own settings (``score_thresh``, ``topk_candidates``,
    ``nms_thresh``, ``detections_per_img``)."""
    return postprocess_dense(scores, output.pred_boxes, output.num_per_level, output.image_sizes, model.score_thresh,
                             model.topk_candidates, model.nms_thresh, model.detections_per_img)


def postprocess_dense(
    scores: Tensor,
    pred_boxes: Tensor,
    num_per_level: list[int],
    image_sizes: list[tuple[int, int]],
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    detections_per_img: int,
    candidates: str = "pairs",
) -> list[dict[str, Tensor]]:
    """Dense-detector post-processing from decoded boxes: per-level candidates, clip, class-wise NMS.

    Per image and level, the candidates are

    - ``candidates="pairs"`` (torchvision's RetinaNet/FCOS): the ``topk_candidates`` best
      (slot, class) pairs scoring above ``score_thresh``;
    - ``candidates="slots"`` (mmdet's GFL, ``nms_pre``): the ``topk_candidates`` slots with the
      highest max class score, then each of their (slot, class) pairs above ``score_thresh``;

    then the boxes are clipped to the image, class-wise NMS runs and the ``detections_per_img``
    best are kept. With ``"pairs"`` this equals ``RetinaNet/FCOS.postprocess_detections``, which
    decode the kept boxes instead of indexing decoded ones (the same arithmetic per box).

    Args:
        scores: ``[B, N, C]`` class scores in ``[0, 1]``.
        pred_boxes: ``[B, N, 4]`` decoded xyxy boxes (input pixels).
        num_per_level: slots per level.
        image_sizes: ``(h, w)`` of each unpadded image.
        candidates: ``"pairs"`` or ``"slots"`` (see above).

    Returns:
        per image ``{"boxes": [K, 4], "scores": [K], "labels": [K]}``.
    """
    if candidates not in ("pairs", "slots"):
        raise ValueError(f"candidates must be 'pairs' or 'slots', got {candidates!r}")
    num_classes = scores.shape[-1]
    detections = []
    for image_scores, image_boxes, image_size in zip(scores, pred_boxes, image_sizes):
        kept_boxes, kept_scores, kept_labels = [], [], []
        for level_scores, level_boxes in zip(image_scores.split(num_per_level), image_boxes.split(num_per_level)):
            if candidates == "slots":
                if level_scores.shape[0] > topk_candidates:
                    best = level_scores.max(dim=1).values.topk(topk_candidates).indices
                    level_scores, level_boxes = level_scores[best], level_boxes[best]
                slot_idx, labels = (level_scores > score_thresh).nonzero(as_tuple=True)
                flat_scores = level_scores[slot_idx, labels]
            else:
                flat_scores = level_scores.flatten()
                keep = flat_scores > score_thresh
                flat_scores = flat_scores[keep]
                flat_idx = torch.where(keep)[0]
                flat_scores, order = flat_scores.topk(min(topk_candidates, flat_idx.numel()))
                flat_idx = flat_idx[order]
                slot_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
                labels = flat_idx % num_classes
            kept_boxes.append(box_ops.clip_boxes_to_image(level_boxes[slot_idx], tuple(image_size)))
            kept_scores.append(flat_scores)
            kept_labels.append(labels)
        boxes, det_scores, labels = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels)
        keep = box_ops.batched_nms(boxes, det_scores, labels, nms_thresh)[:detections_per_img]
        detections.append({"boxes": boxes[keep], "scores": det_scores[keep], "labels": labels[keep]})
    return detections


def normalise_image_sizes(image_sizes) -> list[tuple[int, int]]:
    """``image_sizes`` as plain ``(int, int)`` tuples (accepts tensors and lists)."""
    return [(int(size[0]), int(size[1])) for size in image_sizes]


@torch.no_grad()
def torchvision_preprocess(
    detector: nn.Module, images: list[Tensor], targets: list[dict] | None = None
) -> tuple[Tensor, list[tuple[int, int]], list[dict] | None]:
    """Run the detector's torchvision ``GeneralizedRCNNTransform`` on raw images.

    Args:
        detector: a kdlab zoo detector (it carries torchvision's ``transform``).
        images: ``[3, H_i, W_i]`` tensors in ``0..1``.
        targets: optional, boxes in pixels of the raw images.

    Returns:
        ``(batch [B, 3, H, W], image_sizes, targets)``: exactly what torchvision's own model
        feeds its backbone, and the targets resized with the images.
    """
    was_training = detector.transform.training
    detector.transform.eval()  # the transform picks a random min_size in train mode when several are given
    image_list, targets = detector.transform(list(images), targets)
    detector.transform.train(was_training)
    return image_list.tensors, normalise_image_sizes(image_list.image_sizes), targets


@torch.no_grad()
def predict_raw_images(detector: nn.Module, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """Detections on raw ``0..1`` images, boxes in pixels of the raw images (torchvision's API).

    Args:
        detector: a kdlab zoo detector.
        images: ``[3, H_i, W_i]`` tensors in ``0..1``.
    """
    batch, image_sizes, _ = torchvision_preprocess(detector, images)
    detections = detector.postprocess(detector(batch, image_sizes))
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    return detector.transform.postprocess(detections, image_sizes, original_sizes)
