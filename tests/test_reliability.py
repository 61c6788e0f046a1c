"""Faults and user mistakes (issue 19's table): each ends with one clear line and exit code 2, or is
handled, and nothing trained is lost. One test (or two) per row of the table:

two runs into one folder, re-running a finished run, distill_options mistakes, errors while building
the task, disk full during a save, a kill during a save, undefined metrics, an all-empty training
split, degenerate validation boxes, a truncated image, Ctrl-C.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import kdlab.engine.build
from kdlab.cli import main
from kdlab.data import CocoDetection, build_dataset
from kdlab.engine import atomic_save, read_metrics, safe_load
from kdlab.engine.checkpoint import SaveError
from kdlab.engine.rundir import LOCK_NAME, OutputDirNotEmpty, claim_output_dir
from kdlab.eval import coco_metrics

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def error_line(error_line):
    """Only the lines that start with ``kdlab: error`` count."""
    return functools.partial(error_line, prefix="kdlab: error")


def quiet_main(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="coco_metrics: no detections")
        return main(argv)


def finished_run(folder: Path) -> dict[str, bytes]:
    """A folder that looks like a finished run; returns its files' bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(2)}}, folder / "student.pt")
    (folder / "metrics.jsonl").write_text('{"iter": 1, "total": 2.0}\n')
    (folder / "eval_epoch1.json").write_text('{"AP": 0.5}')
    (folder / "eval_final.json").write_text('{"AP": 0.5}')
    (folder / "config.yaml").write_text("lr: 0.01\n")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ---------------------------------------------------------------- two trainings into one output_dir
@pytest.mark.slow
def test_two_processes_one_output_dir_the_second_is_refused_and_ctrl_c_stops_the_first(tiny_config, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "kdlab", "train", str(tiny_config), "--no-progress", "--set", "epochs=200"]
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        second = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by another kdlab run (pid {first.pid} on " in second.stderr.strip().splitlines()[-1]
        first.send_signal(signal.SIGINT)  # Ctrl-C: the first run saves where it stopped and says how to resume
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130 and "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    iteration = safe_load(out / "last.pt")["iteration"]
    assert line.startswith(f"kdlab: interrupted at iteration {iteration} ({out}/last.pt saved); resume with "
                           f"`kdlab train {tiny_config} --set epochs=200 --resume`"), line
    assert [r["iter"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, iteration + 1))  # one writer
    assert not (out / LOCK_NAME).exists()


def test_a_live_lock_names_its_holder_and_a_dead_one_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from kdlab.engine.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(kdlab.engine.rundir.OutputDirInUse, match=f"pid {holder.pid} on .*lock file {tmp_path}"):
            with claim_output_dir(tmp_path, resume=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claim_output_dir(tmp_path, resume=False):  # its process is gone: the kernel dropped the lock
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"took over the lock of {tmp_path} from a run that ended without releasing it (pid {holder.pid}" \
        in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()


# ---------------------------------------------------------------- re-running a finished run
def test_a_finished_run_is_not_overwritten_without_overwrite(tiny_config, tmp_path, capsys, error_line):
    before = finished_run(tmp_path / "run")
    assert main(["train", str(tiny_config), "--no-progress"]) == 2
    line = error_line()
    assert line.startswith(f"kdlab: error: output_dir {tmp_path / 'run'} already holds a finished run (")
    assert "nothing was changed. Start over with --overwrite" in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # student.pt, logs, evals kept
    assert main(["train", str(tiny_config), "--resume", "--overwrite"]) == 2
    assert "contradict" in error_line()


def test_overwrite_removes_the_previous_run_and_nothing_else(tmp_path, capsys):
    folder = tmp_path / "run"
    finished_run(folder)
    (folder / "tensorboard").mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirNotEmpty):
        with claim_output_dir(folder, resume=False):
            pass
    with claim_output_dir(folder, resume=False, overwrite=True):
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "notes.txt"]  # stale eval_epoch1.json gone
    assert "--overwrite: removed the previous run's" in capsys.readouterr().err


