"""kdlab.engine: sampler, lr schedule, optimiser, checkpoints, evaluation, and the training loop
(exact resume at an epoch boundary, mid-epoch and after a crash; non-finite loss; exports)."""

from __future__ import annotations

import dataclasses
import math
import shutil
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

import kdlab.engine.build
import kdlab.engine.loop
from kdlab.config import ConfigError, TrainConfig
from kdlab.data import build_dataset
from kdlab.distill.base import DistillationTask, DistillCriterion
from kdlab.engine import (CheckpointError, DistContext, ResumableBatchSampler, atomic_save, build_loader,
                          build_lr_scheduler, build_optimizer, detections_to_coco, evaluate, load_detector,
                          predict, read_metrics, safe_load, scaled_lr, train)
from kdlab.engine.optim import WarmupStepFactor
from kdlab.models.base import Criterion, DetectionTask, Detector

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- a tiny detector for unit tests
class TinyCriterion(Criterion):
    def __init__(self, nan_at_call: int | None):
        super().__init__()
        self.weight_dict = {"loss_cls": 1.0, "loss_box": 2.0}
        self.nan_at_call, self.calls = nan_at_call, 0

    def forward(self, output, targets):
        self.calls += 1
        labels = torch.stack([t["labels"][0] if len(t["labels"]) else torch.tensor(0) for t in targets])
        boxes = torch.stack([t["boxes"][0] if len(t["boxes"]) else torch.zeros(4) for t in targets])
        loss_cls = nn.functional.cross_entropy(output["logits"], labels)
        if self.calls == self.nan_at_call:
            loss_cls = loss_cls * float("nan")
        return {"loss_cls": loss_cls, "loss_box": (output["boxes"] - boxes).abs().mean() / 64}


class TinyDetector(Detector):
    """Follows the Detector contract: one box and class per image from pooled features."""

    def __init__(self, num_classes: int, nan_at_call: int | None = None):
        super().__init__()
        self.num_classes, self.nan_at_call = num_classes, nan_at_call
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.cls_head, self.box_head = nn.Linear(4, num_classes), nn.Linear(4, 4)

    def forward(self, images, image_sizes, targets=None):
        pooled = self.backbone(images).mean(dim=(2, 3))  # [B, 4]
        return {"logits": self.cls_head(pooled), "boxes": self.box_head(pooled).sigmoid() * images.shape[-1]}

    def postprocess(self, output):
        scores, labels = output["logits"].softmax(-1).max(-1)
        xy = output["boxes"][:, :2].minimum(output["boxes"][:, 2:])
        boxes = torch.cat([xy, output["boxes"][:, :2].maximum(output["boxes"][:, 2:])], dim=1)
        return [{"boxes": b[None], "scores": s[None], "labels": l[None]} for b, s, l in zip(boxes, scores, labels)]

    def build_criterion(self):
        return TinyCriterion(self.nan_at_call)


class TinyMimic(DistillCriterion):
    name = "mimic"

    def __init__(self, student, teacher):
        super().__init__(student, teacher)
        self.weight_dict = {"loss_mimic": 1.0}
        self.adapter = nn.Linear(4, 4)

    def forward(self, student_out, teacher_out, targets):
        return {"loss_mimic": (self.adapter(student_out["boxes"]) - teacher_out["boxes"]).pow(2).mean()}


def tiny_distillation(student, teacher):
    return DistillationTask(student, teacher, TinyMimic(student, teacher))


# ---------------------------------------------------------------- sampler
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_sampler_has_distributed_sampler_semantics(world_size, epoch):
    dataset = list(range(10))
    for rank in range(world_size):
        reference = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=5)
        reference.set_epoch(epoch)
        sampler = ResumableBatchSampler(10, 3, shuffle=True, seed=5, rank=rank, world_size=world_size)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [i for b in batches for i in b] == list(reference)
        assert all(len(b) == 3 for b in batches[:-1]) and len(batches) == len(sampler) == sampler.batches_per_epoch()


