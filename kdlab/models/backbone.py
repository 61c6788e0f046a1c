"""ResNet backbones (torchvision's, or narrow ones for CPU) with an FPN P3-P7 on top.

``width=64`` is torchvision's ResNet exactly (same module names, so ImageNet weights from
torchvision's weights API load); smaller widths build the same architecture with
``width * (1, 2, 4, 8)`` channels per stage, which is what the CPU "quick" configurations use.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from kdlab.models.layers import norm_layer_factory
from kdlab.models.weights import load_weights_state_dict

RESNET_SPECS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3]),
}


class ResNetBody(nn.Module):
    """torchvision's ResNet trunk (no avgpool/fc) with a configurable base width.

    Returns C3, C4, C5 (strides 8, 16, 32; with ``dilate_c5`` C5 keeps stride 16 and its 3x3
    convolutions are dilated instead, DETR's "DC5", Bottleneck ResNets only as in torchvision).
    """

    def __init__(self, depth: str = "resnet18", width: int = 64, norm: str = "frozen_bn", dilate_c5: bool = False):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"backbone must be one of {sorted(RESNET_SPECS)}, got {depth!r}")
        block, layers = RESNET_SPECS[depth]
        if dilate_c5 and block is tv_resnet.BasicBlock:
            raise ValueError(f"a dilated C5 (DC5) needs a Bottleneck ResNet (resnet50/101), got {depth!r}")
        self._norm_layer = norm_layer_factory(norm)
        self.inplanes = width
        self.dilation = 1
        self.groups, self.base_width = 1, 64  # torchvision's Bottleneck arguments
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # torchvision's ResNet._make_layer only reads the attributes set above
        make_layer = tv_resnet.ResNet._make_layer
        self.layer1 = make_layer(self, block, width, layers[0])
        self.layer2 = make_layer(self, block, width * 2, layers[1], stride=2)
        self.layer3 = make_layer(self, block, width * 4, layers[2], stride=2)
        self.layer4 = make_layer(self, block, width * 8, layers[3], stride=2, dilate=dilate_c5)
        self.out_channels = [width * 2 * block.expansion, width * 4 * block.expansion, width * 8 * block.expansion]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def freeze_stages(self, frozen_stages: int) -> None:
        """Freeze the stem (``>= 0``) and ``layer1 .. layer{frozen_stages}`` (mmdet's convention)."""
        if frozen_stages < 0:
            return
        modules = [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1)]
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def load_backbone_weights(body: ResNetBody, depth: str, width: int, weights: str) -> None:
    """Initialise ``body`` from ``weights``: a torchvision ImageNet weights name (e.g. ``"IMAGENET1K_V1"``),
    or the path of a kdlab detector checkpoint (``*.pt``) whose ``backbone.body.*`` weights fit ``body``
    (the quick CPU configurations' stand-in for ImageNet weights, which this machine does not have)."""
    if weights.endswith(".pt"):
        load_checkpoint_body(body, weights)
    else:
        load_imagenet_weights(body, depth, width, weights)


def load_checkpoint_body(body: ResNetBody, path: str) -> None:
    """Copy the ``backbone.body.*`` weights of the exported detector ``path`` (``student.pt``) into ``body``."""
    state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {})
    prefix = "backbone.body."
    body_state = {k[len(prefix):]: v.float() if v.is_floating_point() else v
                  for k, v in state.items() if k.startswith(prefix)}
    try:
        missing, unexpected = body.load_state_dict(body_state, strict=False)
    except RuntimeError as err:  # shapes differ: another width
        raise ValueError(f"backbone_weights={path!r} does not fit this ResNet: {str(err).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:  # another depth, or no backbone.body at all
        raise ValueError(f"backbone_weights={path!r} does not fit this ResNet: missing {missing[:3]} "
                         f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")


def load_imagenet_weights(body: ResNetBody, depth: str, width: int, weights: str) -> None:
    """Load torchvision's ImageNet weights ``weights`` (e.g. ``"IMAGENET1K_V1"``) into ``body``."""
    if width != 64:
        raise ValueError(f"backbone_weights={weights!r} needs backbone_width=64 (torchvision's ResNet), got {width}")
    enum = tv_resnet.__dict__[{"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                               "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights"}[depth]]
    if weights not in enum.__members__:
        raise ValueError(f"unknown backbone_weights {weights!r} for {depth}; valid: {list(enum.__members__)}")
    state = load_weights_state_dict(enum[weights])
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if bad_missing or unexpected:
        raise RuntimeError(f"ImageNet weights do not match {depth}: missing {bad_missing}, unexpected {unexpected}")


class ResNetFPN(nn.Module):
    """ResNet C3-C5 -> FPN P3-P5 plus P6, P7 from P5 (RetinaNet/GFL layout, strides 8..128)."""

    strides = (8, 16, 32, 64, 128)

    def __init__(
        self,
        depth: str = "resnet50",
        width: int = 64,
        norm: str = "frozen_bn",
        fpn_channels: int = 256,
        weights: str | None = None,
        frozen_stages: int | None = None,
    ):
        super().__init__()
        self.body = ResNetBody(depth, width, norm)
        if weights is not None:
            load_backbone_weights(self.body, depth, width, weights)
        if frozen_stages is None:
            frozen_stages = 1 if weights is not None else -1
        self.body.freeze_stages(frozen_stages)
        self.fpn = FeaturePyramidNetwork(
            self.body.out_channels, fpn_channels, extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels)
        )
        self.out_channels = fpn_channels

    def forward(self, images: Tensor) -> list[Tensor]:
        c3, c4, c5 = self.body(images)
        pyramid = self.fpn(OrderedDict([("c3", c3), ("c4", c4), ("c5", c5)]))
        return list(pyramid.values())  # P3, P4, P5, P6, P7
