"""Datasets, the generated *shapes* set, transforms and batching.

- :func:`make_shapes` writes *shapes*, a COCO-format detection set generated in seconds
  (:mod:`kdlab.data.shapes` explains what makes it hard).
- :class:`CocoDetection` reads any COCO-format folder with pycocotools; :func:`build_dataset`
  detects the layout (COCO 2017, *shapes*, BCCD-style) and adds the transforms.
- :func:`build_transforms` (``torchvision.transforms.v2``) and :func:`collate_fn` produce the
  batch every model and the engine consume: ``images`` ``[B, 3, H, W]`` normalised and padded,
  ``targets`` a list of dicts (``boxes``, ``labels``, ``image_id``, ``orig_size``, ``size``).
"""

from kdlab.data.coco import CocoDetection, build_dataset, dataset_layouts, read_rgb, to_rgb
from kdlab.data.shapes import SHAPES_CATEGORY_IDS, SHAPES_CLASSES, make_shapes, render_scene
from kdlab.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, build_transforms, collate_fn, denormalize,
                                   image_sizes_of)

__all__ = [
    "CocoDetection",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES_CATEGORY_IDS",
    "SHAPES_CLASSES",
    "build_dataset",
    "build_transforms",
    "collate_fn",
    "dataset_layouts",
    "denormalize",
    "image_sizes_of",
    "make_shapes",
    "read_rgb",
    "render_scene",
    "to_rgb",
]
