"""Helpers shared by the experiment scripts (``experiments/*.py``): configs and cached, resumable runs."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from kdlab.config import TrainConfig, load_config
from kdlab.engine.loop import train
from kdlab.eval import format_metric


def make_config(base: Path, fields: dict) -> TrainConfig:
    """``base`` YAML with ``fields`` replaced (validated again by ``TrainConfig``)."""
    return dataclasses.replace(load_config(base), **fields)


def run(cfg: TrainConfig) -> dict[str, float | None]:
    """Train ``cfg`` unless an identical finished run exists; resume an identical interrupted one."""
    out = Path(cfg.output_dir)
    final, saved = out / "eval_final.json", out / "config.yaml"
    same = saved.is_file() and load_config(saved).to_dict() == cfg.to_dict()
    if same and final.is_file():
        return json.loads(final.read_text())
    if out.exists() and not same and any(out.iterdir()):
        raise FileExistsError(f"{out} holds a run with another config; remove it or choose another --out")
    start = time.time()
    resume = same and (out / "last.pt").is_file()
    # the same config without a checkpoint: a run that stopped before its first save, started over
    metrics = train(cfg, resume=resume, overwrite=not resume, progress=False)
    print(f"  {out}: AP {format_metric(metrics['AP'])} ({time.time() - start:.0f} s)", flush=True)
    return metrics


def relative_to(path: Path | str, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else as given (published results carry no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
