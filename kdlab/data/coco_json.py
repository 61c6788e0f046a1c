"""Reading and checking a COCO-format annotation file before anything else touches it.

pycocotools reads JSON itself and fails with bare ``KeyError``/``JSONDecodeError`` tracebacks.
:func:`load_coco_json` reads the file, reports problems by file, key and record id, and builds
the pycocotools ``COCO`` object from the checked dictionary. :func:`training_boxes` turns the
annotations into the per-annotation training boxes (crowd removed, clipped, tiny ones dropped).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

# The fields kdlab reads; COCOeval also needs ``area`` and ``iscrowd``, which are filled in when absent.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _column(records: list[dict], key: str, section: str, ann_file: Path) -> list:
    """``[r[key] for r in records]``, or a ``ValueError`` naming the first record without ``key``."""
    try:
        return [record[key] for record in records]
    except (KeyError, TypeError):
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"{ann_file}: {section}[{index}] is a {type(record).__name__}, expected an object") from None
            if key not in record:
                name = f"id {record['id']}" if "id" in record else f"index {index}"
                raise ValueError(f"{ann_file}: {section} entry with {name} has no required key {key!r}") from None
        raise


def _int_ids(values: list, what: str, ann_file: Path) -> np.ndarray:
    """``values`` as an int64 array, or a ``ValueError`` naming the first non-integer ``what``."""
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{ann_file}: {what} {value!r} is a {type(value).__name__}, expected an integer")
    return np.array(values, dtype=np.int64)


def _duplicates(values: np.ndarray) -> list:
    unique, counts = np.unique(values, return_counts=True)
    return unique[counts > 1].tolist()


def load_coco_json(ann_file: str | Path) -> COCO:
    """Read and check a COCO-format annotation file, return a pycocotools ``COCO`` on it.

    Checks (each failure names the file and the offending key or record): valid JSON (with the
    error's line and column), top-level ``images``/``annotations``/``categories`` lists, the
    fields of :data:`REQUIRED_FIELDS` in every record, unique image and category ids, every
    annotation's ``image_id`` among the images and ``category_id`` among the categories.
    Repair, with a warning: missing ``iscrowd`` is set to 0 and missing ``area`` to the box area
    ``w * h`` (pycocotools' COCOeval reads both).

    Args:
        ann_file: path of the ``instances_*.json`` file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON or not a valid COCO detection file.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {ann_file} does not exist")
    try:
        with open(ann_file, encoding="utf-8") as handle:
            dataset = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{ann_file} is not valid JSON: {error.msg} at line {error.lineno}, "
                         f"column {error.colno} (character {error.pos})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{ann_file} is not UTF-8 text (byte {error.start}): not a COCO JSON file") from None
    if not isinstance(dataset, dict):
        raise ValueError(f"{ann_file}: top level is a {type(dataset).__name__}, expected a JSON object with "
                         f"keys {sorted(REQUIRED_FIELDS)}")
    for section, fields in REQUIRED_FIELDS.items():
        if section not in dataset:
            raise ValueError(f"{ann_file}: missing required top-level key {section!r} "
                             f"(a COCO detection file has {sorted(REQUIRED_FIELDS)})")
        if not isinstance(dataset[section], list):
            raise ValueError(f"{ann_file}: {section!r} is a {type(dataset[section]).__name__}, expected a list")
        for field in fields:
            _column(dataset[section], field, section, ann_file)

    image_ids = _int_ids(_column(dataset["images"], "id", "images", ann_file), "image id", ann_file)
    cat_ids = _int_ids(_column(dataset["categories"], "id", "categories", ann_file), "category id", ann_file)
    if len(cat_ids) == 0:
        raise ValueError(f"{ann_file}: 'categories' is empty; a detection file needs at least one category")
    for section, ids in (("image", image_ids), ("category", cat_ids)):
        if duplicated := _duplicates(ids):
            raise ValueError(f"{ann_file}: duplicate {section} ids {duplicated[:10]}")
    for image in dataset["images"]:
        for side in ("width", "height"):
            value = image[side]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{ann_file}: image id {image['id']} has {side} {value!r}, expected a positive number")
    annotations = dataset["annotations"]
    ann_image_ids = _int_ids(_column(annotations, "image_id", "annotations", ann_file), "annotation image_id", ann_file)
    ann_cat_ids = _int_ids(_column(annotations, "category_id", "annotations", ann_file), "annotation category_id", ann_file)
    for values, known, what in ((ann_cat_ids, cat_ids, "category_id"), (ann_image_ids, image_ids, "image_id")):
        unknown = np.flatnonzero(~np.isin(values, known))
        if len(unknown):
            first = annotations[int(unknown[0])]
            raise ValueError(f"{ann_file}: annotation id {first['id']} has {what} {first[what]}, which is not among "
                             f"the file's {'categories' if what == 'category_id' else 'images'} "
                             f"({len(unknown)} annotation(s) affected)")
    _fill_eval_fields(annotations, ann_file)

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def _fill_eval_fields(annotations: list[dict], ann_file: Path) -> None:
    """Set absent ``iscrowd`` to 0 and absent ``area`` to ``w * h`` (in place), with one warning."""
    repaired = 0
    for ann in annotations:
        if "iscrowd" not in ann or "area" not in ann:
            repaired += 1
            ann.setdefault("iscrowd", 0)
            if "area" not in ann:
                bbox = ann["bbox"]
                ann["area"] = float(bbox[2]) * float(bbox[3]) if len(bbox) == 4 else 0.0
    if repaired:
        warnings.warn(f"{ann_file}: {repaired} annotation(s) had no 'iscrowd' and/or 'area'; set iscrowd=0 and "
                      f"area = box w * h (COCOeval needs both)", stacklevel=3)


def training_boxes(coco: COCO, ann_file: Path, min_box_size: float) -> dict[str, np.ndarray]:
    """Training boxes of every non-crowd annotation: clipped to the image, too-small ones dropped.

    ``bbox = [x, y, w, h]`` becomes ``[x1, y1, x2, y2] = [x, y, x + w, y + h]`` clipped to
    ``[0, width] x [0, height]`` of its image. A box with ``x2 - x1 < min_box_size`` or
    ``y2 - y1 < min_box_size`` after clipping (zero, negative or non-finite size, tiny or outside
    the image) is dropped, with one warning naming the annotation ids.

    Returns:
        ``{"ann_ids" [N], "image_ids" [N], "cat_ids" [N] int64, "boxes" [N, 4] float32,
        "dropped_ann_ids" [D] int64}`` for the kept non-crowd annotations, in file order.
    """
    annotations = [ann for ann in coco.dataset["annotations"] if not ann.get("iscrowd", 0)]
    ann_ids = np.array([ann["id"] for ann in annotations], dtype=np.int64)
    try:
        xywh = np.array([ann["bbox"] for ann in annotations], dtype=np.float64).reshape(-1, 4)
    except (ValueError, TypeError):
        for ann in annotations:
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise ValueError(f"{ann_file}: annotation id {ann['id']} has bbox {bbox!r}; expected [x, y, w, h], "
                                 f"4 numbers") from None
        raise
    image_ids = np.array([ann["image_id"] for ann in annotations], dtype=np.int64)
    cat_ids = np.array([ann["category_id"] for ann in annotations], dtype=np.int64)
    sizes = np.array([[coco.imgs[i]["width"], coco.imgs[i]["height"]] for i in image_ids.tolist()],
                     dtype=np.float64).reshape(-1, 2)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    xyxy = np.clip(xyxy, 0, np.tile(sizes, 2))  # NaN stays NaN and fails the test below
    with np.errstate(invalid="ignore"):
        keep = (xyxy[:, 2] - xyxy[:, 0] >= min_box_size) & (xyxy[:, 3] - xyxy[:, 1] >= min_box_size)
    dropped = ann_ids[~keep]
    if len(dropped):
        listed = ", ".join(str(i) for i in dropped[:20].tolist()) + (f" and {len(dropped) - 20} more" if len(dropped) > 20 else "")
        warnings.warn(f"{ann_file}: dropped {len(dropped)} of {len(ann_ids)} non-crowd boxes whose width or height "
                      f"is below min_box_size={min_box_size} px after clipping to the image; they are left out of "
                      f"training and of the ground truth COCOeval scores against (annotation ids {listed})", stacklevel=3)
    return {"ann_ids": ann_ids[keep], "image_ids": image_ids[keep], "cat_ids": cat_ids[keep],
            "boxes": xyxy[keep].astype(np.float32), "dropped_ann_ids": dropped}


def evaluation_ground_truth(coco: COCO, dropped_ann_ids: list[int]) -> COCO:
    """``coco`` without the annotations ``dropped_ann_ids`` (``coco`` itself when there are none).

    Evaluation then scores against what training learns from: a box that training drops as
    degenerate (zero or sub-pixel width, outside the image) would otherwise count as a miss that
    no detector can avoid. On a file with such boxes (COCO 2017 val has a few) the metrics
    therefore differ slightly from an evaluation against the file as published.
    """
    if not dropped_ann_ids:
        return coco
    dropped = set(int(i) for i in dropped_ann_ids)
    dataset = {**coco.dataset, "annotations": [a for a in coco.dataset["annotations"] if a["id"] not in dropped]}
    filtered = COCO()
    filtered.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        filtered.createIndex()
    return filtered
