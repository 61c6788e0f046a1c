"""kdlab.eval: COCO metrics against hand-computed cases, the real minicoco set, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.eval import METRIC_NAMES, coco_metrics, format_mean_std, format_metric, format_metrics_table, load_coco

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
R = 101  # COCOeval's recall thresholds 0, 0.01, ..., 1


def ann_file(tmp_path: Path, boxes: list[tuple[int, int, list[float]]], num_images: int = 1) -> Path:
    """A COCO file with ``num_images`` 200x200 images and GT ``(image_id, category_id, xywh)``."""
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in range(1, num_images + 1)],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [{"id": k + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0} for k, (img, cat, box) in enumerate(boxes)],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def det(image_id: int, category_id: int, bbox: list[float], score: float = 1.0) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_ground_truth_as_detections_scores_one_on_minicoco():
    path = SHARED_DATA / "minicoco" / "annotations" / "instances_val2017.json"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    data = json.loads(path.read_text())
    results = [det(a["image_id"], a["category_id"], a["bbox"]) for a in data["annotations"] if not a["iscrowd"]]
    metrics = coco_metrics(path, results)
    assert metrics == pytest.approx({name: 1.0 for name in METRIC_NAMES})


def test_one_of_two_found(tmp_path):
    # 1 image, 2 medium GT of one category, one exact detection: recall reaches 1/2 with
    # precision 1, so the interpolated precision is 1 at the 51 recall thresholds 0..0.5, 0 after.
    path = ann_file(tmp_path, [(1, 3, [10, 10, 40, 40]), (1, 3, [100, 100, 50, 50])])
    metrics = coco_metrics(path, [det(1, 3, [10, 10, 40, 40])])
    expected = 51 / R
    assert metrics["AP"] == pytest.approx(expected) and metrics["AP50"] == pytest.approx(expected)
    assert metrics["AP75"] == pytest.approx(expected) and metrics["APm"] == pytest.approx(expected)
    assert metrics["APs"] is None and metrics["APl"] is None  # no GT of those sizes: pycocotools' -1, undefined


def test_one_of_two_categories_found(tmp_path):
    # per category AP: cat 3 -> 1, cat 7 (missed) -> 0; AP is their mean
    path = ann_file(tmp_path, [(1, 3, [10, 10, 40, 40]), (1, 7, [100, 100, 50, 50])])
    assert coco_metrics(path, [det(1, 3, [10, 10, 40, 40])])["AP"] == pytest.approx(0.5)


def test_false_positive_ranked_first_halves_precision(tmp_path):
    # ranks: FP (0.9) then TP (0.8): recall 1 is reached at precision 1/2 -> AP = 0.5
    path = ann_file(tmp_path, [(1, 3, [10, 10, 40, 40])])
    results = [det(1, 3, [120, 120, 30, 30], 0.9), det(1, 3, [10, 10, 40, 40], 0.8)]
    assert coco_metrics(path, results)["AP"] == pytest.approx(0.5)


def test_iou_thresholds(tmp_path):
    # IoU = (10 * 7.2) / (10 * 10) = 0.72: a match at thresholds 0.50..0.70 (5 of 10), not at 0.75
    path = ann_file(tmp_path, [(1, 3, [0, 0, 10, 10])])
    metrics = coco_metrics(path, [det(1, 3, [0, 0, 10, 7.2])])
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.5) and metrics["APs"] == pytest.approx(0.5)


def test_images_without_detections_count(tmp_path):
    path = ann_file(tmp_path, [(1, 3, [10, 10, 40, 40]), (2, 3, [10, 10, 40, 40])], num_images=2)
    results = [det(1, 3, [10, 10, 40, 40])]
    assert coco_metrics(path, results)["AP"] == pytest.approx(51 / R)  # image 2's GT is a miss
    assert coco_metrics(path, results, image_ids=[1])["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"image_ids \[3\] are not images"):
        coco_metrics(path, results, image_ids=[1, 3])


def test_accepts_a_coco_object_and_does_not_modify_results(tmp_path):
    coco = load_coco(ann_file(tmp_path, [(1, 3, [10, 10, 40, 40])]))
    results = [det(1, 3, [10, 10, 40, 40])]
    assert coco_metrics(coco, results)["AP"] == pytest.approx(1.0)
    assert results == [det(1, 3, [10, 10, 40, 40])]  # loadRes would add "area" and "id"


def test_empty_results_warn_and_score_every_object_as_a_miss(tmp_path):
    path = ann_file(tmp_path, [(1, 3, [10, 10, 40, 40])])  # one medium object
    with pytest.warns(UserWarning, match="no detections"):
        assert coco_metrics(path, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": None, "APm": 0.0, "APl": None}


def test_metrics_of_a_split_without_ground_truth_are_undefined(tmp_path):
    # an all-empty val split: pycocotools gives -1 for everything; it used to be printed as 0.0
    path = ann_file(tmp_path, [], num_images=2)
    assert coco_metrics(path, [det(1, 3, [10, 10, 40, 40], 0.9)]) == {name: None for name in METRIC_NAMES}
    with pytest.warns(UserWarning, match="no detections"):
        assert coco_metrics(path, []) == {name: None for name in METRIC_NAMES}


def test_quiet_unless_verbose(tmp_path, capsys):
    path = ann_file(tmp_path, [(1, 3, [10, 10, 40, 40])])
    coco_metrics(path, [det(1, 3, [10, 10, 40, 40])])
    assert capsys.readouterr().out == ""
    coco_metrics(path, [det(1, 3, [10, 10, 40, 40])], verbose=True)
    assert "Average Precision" in capsys.readouterr().out


@pytest.mark.parametrize("bad, expected", [
    ({"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5]}, r"result #1 .* lacks key\(s\) \['score'\]"),
    (det(1, 5, [0, 0, 5, 5]), "result #1 has category_id 5, not one of .*\\[3, 7\\]"),
    (det(9, 3, [0, 0, 5, 5]), "result #1 has image_id 9"),
    (det(1, 3, [0, 0, -5, 5]), "result #1 bbox must be"),
    ("box", "result #1 must be a dict"),
])
def test_bad_result_entries_are_named(tmp_path, bad, expected):
    path = ann_file(tmp_path, [(1, 3, [10, 10, 40, 40])])
    with pytest.raises(ValueError, match=expected):
        coco_metrics(path, [det(1, 3, [10, 10, 40, 40]), bad])


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_metrics(tmp_path / "nope.json", [det(1, 3, [0, 0, 1, 1])])


def test_format_metrics_table():
    table = format_metrics_table({
        "baseline": {"AP": 0.358, "AP50": 0.5312, "AP75": 0.38249, "APs": 0.189, "APm": 0.389, "APl": 0.4791},
        "ld": {"AP": 0.3751},
    })
    assert table.splitlines() == [
        "| run      |   AP | AP50 | AP75 |  APs |  APm |  APl |",
        "|----------|------|------|------|------|------|------|",
        "| baseline | 35.8 | 53.1 | 38.2 | 18.9 | 38.9 | 47.9 |",
        "| ld       | 37.5 |    - |    - |    - |    - |    - |",
    ]


def test_format_metrics_table_shows_undefined_as_a_dash_and_says_why():
    table = format_metrics_table({"shapes": {"AP": 0.074, "AP50": 0.13, "AP75": 0.078, "APs": 0.059, "APm": 0.2,
                                             "APl": None}})
    assert table.splitlines() == [
        "| run    |   AP | AP50 | AP75 |  APs |  APm |  APl |",
        "|--------|------|------|------|------|------|------|",
        "| shapes |  7.4 | 13.0 |  7.8 |  5.9 | 20.0 |    – |",
        "",
        "– undefined (no ground-truth object to score; pycocotools' -1): APl",
    ]


def test_format_mean_std_skips_undefined_values():
    assert format_mean_std([0.074, 0.073, 0.075]) == "7.4 ± 0.1"
    assert format_mean_std([0.05, None]) == "5.0"  # one defined value: no ± claimed
    assert format_mean_std([None, None]) == "–" and format_metric(None, 4) == "   –" and format_metric(0.1234) == "12.3"
