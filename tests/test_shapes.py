"""The generated *shapes* set: determinism, difficulty statistics, COCO validity, drawing geometry."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from kdlab.data import SHAPES_CATEGORY_IDS, SHAPES_CLASSES, build_dataset, make_shapes, render_scene
from kdlab.data.shapes_draw import SUPERSAMPLE, class_outline, drawn_area, drawn_box, place, polygon_area, rasterize


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _all_annotations(root: Path) -> tuple[list[dict], list[dict]]:
    images, annotations = [], []
    for split in ("train", "val"):
        data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        images += data["images"]
        annotations += [dict(ann, split=split) for ann in data["annotations"]]
    return images, annotations


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path: Path):
    options = {"num_train": 4, "num_val": 2, "image_size": 64}
    first = make_shapes(tmp_path / "a", seed=3, **options)
    make_shapes(tmp_path / "b", seed=3, **options)
    make_shapes(tmp_path / "c", seed=4, **options)
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert sorted(files_a) == ["annotations/instances_train.json", "annotations/instances_val.json",
                               "train/000001.png", "train/000002.png", "train/000003.png", "train/000004.png",
                               "val/000001.png", "val/000002.png"]
    assert files_a == files_b
    assert sorted(files_c) == sorted(files_a)
    assert all(files_c[name] != files_a[name] for name in files_a)  # every file changes with the seed
    assert first["train"]["num_images"] == 4 and first["val"]["num_images"] == 2
    assert first["train"]["num_annotations"] == len(json.loads(files_a["annotations/instances_train.json"])["annotations"])


def test_val_split_does_not_depend_on_num_train(tmp_path: Path):
    make_shapes(tmp_path / "a", num_train=1, num_val=2, image_size=64)
    make_shapes(tmp_path / "b", num_train=3, num_val=2, image_size=64)
    for name in ("val/000001.png", "val/000002.png", "annotations/instances_val.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_coco_fields_and_noncontiguous_category_ids(tiny_shapes: Path):
    data = json.loads((tiny_shapes / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in data["categories"]] == list(SHAPES_CATEGORY_IDS)
    assert [c["name"] for c in data["categories"]] == list(SHAPES_CLASSES)
    assert len(SHAPES_CLASSES) >= 6
    cat_ids = sorted(c["id"] for c in data["categories"])
    assert cat_ids != list(range(1, len(cat_ids) + 1))  # a gap: label mapping is exercised
    assert len(data["images"]) == 16
    assert set(data["images"][0]) == {"id", "file_name", "width", "height"}
    assert set(data["annotations"][0]) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
    assert [ann["id"] for ann in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128.001 and y + h <= 128.001
        assert w >= 3 and h >= 3 and ann["iscrowd"] == 0
        assert 0 < ann["area"] <= w * h * 1.01 + 1  # visible area lies inside the box


def test_difficulty_statistics(tiny_shapes: Path):
    images, annotations = _all_annotations(tiny_shapes)
    assert len({ann["category_id"] for ann in annotations}) >= 6
    longest_side = np.array([max(ann["bbox"][2:]) for ann in annotations])
    assert (longest_side <= 12).sum() >= 5  # many small objects
    assert (longest_side >= 0.5 * 128).sum() >= 2  # and a few large ones
    per_image = {}
    for ann in annotations:
        per_image.setdefault((ann["split"], ann["image_id"]), []).append(ann["bbox"])
    counts = [len(boxes) for boxes in per_image.values()]
    assert max(counts) >= 5 and np.mean(counts) >= 3
    overlapping_pairs = 0
    for boxes in per_image.values():
        xyxy = torch.tensor(boxes, dtype=torch.float64)
        xyxy[:, 2:] += xyxy[:, :2]
        iou = box_iou(xyxy, xyxy).triu(diagonal=1)
        overlapping_pairs += int((iou > 0).sum())
    assert overlapping_pairs >= 10  # occlusion happens
    touching_border = sum(ann["bbox"][0] == 0 or ann["bbox"][1] == 0 or
                          math.isclose(ann["bbox"][0] + ann["bbox"][2], 128, abs_tol=0.01) for ann in annotations)
    assert touching_border >= 5  # objects cut by the image border


def test_loads_with_pycocotools_and_ground_truth_scores_ap_one(tiny_shapes: Path):
    ann_file = tiny_shapes / "annotations" / "instances_val.json"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
        detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                      for a in coco.dataset["annotations"]]
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert len(coco.getImgIds()) == 8
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_loader_reads_shapes_with_label_mapping(tiny_shapes: Path):
    dataset = build_dataset(tiny_shapes, "val", train=False, min_size=128, max_size=None)
    assert dataset.num_classes == len(SHAPES_CLASSES) and dataset.class_names == list(SHAPES_CLASSES)
    assert dataset.label_to_cat_id == list(SHAPES_CATEGORY_IDS)
    image, target = dataset[0]
    assert image.shape == (3, 128, 128)  # min_size == image side: no resize
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[dataset.ids[0]]))
    expected = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in anns], dtype=torch.float32)
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [SHAPES_CATEGORY_IDS.index(a["category_id"]) for a in anns]


def test_hidden_objects_are_not_annotated():
    """The scene does not depend on ``max_hidden_fraction``; a stricter limit only removes annotations."""
    removed = 0
    for seed in range(6):
        image_loose, loose = render_scene(np.random.default_rng(seed), 96, max_hidden_fraction=0.99)
        image_strict, strict = render_scene(np.random.default_rng(seed), 96, max_hidden_fraction=0.3)
        np.testing.assert_array_equal(image_loose, image_strict)
        loose_boxes = [tuple(a["box"]) for a in loose]
        assert all(tuple(a["box"]) in loose_boxes for a in strict)
        removed += len(loose) - len(strict)
    assert removed > 0


def test_polygon_area_and_box_by_hand():
    square = place(class_outline("square", np.random.default_rng(0)), np.array([50.0, 40.0]), 10.0, 0.0, 1.0)
    # half-side 0.8 * 10 = 8 -> a 16 x 16 square centred at (50, 40)
    assert drawn_area(square) == pytest.approx(256.0)
    np.testing.assert_allclose(drawn_box(square, 128), [42, 32, 58, 48])
    np.testing.assert_allclose(drawn_box(square, 45), [42, 32, 45, 45])  # clipped to a 45-px image
    rotated = place(class_outline("square", np.random.default_rng(0)), np.array([50.0, 40.0]), 10.0, math.pi / 4, 1.0)
    half_diagonal = 8 * math.sqrt(2)
    np.testing.assert_allclose(drawn_box(rotated, 128), [50 - half_diagonal, 40 - half_diagonal,
                                                         50 + half_diagonal, 40 + half_diagonal])
    ring = class_outline("ring", np.random.default_rng(0))
    hole = np.linalg.norm(ring[1][1][0])
    regular_48gon_area = 24 * math.sin(2 * math.pi / 48)  # (n / 2) r^2 sin(2 pi / n), r = 1
    assert drawn_area(ring) == pytest.approx(regular_48gon_area * (1 - hole**2))
    assert polygon_area(np.array([[0, 0], [4, 0], [0, 3]])) == pytest.approx(6.0)


def test_rasterized_coverage_matches_geometry():
    rng = np.random.default_rng(1)
    for name in SHAPES_CLASSES:
        strokes = place(class_outline(name, rng), np.array([31.3, 33.7]), 17.0, rng.uniform(0, 6.3), 1.1)
        coverage = rasterize(strokes, 64)
        perimeter = sum(np.linalg.norm(points - np.roll(points, 1, axis=0), axis=1).sum() for _, points, _ in strokes)
        # PIL fills the outline's pixels too: at most half a supersampled pixel (1/8 px) of extra width
        assert abs(coverage.sum() - drawn_area(strokes)) <= perimeter / (2 * SUPERSAMPLE), name
        assert coverage.sum() > drawn_area(strokes) * 0.99, name
        rows, cols = np.nonzero(coverage > 0)
        x1, y1, x2, y2 = drawn_box(strokes, 64)
        # the box is the drawn extent: the first and last covered pixels contain its edges (up to 1/8 px)
        tolerance = 1 / (2 * SUPERSAMPLE)
        for first, last, low, high in ((cols.min(), cols.max(), x1, x2), (rows.min(), rows.max(), y1, y2)):
            assert first - tolerance <= low <= first + 1 + tolerance, name
            assert last - tolerance <= high <= last + 1 + tolerance, name


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="image_size"):
        make_shapes("/nonexistent", image_size=16)
    with pytest.raises(ValueError, match="image_format"):
        make_shapes("/nonexistent", image_format="gif")
    with pytest.raises(ValueError, match="min_objects"):
        make_shapes("/nonexistent", min_objects=5, max_objects=2)
