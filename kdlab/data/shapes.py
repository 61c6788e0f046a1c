"""*shapes*: a generated COCO-format detection set, "the MNIST of detection".

There is no small, free, instant detection dataset on which a distillation method shows its
effect in minutes on a CPU. *shapes* is one: ``make_shapes("data/shapes")`` writes 4000 train and
250 val images (128 x 128 PNG) with COCO-2017-style annotation files in about 70 CPU-seconds
(15 ms an image), drawn in parallel processes on every core (numpy + PIL; 4.9 boxes per image). Why 4000: detectors trained from scratch on 1000
images overfit them (measured: a GFL R-34 teacher's val AP fell from 6.8 to 6.4 over its last 12
of 48 epochs while its training loss kept falling); a generator can give fresh images instead of
more epochs at the same compute. It is a miniature of what makes COCO
hard, because the four methods in kdlab each target one of those difficulties:

- **Classes by outline only** (:data:`SHAPES_CLASSES`: disc, square, triangle, star, ring, cross,
  hexagon, heart). Each object gets a random colour and texture (solid, gradient, stripes,
  speckle), so colour carries no label information and a detector must learn shape.
- **Scale variation with many small objects**: the nominal size is log-uniform between 6 px and
  0.8 of the image side, so about a quarter of the objects are at most 12 px and a few fill most
  of the image (FPN levels and size-dependent assignment matter).
- **Crowding and occlusion**: 2-10 objects per image, some placed next to an earlier one, drawn
  in random depth order; objects may extend past the image border. Boxes are the full drawn
  extent of the shape (exact, from its polygon) clipped to the image, like COCO's amodal-ish
  boxes of truncated objects. An object more than ``max_hidden_fraction`` (70 %) hidden, by
  occluders or the border, is left out of the annotations: every ground truth is visible enough
  to be detected in principle.
- **Ambiguous edges**: each object's edge is blurred with its own random strength and about a
  quarter are drawn in a colour close to the background behind them, so the exact position of
  some box edges is genuinely uncertain: the situation LD's edge distributions are made for.
- **A background that is not trivially separable**: gradients, stripes, checks, smooth blotches
  and noise, plus 0-5 *distractors* per image (irregular blobs, elongated ellipses, scribbles,
  arcs) that look object-like but belong to no class, so detectors produce confident false
  positives whose background knowledge GID and DRKD distil.

Files: ``root/{train,val}/NNNNNN.png`` and ``root/annotations/instances_{train,val}.json`` with
full COCO fields; category ids are non-contiguous (:data:`SHAPES_CATEGORY_IDS`) like COCO's, so
the contiguous-label mapping is always exercised. ``area`` is the object's visible area in the
image (as COCO's mask areas are). The set is a pure function of the arguments: image ``i`` of a
split is drawn from ``np.random.default_rng([seed, split, i])``, so the same arguments give
byte-identical files (for a given numpy and Pillow) and the val set does not depend on
``num_train``.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from kdlab.data.shapes_draw import (
    SHAPES_CLASSES,
    background,
    class_outline,
    distractor_strokes,
    drawn_area,
    drawn_box,
    paint,
    place,
    random_colour,
    rasterize,
    soften,
)

__all__ = ["SHAPES_CLASSES", "SHAPES_CATEGORY_IDS", "make_shapes", "render_scene"]

# COCO-style ids with a gap (COCO's ids run 1..90 with 10 holes): label k <-> SHAPES_CATEGORY_IDS[k].
SHAPES_CATEGORY_IDS: tuple[int, ...] = (1, 2, 3, 4, 6, 7, 8, 9)

_SPLIT_CODES = {"train": 0, "val": 1}


def render_scene(
    rng: np.random.Generator,
    image_size: int = 128,
    *,
    min_objects: int = 2,
    max_objects: int = 10,
    max_distractors: int = 5,
    min_object_size: float = 6.0,
    max_object_fraction: float = 0.8,
    max_hidden_fraction: float = 0.7,
    min_box_side: float = 3.0,
) -> tuple[np.ndarray, list[dict]]:
    """Draw one image and its annotations.

    Args:
        rng: the scene's random generator (everything random is drawn from it).
        image_size: side ``S`` of the square image in pixels.
        min_objects, max_objects: number of class objects, uniform in this inclusive range.
        max_distractors: number of no-class distractors, uniform in ``0..max_distractors``.
        min_object_size: smallest nominal object extent in pixels.
        max_object_fraction: largest nominal extent as a fraction of ``S``.
        max_hidden_fraction: objects with ``1 - visible_area / full_area`` above this are not
            annotated (``visible_area``: unoccluded and inside the image).
        min_box_side: objects whose clipped box is narrower or shorter are not annotated.

    Returns:
        ``image`` uint8 ``[S, S, 3]`` and a list of annotations ``{"label": int,
        "box": [x1, y1, x2, y2] pixels, "area": visible area in pixels}``, back to front.
    """
    canvas = background(rng, image_size)
    layers = []  # (label or None for a distractor, strokes)
    centres: list[np.ndarray] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        label = int(rng.integers(len(SHAPES_CLASSES)))
        extent = math.exp(rng.uniform(math.log(min_object_size), math.log(max_object_fraction * image_size)))
        if centres and rng.uniform() < 0.3:  # crowd: next to an earlier object, overlapping it
            centre = centres[int(rng.integers(len(centres)))] + rng.normal(0, 0.4 * extent, size=2)
        else:
            centre = rng.uniform(0, image_size, size=2)
        centres.append(centre)
        strokes = place(class_outline(SHAPES_CLASSES[label], rng), centre, extent / 2,
                        rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.25))
        layers.append((label, strokes))
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        layers.append((None, distractor_strokes(rng, image_size)))
    layers = [layers[k] for k in rng.permutation(len(layers))]  # random depth order, back to front

    coverages = []
    for label, strokes in layers:
        coverage = rasterize(strokes, image_size)  # [S, S] sharp, anti-aliased
        colour = random_colour(rng)
        if label is not None and rng.uniform() < 0.25:  # low contrast against what lies behind
            y, x = np.clip(strokes[0][1].mean(axis=0), 0, image_size - 1).astype(int)[::-1]
            colour = np.clip(canvas[y, x] + rng.choice([-1, 1], size=3) * rng.uniform(0.1, 0.2, size=3), 0, 1)
        drawn_width = max(1.0, float(np.ptp(strokes[0][1][:, 0])))
        # edge blur of random strength (none for about a third), never so strong it erases a small object
        sigma = 0.0 if rng.uniform() < 0.35 else rng.uniform(0.3, min(2.0, 0.12 * drawn_width + 0.3))
        alpha = soften(coverage, sigma)[..., None]
        canvas = canvas * (1 - alpha) + paint(rng, colour, image_size) * alpha
        coverages.append(coverage)
    noise_std = rng.uniform(0.0, 0.04)
    canvas = canvas + rng.normal(0, noise_std, size=canvas.shape)
    image = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)

    annotations = []
    transmittance = np.ones((image_size, image_size), dtype=np.float32)  # of the layers in front
    for (label, strokes), coverage in zip(reversed(layers), reversed(coverages)):
        if label is not None:
            visible_area = float((coverage * transmittance).sum())
            box = drawn_box(strokes, image_size)
            hidden = 1 - visible_area / drawn_area(strokes)
            if hidden <= max_hidden_fraction and min(box[2] - box[0], box[3] - box[1]) >= min_box_side:
                annotations.append({"label": label, "box": box.tolist(), "area": visible_area})
        transmittance *= 1 - coverage
    return image, annotations[::-1]


def _categories() -> list[dict]:
    return [{"id": cat_id, "name": name, "supercategory": "shape"}
            for cat_id, name in zip(SHAPES_CATEGORY_IDS, SHAPES_CLASSES)]


def _write_image(index: int, image_dir: Path, split: str, image_size: int, seed: int, image_format: str,
                 scene_options: dict) -> list[dict]:
    """Draw image ``index`` of ``split``, write its file, return its objects."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    pixels, objects = render_scene(rng, image_size, **scene_options)
    file_name = f"{index + 1:06d}.{image_format}"  # COCO ids start at 1
    if image_format == "png":
        Image.fromarray(pixels).save(image_dir / file_name, compress_level=1)
    else:
        Image.fromarray(pixels).save(image_dir / file_name, quality=92)
    return objects


