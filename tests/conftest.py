"""Shared fixtures.

- ``tiny_shapes``: root of a small *shapes* set (16 train / 8 val images, 128 x 128, seed 0),
  generated once per test session into a temporary folder (about 0.3 s). Load it with
  ``kdlab.data.build_dataset(tiny_shapes, "train", train=..., min_size=128, max_size=None)``.
- ``shared_data``: ``/work/shared/data`` (minicoco, bccd) beside the repository, or a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.data import make_shapes

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY_SHAPES_OPTIONS = {"num_train": 16, "num_val": 8, "image_size": 128, "seed": 0}


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny generated *shapes* set: ``train/``, ``val/``, ``annotations/instances_{train,val}.json``."""
    root = tmp_path_factory.mktemp("tiny_shapes")
    make_shapes(root, **TINY_SHAPES_OPTIONS)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real COCO-format test sets beside the repository (``minicoco/``, ``bccd/``), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (expected beside the repository)")
    return SHARED_DATA
