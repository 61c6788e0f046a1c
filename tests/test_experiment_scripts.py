"""Argument handling of the experiment scripts (the runs themselves are too long for tests)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gid_seeds_for_families_and_variants():
    gid = load_script("gid_shapes")
    args = gid.parse_args(["--seeds-for", "faster_rcnn=0", "fcos=1,2", "retinanet/gid_feature=0"])
    assert args.seeds == [0, 1, 2]
    assert args.seeds_for == {"faster_rcnn": [0], "fcos": [1, 2], "retinanet/gid_feature": [0]}
    for bad in ("yolo=0", "fcos=", "fcos=a", "fcos/gid_feature=0"):  # FCOS has no ablations
        with pytest.raises(SystemExit):
            gid.parse_args(["--seeds-for", bad])


def test_gid_markdown_rows_carry_their_seeds():
    gid = load_script("gid_shapes")
    metrics = lambda ap: {"AP": ap, "AP50": 0.2, "AP75": 0.1, "APs": 0.05}  # noqa: E731
    runs = {"student": {0: metrics(0.04), 1: metrics(0.05)}, "gid": {0: metrics(0.07), 1: metrics(0.08)},
            "gid_feature": {0: metrics(0.06)}}
    part = {"teacher": metrics(0.1), "runs": runs, "table": {v: gid.mean_std(r) for v, r in runs.items()}}
    text = gid.markdown("retinanet", part, "")
    assert "| student alone | 2 | 4.5 ± 0.7 |" in text  # mean 4.5, sample std 0.71
    assert "| GID feature only | 1 | 6.0 | 20.0 | 10.0 | 5.0 | 6.0 |" in text  # one seed: no ± claimed
    assert "+3.0 AP (target >= +1.5): met" in text
