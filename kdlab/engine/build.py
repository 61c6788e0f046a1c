"""Build what a run trains from its :class:`~kdlab.config.TrainConfig`: data loaders and the task.

``build_task`` returns a :class:`~kdlab.models.base.DetectionTask` around the detector, or, when
``cfg.distill`` is set, the :class:`~kdlab.distill.DistillationTask` of ``kdlab.distill.build_distillation``
with the teacher loaded from its exported checkpoint.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdlab.config import TrainConfig, load_config
from kdlab.data import build_dataset, collate_fn
from kdlab.distill import build_distillation
from kdlab.engine.checkpoint import CheckpointError, load_detector, safe_load
from kdlab.engine.distributed import DistContext
from kdlab.engine.sampler import ResumableBatchSampler
from kdlab.models import build_detector
from kdlab.models.base import DetectionTask, Detector


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training (augmented) and validation datasets of ``cfg``."""
    options = {"min_size": cfg.min_size, "max_size": cfg.max_size, "seed": cfg.seed}
    train_set = build_dataset(cfg.data_root, cfg.train_split, train=True, **options)
    val_set = build_dataset(cfg.data_root, cfg.val_split, train=False, **options)
    return train_set, val_set


def build_loader(dataset: Dataset, cfg: TrainConfig, ctx: DistContext, *, train: bool) -> DataLoader:
    """A DataLoader over this rank's share of ``dataset`` (see :class:`ResumableBatchSampler`).

    The loader gets its own random generator, so that creating an iterator never draws from the
    global torch RNG (which a resumed run restores from the checkpoint).
    """
    batch_sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, shuffle=train, seed=cfg.seed,
                                          rank=ctx.rank, world_size=ctx.world_size)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.num_workers,
                      collate_fn=functools.partial(collate_fn, size_divisor=cfg.size_divisor),
                      pin_memory=ctx.device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg.seed + ctx.rank))


def build_student(cfg: TrainConfig, num_classes: int) -> Detector:
    """``build_detector(cfg.model, num_classes, **cfg.model_options())``."""
    return build_detector(cfg.model, num_classes, **cfg.model_options())


def build_teacher(cfg: TrainConfig, num_classes: int) -> Detector:
    """The frozen teacher: its architecture from ``cfg.teacher_config`` (or, if unset, from the
    checkpoint itself) and its weights from ``cfg.teacher_checkpoint`` (an exported ``student.pt``)."""
    if cfg.teacher_checkpoint is None:
        raise ValueError(f"distill={cfg.distill!r} needs teacher_checkpoint (the teacher's exported student.pt)")
    if cfg.teacher_config is None:
        teacher = load_detector(cfg.teacher_checkpoint)
    else:
        teacher_cfg = load_config(cfg.teacher_config)
        options = {k: v for k, v in teacher_cfg.model_options().items() if k not in ("backbone_weights", "weights")}
        teacher = build_detector(teacher_cfg.model, num_classes, **options)
        state = safe_load(cfg.teacher_checkpoint)
        if "state_dict" not in state:
            raise CheckpointError(f"teacher_checkpoint {cfg.teacher_checkpoint} is not an exported detector "
                                  f"(student.pt) checkpoint: it has no 'state_dict'")
        try:
            teacher.load_state_dict(state["state_dict"])
        except RuntimeError as err:
            raise CheckpointError(f"teacher_checkpoint {cfg.teacher_checkpoint} does not fit the model of "
                                  f"teacher_config {cfg.teacher_config}: {str(err).splitlines()[0]}") from None
    if getattr(teacher, "num_classes", num_classes) != num_classes:
        raise ValueError(f"teacher_checkpoint {cfg.teacher_checkpoint} predicts {teacher.num_classes} classes, "
                         f"the dataset {cfg.data_root} has {num_classes}")
    return teacher.eval()


def build_task(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """What the engine trains: ``DetectionTask(student)``, or the distillation named by ``cfg.distill``."""
    student = build_student(cfg, num_classes)
    if cfg.distill is None:
        return DetectionTask(student)
    return build_distillation(cfg.distill, student, build_teacher(cfg, num_classes), cfg.distill_options)


def named_trainable_parameters(task: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``task.trainable_parameters()`` with their names (the names select the backbone lr)."""
    names = {id(p): n for n, p in task.named_parameters()}
    return [(names[id(p)], p) for p in task.trainable_parameters()]


def check_output_dir(path: str | Path, resume: bool) -> Path:
    """The run directory; resuming needs its ``last.pt``."""
    path = Path(path)
    if resume and not (path / "last.pt").is_file():
        raise CheckpointError(f"cannot resume: {path / 'last.pt'} does not exist (train without --resume first)")
    return path