def test_sampler_order_depends_on_seed_and_epoch_only():
    first, second = ResumableBatchSampler(20, 4, shuffle=True, seed=1), ResumableBatchSampler(20, 4, shuffle=True, seed=1)
    second.set_epoch(3)
    list(second)
    second.set_epoch(1)
    first.set_epoch(1)
    assert list(first) == list(second)
    first.set_epoch(2)
    assert list(first) != list(second)
    assert sorted(i for b in first for i in b) == list(range(20))


def test_sampler_rank_batches_together_equal_one_big_batch():
    one = ResumableBatchSampler(16, 4, shuffle=True, seed=0)
    ranks = [ResumableBatchSampler(16, 2, shuffle=True, seed=0, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        for s in [one, *ranks]:
            s.set_epoch(epoch)
        for big, *parts in zip(one, *ranks):
            assert sorted(big) == sorted(i for p in parts for i in p)


def test_sampler_eval_covers_every_index_once():
    shares = []
    for rank in range(3):
        sampler = ResumableBatchSampler(7, 2, shuffle=False, rank=rank, world_size=3)
        shares.append([i for b in sampler for i in b])
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]


def test_sampler_starts_at_batch_k():
    sampler = ResumableBatchSampler(10, 3, shuffle=True, seed=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start_batch=2)
    assert list(sampler) == full[2:] and len(sampler) == 2


def test_sampler_errors():
    with pytest.raises(ValueError, match="dataset is empty"):
        ResumableBatchSampler(0, 2, shuffle=True)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ResumableBatchSampler(4, 2, shuffle=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_batch 3 is outside"):
        ResumableBatchSampler(4, 2, shuffle=True).set_epoch(0, start_batch=3)


# ---------------------------------------------------------------- optimiser and schedule
def test_warmup_step_factor_hand_values():
    factor = WarmupStepFactor(iters_per_epoch=100, lr_steps=[8, 11], gamma=0.1, warmup_iters=500, warmup_ratio=0.001)
    assert factor(0) == pytest.approx(0.001)
    assert factor(250) == pytest.approx(0.001 + 0.999 * 0.5)
    assert factor(500) == 1.0 and factor(799) == 1.0
    assert factor(800) == pytest.approx(0.1) and factor(1099) == pytest.approx(0.1)  # epoch 8
    assert factor(1100) == pytest.approx(0.01)  # epoch 11


def test_scheduler_steps_per_iteration():
    cfg = TrainConfig(lr=0.02, batch_size=2, base_batch_size=16, warmup_iters=2, warmup_ratio=0.5, lr_steps=[1])
    assert scaled_lr(cfg, world_size=4) == pytest.approx(0.02 * 8 / 16)
    optimizer = build_optimizer([("w", nn.Parameter(torch.zeros(1)))], cfg, world_size=4)
    scheduler = build_lr_scheduler(optimizer, cfg, iters_per_epoch=3)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.005, 0.0075, 0.01, 0.001, 0.001])


def test_optimizer_backbone_group_and_no_teacher():
    distiller = tiny_distillation(TinyDetector(3), TinyDetector(3))
    named = kdlab.engine.build.named_trainable_parameters(distiller)
    cfg = TrainConfig(optimizer="adamw", lr=1e-4, batch_size=16, backbone_lr_mult=0.1, momentum=0.8)
    optimizer = build_optimizer(named, cfg, world_size=1)
    groups = {g["name"]: g for g in optimizer.param_groups}
    backbone_ids = {id(p) for p in distiller.student.backbone.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone_ids
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["default"]["lr"] == pytest.approx(1e-4)
    assert groups["default"]["betas"] == (0.8, 0.999)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in distiller.teacher.parameters()}
    assert {id(p) for p in distiller.distillers["mimic"].adapter.parameters()} <= in_optimizer