def test_an_unfinished_run_points_to_resume(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(OutputDirNotEmpty, match=r"an unfinished run \(last.pt\); continue it with --resume"):
        with claim_output_dir(tmp_path, resume=False):
            pass


# ---------------------------------------------------------------- distill_options mistakes
@pytest.mark.parametrize("override, expected", [
    ("distill_options.temprature=5",
     "kdlab: error: distill_options: distill='ld' (kdlab.distill.ld.LD) has no option 'temprature'; did you mean "),
    ("distill_options.main_ld_weight=abc",
     "kdlab: error: distill_options.main_ld_weight must be float | None, got 'abc' (str) for distill='ld'"),
    ("distill_options.vlr_exclude_positives=3", "kdlab: error: distill_options.vlr_exclude_positives must be bool"),
])
def test_distill_option_typos_and_wrong_types_are_one_line(tiny_config, tmp_path, override, expected, capsys, error_line):
    argv = ["train", str(tiny_config), "--no-progress", "--set", "distill=ld",
            f"teacher_checkpoint={tmp_path / 'teacher.pt'}", override]
    assert main(argv) == 2
    line = error_line()
    assert line.startswith(expected), line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training


def test_distill_options_check_follows_options_into_the_base_class():
    from kdlab.distill.imitation import FineGrainedImitation
    from kdlab.engine.build import check_distill_options

    # psi is FineGrainedImitation's own; weight comes through **options from FeatureImitation
    assert check_distill_options(FineGrainedImitation, {"psi": 1, "weight": "1e-3"}) == {"psi": 1.0, "weight": 1e-3}
    with pytest.raises(kdlab.config.ConfigError, match="has no option 'wieght'; did you mean weight"):
        check_distill_options(FineGrainedImitation, {"wieght": 1.0})
    with pytest.raises(kdlab.config.ConfigError, match="adapter must be str, got 3"):
        check_distill_options(FineGrainedImitation, {"adapter": 3})


def test_distill_options_without_distill_are_refused(tiny_config, capsys, error_line):
    assert main(["train", str(tiny_config), "--set", "distill_options.main_kd_weight=0"]) == 2
    assert "are given but distill is null" in error_line()


def test_an_unsupported_teacher_is_one_line(tiny_config, tmp_path, capsys, error_line):
    # a Faster R-CNN teacher for LD (a dense, distribution-head method): one line naming both, exit 2
    shutil.copy(REPO / "data" / "checkpoints" / "shapes_faster_rcnn_teacher.pt", tmp_path / "teacher.pt")
    assert main(["train", str(tiny_config), "--no-progress", "--set", "distill=ld", "backbone_width=16",
                 f"teacher_checkpoint={tmp_path / 'teacher.pt'}"]) == 2
    assert error_line() == ("kdlab: error: distill='ld': LD distils dense detectors; the teacher is a "
                                  "FasterRCNN (two-stage output)")


def test_gid_with_a_teacher_of_another_family_is_one_line(tiny_config, tmp_path, capsys, error_line):
    shutil.copy(REPO / "data" / "checkpoints" / "shapes_faster_rcnn_teacher.pt", tmp_path / "teacher.pt")
    assert main(["train", str(tiny_config), "--no-progress", "--set", "distill=gid", "model=retinanet",
                 "reg_max=null", f"teacher_checkpoint={tmp_path / 'teacher.pt'}"]) == 2
    assert "distill='gid': GID compares teacher and student slot by slot" in error_line()


# ---------------------------------------------------------------- disk full while writing a checkpoint
def torch_disk_full_error() -> RuntimeError:
    """What torch.save raises when the disk fills up: this RuntimeError, with the OSError as its context."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        except RuntimeError as err:
            return err


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous(tiny_config, tmp_path, monkeypatch, capsys, error_line):
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        calls.append(obj.get("iteration"))
        if len(calls) == 2:
            f.write(b"the first megabytes")
            raise torch_disk_full_error()
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    assert quiet_main(["train", str(tiny_config), "--no-progress", "--set", "checkpoint_every_iters=1"]) == 2
    last = tmp_path / "run" / "last.pt"
    line = error_line()
    # the free space is read when the error happens; other processes may have written since
    match = re.fullmatch(re.escape(f"kdlab: error: cannot write {last}: no space left on the device (disk full); ")
                         + r"([0-9.]+)" + re.escape(" MiB free on the device; the previous last.pt is intact and the "
                                                   "partial file was removed"), line)
    assert match, line
    assert abs(float(match.group(1)) - float(free_mib(last))) < 512
    monkeypatch.setattr(torch, "save", real_save)
    assert calls == [1, 2] and safe_load(last)["iteration"] == 1
    assert not list((tmp_path / "run").glob(".*.tmp"))


def free_mib(path: Path) -> str:
    return f"{shutil.disk_usage(path.parent).free / 2**20:.1f}"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and a kernel that allows it; skipped otherwise)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_real_disk_full_on_a_small_tmpfs(small_tmpfs):
    path = small_tmpfs / "last.pt"
    atomic_save({"iteration": 1, "w": torch.zeros(1000)}, path)
    with pytest.raises(SaveError, match=r"cannot write .*last.pt: no space left on the device \(disk full\); .* the "
                                        r"previous last.pt is intact and the partial file was removed"):
        atomic_save({"iteration": 2, "w": torch.zeros(1_000_000)}, path)  # 4 MB into 1 MiB
    assert safe_load(path)["iteration"] == 1 and sorted(p.name for p in small_tmpfs.iterdir()) == ["last.pt"]


# ---------------------------------------------------------------- a kill during a save
def test_a_kill_during_a_save_leaves_a_temp_file_that_the_next_start_removes(tmp_path, capsys):
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, torch\n"
        "from kdlab.engine.checkpoint import atomic_save\n"
        "from kdlab.engine.rundir import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\n"
        "def slow_save(obj, f):\n"
        "    f.write(b'x' * 100000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
        "torch.save = slow_save\n"
        "atomic_save({'iteration': 3}, sys.argv[1] + '/last.pt')\n"), str(tmp_path)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        writer.send_signal(signal.SIGKILL)  # kill -9 during the save: nothing cleans up
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    temp = tmp_path / f".last.pt.{writer.pid}.tmp"
    assert temp.is_file() and temp.stat().st_size == 100000 and not (tmp_path / "last.pt").exists()
    with claim_output_dir(tmp_path, resume=False):  # what `kdlab train` does first
        assert not temp.exists()
    err = capsys.readouterr().err
    assert f"removed 1 temporary file(s) left by an interrupted save: .last.pt.{writer.pid}.tmp" in err
    assert f"took over the lock of {tmp_path} from a run that ended without releasing it (pid {writer.pid}" in err


# ---------------------------------------------------------------- an all-empty training split
def test_an_all_empty_training_split_is_an_error(tiny_shapes, tmp_path, write_tiny_config, capsys, error_line):
    root = tmp_path / "data"
    shutil.copytree(tiny_shapes, root)
    train_json = root / "annotations" / "instances_train.json"
    train_json.write_text(json.dumps({**json.loads(train_json.read_text()), "annotations": []}))
    config = write_tiny_config(root)
    assert main(["train", str(config), "--no-progress"]) == 2
    assert error_line() == (f"kdlab: error: training split 'train' ({train_json}) has 16 images but no box to "
                                  f"learn from (no annotations, or all crowd or dropped as degenerate); "
                                  f"`kdlab check-data CONFIG` shows the counts")


# ---------------------------------------------------------------- degenerate boxes in val
def test_validation_boxes_that_training_drops_are_not_scored(tmp_path):
    image = Image.new("RGB", (64, 48), (90, 120, 30))
    (tmp_path / "images").mkdir()
    image.save(tmp_path / "images" / "1.png")
    boxes = [[4, 4, 20, 20], [30, 10, 12, 30], [50, 40, 0.5, 6]]  # the last is half a pixel wide
    (tmp_path / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.png", "width": 64, "height": 48}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for k, b in enumerate(boxes)]}))
    with pytest.warns(UserWarning, match="dropped 1 of 3 .* left out of training and of the ground truth COCOeval "
                                         "scores against"):
        dataset = CocoDetection(tmp_path / "images", tmp_path / "instances_val.json")
    perfect = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 1.0} for b in boxes[:2]]  # every box training has
    assert coco_metrics(dataset.eval_coco, perfect)["AP"] == pytest.approx(1.0)
    assert coco_metrics(dataset.coco, perfect)["AP"] < 0.7  # the file as is: the unmatchable box is a miss


# ---------------------------------------------------------------- a truncated image
def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_image_is_found_before_training_and_can_be_skipped(tiny_shapes, tmp_path, write_tiny_config, capsys, error_line):
    root = tmp_path / "data"
    shutil.copytree(tiny_shapes, root)
    truncate(root / "train" / "000003.png")
    config = write_tiny_config(root)

    assert main(["check-data", str(config)]) == 2
    captured = capsys.readouterr()
    assert f"{root / 'train' / '000003.png'} (image id 3): cannot be decoded" in captured.out
    assert "classes, from the file's 'categories': disc (id 1), square (id 2)" in captured.out

    assert main(["train", str(config), "--no-progress"]) == 2
    line = error_line()
    assert line.startswith("kdlab: error: 1 of 16 images of split 'train' cannot be used: "
                           f"{root / 'train' / '000003.png'} (image id 3): cannot be decoded")
    assert line.endswith("or pass --skip-bad-images to leave them out")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # found before any training step

    assert quiet_main(["train", str(config), "--no-progress", "--skip-bad-images", "--set", "max_iters=1"]) == 0
    assert "kdlab: note: --skip-bad-images: left out 1 of 16 images of split 'train'" in capsys.readouterr().err


def test_the_quick_check_finds_truncated_jpeg_and_png_and_wrong_sizes(tmp_path):
    from kdlab.data.check import check_image

    for suffix in ("jpg", "png"):
        path = tmp_path / f"image.{suffix}"
        Image.effect_noise((64, 48), 40).convert("RGB").save(path)
        assert check_image(path, 64, 48) is None
        assert check_image(path, 48, 64) == "is 64x48 (w x h) but the annotation file says 48x64"
        truncate(path, 0.7)
        assert check_image(path, 64, 48).startswith("cannot be decoded (image file is truncated")
    assert check_image(tmp_path / "nope.png", 1, 1) == "file does not exist"


# ---------------------------------------------------------------- Ctrl-C in the Python API
def test_ctrl_c_saves_the_position_and_resume_matches_an_uninterrupted_run(tiny_shapes, tmp_path, monkeypatch):
    import dataclasses

    import kdlab.engine.loop
    from kdlab.config import TrainConfig
    from kdlab.engine import train
    from kdlab.engine.interrupt import TrainingInterrupted

    cfg = TrainConfig(data_root=str(tiny_shapes), min_size=64, max_size=64, batch_size=4, num_workers=0,
                      backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=16, head_convs=1,
                      reg_max=8, lr=0.01, base_batch_size=4, epochs=2, lr_steps=[1], warmup_iters=2, log_every=1,
                      eval_every=0, device="cpu", output_dir=str(tmp_path / "whole"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="coco_metrics: no detections")
        train(cfg, progress=False)
        real_step = kdlab.engine.loop.train_step

        def ctrl_c_at_6(*args, **kwargs):
            if kwargs["where"].startswith("iteration 6 "):
                os.kill(os.getpid(), signal.SIGINT)  # arrives inside the step: deferred to its end
            return real_step(*args, **kwargs)

        monkeypatch.setattr(kdlab.engine.loop, "train_step", ctrl_c_at_6)
        stopped = dataclasses.replace(cfg, output_dir=str(tmp_path / "stopped"))
        with pytest.raises(TrainingInterrupted, match=r"interrupted at iteration 6 \(.*last.pt saved\)"):
            train(stopped, progress=False)
        last = safe_load(tmp_path / "stopped" / "last.pt")
        assert (last["epoch"], last["batch_in_epoch"], last["iteration"]) == (1, 2, 6)  # the step finished
        monkeypatch.setattr(kdlab.engine.loop, "train_step", real_step)
        train(stopped, resume=True, progress=False)
    whole, resumed = safe_load(tmp_path / "whole" / "student.pt"), safe_load(tmp_path / "stopped" / "student.pt")
    for name, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
