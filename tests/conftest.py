"""Shared fixtures.

- ``tiny_shapes``: root of a small *shapes* set (16 train / 8 val images, 128 x 128, seed 0),
  generated once per test session into a temporary folder (about 0.3 s). Load it with
  ``kdlab.data.build_dataset(tiny_shapes, "train", train=..., min_size=128, max_size=None)``.
- ``shared_data``: ``/work/shared/data`` (minicoco, bccd) beside the repository, or a skip.
- ``one_thread``: one intra-op torch thread while a module runs; a module asks for it with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``.
- ``write_tiny_config`` / ``tiny_config``: a small training config (``TINY_CONFIG``: ResNet-18 at width 8,
  64 px images, one epoch, CPU) written to ``tmp_path / "tiny.yaml"``, for a data root / for ``tiny_shapes``.
- ``error_line``: ``error_line(prefix="kdlab:")`` reads the captured stderr and returns its one line that
  starts with ``prefix`` (asserting there is exactly one and no traceback).
- ``tiny_batch``: a function returning a fresh batch of 2 images (64 x 64) and their 3 boxes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.data import make_shapes

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY_SHAPES_OPTIONS = {"num_train": 16, "num_val": 8, "image_size": 128, "seed": 0}
TINY_CONFIG = ("min_size: 64\nmax_size: 64\nbatch_size: 4\nnum_workers: 0\nbackbone: resnet18\nbackbone_width: 8\n"
               "backbone_norm: gn\nfpn_channels: 16\nhead_convs: 1\nreg_max: 8\nbase_batch_size: 4\nepochs: 1\n"
               "warmup_iters: 2\nlog_every: 1\ndevice: cpu\n")


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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny convolutions run up to 10x faster than with 2 threads on a busy 2-core
    machine (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_tiny_config(tmp_path):
    """``write(data_root) -> Path``: ``TINY_CONFIG`` on ``data_root``, output in ``tmp_path / "run"``,
    written to ``tmp_path / "tiny.yaml"``."""
    def write(data_root: Path) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(TINY_CONFIG + f"data_root: {data_root}\noutput_dir: {tmp_path / 'run'}\n")
        return path

    return write


@pytest.fixture
def tiny_config(tiny_shapes, write_tiny_config) -> Path:
    """``TINY_CONFIG`` on ``tiny_shapes`` (``tmp_path / "tiny.yaml"``)."""
    return write_tiny_config(tiny_shapes)


@pytest.fixture
def error_line(capsys):
    """``error_line(prefix="kdlab:")``: the one line of the stderr captured so far that starts with ``prefix``."""
    def read(prefix: str = "kdlab:") -> str:
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith(prefix)]
        assert len(lines) == 1, err
        return lines[0]

    return read


def two_image_batch():
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 50.0], [30.0, 30.0, 60.0, 60.0]]), "labels": torch.tensor([0, 2]),
         "size": torch.tensor([64, 64])},
        {"boxes": torch.tensor([[4.0, 20.0, 28.0, 36.0]]), "labels": torch.tensor([1]), "size": torch.tensor([64, 64])},
    ]
    return images, targets


@pytest.fixture
def tiny_batch():
    """A function that returns a fresh batch: 2 random 64 x 64 images (generator seed 0), 2 + 1 boxes of 3 classes."""
    return two_image_batch
