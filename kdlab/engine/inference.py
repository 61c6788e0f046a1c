"""Detections on any images, in their own pixels: ``detector.predict([...])`` and ``kdlab predict``.

Like torchvision's detectors, :func:`predict_images` takes a list of images of any sizes (PIL
images, ``[3, H, W]`` tensors, uint8 or float in ``[0, 1]``, or file paths) and returns, per image,
``boxes`` ``[K, 4]`` xyxy in that image's pixels, ``scores`` ``[K]`` and ``labels`` ``[K]``
(contiguous, ``detector.class_names[label]``). The preprocessing is the evaluation pipeline of
training: :func:`~kdlab.data.transforms.build_transforms` (resize so that the shorter side is
``min_size``, the longer at most ``max_size``; ImageNet normalisation), then
:func:`~kdlab.data.transforms.collate_fn` (zero padding to ``size_divisor``). A detector loaded with
:func:`~kdlab.engine.load_detector` knows the sizes it was trained at (``detector.input_size``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_convert

from kdlab.data.coco import read_rgb, to_rgb
from kdlab.data.transforms import build_transforms, collate_fn
from kdlab.engine.evaluation import to_original_pixels

ImageLike = Image.Image | Tensor | str | Path


def as_image_tensor(image: ImageLike) -> Tensor:
    """``[3, H, W]`` uint8 (files, PIL images, uint8 tensors) or float in ``[0, 1]`` (float tensors)."""
    if isinstance(image, (str, Path)):
        image = read_rgb(Path(image))
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(to_rgb(image)).copy()).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(f"predict takes PIL images, [3, H, W] tensors or file paths, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"predict takes [3, H, W] RGB tensors (one per image, in a list), got shape {tuple(image.shape)}")
    if image.is_floating_point() and image.numel() and (image.min() < 0 or image.max() > 1):
        raise ValueError("a float image tensor must hold values in [0, 1] (torchvision's convention), got "
                         f"{float(image.min()):.3g}..{float(image.max()):.3g}; pass uint8 for 0..255")
    return image.detach().cpu()


def preprocess(images: Sequence[ImageLike], min_size: int, max_size: int | None,
               size_divisor: int = 32) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """The network batch of ``images`` and, per image, ``size`` (resized) and ``orig_size`` ``(h, w)``."""
    transforms = build_transforms(False, min_size, max_size)
    samples = []
    for image in images:
        pixels = as_image_tensor(image)
        orig_size = tuple(pixels.shape[-2:])
        empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=orig_size),
                 "labels": torch.zeros(0, dtype=torch.int64)}
        resized, _ = transforms(tv_tensors.Image(pixels), empty)
        resized = resized.as_subclass(Tensor)
        samples.append((resized, {"size": torch.tensor(resized.shape[-2:]), "orig_size": torch.tensor(orig_size)}))
    return collate_fn(samples, size_divisor=size_divisor)


def input_size_of(detector, min_size: int | None, max_size: int | None, size_divisor: int | None) -> dict[str, Any]:
    """The resize to use: the arguments where given, else the detector's ``input_size`` (training's)."""
    known = dict(getattr(detector, "input_size", None) or {})
    given = {k: v for k, v in (("min_size", min_size), ("max_size", max_size), ("size_divisor", size_divisor))
             if v is not None}
    size = {"size_divisor": 32, **known, **given}
    if "min_size" not in size:
        raise ValueError("this detector does not record the image size it was trained at (a checkpoint exported "
                         "before kdlab stored it, or a detector built in Python): pass min_size and max_size, the "
                         "training config's values (kdlab predict: --min-size/--max-size)")
    size.setdefault("max_size", None)
    return size


@torch.no_grad()
def predict_images(detector, images: Sequence[ImageLike], *, score_thresh: float = 0.0, min_size: int | None = None,
                   max_size: int | None = None, size_divisor: int | None = None,
                   batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Detections of ``images`` in their own pixels (see the module docstring).

    Args:
        detector: a kdlab detector (its mode is restored afterwards).
        images: PIL images, ``[3, H, W]`` tensors (uint8, or float in ``[0, 1]``) or file paths.
        score_thresh: keep detections scoring at least this.
        min_size, max_size, size_divisor: the resize; default ``detector.input_size``.
        batch_size: images per forward pass.

    Returns:
        Per image ``{"boxes": [K, 4] xyxy, "scores": [K], "labels": [K]}`` on the CPU.
    """
    if isinstance(images, (Image.Image, Tensor, str, Path)):
        raise TypeError("predict takes a list of images (like torchvision's detectors): predict([image])")
    size = input_size_of(detector, min_size, max_size, size_divisor)
    device = next(detector.parameters()).device
    was_training = detector.training
    detector.eval()
    results = []
    try:
        for start in range(0, len(images), batch_size):
            batch, infos = preprocess(images[start:start + batch_size], size["min_size"], size["max_size"],
                                      size["size_divisor"])
            output = detector(batch.to(device), [tuple(int(v) for v in info["size"]) for info in infos])
            for det, info in zip(detector.postprocess(output), infos):
                keep = det["scores"] >= score_thresh
                boxes = to_original_pixels(det["boxes"][keep].float().cpu(), info["size"], info["orig_size"])
                results.append({"boxes": boxes, "scores": det["scores"][keep].float().cpu(),
                                "labels": det["labels"][keep].cpu()})
    finally:
        detector.train(was_training)
    return results


def coco_detections(files: Sequence[Path], sizes: Sequence[tuple[int, int]], detections: list[dict[str, Tensor]],
                    class_names: Sequence[str], category_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """A COCO-format dict of ``detections``: ``images`` (ids 1..N), ``categories`` and ``annotations``
    (``bbox`` xywh in the image's pixels, with ``score``), loadable by ``pycocotools.coco.COCO``."""
    category_ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    images, annotations = [], []
    for image_id, (path, (height, width), det) in enumerate(zip(files, sizes, detections), start=1):
        images.append({"id": image_id, "file_name": str(path), "width": int(width), "height": int(height)})
        for box, score, label in zip(box_convert(det["boxes"], "xyxy", "xywh").tolist(), det["scores"].tolist(),
                                     det["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(category_ids[label]), "bbox": [round(v, 2) for v in box],
                                "area": round(box[2] * box[3], 2), "score": round(score, 5), "iscrowd": 0})
    categories = [{"id": int(c), "name": name} for c, name in zip(category_ids, class_names)]
    return {"images": images, "categories": categories, "annotations": annotations}
