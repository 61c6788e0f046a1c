"""Every COCO recipe (``configs/coco_*.yaml``) runs end to end on real COCO images, through the CLI a user calls.

``test_recipe_runs_and_evaluates`` runs ``kdlab train CONFIG --no-progress --set ...`` (``kdlab.cli.main``,
what ``python -m kdlab`` and ``torchrun -m kdlab`` run) for 2 iterations, then the run's own evaluation on
COCO val images, and checks the files a run writes. It overrides only:

- ``data_root``: minicoco (``../shared/data/minicoco``: real COCO 2017 images and annotations, 80 classes);
  the runs read a copy of its layout in a temporary folder whose val split is its first ``VAL_IMAGES``
  images (the files are links), to keep every recipe's evaluation short (the 2-process run below splits
  them between its two processes);
- the image size (``min_size=96 max_size=128``: every FPN level down to stride 128 still has a cell),
  ``max_iters=2``, ``batch_size=2``, ``num_workers=0``, ``log_every=1`` (so that every loss term is
  logged), the output dir and ``device=cpu``;
- the pretrained weights, which cannot be downloaded here: ``backbone_weights=null`` (random
  initialisation); a teacher given by ``teacher_config`` + ``teacher_checkpoint`` gets a randomly
  initialised checkpoint of that architecture, exported with ``kdlab.engine.export_student`` into a
  temporary folder (``teacher_checkpoint=...``); a torchvision teacher (``teacher_model`` +
  ``teacher_weights: COCO_V1``) reads a randomly initialised state dict placed in a temporary
  ``$TORCH_HOME/hub/checkpoints`` under the file name torchvision uses, so the recipe's one-call load runs as
  written. The random teachers' residual branches end in a zero norm scale (torchvision's
  ``zero_init_residual``): their frozen norms carry no pretrained statistics, and a deep random ResNet
  without them (R-101: 33 residual additions) has features of order 1e5, whose imitation terms overflow.

So a broken recipe (an unknown option, a teacher of the wrong family, a distiller that cannot run on these
detectors, a term that is not finite) fails CI. The metrics of 2 iterations from random weights mean
nothing and are not checked. Tests that need minicoco skip when it is absent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from kdlab.cli import main
from kdlab.config import load_config, recipe_header
from kdlab.engine import export_student, read_metrics
from kdlab.engine.build import build_teacher
from kdlab.models import build_detector
from kdlab.models import weights as zoo_weights
from kdlab.models.weights import resolve_weights, weights_cache_path

REPO = Path(__file__).resolve().parents[1]
MINICOCO = REPO.parent / "shared" / "data" / "minicoco"
RECIPES = sorted(p.name for p in (REPO / "configs").glob("coco_*.yaml"))
VAL_IMAGES = 4
SMOKE = ["min_size=96", "max_size=128", "max_iters=2", "batch_size=2", "num_workers=0", "log_every=1", "device=cpu"]


def needs_minicoco() -> None:
    if not (MINICOCO / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"minicoco not found at {MINICOCO} (the shared test data beside the repository)")


@pytest.fixture(scope="module")
def minicoco_short_val(tmp_path_factory) -> Path:
    """minicoco's layout with its train split as it is and its first ``VAL_IMAGES`` val images (links)."""
    needs_minicoco()
    root = tmp_path_factory.mktemp("minicoco_short_val")
    (root / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(MINICOCO / split, target_is_directory=True)
    (root / "annotations" / "instances_train2017.json").symlink_to(MINICOCO / "annotations" / "instances_train2017.json")
    val = json.loads((MINICOCO / "annotations" / "instances_val2017.json").read_text())
    val["images"] = sorted(val["images"], key=lambda image: image["id"])[:VAL_IMAGES]
    kept = {image["id"] for image in val["images"]}
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in kept]
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    return root


def coco_class_names() -> list[str]:
    categories = json.loads((MINICOCO / "annotations" / "instances_val2017.json").read_text())["categories"]
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


@torch.no_grad()
def zero_residual_branches(model: torch.nn.Module) -> torch.nn.Module:
    """Set the last norm scale of every ResNet block to 0 (torchvision's ``zero_init_residual``), in place."""
    for module in model.modules():
        if isinstance(module, Bottleneck):
            module.bn3.weight.zero_()
        elif isinstance(module, BasicBlock):
            module.bn2.weight.zero_()
    return model


