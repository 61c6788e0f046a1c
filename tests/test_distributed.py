"""DDP through ``torchrun`` (2 CPU processes, gloo) against one process with the same total batch.

Run as a script (``python -m torch.distributed.run --nproc_per_node=2 tests/test_distributed.py
evaluate ROOT OUT``) this file is also the worker of the distributed-evaluation test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.engine import read_metrics, safe_load
from kdlab.engine.distributed import init_distributed, resolve_device

REPO = Path(__file__).resolve().parents[1]

TINY_GFL = {  # GFL with GroupNorm (exact under DDP), width 8, 64 px: 4 iterations per epoch on 16 images
    "min_size": 64, "max_size": 64, "num_workers": 0, "backbone": "resnet18", "backbone_width": 8,
    "backbone_norm": "gn", "fpn_channels": 16, "head_convs": 1, "reg_max": 8, "lr": 0.01, "base_batch_size": 4,
    "epochs": 2, "lr_steps": [1], "warmup_iters": 3, "grad_clip": 10.0, "log_every": 1, "device": "cpu",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], nproc: int, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("KDLAB_DEBUG", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_single_process_without_torchrun_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.device, ctx.owns_group) == (0, 1, torch.device("cpu"), False)
    assert not torch.distributed.is_initialized()
    assert resolve_device("cuda:1" if torch.cuda.is_available() else "cpu").type in ("cuda", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_twice_the_batch(tiny_shapes, tmp_path):
    """W processes x b images == 1 process x W*b images, because every loss normaliser is a global mean.

    A normaliser clamped *after* ``reduce_mean`` with ``clamp(min=1)`` breaks this while the global
    sum is below ``W`` (early training, when GFL's score weights are ~0.01); the single-process
    semantics are ``reduce_mean(x).clamp(min=1 / world_size)``.
    """
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({**TINY_GFL, "data_root": str(tiny_shapes)}))  # JSON is YAML
    run(["-m", "kdlab", "train", str(config), "--no-progress", "--output-dir", str(tmp_path / "ddp"),
         "--set", "batch_size=2"], nproc=2)
    run(["-m", "kdlab", "train", str(config), "--no-progress", "--output-dir", str(tmp_path / "single"),
         "--set", "batch_size=4"], nproc=1)

    ddp, single = read_metrics(tmp_path / "ddp" / "metrics.jsonl"), read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [r["iter"] for r in ddp] == [r["iter"] for r in single] == list(range(1, 9))  # rank 0 alone writes
    for a, b in zip(ddp, single):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)  # lr scaled by the total batch 2 x 2 = 4
        for name in ("total", "loss_qfl", "loss_giou", "loss_dfl"):
            assert a[name] == pytest.approx(b[name], rel=1e-4), (a["iter"], name, a[name], b[name])
    ddp_weights = safe_load(tmp_path / "ddp" / "student.pt")["state_dict"]
    single_weights = safe_load(tmp_path / "single" / "student.pt")["state_dict"]
    for name, value in single_weights.items():
        assert torch.allclose(ddp_weights[name], value, rtol=1e-3, atol=1e-5), name
    assert (tmp_path / "ddp" / "eval_final.json").is_file() and (tmp_path / "ddp" / "last.pt").is_file()


@pytest.mark.slow
def test_distributed_evaluation_gathers_every_image_once(tiny_shapes, tmp_path):
    run([str(Path(__file__)), "evaluate", str(tiny_shapes), str(tmp_path)], nproc=2)
    report = json.loads((tmp_path / "evaluate.json").read_text())
    val = json.loads((tiny_shapes / "annotations" / "instances_val.json").read_text())
    assert report["image_ids"] == sorted(image["id"] for image in val["images"])
    assert report["metrics"]["AP"] == pytest.approx(1.0, abs=1e-6)
    assert report["same_on_every_rank"]


def _evaluate_worker(root: str, out: str) -> None:
    """Each rank evaluates a ground-truth oracle on its share; rank 0 reports what COCOeval saw."""
    import kdlab.engine.evaluation as evaluation_module
    from kdlab.config import TrainConfig
    from kdlab.data import build_dataset
    from kdlab.engine import build_loader, evaluate
    from kdlab.utils.dist import all_gather_object

    sys.path.insert(0, str(Path(__file__).parent))
    from test_engine import OracleDetector

    ctx = init_distributed("cpu")
    seen: dict = {}
    real_coco_metrics = evaluation_module.coco_metrics

    def recording_coco_metrics(coco, results, image_ids=None):
        seen["image_ids"] = image_ids
        return real_coco_metrics(coco, results, image_ids=image_ids)

    evaluation_module.coco_metrics = recording_coco_metrics
    dataset = build_dataset(root, "val", train=False, min_size=64, max_size=64)
    cfg = TrainConfig(batch_size=3, num_workers=0)
    oracle = OracleDetector(build_loader(dataset, cfg, ctx, train=False))
    metrics = evaluate(oracle, build_loader(dataset, cfg, ctx, train=False), ctx.device)
    everyone = all_gather_object(metrics)
    if ctx.is_main:
        report = {"metrics": metrics, "image_ids": seen["image_ids"], "same_on_every_rank": all(m == metrics for m in everyone)}
        Path(out, "evaluate.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "evaluate":
        _evaluate_worker(sys.argv[2], sys.argv[3])
