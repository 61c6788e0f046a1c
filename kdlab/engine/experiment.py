"""Helpers shared by the experiment scripts (``experiments/*.py``): configs and cached, resumable runs."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from kdlab.config import TrainConfig, load_config
from kdlab.engine.loop import train


def make_config(base: Path, fields: dict) -> TrainConfig:
    """``base`` YAML with ``fields`` replaced (validated again by ``TrainConfig``)."""
    return dataclasses.replace(load_config(base), **fields)


def run(cfg: TrainConfig) -> dict[str, float]:
    """Train ``cfg`` unless an identical finished run exists; resume an identical interrupted one."""
    out = Path(cfg.output_dir)
    final, saved = out / "eval_final.json", out / "config.yaml"
    same = saved.is_file() and load_config(saved).to_dict() == cfg.to_dict()
    if same and final.is_file():
        return json.loads(final.read_text())
    if out.exists() and not same and any(out.iterdir()):
        raise FileExistsError(f"{out} holds a run with another config; remove it or choose another --out")
    start = time.time()
    metrics = train(cfg, resume=same and (out / "last.pt").is_file(), progress=False)
    print(f"  {out}: AP {100 * metrics['AP']:.1f} ({time.time() - start:.0f} s)", flush=True)
    return metrics


def relative_to(path: Path | str, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else as given (published results carry no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