@pytest.fixture(scope="module")
def random_teachers(tmp_path_factory):
    """``teacher_config`` -> a randomly initialised teacher of that architecture, exported (fp16) once."""
    folder, made = tmp_path_factory.mktemp("random_teachers"), {}

    def teacher_for(teacher_config: str) -> Path:
        if teacher_config not in made:
            cfg = load_config(REPO / teacher_config, ["backbone_weights=null"])
            torch.manual_seed(0)
            detector = zero_residual_branches(build_detector(cfg.model, 80, **cfg.model_options()))
            detector.half()  # half the file; load_state_dict copies into the float32 teacher
            made[teacher_config] = folder / f"{Path(teacher_config).stem}.pt"
            export_student(made[teacher_config], cfg, 80, coco_class_names(), detector)
        return made[teacher_config]

    return teacher_for


@pytest.fixture(scope="module")
def fake_torch_home(tmp_path_factory):
    """A ``$TORCH_HOME`` whose cache holds randomly initialised torchvision COCO weights, written on demand."""
    home = tmp_path_factory.mktemp("torch_home")

    def with_weights(model_name: str, weights: str) -> Path:
        path = weights_cache_path(resolve_weights(model_name, weights))
        path = home / "hub" / "checkpoints" / path.name
        if not path.is_file():
            torch.manual_seed(0)
            state = zero_residual_branches(build_detector(model_name, 91)).state_dict()
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
        return home

    return with_weights


def smoke_overrides(name: str, data_root: Path, output_dir: Path, random_teachers, fake_torch_home, monkeypatch) -> list[str]:
    """The ``--set`` values of a recipe's smoke run (see the module docstring)."""
    cfg = load_config(REPO / "configs" / name)
    overrides = [f"data_root={data_root}", f"output_dir={output_dir}", *SMOKE]
    if cfg.backbone_weights is not None:
        overrides.append("backbone_weights=null")
    if cfg.weights is not None:
        overrides.append("weights=null")
    if cfg.teacher_model is not None:
        monkeypatch.setenv("TORCH_HOME", str(fake_torch_home(cfg.teacher_model, cfg.teacher_weights)))
    elif cfg.teacher_config is not None:
        overrides.append(f"teacher_checkpoint={random_teachers(cfg.teacher_config)}")
    return overrides


