"""Layers every kdlab head shares: one GroupNorm rule, one conv tower, a per-level scale."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, fewer for narrow layers: at least 4 channels a group.

    ``gcd(min(32, channels // 4), channels)`` groups: 32 for 128 or more channels (torchvision's
    and mmdet's heads), 8 for the 32-channel FPNs of the CPU students, and a divisor of the
    width for MobileNetV3's (e.g. 18 for 72). One channel a group would normalise a single value
    on P7 (1 x 1 for a 128-px image): training with one image a batch fails, and larger batches
    lose every feature there.
    """
    return nn.GroupNorm(math.gcd(max(1, min(32, num_channels // 4)), num_channels), num_channels)


def norm_layer_factory(norm: str) -> Callable[[int], nn.Module]:
    """``"frozen_bn"`` (pretrained backbones), ``"bn"``, ``"gn"`` (:func:`group_norm`; per-sample, so DDP == big batch)."""
    from torchvision.ops import FrozenBatchNorm2d

    layers = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": group_norm}
    if norm not in layers:
        raise ValueError(f"backbone_norm must be 'frozen_bn', 'bn' or 'gn', got {norm!r}")
    return layers[norm]


def conv_tower(channels: int, num_convs: int, norm_layer: Callable[[int], nn.Module] | None = group_norm, *,
               blocks: bool = False, init_std: float | None = 0.01) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, norm, ReLU), convs drawn from ``N(0, init_std^2)`` with zero bias.

    The convs have a bias only without a norm. Two layouts of the same layers, because the
    state-dict keys must match the checkpoints each head loads:

    - ``blocks=False``: flat ``[conv, norm, ReLU, conv, ...]`` (GFL's ``cls_convs``, torchvision's
      FCOS towers, the distribution heads);
    - ``blocks=True``: one ``Conv2dNormActivation`` per layer (torchvision's RetinaNet v2 towers).

    Args:
        channels: input and output width.
        num_convs: layers (0 gives an identity ``Sequential``).
        norm_layer: ``channels -> module``, or ``None`` for no norm.
        blocks: the layout (see above).
        init_std: standard deviation of the conv weights (0.01 in GFL, RetinaNet, FCOS); ``None``
            leaves PyTorch's default init, for a head that initialises all its convs at once after
            building them (the order of random draws decides the initial weights of a seeded run).
    """
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        if blocks:
            layers.append(Conv2dNormActivation(channels, channels, norm_layer=norm_layer))
        else:
            layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=norm_layer is None))
            if norm_layer is not None:
                layers.append(norm_layer(channels))
            layers.append(nn.ReLU(inplace=True))
    tower = nn.Sequential(*layers)
    if init_std is None:
        return tower
    for module in tower.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return tower


class Scale(nn.Module):
    """A learnable scalar per FPN level (multiplies the box outputs, as in GFL/FCOS)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale
