"""Transforms (``torchvision.transforms.v2`` on ``tv_tensors``) and batching.

Training and evaluation use the same pipeline except for the flip:

1. ``Resize``: shorter side to ``min_size``, longer side capped at ``max_size``; boxes scale by
   ``(new_w / w, new_h / h)`` exactly. An image already at that size is left untouched (a
   128 x 128 *shapes* image with ``min_size=128``).
2. ``RandomHorizontalFlip`` (training): ``x1' = W - x2``, ``x2' = W - x1``.
3. ``ToDtype(float32, scale=True)`` then ``Normalize`` with the ImageNet mean and std.
4. ``ClampBoundingBoxes``: boxes stay inside the image. No ``SanitizeBoundingBoxes``: nothing is
   dropped silently; :class:`~kdlab.data.coco.CocoDetection` drops degenerate boxes itself, with
   a warning, before any transform.

:func:`collate_fn` pads a list of samples into the batch format every model and the engine use:
``images`` float32 ``[B, 3, H, W]`` zero-padded at the bottom/right to a size divisible by
``size_divisor``; ``targets`` the list of the samples' target dicts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.transforms import v2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def build_transforms(train: bool, min_size: int, max_size: int | None, flip_prob: float = 0.5) -> v2.Compose:
    """The v2 pipeline of the module docstring, called as ``transforms(image, target)``.

    Args:
        train: add the random horizontal flip.
        min_size: target length of the shorter side in pixels.
        max_size: cap on the longer side (``v2.Resize(size=min_size, max_size=max_size)``);
            ``None``: no cap. ``max_size == min_size`` is allowed and means "the longer side
            becomes ``max_size``" (``v2.Resize(size=None, max_size=max_size)``), the limit of the
            capped resize; ``max_size < min_size`` is an error.
        flip_prob: probability of the horizontal flip in training.
    """
    if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 1:
        raise ValueError(f"min_size must be a positive int (pixels), got {min_size!r}")
    if max_size is not None and (not isinstance(max_size, int) or max_size < min_size):
        raise ValueError(f"max_size must be None or an int >= min_size={min_size}, got {max_size!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if max_size == min_size:
        resize = v2.Resize(size=None, max_size=max_size, antialias=True)
    else:
        resize = v2.Resize(size=min_size, max_size=max_size, antialias=True)
    steps = [resize]
    if train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        v2.ClampBoundingBoxes(),
    ]
    return v2.Compose(steps)


def collate_fn(batch: list[tuple[Tensor, dict]], size_divisor: int = 32) -> tuple[Tensor, list[dict]]:
    """Stack samples into a zero-padded batch.

    Args:
        batch: ``(image [3, h_i, w_i], target)`` pairs, as returned by ``CocoDetection``.
        size_divisor: the padded ``H`` and ``W`` are ``ceil(max_i h_i / size_divisor) * size_divisor``
            (and the same for ``w``), so every FPN stride divides them.

    Returns:
        ``images`` ``[B, 3, H, W]`` with image ``i`` in ``[:, :h_i, :w_i]`` and zeros elsewhere,
        and the list of the ``B`` targets (unchanged).
    """
    if len(batch) == 0:
        raise ValueError("collate_fn got an empty batch")
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    images = [image for image, _ in batch]
    for position, image in enumerate(images):
        if image.ndim != 3 or image.shape[0] != images[0].shape[0]:
            raise ValueError(f"collate_fn: image {position} has shape {tuple(image.shape)}; expected "
                             f"[{images[0].shape[0]}, H, W] like image 0")
    height = math.ceil(max(image.shape[1] for image in images) / size_divisor) * size_divisor
    width = math.ceil(max(image.shape[2] for image in images) / size_divisor) * size_divisor
    padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))  # [B, 3, H, W]
    for slot, image in zip(padded, images):
        slot[:, : image.shape[1], : image.shape[2]].copy_(image)
    return padded, [target for _, target in batch]


def denormalize(images: Tensor) -> Tensor:
    """Undo ``Normalize``: ``x * std + mean`` clamped to ``[0, 1]``, for ``[3, H, W]`` or ``[B, 3, H, W]``."""
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"denormalize expects [3, H, W] or [B, 3, H, W], got shape {tuple(images.shape)}")
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def image_sizes_of(targets: list[dict]) -> list[tuple[int, int]]:
    """``(h, w)`` of each unpadded input image of a batch, read from its targets' ``size``."""
    return [(int(t["size"][0]), int(t["size"][1])) for t in targets]