# ---------------------------------------------------------------- checkpoints
def test_atomic_save_and_crash_during_save(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"iteration": 1, "w": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]

    def crashing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"iteration": 2}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left
    assert safe_load(path)["iteration"] == 1  # the previous checkpoint is intact


def test_safe_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        safe_load(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt.pt is corrupt"):
        safe_load(tmp_path / "corrupt.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt holds a list"):
        safe_load(tmp_path / "list.pt")
    torch.save({"model": TinyDetector(2)}, tmp_path / "pickled_module.pt")  # refused by weights_only
    with pytest.raises(CheckpointError, match="pickled_module.pt is corrupt or not a torch file"):
        safe_load(tmp_path / "pickled_module.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt is not a kdlab detector checkpoint"):
        load_detector(tmp_path / "other.pt")


# ---------------------------------------------------------------- evaluation
def test_detections_to_coco_maps_back_to_the_original_image():
    detections = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.5]),
                   "labels": torch.tensor([1])}]
    targets = [{"image_id": 42, "size": torch.tensor([100, 200]), "orig_size": torch.tensor([150, 400])}]
    # x scale 400 / 200 = 2, y scale 150 / 100 = 1.5 -> xyxy (20, 30, 60, 90) -> xywh (20, 30, 40, 60)
    assert detections_to_coco(detections, targets, label_to_cat_id=[5, 9]) == [
        {"image_id": 42, "category_id": 9, "bbox": [20.0, 30.0, 40.0, 60.0], "score": 0.5}]


class OracleDetector(TinyDetector):
    """Returns the ground truth of the batches of ``loader`` (iterated in the same order)."""

    def __init__(self, loader):
        super().__init__(num_classes=8)
        self.batches = iter(loader)

    def forward(self, images, image_sizes, targets=None):
        return next(self.batches)[1]

    def postprocess(self, output):
        return [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]} for t in output]


def test_evaluate_ground_truth_oracle_scores_one(tiny_shapes):
    dataset = build_dataset(tiny_shapes, "val", train=False, min_size=64, max_size=64)  # 128 -> 64 px
    cfg = TrainConfig(batch_size=3, num_workers=0)
    oracle = OracleDetector(build_loader(dataset, cfg, CPU, train=False))
    metrics = evaluate(oracle, build_loader(dataset, cfg, CPU, train=False), "cpu")
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-6) and metrics["AP75"] == pytest.approx(1.0, abs=1e-6)


def test_predict_keeps_training_mode(tiny_shapes):
    dataset = build_dataset(tiny_shapes, "val", train=False, min_size=64, max_size=64)
    images, targets = next(iter(build_loader(dataset, TrainConfig(batch_size=2, num_workers=0), CPU, train=False)))
    detector = TinyDetector(8).train()
    resized = predict(detector, images, targets)
    original = predict(detector, images, targets, original_pixels=True)
    assert detector.training and len(resized) == 2
    assert torch.allclose(original[0]["boxes"], resized[0]["boxes"] * 2)  # 128 px files shown at 64 px


# ---------------------------------------------------------------- the training loop
def tiny_config(data_root, output_dir, **changes) -> TrainConfig:
    """GFL with a width-8 ResNet-18, GroupNorm, 64 px: 4 iterations per epoch on 16 images."""
    cfg = TrainConfig(data_root=str(data_root), min_size=64, max_size=64, batch_size=4, num_workers=0,
                      backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=16, head_convs=1,
                      reg_max=8, lr=0.01, base_batch_size=4, epochs=3, lr_steps=[2], warmup_iters=3,
                      grad_clip=10.0, log_every=1, eval_every=1, output_dir=str(output_dir))
    return dataclasses.replace(cfg, **changes)


def losses(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in read_metrics(path)]


def quiet_train(cfg: TrainConfig, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="coco_metrics: no detections")
        return train(cfg, progress=False, **kwargs)


