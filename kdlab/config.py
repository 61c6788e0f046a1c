"""Training configuration: one dataclass, loaded from a FLAT YAML file.

Every key of the YAML file is a field of :class:`TrainConfig` (one to one; no inheritance, no
``_base_`` files), so a reader sees in one file which data, detector, optimiser and distiller a
run uses. The classes are not a config key: they are the categories of the annotation file. Values are read with ``yaml.safe_load`` and checked against the field types::

    cfg = load_config("configs/gfl_r18_shapes.yaml", overrides=["lr=0.02", "epochs=2"])
    build_detector(cfg.model, num_classes, **cfg.model_options())

YAML note: PyYAML reads ``1e-4`` (no dot) as a string; float fields accept such numeric strings,
as YAML 1.2 would.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that does not describe a valid :class:`TrainConfig`."""


@dataclass
class TrainConfig:
    """Everything a training run needs (see ``configs/*.yaml`` for examples).

    Data:
        data_root: dataset directory (COCO layout, see ``kdlab.data.build_dataset``).
        train_split / val_split: split names.
        min_size / max_size: resize the shorter side to ``min_size``, the longer to at most ``max_size``.
        batch_size: images per process (the total batch is ``batch_size * world_size``).
        num_workers: DataLoader worker processes.
        size_divisor: batches are zero-padded to a multiple of this.
    Model (``None`` = the detector's own default):
        model: detector name for ``kdlab.models.build_detector``.
        backbone, backbone_width, backbone_weights, backbone_norm, fpn_channels, head_convs,
        reg_max, octave_base_scale, anchor_scale, weights: detector options (``weights``: zoo detectors' pretrained
        weights; ``octave_base_scale``: GFL's anchor side in strides, 8 for COCO-sized images).
        init_checkpoint: a kdlab detector checkpoint (an exported ``student.pt`` or a training ``last.pt``)
            whose weights start the student, to continue a finished schedule or fine-tune; it must hold
            the configured detector (same model, options and number of classes), else a ``ConfigError``.
            Unlike ``resume`` it restores no optimiser, schedule or data order.
        detector_options: extra keyword arguments of ``build_detector``, for detectors with options
        beyond the fields above (e.g. DAB-DETR's ``num_queries``,
        Faster R-CNN's ``box_batch_size_per_image``); merged into ``model_options()``.
    Optimisation:
        optimizer: ``"sgd"`` (momentum) or ``"adamw"``.
        lr: learning rate for ``base_batch_size`` images; scaled linearly to the real total batch.
        momentum, weight_decay: optimiser settings (``momentum`` is AdamW's ``beta1``).
        backbone_lr_mult: lr multiplier of parameters whose name contains ``.backbone.``.
        epochs: training epochs.
        lr_steps: 0-based epochs at whose start the lr is multiplied by ``lr_gamma``.
        warmup_iters / warmup_ratio: linear warm-up from ``warmup_ratio * lr`` to ``lr``.
        grad_clip: max gradient norm, or ``None`` for no clipping.
        amp: bf16 autocast on CUDA (ignored on CPU).
    Distillation:
        teacher_config: YAML of the teacher's model fields (``None``: read them from the checkpoint);
            also names the config that trains the teacher in the error for a missing checkpoint.
        teacher_checkpoint: exported ``student.pt`` of the teacher.
        teacher_model / teacher_weights: instead of a checkpoint, a torchvision COCO detector built in one
            call, e.g. ``retinanet_resnet50_fpn_v2`` / ``COCO_V1`` (the file comes from
            ``$TORCH_HOME/hub/checkpoints``); its 91 COCO slots are restricted to the dataset's classes.
        distill: a method of ``kdlab.distill.METHODS``, a combination ``"a+b"`` or a recipe of
            ``kdlab.distill.RECIPES`` (``None``: plain training).
        distill_options: keyword arguments of the method (of each method, keyed by name, for a
            combination or a recipe); checked against the methods' signatures when the task is
            built; must be empty when ``distill`` is ``None``.
    Run:
        output_dir: where checkpoints, logs and evaluations go.
        seed, deterministic: seeding and deterministic kernels.
        log_every: iterations per ``metrics.jsonl`` record.
        eval_every: epochs between COCO evaluations (0: only at the end).
        checkpoint_every_iters: extra ``last.pt`` every this many iterations (0: per epoch only).
        max_iters: stop after this many iterations in total (tests, benchmarks).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        find_unused_parameters: passed to ``DistributedDataParallel``.
    """

    # data
    data_root: str = "data/shapes"
    train_split: str = "train"
    val_split: str = "val"
    min_size: int = 800
    max_size: int = 1333
    batch_size: int = 2
    num_workers: int = 2
    size_divisor: int = 32
    # model
    model: str = "gfl"
    backbone: str | None = None
    backbone_width: int | None = None
    backbone_weights: str | None = None
    backbone_norm: str | None = None
    fpn_channels: int | None = None
    head_convs: int | None = None
    reg_max: int | None = None
    octave_base_scale: float | None = None
    anchor_scale: float | None = None
    weights: str | None = None
    init_checkpoint: str | None = None
    detector_options: dict[str, Any] = field(default_factory=dict)
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.01
    base_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 1.0
    epochs: int = 12
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])
    lr_gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    grad_clip: float | None = None
    amp: bool = True
    # distillation
    teacher_config: str | None = None
    teacher_checkpoint: str | None = None
    teacher_model: str | None = None
    teacher_weights: str | None = None
    distill: str | None = None
    distill_options: dict[str, Any] = field(default_factory=dict)
    # run
    output_dir: str = "runs/default"
    seed: int = 0
    deterministic: bool = True
    log_every: int = 20
    eval_every: int = 1
    checkpoint_every_iters: int = 0
    max_iters: int | None = None
    device: str = "auto"
    find_unused_parameters: bool = False

    MODEL_OPTION_FIELDS = ("backbone", "backbone_width", "backbone_weights", "backbone_norm",
                           "fpn_channels", "head_convs", "reg_max", "octave_base_scale", "anchor_scale", "weights")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _field_types()[f.name]))
        self._check_values()

    def model_options(self) -> dict[str, Any]:
        """The non-``None`` model fields and ``detector_options``, as keyword arguments of ``build_detector``."""
        fields = {name: getattr(self, name) for name in self.MODEL_OPTION_FIELDS if getattr(self, name) is not None}
        return {**fields, **self.detector_options}

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """``{field: default}`` for the fields that have one (a fresh copy of mutable defaults)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (only str/int/float/bool/None/list/dict), e.g. for checkpoints."""
        return dataclasses.asdict(self)

    def _check_values(self) -> None:
        positive = ["min_size", "max_size", "batch_size", "size_divisor", "base_batch_size", "epochs", "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ["num_workers", "warmup_iters", "eval_every", "checkpoint_every_iters", "weight_decay"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.warmup_ratio <= 1:
            raise ConfigError(f"warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        if sorted(self.lr_steps) != self.lr_steps or any(s < 0 for s in self.lr_steps):
            raise ConfigError(f"lr_steps must be increasing non-negative epoch indices, got {self.lr_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.max_iters is not None and self.max_iters < 1:
            raise ConfigError(f"max_iters must be >= 1 or null, got {self.max_iters}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        clash = sorted(set(self.detector_options) & {"model", *self.MODEL_OPTION_FIELDS})
        if clash:
            raise ConfigError(f"detector_options {clash} are model fields: set them as top-level keys")
        if self.distill is not None and self.teacher_checkpoint is None and self.teacher_model is None:
            raise ConfigError(f"distill={self.distill!r} needs teacher_checkpoint (an exported student.pt) "
                              f"or teacher_model + teacher_weights (a torchvision COCO detector)")
        if self.teacher_model is not None:
            if self.teacher_checkpoint is not None or self.teacher_config is not None:
                raise ConfigError("teacher_model (a torchvision COCO detector) and teacher_checkpoint/teacher_config "
                                  "(an exported student.pt) are two ways to give the teacher: set one of them")
            if self.teacher_weights is None:
                raise ConfigError(f"teacher_model={self.teacher_model!r} needs teacher_weights (e.g. COCO_V1): "
                                  f"a randomly initialised teacher has nothing to teach")
        elif self.teacher_weights is not None:
            raise ConfigError(f"teacher_weights={self.teacher_weights!r} needs teacher_model (the torchvision detector "
                              f"the weights belong to, e.g. retinanet_resnet50_fpn_v2)")
        if self.distill is None and self.distill_options:
            raise ConfigError(f"distill_options {self.distill_options} are given but distill is null, so nothing would "
                              f"use them; for the student alone also set distill_options={{}} "
                              f"(e.g. --set distill=null distill_options={{}})")


_FIELD_TYPES: dict[str, Any] = {}


def _field_types() -> dict[str, Any]:
    if not _FIELD_TYPES:
        _FIELD_TYPES.update(typing.get_type_hints(TrainConfig))
    return _FIELD_TYPES


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints become floats where floats are expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    ok = False
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value, ok = float(value), True
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp in (str, bool):
        ok = isinstance(value, tp)
    elif origin is list:
        if isinstance(value, list):
            value, ok = [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)], True
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if not ok:
        raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


# keys people expect that are not config fields, and why
NOT_CONFIG_KEYS = {
    name: "the classes are the 'categories' of the training annotation file (instances_<train_split>.json "
          "under data_root): their number and names come from there; to train on fewer classes, remove "
          "the others' categories and annotations from the JSON files"
    for name in ("num_classes", "classes", "class_names", "categories")
}


def _closest(key: str) -> str:
    if key in NOT_CONFIG_KEYS:
        return f"it is not a config key: {NOT_CONFIG_KEYS[key]}"
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(names)}"


def _apply_override(values: dict[str, Any], override: str) -> None:
    """Apply ``key=value`` (``value`` parsed by YAML); ``distill_options.name=value`` (or
    ``detector_options.name=value``) sets one option."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({err})") from None
    head, dot, option = key.partition(".")
    if dot:
        if head not in ("distill_options", "detector_options") or not option:
            raise ConfigError(f"override {override!r}: only distill_options.<name>=value and "
                              f"detector_options.<name>=value may use a dot")
        values[head] = {**(values.get(head) or {}), option: value}
        return
    if key not in _field_types():
        raise ConfigError(f"override {override!r}: unknown key {key!r}; {_closest(key)}")
    values[key] = value


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a flat dict; errors name ``source`` and the key."""
    unknown = [k for k in values if k not in _field_types()]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; {_closest(str(unknown[0]))}")
    try:
        return TrainConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a flat YAML file into a :class:`TrainConfig`, then apply ``key=value`` overrides.

    Args:
        path: the YAML file (a mapping of field names to values).
        overrides: ``["lr=0.02", "lr_steps=[1, 2]", "distill_options.temperature=5"]``; the
            values are parsed with ``yaml.safe_load``.

    Raises:
        ConfigError: missing/unreadable file, unknown key (with the closest valid names), or a
            value of the wrong type (naming the key and the expected type).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys to values, got {type(values).__name__}")
    for override in overrides:
        _apply_override(values, override)
    return config_from_dict(values, source=str(path))


def recipe_header(path: str | Path) -> dict[str, Any]:
    """What a recipe's header comment says (``configs/coco_*.yaml``): its first line, the published
    result it targets and the command that runs it.

    A recipe's header has a line ``# Published: 42.1 AP, <what and where from>`` (``# Published: –``
    when no number is published) and a line ``# Command: torchrun ...``.

    Returns:
        ``{"title", "published", "published_ap", "command"}``; ``published_ap`` is the first number of
        the published line (``None`` without one), the others are strings (``""`` when absent).
    """
    header = {"title": "", "published": "", "published_ap": None, "command": ""}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not header["title"]:
            header["title"] = text
        for key in ("published", "command"):
            prefix = f"{key.capitalize()}:"
            if text.startswith(prefix) and not header[key]:
                header[key] = text[len(prefix):].strip()
    number = re.match(r"\s*(\d+(?:\.\d+)?)\s*AP", header["published"])
    header["published_ap"] = float(number.group(1)) if number else None
    return header


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` as a flat YAML file that :func:`load_config` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
