"""Build what a run trains from its :class:`~kdlab.config.TrainConfig`: data loaders and the task.

``build_task`` returns a :class:`~kdlab.models.base.DetectionTask` around the detector, or, when
``cfg.distill`` is set, the :class:`~kdlab.distill.DistillationTask` of ``kdlab.distill.build_distillation``
with the teacher loaded from its exported checkpoint or, with ``cfg.teacher_model``, built with
torchvision's COCO weights in one call.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdlab.config import ConfigError, TrainConfig, load_config
from kdlab.data import build_dataset, collate_fn
from kdlab.data.check import screen_images
from kdlab.distill import METHODS, DistillationTask, method_options
from kdlab.engine.checkpoint import CheckpointError, load_detector, load_student_record, safe_load
from kdlab.engine.distributed import DistContext
from kdlab.engine.sampler import ResumableBatchSampler
from kdlab.models import build_detector
from kdlab.models.base import DetectionTask, Detector
from kdlab.models.weights import coco91_columns


def build_datasets(cfg: TrainConfig, *, check_images: bool = False, skip_bad_images: bool = False,
                   announce: bool = True) -> tuple[Dataset, Dataset]:
    """The training (augmented) and validation datasets of ``cfg``.

    Args:
        cfg: the run's configuration.
        check_images: quick-check every image file of both splits first
            (:func:`~kdlab.data.check.screen_images`).
        skip_bad_images: leave bad image files out instead of stopping (with ``check_images``).
        announce: print what was left out (rank 0).

    Raises:
        ValueError: the training split has no image or no box to learn from.
        kdlab.data.check.BadImagesError: bad image files and not ``skip_bad_images``.
    """
    options = {"min_size": cfg.min_size, "max_size": cfg.max_size, "seed": cfg.seed}
    train_set = build_dataset(cfg.data_root, cfg.train_split, train=True, **options)
    val_set = build_dataset(cfg.data_root, cfg.val_split, train=False, **options)
    if check_images:
        for split, dataset in ((cfg.train_split, train_set), (cfg.val_split, val_set)):
            screen_images(dataset, split, skip=skip_bad_images, announce=announce)
    check_training_split(train_set, cfg.train_split)
    return train_set, val_set


def check_training_split(dataset: Dataset, split: str) -> None:
    """A training split must have images and at least one box (else there is nothing to learn)."""
    where = f"training split {split!r} ({getattr(dataset, 'ann_file', '')})"
    if len(dataset) == 0:
        raise ValueError(f"{where} has no images")
    if getattr(dataset, "num_boxes", 1) == 0:
        raise ValueError(f"{where} has {len(dataset)} images but no box to learn from (no annotations, or all crowd "
                         f"or dropped as degenerate); `kdlab check-data CONFIG` shows the counts")


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
    """``build_detector(cfg.model, num_classes, **cfg.model_options())``, started from the weights of
    ``cfg.init_checkpoint`` when it is set (:func:`init_from_checkpoint`)."""
    student = build_detector(cfg.model, num_classes, **cfg.model_options())
    if cfg.init_checkpoint is not None:
        init_from_checkpoint(student, cfg, num_classes)
    return student


def init_from_checkpoint(student: Detector, cfg: TrainConfig, num_classes: int) -> None:
    """Copy the weights of the detector stored in ``cfg.init_checkpoint`` into ``student``.

    Raises:
        ConfigError: naming ``init_checkpoint``, when the file is missing or not a kdlab detector
            checkpoint, or holds another model, other options or another number of classes.
    """
    path = cfg.init_checkpoint
    config = project_checkpoint_config(path)
    if not Path(path).is_file() and config is not None:
        run = f"runs/{Path(config).stem}"
        raise ConfigError(f"init_checkpoint {path} does not exist: train it with `kdlab train {config} --output-dir "
                          f"{run}` and copy {run}/student.pt to {path}")
    try:
        record = load_student_record(path)
    except CheckpointError as err:
        raise ConfigError(f"init_checkpoint: {err}") from None
    stored = {k: v for k, v in record["model"].items() if v is not None}
    configured = {"name": cfg.model, **cfg.model_options()}
    ignored = ("backbone_weights", "weights")
    differences = sorted(k for k in set(stored) | set(configured) if k not in ignored and stored.get(k) != configured.get(k))
    if differences:
        listed = ", ".join(f"{k}: checkpoint {stored.get(k)!r}, config {configured.get(k)!r}" for k in differences)
        raise ConfigError(f"init_checkpoint {path} holds another detector than the config's ({listed})")
    if record["num_classes"] != num_classes:
        raise ConfigError(f"init_checkpoint {path} has {record['num_classes']} classes, the dataset {num_classes}")
    try:
        student.load_state_dict(record["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"init_checkpoint {path}: its weights do not fit the configured detector ({err})") from None


# the project's teacher checkpoints (data/checkpoints/README.md) -> the config that trains each; any other
# data/checkpoints/NAME.pt is looked up as configs/NAME.yaml
PROJECT_TEACHERS = {
    "shapes_retinanet_teacher": "configs/shapes_gid_retinanet_teacher.yaml",
    "shapes_fcos_teacher": "configs/shapes_gid_fcos_teacher.yaml",
    "shapes_faster_rcnn_teacher": "configs/shapes_gid_faster_rcnn_teacher.yaml",
    # DAB-DETR's teacher trains in three schedules, each starting from the one before (stored as ..._stageN.pt)
    "shapes_dab_detr_teacher_stage1": "configs/shapes_dab_detr_teacher.yaml",
    "shapes_dab_detr_teacher_stage2": "configs/shapes_dab_detr_teacher_stage2.yaml",
    "shapes_dab_detr_teacher": "configs/shapes_dab_detr_teacher_stage3.yaml",
}
REPO_ROOT = Path(__file__).resolve().parents[2]


def project_checkpoint_config(checkpoint: str | Path) -> str | None:
    """The project config that trains the checkpoint ``.../NAME.pt`` (:data:`PROJECT_TEACHERS`, or
    ``configs/NAME.yaml``), or ``None`` when there is none."""
    stem = Path(checkpoint).stem
    candidate = PROJECT_TEACHERS.get(stem, f"configs/{stem}.yaml")
    return candidate if (REPO_ROOT / candidate).is_file() or Path(candidate).is_file() else None


def teacher_training_config(cfg: TrainConfig) -> str | None:
    """The config that trains ``cfg.teacher_checkpoint``: ``teacher_config``, else the project config of a
    checkpoint under ``data/checkpoints/`` (:func:`project_checkpoint_config`), else ``None``."""
    if cfg.teacher_config is not None:
        return cfg.teacher_config
    return project_checkpoint_config(cfg.teacher_checkpoint)


def check_teacher_checkpoint(cfg: TrainConfig) -> None:
    """A missing ``teacher_checkpoint`` is a :class:`CheckpointError` naming the file and how to train it."""
    path = Path(cfg.teacher_checkpoint)
    if path.is_file():
        return
    config = teacher_training_config(cfg)
    if config is None:
        how = ("train the teacher (`kdlab train TEACHER_CONFIG`) and set teacher_checkpoint to its exported "
               "student.pt")
    else:
        run = f"runs/{Path(config).stem}"
        how = (f"train it with `kdlab train {config} --output-dir {run}` and copy {run}/student.pt to {path} "
               f"(or set teacher_checkpoint={run}/student.pt)")
    raise CheckpointError(f"teacher_checkpoint {path} does not exist: {how}")


def build_teacher(cfg: TrainConfig, num_classes: int, label_to_cat_id: list[int] | None = None) -> Detector:
    """The frozen teacher, in ``eval()`` mode, from one of:

    - ``cfg.teacher_model`` + ``cfg.teacher_weights``: a torchvision COCO detector in one call
      (``build_detector("retinanet_resnet50_fpn_v2", 91, weights="COCO_V1")``), its 91 COCO slots
      restricted to the dataset's classes by category id (``label_to_cat_id``, contiguous label ->
      COCO category id); the weights file is read from ``$TORCH_HOME/hub/checkpoints``;
    - ``cfg.teacher_checkpoint``: an exported ``student.pt``, its architecture from ``cfg.teacher_config``
      (or, if unset, from the checkpoint itself).

    Raises:
        CheckpointError: the checkpoint is missing (the message names the file and the command that
            trains it, :func:`check_teacher_checkpoint`), corrupt, or does not fit.
        WeightsUnavailableError: the torchvision weights file is neither cached nor downloadable
            (the message names the file and where to put it).
    """
    if cfg.teacher_model is not None:
        if label_to_cat_id is None:
            raise ValueError(f"teacher_model={cfg.teacher_model!r} predicts torchvision's 91 COCO slots: the dataset's "
                             f"category ids (label_to_cat_id) are needed to keep its {num_classes} classes")
        try:
            columns = coco91_columns(label_to_cat_id)  # [num_classes], the COCO slot of each label
        except ValueError as err:
            raise ValueError(f"teacher_model={cfg.teacher_model!r} is a COCO detector, but {cfg.data_root}: {err}") from None
        teacher = build_detector(cfg.teacher_model, None, weights=cfg.teacher_weights)
        teacher.restrict_classes_(columns)
        return teacher.eval()
    if cfg.teacher_checkpoint is None:
        raise ValueError(f"distill={cfg.distill!r} needs teacher_checkpoint (the teacher's exported student.pt) "
                         f"or teacher_model + teacher_weights")
    check_teacher_checkpoint(cfg)
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


def build_task(cfg: TrainConfig, num_classes: int, label_to_cat_id: list[int] | None = None) -> nn.Module:
    """What the engine trains: ``DetectionTask(student)``, or the distillation named by ``cfg.distill``
    (a method, ``"a+b"`` or a recipe; :func:`kdlab.distill.method_options`).

    Each method's options are checked against its signature first (:func:`check_distill_options`);
    a ``ValueError`` of a method (e.g. a teacher it cannot distil) is re-raised as a
    :class:`~kdlab.config.ConfigError` naming ``distill``. ``label_to_cat_id`` (the dataset's category
    id of each label) is needed by a ``teacher_model`` teacher.
    """
    checked = {}
    if cfg.distill is not None:
        try:
            per_method = method_options(cfg.distill, cfg.distill_options)
        except ValueError as err:
            raise ConfigError(f"distill: {err}") from None
        checked = {name: check_distill_options(METHODS[name], kwargs, method=name) for name, kwargs in per_method.items()}
    student = build_student(cfg, num_classes)
    if cfg.distill is None:
        return DetectionTask(student)
    teacher = build_teacher(cfg, num_classes, label_to_cat_id)
    try:
        return DistillationTask(student, teacher, [METHODS[name](student, teacher, **kwargs) for name, kwargs in checked.items()])
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"distill={cfg.distill!r}: {err}") from None


def _option_parameters(method_class: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """Keyword options of ``method_class.__init__`` after ``(student, teacher)``, following
    ``**options`` into the base classes, and their resolved annotations."""
    parameters: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for klass in method_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        signature = inspect.signature(init)
        try:
            klass_hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not resolve: check names only
            klass_hints = {}
        forwards = False
        for position, (name, parameter) in enumerate(signature.parameters.items()):
            if position < 3 and name in ("self", "student", "teacher"):
                continue
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                parameters.setdefault(name, parameter)
                if name in klass_hints:
                    hints.setdefault(name, klass_hints[name])
        if not forwards:
            break
    return parameters, hints


def _check_type(value: Any, annotation: Any) -> tuple[bool, Any]:
    """``(ok, value)``: whether ``value`` fits ``annotation`` (ints and numeric strings become floats)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, value
        for inner in args:
            if inner is not type(None):
                ok, converted = _check_type(value, inner)
                if ok:
                    return True, converted
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                return False, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation in (bool, str):
        return isinstance(value, annotation), value
    return True, value  # other annotations (sequences, modules): left to the method


