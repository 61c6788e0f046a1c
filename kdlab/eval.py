"""COCO box metrics through pycocotools' ``COCOeval``.

``coco_metrics(ann_file, results)`` scores a list of COCO result dicts
(``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``) against a COCO annotation file
and returns the six headline numbers as floats in ``[0, 1]``, or ``None`` where a metric is
undefined (pycocotools' ``-1``: no ground truth in that size range, or none at all):

- ``AP``: mean over IoU thresholds ``0.50:0.05:0.95`` and categories of the 101-point
  interpolated precision ``AP = 1/101 * sum_{r in {0, 0.01, ..., 1}} max_{r' >= r} p(r')``,
- ``AP50`` / ``AP75``: the same at IoU 0.5 / 0.75,
- ``APs`` / ``APm`` / ``APl``: ``AP`` on ground truth of area ``< 32^2``, ``32^2 .. 96^2``, ``> 96^2``.

An undefined metric is ``None`` (``null`` in JSON, ``–`` in :func:`format_metrics_table`), never
``0.0``: on the 128-pixel *shapes* images no object is large, so ``APl`` is undefined there.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6], in this order
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


def load_coco(ann_file: str | Path | COCO, verbose: bool = False) -> COCO:
    """A pycocotools ``COCO`` for ``ann_file`` (returned as is if it already is one)."""
    if isinstance(ann_file, COCO):
        return ann_file
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    with _quiet(verbose):
        return COCO(str(path))


def check_results(coco: COCO, results: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming the first result entry that ``COCOeval`` could not score."""
    cat_ids, img_ids = set(coco.getCatIds()), set(coco.getImgIds())
    for i, res in enumerate(results):
        if not isinstance(res, dict):
            raise ValueError(f"result #{i} must be a dict with keys {RESULT_KEYS}, got {type(res).__name__}")
        missing = [k for k in RESULT_KEYS if k not in res]
        if missing:
            raise ValueError(f"result #{i} {res} lacks key(s) {missing}; expected {RESULT_KEYS}")
        if res["category_id"] not in cat_ids:
            raise ValueError(f"result #{i} has category_id {res['category_id']!r}, not one of the "
                             f"annotation file's categories {sorted(cat_ids)}")
        if res["image_id"] not in img_ids:
            raise ValueError(f"result #{i} has image_id {res['image_id']!r}, not an image of the annotation file")
        bbox = res["bbox"]
        if len(bbox) != 4 or bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"result #{i} bbox must be [x, y, w, h] with w, h >= 0, got {bbox}")


def coco_metrics(
    ann_file: str | Path | COCO,
    results: list[dict[str, Any]],
    image_ids: list[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """COCO bbox metrics of ``results`` against ``ann_file``.

    Args:
        ann_file: path of a COCO annotation JSON, or a pycocotools ``COCO``.
        results: COCO result dicts ``{"image_id", "category_id", "bbox" (xywh pixels), "score"}``.
        image_ids: images to evaluate; default every image of ``ann_file`` (an image without
            detections still counts: its ground truth are misses).
        verbose: let pycocotools print its progress and summary table.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}``: floats in ``[0, 1]``, or ``None`` for a
        metric without ground truth to score (pycocotools' ``-1``), e.g. ``APl`` when no object
        is larger than 96 x 96 pixels. Empty ``results`` warn and score every ground truth as a
        miss (0.0 where ground truth exists).
    """
    coco = load_coco(ann_file, verbose)
    if not results:
        warnings.warn("coco_metrics: no detections at all; every object is a miss", stacklevel=2)
    check_results(coco, results)
    if image_ids is not None and not set(image_ids) <= set(coco.getImgIds()):
        unknown = sorted(set(image_ids) - set(coco.getImgIds()))
        raise ValueError(f"image_ids {unknown[:5]} are not images of the annotation file")
    with _quiet(verbose):
        # loadRes adds "area"/"id" to the dicts it gets: give it copies
        coco_dt = coco.loadRes(copy.deepcopy(list(results))) if results else _no_detections(coco)
        evaluator = COCOeval(coco, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(coco.getImgIds() if image_ids is None else image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (float(value) if value >= 0 else None) for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}


def _no_detections(coco: COCO) -> COCO:
    """An empty result set (``COCO.loadRes`` refuses an empty list)."""
    empty = COCO()
    empty.dataset = {"images": list(coco.dataset["images"]), "categories": copy.deepcopy(coco.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Swallow pycocotools' prints unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


UNDEFINED = "–"  # an en dash: the metric has no ground truth to score (None), unlike "-", not given


def format_metric(value: float | None, width: int = 0) -> str:
    """One metric as a table cell: ``100 * value`` with one decimal, or ``–`` when undefined (``None``)."""
    return f"{UNDEFINED:>{width}}" if value is None else f"{100 * value:>{width}.1f}"


def format_mean_std(values: list[float | None], width: int = 0) -> str:
    """``mean ± std`` (x100, sample std) of the defined values; the bare value for one; ``–`` for none."""
    import statistics

    defined = [100 * v for v in values if v is not None]
    if not defined:
        return f"{UNDEFINED:>{width}}"
    if len(defined) == 1:
        return f"{defined[0]:>{width}.1f}"
    return f"{statistics.mean(defined):.1f} ± {statistics.stdev(defined):.1f}".rjust(width)


def format_metrics_table(rows: dict[str, dict[str, float | None]], names: tuple[str, ...] = METRIC_NAMES) -> str:
    """A markdown table with one row per run, AP values x100 with one decimal.

    An undefined metric (``None``, see :func:`coco_metrics`) is shown as ``–`` and explained
    under the table; a metric a row does not have is shown as ``-``. Example::

        | run      |   AP | AP50 | AP75 |  APs |  APm |  APl |
        |----------|------|------|------|------|------|------|
        | baseline | 35.8 | 53.1 | 38.2 | 18.9 | 38.9 | 47.9 |
    """
    width = max([3] + [len(str(name)) for name in rows])
    header = f"| {'run':<{width}} | " + " | ".join(f"{n:>4}" for n in names) + " |"
    rule = f"|{'-' * (width + 2)}|" + "|".join("-" * (max(len(n), 4) + 2) for n in names) + "|"
    lines = [header, rule]
    undefined = []
    for run, metrics in rows.items():
        cells = [format_metric(metrics[n], max(len(n), 4)) if n in metrics else f"{'-':>{max(len(n), 4)}}" for n in names]
        undefined += [n for n in names if n in metrics and metrics[n] is None and n not in undefined]
        lines.append(f"| {str(run):<{width}} | " + " | ".join(cells) + " |")
    if undefined:
        lines.append(f"\n{UNDEFINED} undefined (no ground-truth object to score; pycocotools' -1): {', '.join(undefined)}")
    return "\n".join(lines)
