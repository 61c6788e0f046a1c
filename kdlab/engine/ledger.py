"""Run records: what a finished experiment run measured, kept in a small tracked JSON file.

An experiment's rows take CPU-hours, and a run's folder (``outputs/...``: checkpoints, logs) is not
tracked: a fresh checkout, another machine or CI would train every row again. So each finished run of
an experiment script also leaves a *record* under ``experiments/results/runs/<experiment>/``: its
configuration, a key that identifies what was trained, the metrics, the wall time, the device, the
kdlab commit and torch version, and the command. A later invocation of the same experiment finds
the record and reuses its metrics instead of training again; the tables say how many rows came from
records (:func:`provenance_line`). ``--fresh`` on an experiment script ignores the records (and
overwrites them), e.g. after a change to a method's code, which the key cannot see.

The key (:func:`run_key`) is a SHA-256 over the configuration with the fields that do not change what is
trained left out (the output folder, the loader's worker count, logging and checkpoint intervals), the
device replaced by the device type it resolves to, and every file the run reads replaced by its
content's digest: checkpoints and weight files by their bytes, a dataset root by its annotation files
(``annotations/instances_<split>.json`` of the train and val splits). A record made in another checkout
or on another machine matches when the run would be the same; a retrained teacher, another dataset or
another schedule does not.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from kdlab.config import TrainConfig
from kdlab.engine.checkpoint import atomic_save_json

IGNORED_FIELDS = ("output_dir", "num_workers", "log_every", "checkpoint_every_iters")
FILE_FIELDS = ("backbone_weights", "weights", "init_checkpoint", "teacher_config", "teacher_checkpoint", "teacher_weights")
FORMAT = 1
# fields added to TrainConfig after the first records: left out of the key while at this default, so that a
# new field does not orphan the records of runs that could not have set it
LATER_FIELDS = {"init_checkpoint": None}


def file_digest(path: Path) -> str:
    """``sha256:`` and the first 16 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def dataset_digest(cfg: TrainConfig) -> str:
    """The digest of ``cfg``'s dataset: its train and val annotation files (COCO layout), or the root as
    written when they are not there (a dataset kdlab does not read as COCO files)."""
    root = Path(cfg.data_root)
    files = [root / "annotations" / f"instances_{split}.json" for split in (cfg.train_split, cfg.val_split)]
    if not all(f.is_file() for f in files):
        return cfg.data_root
    return "+".join(file_digest(f) for f in files)


def key_fields(cfg: TrainConfig, device_type: str) -> dict[str, Any]:
    """The configuration that identifies a run (see the module docstring)."""
    fields = cfg.to_dict()
    for name in IGNORED_FIELDS:
        fields.pop(name)
    for name, default in LATER_FIELDS.items():
        if fields.get(name) == default:
            fields.pop(name, None)
    fields["device"] = device_type
    fields["data_root"] = dataset_digest(cfg)
    for name in FILE_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) and Path(value).is_file():
            fields[name] = file_digest(Path(value))
    return fields


def run_key(cfg: TrainConfig, device_type: str) -> str:
    """SHA-256 (hex) of :func:`key_fields`, canonical JSON."""
    text = json.dumps(key_fields(cfg, device_type), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def eval_history(run_dir: Path) -> dict[str, dict]:
    """``{epoch: metrics}`` of a run's periodic evaluations (``eval_epoch<n>.json`` in its folder)."""
    history = {}
    for path in sorted(run_dir.glob("eval_epoch*.json"), key=lambda p: int(p.stem.removeprefix("eval_epoch"))):
        history[path.stem.removeprefix("eval_epoch")] = json.loads(path.read_text())
    return history


def write_record(path: Path, cfg: TrainConfig, device_type: str, metrics: dict, seconds: float | None) -> dict:
    """Write the record of a finished run of ``cfg`` to ``path`` (atomically) and return it."""
    import torch

    record = {
        "format": FORMAT,
        "key": run_key(cfg, device_type),
        "metrics": metrics,
        "seconds": None if seconds is None else round(seconds, 1),
        "device": device_type,
        "threads": torch.get_num_threads(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kdlab_commit": _commit(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "eval_history": eval_history(Path(cfg.output_dir)),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir",)},
        "key_fields": key_fields(cfg, device_type),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(record, path)
    return record


def read_record(path: Path, cfg: TrainConfig, device_type: str) -> dict | None:
    """The record at ``path`` when it is one of a run of ``cfg`` on ``device_type`` (same key), else None."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"run record {path} is not valid JSON ({err}); delete it to train the run again") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT or "metrics" not in record:
        raise ValueError(f"run record {path}: expected a kdlab run record (format {FORMAT}) with 'metrics'")
    if record.get("key") != run_key(cfg, device_type):
        return None
    return record


def find_same_run(root: Path, cfg: TrainConfig, device_type: str, exclude: Path | None = None) -> Path | None:
    """A record under ``root`` (searched recursively) of the same run as ``cfg`` (same key), other than
    ``exclude``; None when there is none.

    Two experiments can train the identical run: e.g. GID's and DRKD's RetinaNet student alone are the same
    config, seed and data, so the key is the same. The first finished record stands for both."""
    if not root.is_dir():
        return None
    key = run_key(cfg, device_type)
    skip = None if exclude is None else exclude.resolve()
    for path in sorted(root.rglob("seed*.json")):
        if skip is not None and path.resolve() == skip:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not a record this search can use; read_record reports a broken one where it is expected
        if isinstance(record, dict) and record.get("format") == FORMAT and record.get("key") == key \
                and "metrics" in record:
            return path
    return None


def reuse_record(source: Path, path: Path, root: Path) -> dict:
    """Copy the record at ``source`` (an identical run made by another experiment, :func:`find_same_run`)
    to ``path``, atomically, naming its origin in ``reused_from`` (relative to ``root``); returns it."""
    record = json.loads(source.read_text())
    try:
        origin = source.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        origin = str(source)
    record["reused_from"] = origin
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(record, path)
    return record


def differing_fields(path: Path, cfg: TrainConfig, device_type: str) -> list[str]:
    """The key fields in which the record at ``path`` differs from ``cfg`` (why it was not reused)."""
    stored = json.loads(path.read_text()).get("key_fields", {})
    now = key_fields(cfg, device_type)
    return sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))


def provenance_line(trained: int, folder: int, recorded: int) -> str:
    """A sentence for a results table: where its runs' numbers come from."""
    parts = []
    if trained:
        parts.append(f"{trained} trained in this invocation")
    if folder:
        parts.append(f"{folder} read from finished runs in the output folder")
    if recorded:
        parts.append(f"{recorded} read from run records (experiments/results/runs/; each with the command that "
                     "computed it, its commit, date and wall time)")
    return "Runs: " + ("; ".join(parts) if parts else "none") + "."