def _describe_type(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def check_distill_options(method_class: type, options: dict[str, Any], *, method: str | None = None) -> dict[str, Any]:
    """Check ``distill_options`` against the keyword arguments of ``method_class.__init__``.

    Every name must be a parameter of the method (a misspelt one gets the closest names), and every
    value must fit the parameter's annotation (``float``, ``int``, ``bool``, ``str``, ``Literal``,
    ``X | None``); value ranges are the method's own business.

    Args:
        method_class: the distiller class, e.g. ``kdlab.distill.ld.LD``.
        options: the config's ``distill_options``.
        method: the config's ``distill`` name, for the messages.

    Returns:
        The options, with ints and numeric strings given for float parameters as floats.

    Raises:
        ConfigError: one line naming ``distill_options.<name>`` and what is expected.
    """
    label = f"distill={method!r} ({method_class.__module__}.{method_class.__name__})" if method else method_class.__name__
    parameters, hints = _option_parameters(method_class)
    checked = {}
    for name, value in options.items():
        if name not in parameters:
            close = difflib.get_close_matches(name, list(parameters), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid options: {', '.join(parameters)}"
            raise ConfigError(f"distill_options: {label} has no option {name!r}; {hint}")
        ok, value = _check_type(value, hints.get(name, typing.Any))
        if not ok:
            raise ConfigError(f"distill_options.{name} must be {_describe_type(hints[name])}, got {value!r} "
                              f"({type(value).__name__}) for {label}")
        checked[name] = value
    missing = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty and name not in options]
    if missing:
        raise ConfigError(f"distill_options: {label} needs {', '.join(missing)}")
    return checked


def named_trainable_parameters(task: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``task.trainable_parameters()`` with their names (the names select the backbone lr)."""
    names = {id(p): n for n, p in task.named_parameters()}
    return [(names[id(p)], p) for p in task.trainable_parameters()]

