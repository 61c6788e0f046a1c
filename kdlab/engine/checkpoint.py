"""Checkpoints: atomic writes, the resumable training state, and the exported student.

Two files live in a run's ``output_dir``:

- ``last.pt`` (:func:`training_state`): everything needed to continue *exactly* where the run
  stopped: the task's trainable weights (student + distiller parts, never the teacher),
  optimiser and scheduler state, position (epoch, batch in the epoch, global iteration),
  RNG states of every rank, the logger's partial window, and the config as a plain dict.
- ``student.pt`` (:func:`export_student`): the plain detector, ``{"model": {...build_detector
  options...}, "num_classes", "class_names", "state_dict"}``, read back by :func:`load_detector`.

Both contain only tensors and plain Python values, so ``torch.load(..., weights_only=True)``
reads them, and both are written atomically: a crash during a save leaves the previous file. A
failed write (disk full) raises :class:`SaveError` naming the file and the reason; a kill during a
save can leave a ``.NAME.PID.tmp`` file, which the next run in that folder removes
(:mod:`kdlab.engine.rundir`).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from kdlab.config import TrainConfig
from kdlab.models import build_detector
from kdlab.models.base import Detector

TRAINING_KEYS = ("task", "optimizer", "scheduler", "epoch", "batch_in_epoch", "iteration", "config")
STUDENT_KEYS = ("model", "num_classes", "class_names", "state_dict")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not of the expected kind."""


class SaveError(OSError):
    """A file could not be written (disk full, no permission, ...); the previous version is intact."""


def _write_failure(path: Path, err: BaseException) -> str | None:
    """Why writing ``path`` failed, in words, if ``err`` is an I/O failure (else ``None``).

    ``torch.save`` reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc...]
    unexpected pos ...``, with the ``OSError`` (e.g. errno 28, no space left) as its context.
    """
    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None and not (isinstance(err, RuntimeError) and ("inline_container" in str(err)
                                                                   or "PytorchStreamWriter" in str(err))):
        return None
    reason = (cause.strerror or str(cause)) if cause is not None else "the write failed"
    if cause is not None and cause.errno == errno.ENOSPC:
        reason = "no space left on the device (disk full)"
    try:
        free = shutil.disk_usage(path.parent).free
        reason += f"; {free / 2**20:.1f} MiB free on the device"
    except OSError:
        pass
    return reason


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, fsync, then rename.

    Raises:
        SaveError: an I/O failure (disk full, permissions); the temporary file is removed and
            ``path`` keeps its previous content. Any other exception propagates unchanged (the
            temporary file is removed as well).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old or the new file
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        reason = _write_failure(path, err) if isinstance(err, (OSError, RuntimeError)) else None
        if reason is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise SaveError(f"cannot write {path}: {reason}; {kept} and the partial file was removed") from None


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_save_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    _atomic_write(Path(path), lambda f: f.write(json.dumps(obj, indent=2).encode()))


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def training_state(task, optimizer, scheduler, *, epoch: int, batch_in_epoch: int, iteration: int,
                   cfg: TrainConfig, num_classes: int, class_names: list[str],
                   rng_states: list[torch.Tensor], log_window: dict[str, Any],
                   category_ids: list[int] | None = None) -> dict[str, Any]:
    """The content of ``last.pt``: the run continues at batch ``batch_in_epoch`` of ``epoch``."""
    return {
        "task": task.trainable_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "iteration": iteration,
        "config": cfg.to_dict(),
        "num_classes": num_classes,
        "class_names": list(class_names),
        "rng_states": rng_states,
        "log_window": log_window,
        "category_ids": None if category_ids is None else [int(c) for c in category_ids],
    }


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read ``last.pt`` and check that it is a training checkpoint."""
    state = safe_load(path)
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a kdlab training checkpoint (missing {missing})")
    return state


def input_record(cfg: TrainConfig) -> dict[str, int]:
    """How images were resized for the network (what ``detector.predict`` needs to do the same)."""
    return {"min_size": cfg.min_size, "max_size": cfg.max_size, "size_divisor": cfg.size_divisor}


def student_record(cfg: TrainConfig, num_classes: int, class_names: list[str], detector: Detector,
                   category_ids: list[int] | None = None) -> dict[str, Any]:
    """The content of ``student.pt``. Pretrained-weight options are dropped: the state dict has the weights.

    Besides the model: ``input`` (:func:`input_record`) and, when given, ``category_ids`` (the
    dataset's category id of each contiguous label), used by ``kdlab predict``.
    """
    model = {"name": cfg.model, **cfg.model_options()}
    model.pop("backbone_weights", None)
    model.pop("weights", None)
    record = {"model": model, "num_classes": num_classes, "class_names": list(class_names),
              "state_dict": detector.state_dict(), "input": input_record(cfg)}
    if category_ids is not None:
        record["category_ids"] = [int(c) for c in category_ids]
    return record


def export_student(path: str | Path, cfg: TrainConfig, num_classes: int, class_names: list[str], detector: Detector,
                   category_ids: list[int] | None = None) -> None:
    """Write the plain detector to ``path`` (``student.pt``), atomically."""
    atomic_save(student_record(cfg, num_classes, class_names, detector, category_ids), path)


def load_student_record(checkpoint_path: str | Path) -> dict[str, Any]:
    """The ``student.pt`` content of ``checkpoint_path``: an exported ``student.pt`` as it is, or the
    student part of a training ``last.pt``.

    Raises:
        CheckpointError: the file is missing or holds no kdlab detector.
    """
    state = safe_load(checkpoint_path)
    if "task" in state and "config" in state:  # a training checkpoint: take the student's weights
        cfg = TrainConfig(**state["config"])
        model = {"name": cfg.model, **cfg.model_options(), "backbone_weights": None, "weights": None}
        prefix = "student."
        weights = {k[len(prefix):]: v for k, v in state["task"].items() if k.startswith(prefix)}
        state = {"model": model, "num_classes": state.get("num_classes"), "class_names": state.get("class_names"),
                 "state_dict": weights, "input": input_record(cfg), "category_ids": state.get("category_ids")}
    missing = [k for k in STUDENT_KEYS if state.get(k) is None]
    if missing:
        raise CheckpointError(f"{checkpoint_path} is not a kdlab detector checkpoint (missing {missing})")
    return state


def load_detector(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> Detector:
    """Build the plain detector stored in ``checkpoint_path`` and load its weights.

    Args:
        checkpoint_path: an exported ``student.pt``, or a training ``last.pt`` (its student part).
        device: where the detector goes.

    Returns:
        The detector in ``eval()`` mode, with attributes ``class_names``, ``category_ids`` (``None``
        when the checkpoint predates them) and ``input_size`` (``{"min_size", "max_size",
        "size_divisor"}`` of training, or ``None`` when the checkpoint predates it).
    """
    state = load_student_record(checkpoint_path)
    options = {k: v for k, v in state["model"].items() if k != "name" and v is not None}
    try:
        detector = build_detector(state["model"]["name"], state["num_classes"], **options)
        detector.load_state_dict(state["state_dict"])
    except (ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{checkpoint_path}: cannot rebuild the detector ({err})") from None
    detector.class_names = list(state["class_names"])
    detector.category_ids = state.get("category_ids")
    detector.input_size = state.get("input")
    return detector.to(device).eval()
