"""Training metrics: JSON lines in ``output_dir/metrics.jsonl`` (+ TensorBoard when installed).

Every ``log_every`` iterations one record is appended::

    {"iter": 40, "epoch": 0, "lr": 0.0049, "total": 2.31,
     "loss_qfl": 0.61, "loss_qfl_weighted": 0.61, "loss_bbox": 0.62, "loss_bbox_weighted": 1.24, ...,
     "sec_per_iter": 0.21}

``iter`` counts optimiser steps done since the start of the run, ``epoch`` is the 0-based epoch
they belong to, and every value is the mean over the iterations since the previous record
(already averaged over processes by the training loop). Each term is logged unweighted and
multiplied by its weight (DETR's convention). Read the file with
``[json.loads(line) for line in open(path)]`` or ``pandas.read_json(path, lines=True)``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kdlab.engine.checkpoint import SaveError

try:  # TensorBoard is optional (pip install tensorboard)
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # pragma: no cover - depends on the environment
    SummaryWriter = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricLogger:
    """Averages scalars over ``log_every`` iterations and writes them (on the main process only).

    Args:
        output_dir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
        log_every: iterations per record.
        weight_dict: loss weights; ``<term>_weighted = weight * <term>`` is added for these terms.
        enabled: ``False`` on every process but rank 0 (it still averages, but writes nothing).
        resume_iteration: when resuming from iteration ``k``, records with ``iter > k`` (written
            by the interrupted run after its last checkpoint) are removed first.
        window: the partial window saved in the checkpoint (from :meth:`window_state`).
    """

    def __init__(self, output_dir: str | Path, log_every: int, weight_dict: dict[str, float], *,
                 enabled: bool = True, resume_iteration: int | None = None, window: dict[str, Any] | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.log_every = log_every
        self.weight_dict = dict(weight_dict)
        self.enabled = enabled
        self.sums: dict[str, float] = dict(window["sums"]) if window else {}
        self.count: int = int(window["count"]) if window else 0
        self.tick = time.perf_counter()
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iteration is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("iter", 0) <= resume_iteration]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if SummaryWriter is not None:
            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def window_state(self) -> dict[str, Any]:
        """The not-yet-written window (saved in checkpoints so that a resumed log is identical)."""
        return {"sums": dict(self.sums), "count": self.count}

    def update(self, iteration: int, epoch: int, lr: float, values: dict[str, float]) -> dict[str, Any] | None:
        """Add one iteration's ``values``; every ``log_every`` iterations write and return a record."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1
        if iteration % self.log_every != 0:
            return None
        record: dict[str, Any] = {"iter": iteration, "epoch": epoch, "lr": lr}
        for name, total in self.sums.items():
            record[name] = total / self.count
            if name in self.weight_dict:
                record[f"{name}_weighted"] = self.weight_dict[name] * record[name]
        now = time.perf_counter()
        record["sec_per_iter"] = (now - self.tick) / self.count
        self.tick, self.sums, self.count = now, {}, 0
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:  # disk full: say which file, one line
                raise SaveError(f"cannot append to {self.path}: {err.strerror or err}") from None
            if self.writer is not None:
                for name, value in record.items():
                    if name not in ("iter", "epoch"):
                        self.writer.add_scalar(f"train/{name}", value, iteration)
        return record

    def log_eval(self, iteration: int, metrics: dict[str, float | None]) -> None:
        """COCO metrics to TensorBoard (the JSON files are written by the training loop)."""
        if self.enabled and self.writer is not None:
            for name, value in metrics.items():
                if value is not None:  # undefined metric (no ground truth in that range)
                    self.writer.add_scalar(f"val/{name}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
