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

pytestmark = pytest.mark.usefixtures("one_thread")


def test_data_shapes(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--num-train", "3", "--num-val", "2",
                 "--image-size", "64", "--seed", "1"]) == 0
    assert "wrote 3 training and 2 validation images of 8 classes" in capsys.readouterr().out
    train = json.loads((tmp_path / "s" / "annotations" / "instances_train.json").read_text())
    assert len(train["images"]) == 3 and train["images"][0]["width"] == 64


def test_data_shapes_bad_argument(tmp_path, capsys, error_line):
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--image-size", "8"]) == 2
    assert "image_size must be >= 32" in error_line()


def test_missing_config(tmp_path, capsys, error_line):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert error_line() == f"kdlab: error: config file {tmp_path / 'missing.yaml'} does not exist"


def test_unknown_key_in_file_and_in_override(tiny_config, capsys, error_line):
    tiny_config.write_text(tiny_config.read_text() + "epochz: 3\n")
    assert main(["train", str(tiny_config)]) == 2
    line = error_line()
    assert str(tiny_config) in line and "'epochz'" in line and "did you mean epochs" in line
    assert main(["eval", str(tiny_config), "--checkpoint", "x.pt"]) == 2
    assert "'epochz'" in error_line()


def test_bad_override(tiny_config, capsys, error_line):
    assert main(["train", str(tiny_config), "--set", "lr=fast"]) == 2
    assert "lr must be float, got 'fast'" in error_line()
    assert main(["train", str(tiny_config), "--set", "lr"]) == 2
    assert "must look like key=value" in error_line()


def test_missing_data(tiny_config, tmp_path, capsys, error_line):
    assert main(["train", str(tiny_config), "--set", f"data_root={tmp_path / 'nowhere'}"]) == 2
    assert f"dataset root {tmp_path / 'nowhere'} does not exist" in error_line()


def test_resume_without_checkpoint(tiny_config, tmp_path, capsys, error_line):
    assert main(["train", str(tiny_config), "--resume", "--no-progress"]) == 2
    assert "cannot resume" in error_line()


def test_eval_missing_checkpoint(tiny_config, tmp_path, capsys, error_line):
    assert main(["eval", str(tiny_config), "--checkpoint", str(tmp_path / "student.pt")]) == 2
    assert error_line() == f"kdlab: error: checkpoint {tmp_path / 'student.pt'} does not exist"


def test_diverged_run_exits_1(tiny_config, monkeypatch, capsys, error_line):
    def diverge(*args, where, **kwargs):
        raise FloatingPointError(f"non-finite loss at {where}: total=nan")

    monkeypatch.setattr(kdlab.engine.loop, "train_step", diverge)
    assert main(["train", str(tiny_config), "--no-progress"]) == 1
    assert error_line() == "kdlab: training diverged: non-finite loss at iteration 1 (epoch 0, batch 0): total=nan"


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


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: kdlab [-h] {data,check-data,train,eval,predict,demo} ..." in out
    for command in ("data", "check-data", "train", "eval", "predict", "demo"):
        assert f"    {command} " in out, command


