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


def test_gid_family_seeds():
    gid = load_script("gid_shapes")
    args = gid.parse_args(["--family-seeds", "faster_rcnn=0", "fcos=1,2"])
    assert args.seeds == [0, 1, 2]
    assert args.seeds_by_family == {"faster_rcnn": [0], "fcos": [1, 2]}
    for bad in ("yolo=0", "fcos=", "fcos=a"):
        with pytest.raises(SystemExit):
            gid.parse_args(["--family-seeds", bad])