def _write_split(root: Path, split: str, num_images: int, image_size: int, seed: int,
                 image_format: str, scene_options: dict, workers: int) -> dict:
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    draw = functools.partial(_write_image, image_dir=image_dir, split=split, image_size=image_size, seed=seed,
                             image_format=image_format, scene_options=scene_options)
    # each image depends on its index only, so any process may draw it; fork (Linux) starts workers in
    # milliseconds where spawn would re-import torch in each
    if workers > 1 and num_images >= 64 and sys.platform == "linux":
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            scenes = list(pool.map(draw, range(num_images), chunksize=max(1, num_images // (8 * workers))))
    else:
        scenes = [draw(index) for index in range(num_images)]
    images, annotations = [], []
    for index, objects in enumerate(scenes):
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{image_id:06d}.{image_format}", "width": image_size,
                       "height": image_size})
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": SHAPES_CATEGORY_IDS[obj["label"]],
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "area": round(obj["area"], 2), "iscrowd": 0,
            })
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    dataset = {
        "info": {"description": "kdlab shapes: generated detection set", "version": "1.0",
                 "seed": seed, "split": split, "image_size": image_size},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _categories(),
    }
    ann_file.write_text(json.dumps(dataset, separators=(",", ":")))
    return {"img_dir": str(image_dir), "ann_file": str(ann_file),
            "num_images": len(images), "num_annotations": len(annotations)}


