"""kdlab.cli: commands, exit codes (0 ok, 1 diverged, 2 error) and one-line error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kdlab.engine.loop
from kdlab.cli import main

REPO = Path(__file__).resolve().parents[1]

TINY = ("min_size: 64\nmax_size: 64\nbatch_size: 4\nnum_workers: 0\nbackbone: resnet18\nbackbone_width: 8\n"
        "backbone_norm: gn\nfpn_channels: 16\nhead_convs: 1\nreg_max: 8\nbase_batch_size: 4\nepochs: 1\n"
        "warmup_iters: 2\nlog_every: 1\ndevice: cpu\n")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config(tiny_shapes, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY + f"data_root: {tiny_shapes}\noutput_dir: {tmp_path / 'run'}\n")
    return path


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("kdlab:")]
    assert len(lines) == 1, err
    return lines[0]


def test_data_shapes(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--num-train", "3", "--num-val", "2",
                 "--image-size", "64", "--seed", "1"]) == 0
    assert "wrote 3 training and 2 validation images of 8 classes" in capsys.readouterr().out
    train = json.loads((tmp_path / "s" / "annotations" / "instances_train.json").read_text())
    assert len(train["images"]) == 3 and train["images"][0]["width"] == 64


def test_data_shapes_bad_argument(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--image-size", "8"]) == 2
    assert "image_size must be >= 32" in error_line(capsys)


def test_missing_config(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert error_line(capsys) == f"kdlab: error: config file {tmp_path / 'missing.yaml'} does not exist"


def test_unknown_key_in_file_and_in_override(tiny_config, capsys):
    tiny_config.write_text(tiny_config.read_text() + "epochz: 3\n")
    assert main(["train", str(tiny_config)]) == 2
    line = error_line(capsys)
    assert str(tiny_config) in line and "'epochz'" in line and "did you mean epochs" in line
    assert main(["eval", str(tiny_config), "--checkpoint", "x.pt"]) == 2
    assert "'epochz'" in error_line(capsys)


def test_bad_override(tiny_config, capsys):
    assert main(["train", str(tiny_config), "--set", "lr=fast"]) == 2
    assert "lr must be float, got 'fast'" in error_line(capsys)
    assert main(["train", str(tiny_config), "--set", "lr"]) == 2
    assert "must look like key=value" in error_line(capsys)


def test_missing_data(tiny_config, tmp_path, capsys):
    assert main(["train", str(tiny_config), "--set", f"data_root={tmp_path / 'nowhere'}"]) == 2
    assert f"dataset root {tmp_path / 'nowhere'} does not exist" in error_line(capsys)


def test_resume_without_checkpoint(tiny_config, tmp_path, capsys):
    assert main(["train", str(tiny_config), "--resume", "--no-progress"]) == 2
    assert "cannot resume" in error_line(capsys)


def test_eval_missing_checkpoint(tiny_config, tmp_path, capsys):
    assert main(["eval", str(tiny_config), "--checkpoint", str(tmp_path / "student.pt")]) == 2
    assert error_line(capsys) == f"kdlab: error: checkpoint {tmp_path / 'student.pt'} does not exist"


def test_diverged_run_exits_1(tiny_config, monkeypatch, capsys):
    def diverge(*args, where, **kwargs):
        raise FloatingPointError(f"non-finite loss at {where}: total=nan")

    monkeypatch.setattr(kdlab.engine.loop, "train_step", diverge)
    assert main(["train", str(tiny_config), "--no-progress"]) == 1
    assert error_line(capsys) == "kdlab: training diverged: non-finite loss at iteration 1 (epoch 0, batch 0): total=nan"


def test_debug_env_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_DEBUG", "1")
    from kdlab.config import ConfigError

    with pytest.raises(ConfigError):
        main(["train", str(tmp_path / "missing.yaml")])


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "cfg.yaml"])  # --checkpoint is required
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_train_then_eval(tiny_config, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="coco_metrics: no detections")
        assert main(["train", str(tiny_config), "--no-progress", "--output-dir", str(tmp_path / "out"),
                     "--set", "max_iters=2", "lr=0.005"]) == 0
        out = capsys.readouterr().out
        assert "| out " in out and "|   AP |" in out
        saved = (tmp_path / "out" / "config.yaml").read_text()
        assert "lr: 0.005" in saved and "max_iters: 2" in saved
        assert main(["eval", str(tiny_config), "--checkpoint", str(tmp_path / "out" / "student.pt"),
                     "--output", str(tmp_path / "metrics.json")]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["split"] == "val" and set(report["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert report["metrics"] == json.loads((tmp_path / "out" / "eval_final.json").read_text())
    assert "| student |" in capsys.readouterr().out


def test_python_dash_m_kdlab(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "kdlab", "train", str(tmp_path / "none.yaml")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"kdlab: error: config file {tmp_path / 'none.yaml'} does not exist"
