"""Optimiser and learning-rate schedule of the detection recipes (mmdetection's 1x schedule).

Learning rate at iteration ``i`` (0-based, counted over the whole run) of epoch ``e``::

    lr(i) = lr_scaled * warmup(i) * gamma ** #{s in lr_steps : s <= e}
    warmup(i) = ratio + (1 - ratio) * i / warmup_iters   for i < warmup_iters, else 1
    lr_scaled = lr * (batch_size * world_size) / base_batch_size      (linear scaling rule)

COCO 1x: 12 epochs, ``lr_steps = [8, 11]`` (the lr drops 10x at the start of 0-based epochs 8
and 11), ``warmup_iters = 500``, ``ratio = 0.001``.
"""

from __future__ import annotations

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from kdlab.config import TrainConfig


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """``cfg.lr`` scaled linearly from ``base_batch_size`` images to the real total batch."""
    return cfg.lr * cfg.batch_size * world_size / cfg.base_batch_size


def is_backbone_parameter(name: str) -> bool:
    """Backbone parameters (lr multiplied by ``backbone_lr_mult``): names containing ``.backbone.``."""
    return ".backbone." in f".{name}"


def build_optimizer(named_parameters: list[tuple[str, nn.Parameter]], cfg: TrainConfig, world_size: int) -> Optimizer:
    """SGD with momentum, or AdamW, over the given (trainable) parameters.

    Args:
        named_parameters: ``(name, parameter)`` pairs of what is trained (never the teacher).
        cfg: ``optimizer``, ``lr``, ``momentum``, ``weight_decay``, ``backbone_lr_mult``, batch sizes.
        world_size: processes, for the linear lr scaling.

    Returns:
        An optimiser with one param group for the backbone and one for the rest (empty groups
        are dropped); each group's ``initial_lr`` is its lr before warm-up.
    """
    lr = scaled_lr(cfg, world_size)
    backbone = [p for n, p in named_parameters if is_backbone_parameter(n)]
    others = [p for n, p in named_parameters if not is_backbone_parameter(n)]
    groups = [{"params": others, "lr": lr, "name": "default"},
              {"params": backbone, "lr": lr * cfg.backbone_lr_mult, "name": "backbone"}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("build_optimizer: there are no trainable parameters")
    if cfg.optimizer == "sgd":
        return SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


class WarmupStepFactor:
    """The lr multiplier ``warmup(i) * gamma ** #{s in steps : s <= i // iters_per_epoch}``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict()`` stores its settings.
    """

    def __init__(self, iters_per_epoch: int, lr_steps: list[int], gamma: float, warmup_iters: int, warmup_ratio: float):
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        self.iters_per_epoch = iters_per_epoch
        self.lr_steps = list(lr_steps)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio

    def __call__(self, iteration: int) -> float:
        epoch = iteration // self.iters_per_epoch
        factor = self.gamma ** sum(1 for step in self.lr_steps if step <= epoch)
        if iteration < self.warmup_iters:
            factor *= self.warmup_ratio + (1 - self.warmup_ratio) * iteration / self.warmup_iters
        return factor


def build_lr_scheduler(optimizer: Optimizer, cfg: TrainConfig, iters_per_epoch: int) -> LambdaLR:
    """Per-iteration scheduler (call ``step()`` after every optimiser step)."""
    factor = WarmupStepFactor(iters_per_epoch, cfg.lr_steps, cfg.lr_gamma, cfg.warmup_iters, cfg.warmup_ratio)
    return LambdaLR(optimizer, factor)