def make_shapes(
    root: str | Path,
    *,
    num_train: int = 4000,
    num_val: int = 250,
    image_size: int = 128,
    seed: int = 0,
    min_objects: int = 2,
    max_objects: int = 10,
    max_distractors: int = 5,
    min_object_size: float = 6.0,
    max_object_fraction: float = 0.8,
    max_hidden_fraction: float = 0.7,
    image_format: str = "png",
    workers: int | None = None,
) -> dict:
    """Generate the *shapes* set (see the module docstring) under ``root``.

    Existing files of the same names are overwritten. Load the result with
    ``build_dataset(root, "train", ...)`` or ``CocoDetection(root / "train",
    root / "annotations/instances_train.json")``.

    Args:
        root: output folder (created).
        num_train, num_val: number of images per split.
        image_size: side of the square images in pixels (>= 32).
        seed: the whole set is a function of this seed and the other arguments.
        min_objects, max_objects: objects per image, inclusive range (before dropping hidden ones).
        max_distractors: at most this many no-class distractors per image.
        min_object_size: smallest nominal object extent in pixels.
        max_object_fraction: largest nominal object extent, fraction of ``image_size``.
        max_hidden_fraction: more hidden than this (occluded or outside the image): not annotated.
        image_format: ``"png"`` (lossless) or ``"jpg"`` (JPEG artefacts, quality 92).
        workers: processes drawing images (default: the CPU count; the files do not depend on it).

    Returns:
        ``{"root", "classes", "category_ids", "train": {...}, "val": {...}, "seconds"}`` where each
        split holds ``img_dir``, ``ann_file``, ``num_images``, ``num_annotations``.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if not 0 < min_object_size < max_object_fraction * image_size:
        raise ValueError(f"need 0 < min_object_size < max_object_fraction * image_size, got "
                         f"{min_object_size} and {max_object_fraction} * {image_size}")
    if max_distractors < 0:
        raise ValueError(f"max_distractors must be >= 0, got {max_distractors}")
    if not 0 <= max_hidden_fraction < 1:
        raise ValueError(f"max_hidden_fraction must be in [0, 1), got {max_hidden_fraction}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    scene_options = {"min_objects": min_objects, "max_objects": max_objects, "max_distractors": max_distractors,
                     "min_object_size": min_object_size, "max_object_fraction": max_object_fraction,
                     "max_hidden_fraction": max_hidden_fraction}
    root = Path(root)
    start = time.perf_counter()
    summary = {"root": str(root), "classes": list(SHAPES_CLASSES), "category_ids": list(SHAPES_CATEGORY_IDS)}
    for split, num_images in (("train", num_train), ("val", num_val)):
        summary[split] = _write_split(root, split, num_images, image_size, seed, image_format, scene_options,
                                      workers if workers is not None else (os.cpu_count() or 1))
    summary["seconds"] = time.perf_counter() - start
    return summary