def test_every_recipe_states_its_target_and_command():
    assert len(RECIPES) >= 20
    for name in RECIPES:
        header = recipe_header(REPO / "configs" / name)
        assert header["command"] == f"torchrun --nproc_per_node=8 -m kdlab train configs/{name}", name
        assert header["published"], f"{name}: no '# Published:' line"
        cfg = load_config(REPO / "configs" / name)
        assert cfg.data_root == "data/coco" and cfg.output_dir == f"runs/{Path(name).stem}", name
        if cfg.teacher_config is not None:  # the teacher's own recipe writes the checkpoint the student reads
            teacher_run = load_config(REPO / cfg.teacher_config).output_dir
            assert cfg.teacher_checkpoint == f"{teacher_run}/student.pt", name
            assert Path(cfg.teacher_config).name in RECIPES, name


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_and_evaluates(name, minicoco_short_val, random_teachers, fake_torch_home, tmp_path,
                                   monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the recipes' paths (teacher_config) are relative to the repository
    output_dir = tmp_path / "run"
    overrides = smoke_overrides(name, minicoco_short_val, output_dir, random_teachers, fake_torch_home, monkeypatch)
    status = main(["train", f"configs/{name}", "--no-progress", "--set", *overrides])
    captured = capsys.readouterr()
    assert status == 0, f"kdlab train configs/{name} --set {' '.join(overrides)} failed:\n{captured.err[-3000:]}"

    cfg = load_config(output_dir / "config.yaml")
    records = read_metrics(output_dir / "metrics.jsonl")
    assert [r["iter"] for r in records] == [1, 2]
    terms = [k for k in records[-1] if k.startswith("loss") or k in ("classification", "bbox_regression")]
    assert terms and all(torch.isfinite(torch.tensor(r["total"])) for r in records)
    if cfg.distill is not None:
        method_terms = {"ld": "loss_ld", "ld_released": "loss_ld", "gid": "loss_gid", "drkd": "loss_drkd"}[cfg.distill]
        assert any(k.startswith(method_terms) for k in records[-1]), (name, sorted(records[-1]))
    metrics = json.loads((output_dir / "eval_final.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (output_dir / "student.pt").is_file() and (output_dir / "last.pt").is_file()
    assert "| run " in captured.out  # the metrics table the CLI prints


@pytest.mark.slow
def test_two_gloo_processes_run_a_coco_distillation_recipe(minicoco_short_val, random_teachers, tmp_path):
    """``torchrun --nproc_per_node=2 -m kdlab train configs/coco_ld_gfl_r101_r18_1x.yaml`` on CPU (gloo), then
    the distributed evaluation (the short val split, shared between the two processes)."""
    name = "coco_ld_gfl_r101_r18_1x.yaml"
    teacher = random_teachers(load_config(REPO / "configs" / name).teacher_config)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import run

    output_dir = tmp_path / "ddp"
    run(["-m", "kdlab", "train", f"configs/{name}", "--no-progress", "--set", f"data_root={minicoco_short_val}",
         f"output_dir={output_dir}", "backbone_weights=null", f"teacher_checkpoint={teacher}", *SMOKE], nproc=2,
        timeout=900)
    records = read_metrics(output_dir / "metrics.jsonl")
    assert [r["iter"] for r in records] == [1, 2] and "loss_ld" in records[-1]
    assert (output_dir / "eval_final.json").is_file() and (output_dir / "student.pt").is_file()


def test_a_missing_teacher_names_the_file_and_the_command_that_trains_it(minicoco_short_val, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(REPO)
    missing = tmp_path / "teacher" / "student.pt"
    status = main(["train", "configs/coco_ld_gfl_r101_r18_1x.yaml", "--no-progress", "--set",
                   f"data_root={minicoco_short_val}", f"output_dir={tmp_path / 'run'}", "backbone_weights=null",
                   f"teacher_checkpoint={missing}", *SMOKE])
    error = capsys.readouterr().err
    assert status == 2
    assert f"teacher_checkpoint {missing} does not exist" in error
    assert "kdlab train configs/coco_gfl_r101_2x.yaml" in error  # the command that trains the teacher


def test_uncached_torchvision_teacher_weights_name_the_file(minicoco_short_val, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    def offline(url, destination, progress):
        raise OSError("no internet")

    monkeypatch.setattr(zoo_weights, "_download", offline)
    status = main(["train", "configs/coco_gid_retinanet_tv_r50_2x.yaml", "--no-progress", "--set",
                   f"data_root={minicoco_short_val}", f"output_dir={tmp_path / 'run'}", "backbone_weights=null", *SMOKE])
    error = capsys.readouterr().err
    assert status == 2
    assert "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth" in error and "hub/checkpoints" in error


def test_a_torchvision_teacher_keeps_the_dataset_classes(fake_torch_home, monkeypatch):
    """``teacher_model`` + ``teacher_weights``: torchvision's 91 COCO slots restricted to the dataset's
    category ids, in the dataset's label order."""
    monkeypatch.setenv("TORCH_HOME", str(fake_torch_home("retinanet_resnet50_fpn_v2", "COCO_V1")))
    monkeypatch.setattr(zoo_weights, "_download", lambda *a: pytest.fail("a cached file must not be downloaded"))
    cfg = load_config(REPO / "configs" / "coco_gid_retinanet_tv_r50_2x.yaml", ["backbone_weights=null"])
    teacher = build_teacher(cfg, num_classes=3, label_to_cat_id=[1, 2, 90])
    assert teacher.num_classes == 3 and teacher.class_names == ["person", "bicycle", "toothbrush"]
    assert not teacher.training
    full = build_detector("retinanet_resnet50_fpn_v2", None, weights="COCO_V1")
    anchors = full.head.classification_head.num_anchors
    rows = (torch.arange(anchors)[:, None] * 91 + torch.tensor([1, 2, 90])[None, :]).flatten()
    assert torch.equal(teacher.head.classification_head.cls_logits.weight, full.head.classification_head.cls_logits.weight[rows])
    with pytest.raises(ValueError, match="not a COCO category id"):
        build_teacher(cfg, num_classes=2, label_to_cat_id=[1, 12])  # 12 is one of COCO's unused ids