# ---------------------------------------------------------------- documented commands run as written
def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` of every kdlab / experiments command in the configs' headers and the READMEs."""
    found = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            found += [(path.name, c) for c in _commands_in(line.lstrip("# "))]
    for path in (REPO / "README.md", REPO / "data" / "checkpoints" / "README.md"):
        in_code = False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
            elif in_code:
                found += [(path.name, c) for c in _commands_in(line.strip())]
    return found


def _commands_in(text: str) -> list[str]:
    text = text.split("  #")[0].split(" # ")[0]  # a trailing comment
    parts = [part.strip() for part in text.split("&&")]
    return [p for p in parts if p.startswith(("kdlab ", "python experiments/", ".venv/bin/kdlab "))
            or (p.startswith("torchrun ") and " -m kdlab " in p)]


def parse_documented(command: str):
    """Parse one documented command with the real parser; check the config and its overrides."""
    import importlib.util
    import shlex

    from kdlab.cli import build_parser
    from kdlab.config import load_config

    words = shlex.split(command)
    if words[0] == ".venv/bin/kdlab":
        words[0] = "kdlab"
    if words[0] == "torchrun":
        words = words[words.index("kdlab"):]
    if words[0] == "python":
        spec = importlib.util.spec_from_file_location("script", REPO / words[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.parse_args(words[2:])
    args = build_parser().parse_args(words[1:])
    if args.command in ("train", "eval", "check-data"):
        load_config(REPO / args.config, args.overrides)
    return args


def test_every_documented_command_parses_as_written():
    commands = documented_commands()
    assert len(commands) > 30 and any("distill=null" in c for _, c in commands)
    for where, command in commands:
        try:
            parse_documented(command)
        except SystemExit as err:
            pytest.fail(f"{where}: `{command}` does not parse (exit {err.code})")


def test_the_old_gid_header_command_would_fail():
    # what the GID configs' headers used to say: `distill=null` without --set is a second config path
    with pytest.raises(SystemExit):
        parse_documented("kdlab train configs/shapes_gid_fcos_student.yaml distill=null")


def test_shipped_distill_options_fit_their_methods():
    from kdlab.config import load_config
    from kdlab.distill import METHODS, method_options
    from kdlab.engine.build import check_distill_options

    checked = 0
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        if cfg.distill is not None:
            for name, options in method_options(cfg.distill, cfg.distill_options).items():
                check_distill_options(METHODS[name], options, method=name)
            checked += 1
    assert checked >= 4


def test_ld_example_config_is_the_student_config_plus_ld():
    import inspect

    from kdlab.config import load_config
    from kdlab.distill.ld import CALIBRATED_LD_WEIGHTS, LD

    student, ld = load_config(REPO / "configs/shapes_gfl_student.yaml"), load_config(REPO / "configs/shapes_gfl_ld_student.yaml")
    distill_keys = {"distill", "distill_options", "teacher_checkpoint", "teacher_config", "output_dir"}
    assert {k: v for k, v in student.to_dict().items() if k not in distill_keys} == \
        {k: v for k, v in ld.to_dict().items() if k not in distill_keys}
    defaults = {name: p.default for name, p in inspect.signature(LD.__init__).parameters.items()}
    # LD's weight defaults are None: resolved by variant, kdlab's calibrated weights for variant="kdlab"
    assert defaults["main_ld_weight"] is None and defaults["vlr_ld_weight"] is None
    defaults.update(main_ld_weight=CALIBRATED_LD_WEIGHTS["loss_ld"], vlr_ld_weight=CALIBRATED_LD_WEIGHTS["loss_ld_vlr"])
    assert ld.distill == "ld" and ld.distill_options["variant"] == "kdlab"
    assert all(defaults[k] == v for k, v in ld.distill_options.items())  # LD's defaults, written out


# ---------------------------------------------------------------- eval and predict
@pytest.fixture
def untrained_student(tiny_config, tmp_path) -> Path:
    """An exported tiny GFL (random weights) in tmp_path/checkpoints/student.pt."""
    from kdlab.config import load_config
    from kdlab.engine import export_student
    from kdlab.engine.build import build_student

    cfg = load_config(tiny_config)
    torch.manual_seed(0)
    path = tmp_path / "checkpoints" / "student.pt"
    export_student(path, cfg, 8, [f"class{k}" for k in range(8)], build_student(cfg, 8), category_ids=list(range(11, 19)))
    return path


def test_eval_writes_beside_the_checkpoint_and_says_where(tiny_config, untrained_student, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the config's output_dir is relative: it used to land in the cwd
    assert main(["eval", str(tiny_config), "--checkpoint", str(untrained_student), "--no-progress"]) == 0
    written = untrained_student.parent / "eval_student.json"
    out = capsys.readouterr().out
    assert f"metrics written to {written}" in out and "|    – |" in out  # APl: no large object in shapes
    report = json.loads(written.read_text())
    assert report["metrics"]["APl"] is None and report["split"] == "val" and not list(elsewhere.iterdir())
    assert main(["eval", str(tiny_config), "--checkpoint", str(untrained_student), "--out", str(tmp_path / "m.json"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == report["metrics"]


def test_predict_writes_coco_json_and_drawn_images(untrained_student, tiny_shapes, tmp_path, capsys):
    from pycocotools.coco import COCO

    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(tiny_shapes / "val" / "000001.png").resize((200, 150)).save(folder / "wide.jpg")
    Image.open(tiny_shapes / "val" / "000002.png").convert("L").save(folder / "gray.png")
    single = tiny_shapes / "val" / "000003.png"
    assert main(["predict", str(untrained_student), str(single), str(folder), "--out", str(tmp_path / "out"),
                 "--score-thresh", "0"]) == 0
    assert f"on 3 image(s): {tmp_path / 'out' / 'detections.json'} (COCO format)" in capsys.readouterr().out
    coco = COCO(str(tmp_path / "out" / "detections.json"))
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == [str(single), str(folder / "gray.png"),
                                                                       str(folder / "wide.jpg")]
    assert coco.imgs[3]["width"] == 200 and coco.imgs[3]["height"] == 150
    assert sorted(coco.cats) == list(range(11, 19))  # the training dataset's category ids
    for name, size in (("000003.png", (128, 128)), ("gray.png", (128, 128)), ("wide.jpg", (200, 150))):
        assert Image.open(tmp_path / "out" / name).size == size


def test_predict_with_a_trained_detector_gives_boxes_in_each_images_pixels(tiny_shapes, tmp_path, capsys, error_line):
    from pycocotools.coco import COCO

    from PIL import Image

    teacher = REPO / "data" / "checkpoints" / "shapes_gfl_teacher.pt"  # exported before the input size was stored
    Image.open(tiny_shapes / "val" / "000001.png").resize((256, 192)).save(tmp_path / "big.png")
    assert main(["predict", str(teacher), str(tmp_path / "big.png"), "--out", str(tmp_path / "out")]) == 2
    assert "pass min_size and max_size, the training config's values (kdlab predict: --min-size/--max-size)" \
        in error_line()
    assert main(["predict", str(teacher), str(tmp_path / "big.png"), str(tiny_shapes / "val" / "000001.png"),
                 "--out", str(tmp_path / "out"), "--min-size", "128", "--max-size", "128"]) == 0
    coco = COCO(str(tmp_path / "out" / "detections.json"))
    assert len(coco.imgToAnns[1]) > 0 and len(coco.imgToAnns[2]) > 0
    for ann in coco.anns.values():  # in each image's own pixels (the network saw 128 x 96 for big.png)
        x, y, w, h = ann["bbox"]
        image = coco.imgs[ann["image_id"]]
        assert 0 <= x and x + w <= image["width"] + 0.01 and 0 <= y and y + h <= image["height"] + 0.01
        assert ann["score"] >= 0.3 and ann["area"] == pytest.approx(w * h, rel=1e-3)
    assert max(a["bbox"][0] + a["bbox"][2] for a in coco.imgToAnns[1]) > 128


def test_predict_missing_image_is_one_line(untrained_student, tmp_path, capsys, error_line):
    assert main(["predict", str(untrained_student), str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o")]) == 2
    assert error_line() == f"kdlab: error: image {tmp_path / 'nope.jpg'} does not exist"
