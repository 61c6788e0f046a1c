"""Evaluation: run a detector over a data loader and score it with COCO metrics.

Detections come out of ``detector.postprocess`` in pixels of the resized network input; COCO
ground truth is in pixels of the original file. Per image, with ``(h, w) = size`` (resized,
unpadded) and ``(H, W) = orig_size``::

    x_orig = x * W / w,    y_orig = y * H / h

then ``(x1, y1, x2, y2) -> (x, y, width, height)`` and contiguous label ``l`` -> COCO category
``dataset.label_to_cat_id[l]``. Under DDP every rank scores its share of the images, the result
lists are gathered, rank 0 runs ``COCOeval`` and broadcasts the metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert
from tqdm.auto import tqdm

from kdlab.data.transforms import image_sizes_of
from kdlab.eval import coco_metrics
from kdlab.models.base import Detector
from kdlab.utils.dist import all_gather_object, get_rank, is_dist


def to_original_pixels(boxes: Tensor, size: Tensor, orig_size: Tensor) -> Tensor:
    """Map ``[K, 4]`` xyxy boxes from the resized input ``size = (h, w)`` to ``orig_size = (H, W)``."""
    scale_y = float(orig_size[0]) / float(size[0])
    scale_x = float(orig_size[1]) / float(size[1])
    return boxes * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])


def detections_to_coco(detections: list[dict[str, Tensor]], targets: list[dict], label_to_cat_id: list[int]) -> list[dict[str, Any]]:
    """COCO result dicts (original pixels, xywh, category ids) of a batch's detections."""
    results = []
    for det, target in zip(detections, targets):
        boxes = to_original_pixels(det["boxes"].float().cpu(), target["size"], target["orig_size"])
        boxes_xywh = box_convert(boxes, "xyxy", "xywh").tolist()
        for box, score, label in zip(boxes_xywh, det["scores"].float().cpu().tolist(), det["labels"].cpu().tolist()):
            results.append({"image_id": int(target["image_id"]), "category_id": int(label_to_cat_id[label]),
                            "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
    return results


@torch.no_grad()
def predict(detector: Detector, images: Tensor, targets: list[dict], *, original_pixels: bool = False) -> list[dict[str, Tensor]]:
    """Detections of one batch (for notebooks): per image ``boxes`` ``[K, 4]`` xyxy, ``scores``, ``labels``.

    Args:
        detector: any kdlab detector.
        images: ``[B, 3, H, W]`` normalised, padded batch.
        targets: the batch's targets (only ``size``, and ``orig_size`` if ``original_pixels``, are read).
        original_pixels: map boxes to the original image instead of the resized input.
    """
    was_training = detector.training
    detector.eval()
    device = next(detector.parameters()).device
    try:
        detections = detector.postprocess(detector(images.to(device), image_sizes_of(targets)))
    finally:
        detector.train(was_training)
    if original_pixels:
        detections = [{**d, "boxes": to_original_pixels(d["boxes"], t["size"], t["orig_size"])}
                      for d, t in zip(detections, targets)]
    return detections


@torch.no_grad()
def evaluate(detector: Detector, data_loader, device: torch.device | str, *, amp: bool = False,
             progress: bool = False) -> dict[str, float | None]:
    """COCO box metrics of ``detector`` on the dataset of ``data_loader``.

    Args:
        detector: the plain detector (not a DDP wrapper).
        data_loader: yields ``(images, targets)``; its ``dataset`` has ``label_to_cat_id`` and
            ``eval_coco`` (or ``coco``), the ground truth to score against. Under DDP each rank's
            loader holds its share of the images.
        device: where the detector runs.
        amp: bf16 autocast (CUDA only).
        progress: a progress bar over the batches (rank 0).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` (see :func:`kdlab.eval.coco_metrics`;
        ``None`` where undefined), the same on every rank; only the images the loaders visited
        are evaluated.
    """
    dataset = data_loader.dataset
    device = torch.device(device)
    was_training = detector.training
    detector.eval()
    results, image_ids = [], []
    batches = tqdm(data_loader, desc="evaluating", disable=not (progress and get_rank() == 0), dynamic_ncols=True,
                   leave=False)
    try:
        for images, targets in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                output = detector(images.to(device, non_blocking=True), image_sizes_of(targets))
                detections = detector.postprocess(output)
            results += detections_to_coco(detections, targets, dataset.label_to_cat_id)
            image_ids += [int(t["image_id"]) for t in targets]
    finally:
        detector.train(was_training)
    if is_dist():
        results = [r for part in all_gather_object(results) for r in part]
        image_ids = [i for part in all_gather_object(image_ids) for i in part]
    ground_truth = getattr(dataset, "eval_coco", None) or dataset.coco
    metrics = coco_metrics(ground_truth, results, image_ids=sorted(set(image_ids))) if get_rank() == 0 else None
    if is_dist():
        holder = [metrics]
        torch.distributed.broadcast_object_list(holder, src=0)
        metrics = holder[0]
    return metrics