@pytest.fixture(scope="module")
def baseline(tiny_shapes, tmp_path_factory):
    """One uninterrupted 12-iteration run."""
    out = tmp_path_factory.mktemp("baseline")
    metrics = quiet_train(tiny_config(tiny_shapes, out))
    return out, metrics


def assert_same_run(run_dir, baseline_dir):
    assert losses(run_dir / "metrics.jsonl") == losses(baseline_dir / "metrics.jsonl")
    ours, theirs = safe_load(run_dir / "student.pt"), safe_load(baseline_dir / "student.pt")
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for name, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], value), name
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_baseline_run_outputs(baseline, tiny_shapes):
    out, metrics = baseline
    records = losses(out / "metrics.jsonl")
    assert [r["iter"] for r in records] == list(range(1, 13)) and [r["epoch"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    assert records[0]["lr"] == pytest.approx(0.01 * 0.001) and records[-1]["lr"] == pytest.approx(0.001)
    assert records[1]["lr"] == pytest.approx(0.01 * (0.001 + 0.999 / 3))
    for r in records:
        assert math.isfinite(r["total"]) and r["grad_norm"] > 0
        assert r["total"] == pytest.approx(sum(r[f"{k}_weighted"] for k in ("loss_qfl", "loss_giou", "loss_dfl")), rel=1e-5)
        assert r["loss_giou_weighted"] == pytest.approx(2.0 * r["loss_giou"])
    for name in ["config.yaml", "eval_epoch1.json", "eval_epoch2.json", "eval_epoch3.json", "eval_final.json"]:
        assert (out / name).is_file(), name
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}

    last = torch.load(out / "last.pt", weights_only=True)  # nothing a safe load refuses
    assert (last["epoch"], last["batch_in_epoch"], last["iteration"]) == (3, 0, 12)
    assert last["config"] == tiny_config(tiny_shapes, out).to_dict()
    assert not any(k.startswith("teacher") for k in last["task"])

    exported = torch.load(out / "student.pt", weights_only=True)
    assert exported["num_classes"] == 8 and len(exported["class_names"]) == 8
    assert exported["model"] == {"name": "gfl", "backbone": "resnet18", "backbone_width": 8, "backbone_norm": "gn",
                                 "fpn_channels": 16, "head_convs": 1, "reg_max": 8}
    # the exported detector and the training checkpoint's student give identical outputs
    detector, from_last = load_detector(out / "student.pt"), load_detector(out / "last.pt")
    assert not detector.training and detector.class_names == exported["class_names"]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = detector(images, [(64, 64)] * 2), from_last(images, [(64, 64)] * 2)
    assert torch.equal(a.cls_logits, b.cls_logits) and torch.equal(a.box_logits, b.box_logits)


@pytest.mark.slow
def test_init_checkpoint_starts_the_student_from_stored_weights_and_names_a_mismatch(baseline, tiny_shapes, tmp_path):
    baseline_dir, _ = baseline
    stored = safe_load(baseline_dir / "student.pt")["state_dict"]
    for source in ("student.pt", "last.pt"):  # an exported detector or a training checkpoint
        cfg = tiny_config(tiny_shapes, tmp_path / source, init_checkpoint=str(baseline_dir / source))
        student = kdlab.engine.build.build_student(cfg, 8)
        for name, value in student.state_dict().items():
            assert torch.equal(value, stored[name]), (source, name)
    fresh = kdlab.engine.build.build_student(tiny_config(tiny_shapes, tmp_path / "fresh"), 8)
    assert any(not torch.equal(v, stored[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ConfigError, match=r"init_checkpoint .* another detector .*backbone_width: checkpoint 8, config 16"):
        kdlab.engine.build.build_student(tiny_config(tiny_shapes, tmp_path / "w", backbone_width=16,
                                                     init_checkpoint=str(baseline_dir / "student.pt")), 8)
    with pytest.raises(ConfigError, match="init_checkpoint .* has 8 classes, the dataset 3"):
        kdlab.engine.build.build_student(tiny_config(tiny_shapes, tmp_path / "c",
                                                     init_checkpoint=str(baseline_dir / "student.pt")), 3)
    with pytest.raises(ConfigError, match="init_checkpoint: checkpoint .*missing.pt does not exist"):
        kdlab.engine.build.build_student(tiny_config(tiny_shapes, tmp_path / "m",
                                                     init_checkpoint=str(tmp_path / "missing.pt")), 8)


def test_resume_at_epoch_boundary_is_exact(baseline, tiny_shapes, tmp_path):
    quiet_train(tiny_config(tiny_shapes, tmp_path, max_iters=4))
    last = safe_load(tmp_path / "last.pt")
    assert (last["epoch"], last["batch_in_epoch"], last["iteration"]) == (1, 0, 4)
    quiet_train(tiny_config(tiny_shapes, tmp_path), resume=True)
    assert_same_run(tmp_path, baseline[0])


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(baseline, tiny_shapes, tmp_path):
    quiet_train(tiny_config(tiny_shapes, tmp_path, max_iters=6))
    last = safe_load(tmp_path / "last.pt")
    assert (last["epoch"], last["batch_in_epoch"], last["iteration"]) == (1, 2, 6)
    # the resumed part loads data in a worker process: the order and augmentation do not change
    quiet_train(tiny_config(tiny_shapes, tmp_path, num_workers=1), resume=True)
    assert_same_run(tmp_path, baseline[0])


class SimulatedKill(BaseException):
    """Stands for a kill: the loop saves nothing on its way out (unlike Ctrl-C)."""


@pytest.mark.slow
def test_crash_then_resume_from_periodic_checkpoint(baseline, tiny_shapes, tmp_path, monkeypatch):
    real_step = kdlab.engine.loop.train_step

    def crash_at_8(*args, **kwargs):
        if kwargs["where"].startswith("iteration 8 "):
            raise SimulatedKill("kill -9: nothing runs after this")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(kdlab.engine.loop, "train_step", crash_at_8)
    with pytest.raises(SimulatedKill):
        quiet_train(tiny_config(tiny_shapes, tmp_path, checkpoint_every_iters=3))
    last = safe_load(tmp_path / "last.pt")
    assert (last["epoch"], last["batch_in_epoch"], last["iteration"]) == (1, 2, 6)
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 8))
    monkeypatch.setattr(kdlab.engine.loop, "train_step", real_step)
    quiet_train(tiny_config(tiny_shapes, tmp_path, checkpoint_every_iters=3), resume=True)
    assert_same_run(tmp_path, baseline[0])  # iteration 7 of the crashed run was dropped from the log


@pytest.mark.slow
def test_crash_while_saving_keeps_previous_checkpoint(tiny_shapes, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_then_crash(obj, f):
        calls.append(obj.get("iteration"))
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError("simulated crash while saving")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="simulated crash while saving"):
        quiet_train(tiny_config(tiny_shapes, tmp_path, checkpoint_every_iters=2, epochs=1))
    monkeypatch.setattr(torch, "save", real_save)
    assert calls == [2, 4]
    assert safe_load(tmp_path / "last.pt")["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []


@pytest.mark.slow
def test_resume_with_a_changed_config_warns(baseline, tiny_shapes, tmp_path):
    shutil.copy(baseline[0] / "last.pt", tmp_path / "last.pt")  # a finished run: resuming only evaluates
    with pytest.warns(UserWarning, match=r"differs in \['lr'\]"):
        quiet_train(tiny_config(tiny_shapes, tmp_path, lr=0.02), resume=True)
    assert (tmp_path / "eval_final.json").is_file() and (tmp_path / "student.pt").is_file()


@pytest.mark.slow
def test_resume_a_checkpoint_from_before_a_field_existed(baseline, tiny_shapes, tmp_path):
    # last.pt written by a kdlab without `detector_options`: the missing field is its default, not a change
    state = safe_load(baseline[0] / "last.pt")
    del state["config"]["detector_options"]
    torch.save(state, tmp_path / "last.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        quiet_train(tiny_config(tiny_shapes, tmp_path), resume=True)
    state["config"]["detector_options"] = {"unused": 1}  # a real difference still warns
    (tmp_path / "again").mkdir()
    torch.save(state, tmp_path / "again" / "last.pt")
    with pytest.warns(UserWarning, match=r"differs in \['detector_options'\]"):
        quiet_train(tiny_config(tiny_shapes, tmp_path / "again"), resume=True)


def test_non_finite_loss_names_iteration_epoch_and_terms(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(kdlab.engine.build, "build_detector", lambda name, num_classes, **o: TinyDetector(num_classes, nan_at_call=6))
    with pytest.raises(FloatingPointError, match=r"iteration 6 \(epoch 1, batch 1\): total=nan, loss_box=[0-9.]+, loss_cls=nan"):
        quiet_train(tiny_config(tiny_shapes, tmp_path))
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_resume_needs_a_checkpoint(tiny_shapes, tmp_path):
    with pytest.raises(CheckpointError, match="cannot resume: .*last.pt does not exist"):
        train(tiny_config(tiny_shapes, tmp_path), resume=True, progress=False)


@pytest.mark.slow
def test_distillation_trains_the_student_only(baseline, tiny_shapes, tmp_path):
    teacher_path = baseline[0] / "student.pt"
    cfg = tiny_config(tiny_shapes, tmp_path, distill="ld", teacher_checkpoint=str(teacher_path), max_iters=2, epochs=1)
    quiet_train(cfg)
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert {"loss_qfl", "loss_giou", "loss_dfl"} < set(record) and len([k for k in record if k.startswith("loss_")]) > 6
    last = safe_load(tmp_path / "last.pt")
    assert last["task"] and not any(k.startswith("teacher.") for k in last["task"])
    # the optimiser holds exactly the distiller's trainable parameters: the student's (+ its own parts)
    task = kdlab.engine.build.build_task(cfg, num_classes=8)
    trainable = {id(p) for p in task.trainable_parameters()}
    assert trainable >= {id(p) for p in task.student.parameters()}
    assert not trainable & {id(p) for p in task.teacher.parameters()}
    assert sum(len(g["params"]) for g in last["optimizer"]["param_groups"]) == len(trainable)


def test_missing_teacher_checkpoint_is_named(tiny_shapes, tmp_path):
    cfg = tiny_config(tiny_shapes, tmp_path, distill="ld", teacher_checkpoint=str(tmp_path / "teacher.pt"))
    with pytest.raises(CheckpointError, match="teacher.pt does not exist"):
        train(cfg, progress=False)


def test_detection_task_wraps_the_student():
    task = DetectionTask(TinyDetector(3))
    assert task.weight_dict == {"loss_cls": 1.0, "loss_box": 2.0}


# ---------------------------------------------------------------- detector.predict on any images
def test_detector_predict_equals_the_evaluation_pipeline_in_original_pixels(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from kdlab.data import make_shapes
    from kdlab.engine.inference import as_image_tensor
    from kdlab.models import build_detector

    make_shapes(tmp_path / "s", num_train=0, num_val=1, image_size=128)
    picture = Image.open(tmp_path / "s" / "val" / "000001.png").resize((256, 192))  # not the training size
    (tmp_path / "flat" / "images").mkdir(parents=True)
    picture.save(tmp_path / "flat" / "images" / "1.png")
    (tmp_path / "flat" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.png", "width": 256, "height": 192}], "annotations": [],
        "categories": [{"id": 1, "name": "x"}]}))
    dataset = build_dataset(tmp_path / "flat", "val", train=False, min_size=128, max_size=128)
    images, targets = next(iter(build_loader(dataset, TrainConfig(batch_size=1, num_workers=0), CPU, train=False)))
    teacher = load_detector("data/checkpoints/shapes_gfl_teacher.pt")
    expected = predict(teacher, images, targets, original_pixels=True)[0]
    assert len(expected["boxes"]) > 0 and float(expected["boxes"][:, 2].max()) > 128  # in the file's pixels

    as_uint8 = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    for given in (picture, as_uint8, tmp_path / "flat" / "images" / "1.png"):
        (found,) = teacher.predict([given], min_size=128, max_size=128)
        torch.testing.assert_close(found["boxes"], expected["boxes"])
        assert torch.equal(found["labels"], expected["labels"])
    (as_float,) = teacher.predict([as_uint8.float() / 255], min_size=128, max_size=128, score_thresh=0.3)
    assert len(as_float["boxes"]) > 0 and float(as_float["boxes"][:, 2].max()) <= 256
    assert torch.equal(as_image_tensor(picture.convert("L")), as_image_tensor(picture.convert("L").convert("RGB")))

    with pytest.raises(ValueError, match="pass min_size and max_size"):  # built in Python: no training size known
        build_detector("gfl", 8, backbone="resnet18", backbone_width=8, fpn_channels=16, head_convs=1).predict([picture])
    with pytest.raises(TypeError, match="a list of images"):
        teacher.predict(picture, min_size=128, max_size=128)
    with pytest.raises(ValueError, match=r"float image tensor must hold values in \[0, 1\]"):
        teacher.predict([as_uint8.float()], min_size=128, max_size=128)


def test_engine_predict_stays_the_batch_function_after_detector_predict():
    import kdlab.engine
    from kdlab.engine.evaluation import predict as batch_predict
    from kdlab.models import build_detector

    build_detector("gfl", 2, backbone="resnet18", backbone_width=8, fpn_channels=16, head_convs=1).predict(
        [torch.zeros(3, 32, 32)], min_size=32, max_size=32)  # imports the inference module lazily
    assert kdlab.engine.predict is batch_predict  # not shadowed by a submodule of the same name


def test_published_parts_reads_every_layout():
    from kdlab.engine.experiment import ap_by_seed, published_parts

    runs = {"student": {"0": {"AP": 0.1}, "1": {"AP": 0.2}}, "ld": {"0": {"AP": None}}}
    for key in ("settings", "datasets", "families"):
        parts = published_parts({key: {"shapes": {"title": "t", "runs": runs}}})
        assert parts["shapes"]["title"] == "t"
        assert parts["shapes"]["runs"]["student"] == {0: {"AP": 0.1}, 1: {"AP": 0.2}}
        assert ap_by_seed(parts["shapes"]["runs"]["student"]) == {0: 10.0, 1: 20.0}
        assert ap_by_seed(parts["shapes"]["runs"]["ld"]) == {}
    assert published_parts({}) == {}


def test_paired_differences_and_their_reading():
    from kdlab.engine.experiment import describe_difference, paired_ap_differences

    runs = {"a": {0: {"AP": 0.10}, 1: {"AP": 0.12}, 2: {"AP": 0.11}}, "b": {0: {"AP": 0.08}, 1: {"AP": 0.09}}}
    diffs = paired_ap_differences(runs, "a", "b")
    assert list(diffs) == [0, 1] and abs(diffs[0] - 2.0) < 1e-9 and abs(diffs[1] - 3.0) < 1e-9
    assert describe_difference(diffs, noise=0.5) == "+2.5 AP, better on 2 of 2 seeds (+2.0, +3.0)"
    assert describe_difference(diffs, noise=3.0).endswith("within the seed spread, no effect resolved")
    assert describe_difference({0: 2.0, 1: -1.0}, noise=0.1).endswith("the sign changes between seeds")
    assert describe_difference({0: 0.2, 1: -0.2, 2: -0.1}).endswith("no effect resolved")  # noise: their own std
    assert "one seed" in describe_difference({0: -5.0}, noise=0.0)
