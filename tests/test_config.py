"""kdlab.config: flat YAML <-> TrainConfig, type checks, overrides, clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kdlab.config import ConfigError, TrainConfig, config_from_dict, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_coco_1x_recipe():
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.lr_steps, cfg.lr_gamma) == (12, [8, 11], 0.1)
    assert (cfg.warmup_iters, cfg.warmup_ratio, cfg.base_batch_size) == (500, 0.001, 16)
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.backbone_lr_mult) == ("sgd", 0.9, 1e-4, 1.0)
    assert (cfg.train_split, cfg.val_split, cfg.size_divisor, cfg.model) == ("train", "val", 32, "gfl")
    assert cfg.grad_clip is None and cfg.max_iters is None and cfg.distill is None
    assert cfg.distill_options == {} and cfg.device == "auto" and cfg.amp is True
    # every model option unset: the detector's own defaults apply
    assert cfg.model_options() == {}


def test_model_options_are_the_non_none_model_fields():
    cfg = TrainConfig(backbone="resnet18", backbone_width=16, backbone_norm="gn", reg_max=8)
    assert cfg.model_options() == {"backbone": "resnet18", "backbone_width": 16, "backbone_norm": "gn", "reg_max": 8}


def test_detector_options_join_the_model_options(tmp_path):
    cfg = TrainConfig(model="faster_rcnn", backbone="resnet50", detector_options={"box_batch_size_per_image": 512})
    assert cfg.model_options() == {"backbone": "resnet50", "box_batch_size_per_image": 512}
    path = write(tmp_path, "model: faster_rcnn\ndetector_options: {rpn_post_nms_top_n_train: 2000}\n")
    cfg = load_config(path, ["detector_options.box_batch_size_per_image=512"])
    assert cfg.detector_options == {"rpn_post_nms_top_n_train": 2000, "box_batch_size_per_image": 512}


def test_a_torchvision_teacher_needs_no_checkpoint():
    cfg = TrainConfig(distill="gid", teacher_model="retinanet_resnet50_fpn_v2", teacher_weights="COCO_V1")
    assert cfg.teacher_checkpoint is None and cfg.teacher_model == "retinanet_resnet50_fpn_v2"


def test_load_save_round_trip(tmp_path):
    path = write(tmp_path, "data_root: data/x\nlr: 0.02\nlr_steps: [1, 2]\ndistill: ld\nteacher_checkpoint: t.pt\n"
                           "distill_options: {temperature: 10, vlr_weighting: iou}\ngrad_clip: 35\n")
    cfg = load_config(path)
    assert cfg.lr == 0.02 and cfg.lr_steps == [1, 2] and cfg.distill == "ld"
    assert cfg.distill_options == {"temperature": 10, "vlr_weighting": "iou"}
    assert cfg.grad_clip == 35.0 and isinstance(cfg.grad_clip, float)  # int -> float field
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == TrainConfig()


def test_yaml_1_1_exponent_strings_are_read_as_floats(tmp_path):
    # PyYAML reads 1e-4 (no dot) as the string "1e-4"
    assert load_config(write(tmp_path, "weight_decay: 1e-4\nlr: 2e-2\n")).weight_decay == 1e-4


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = write(tmp_path, "batchsize: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "'batchsize'" in message and "batch_size" in message


@pytest.mark.parametrize("text, expected", [
    ("lr: fast\n", "lr must be float"),
    ("epochs: 1.5\n", "epochs must be int"),
    ("batch_size: true\n", "batch_size must be int"),  # a bool is not an int here
    ("lr_steps: [8, eleven]\n", "lr_steps[1] must be int"),
    ("lr_steps: 8\n", "lr_steps must be list[int]"),
    ("amp: 1\n", "amp must be bool"),
    ("distill_options: [1, 2]\n", "distill_options must be dict"),
    ("backbone: 18\n", "backbone must be str"),
])
def test_wrong_type_names_key_and_expected_type(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("values, expected", [
    ({"optimizer": "adam"}, "optimizer must be 'sgd' or 'adamw'"),
    ({"lr": 0}, "lr must be > 0"),
    ({"lr_steps": [11, 8]}, "lr_steps must be increasing"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"device": "gpu"}, "device must be"),
    ({"warmup_ratio": 0.0}, "warmup_ratio must be in (0, 1]"),
    ({"distill": "ld"}, "needs teacher_checkpoint"),
    ({"distill": "gid", "teacher_model": "retinanet_resnet50_fpn_v2"}, "needs teacher_weights"),
    ({"teacher_weights": "COCO_V1"}, "needs teacher_model"),
    ({"teacher_model": "retinanet_resnet50_fpn_v2", "teacher_weights": "COCO_V1", "teacher_checkpoint": "t.pt"},
     "set one of them"),
    ({"detector_options": {"backbone": "resnet18"}}, "detector_options ['backbone'] are model fields"),
])
def test_invalid_values(values, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        config_from_dict(values)


def test_programmatic_construction_is_checked_too():
    with pytest.raises(ConfigError, match="epochs must be int"):
        TrainConfig(epochs="12")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        dataclasses.replace(TrainConfig(), batch_size=0)


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "lr: 0.01\ngrad_clip: 10\n")
    cfg = load_config(path, ["lr=0.02", "lr_steps=[1, 2]", "grad_clip=null", "distill=ld", "teacher_checkpoint=t.pt",
                             "distill_options.temperature=5", "output_dir=runs/x", "amp=false"])
    assert cfg.lr == 0.02 and cfg.lr_steps == [1, 2] and cfg.grad_clip is None
    assert cfg.distill_options == {"temperature": 5} and cfg.output_dir == "runs/x" and cfg.amp is False


def test_distill_options_without_distill_are_refused(tmp_path):
    # they used to be ignored without a word when distill was null
    path = write(tmp_path, "distill: ld\nteacher_checkpoint: t.pt\ndistill_options: {main_kd_weight: 0.0}\n")
    with pytest.raises(ConfigError, match=r"distill_options \{'main_kd_weight': 0.0\} are given but distill is null"):
        load_config(path, ["distill=null"])
    assert load_config(path, ["distill=null", "distill_options={}"]).distill_options == {}


def test_num_classes_says_where_the_classes_come_from(tmp_path):
    with pytest.raises(ConfigError, match=r"'num_classes'; it is not a config key: the classes are the 'categories' of "
                                          r"the training annotation file"):
        load_config(write(tmp_path, "lr: 0.01\n"), ["num_classes=1"])


@pytest.mark.parametrize("override, expected", [
    ("lr", "must look like key=value"),
    ("lrr=0.1", "unknown key 'lrr'; did you mean lr"),
    ("lr=[0.1", "not valid YAML"),
    ("model.backbone=resnet18", "only distill_options.<name>=value"),
    ("epochs=two", "epochs must be int"),
])
def test_bad_overrides(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_config(write(tmp_path, "lr: 0.01\n"), [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- lr\n- 0.1\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "lr: [0.1\n"))


def test_safe_load_only(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "lr: !!python/object/apply:os.getcwd []\n"))


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    if not paths:
        pytest.skip("no configs/*.yaml in the repository")
    for path in paths:
        cfg = load_config(path)
        assert cfg.epochs >= 1, path
