"""Backbone + FPN for the small configurations of the zoo (torchvision's parts, narrower FPN).

Torchvision's detection builders fix the FPN at 256 channels and the ResNet at width 64; the CPU
students of kdlab use narrower ones. :func:`build_fpn_backbone` assembles torchvision's
``BackboneWithFPN`` (so features come back as torchvision's ordered dict) from a ResNet of any
base width (:class:`kdlab.models.backbone.ResNetBody`, torchvision's ResNet at width 64) or a
MobileNetV3, in the two level layouts of the zoo:

- ``"p3p7"`` (RetinaNet, FCOS): C3, C4, C5 -> P3, P4, P5, then P6, P7 by stride-2 convs on P5
  (strides 8 ... 128);
- ``"p2p6"`` (Faster R-CNN): C2 ... C5 -> P2 ... P5, and P6 by max-pooling P5 (named ``"pool"``,
  used by the RPN only; strides 4 ... 64).

For MobileNetV3, C2 ... C5 are the outputs of the blocks with strides 4, 8, 16 and 32.
"""

from __future__ import annotations

import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from kdlab.models.backbone import RESNET_SPECS, ResNetBody
from kdlab.models.layers import norm_layer_factory
from kdlab.models.weights import load_weights_state_dict, resolve_weights

MOBILENET_NAMES = ("mobilenet_v3_small", "mobilenet_v3_large")
LEVEL_LAYOUTS = {"p3p7": (8, 16, 32, 64, 128), "p2p6": (4, 8, 16, 32, 64)}
"""Nominal stride of each output level for each layout."""


def build_fpn_backbone(
    backbone: str,
    *,
    backbone_width: int = 64,
    backbone_norm: str = "bn",
    backbone_weights: str | None = None,
    frozen_stages: int | None = None,
    fpn_channels: int = 256,
    levels: str = "p3p7",
) -> BackboneWithFPN:
    """A ResNet or MobileNetV3 with an FPN on top.

    Args:
        backbone: ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` /
            ``mobilenet_v3_small`` / ``mobilenet_v3_large``.
        backbone_width: ResNet base width (64 = torchvision's; 8-32 for CPU configurations).
        backbone_norm: ``"frozen_bn"`` (pretrained), ``"bn"`` or ``"gn"``.
        backbone_weights: torchvision ImageNet weights (e.g. ``"IMAGENET1K_V1"``), read from
            ``$TORCH_HOME/hub/checkpoints`` (clear error when absent); ``None``: random init.
        frozen_stages: stem and the first ``k`` stages frozen (default 1 with weights, else
            none); for MobileNetV3 the blocks up to the end of stage ``k``.
        fpn_channels: FPN width (``out_channels`` of every level).
        levels: ``"p3p7"`` or ``"p2p6"`` (see the module docstring).

    Returns:
        a module mapping ``[B, 3, H, W]`` to an ordered dict of ``[B, fpn_channels, H_l, W_l]``
        maps, with attribute ``out_channels``.
    """
    if levels not in LEVEL_LAYOUTS:
        raise ValueError(f"levels must be one of {sorted(LEVEL_LAYOUTS)}, got {levels!r}")
    norm_layer_factory(backbone_norm)  # validates the name
    weights = resolve_weights(backbone, backbone_weights)
    if weights is not None and backbone in RESNET_SPECS and backbone_width != 64:
        raise ValueError(f"backbone_weights={backbone_weights!r} needs backbone_width=64 (torchvision's ResNet)")
    if frozen_stages is None:
        frozen_stages = 1 if weights is not None else -1
    if backbone in RESNET_SPECS:
        body = ResNetBody(backbone, backbone_width, backbone_norm)  # children run in registration order
        if weights is not None:
            state = {k: v for k, v in load_weights_state_dict(weights).items() if not k.startswith("fc.")}
            body.load_state_dict(state, strict=False)
        body.freeze_stages(frozen_stages)
        stage_names = ["layer1", "layer2", "layer3", "layer4"]
        expansion = RESNET_SPECS[backbone][0].expansion
        stage_channels = [backbone_width * 2**i * expansion for i in range(4)]
    elif backbone in MOBILENET_NAMES:
        network = getattr(torchvision.models, backbone)(weights=None, norm_layer=_mobilenet_norm(backbone_norm))
        if weights is not None:
            network.load_state_dict(load_weights_state_dict(weights))
        body = network.features  # IntermediateLayerGetter walks the blocks directly
        stage_ends = [0] + [i for i, block in enumerate(body) if getattr(block, "_is_cn", False)] + [len(body) - 1]
        for block in body[: stage_ends[frozen_stages] + 1] if frozen_stages >= 0 else []:
            block.requires_grad_(False)
        picked = [stage_ends[1], stage_ends[2], stage_ends[3], stage_ends[-1]]  # strides 4, 8, 16, 32
        stage_names = [str(i) for i in picked]
        stage_channels = [body[i].out_channels for i in picked]
    else:
        raise ValueError(f"backbone must be one of {sorted(RESNET_SPECS) + list(MOBILENET_NAMES)}, got {backbone!r}")

    used = slice(1, 4) if levels == "p3p7" else slice(0, 4)
    return_layers = {name: str(k) for k, name in enumerate(stage_names[used])}
    extra_blocks = LastLevelP6P7(fpn_channels, fpn_channels) if levels == "p3p7" else LastLevelMaxPool()
    return BackboneWithFPN(body, return_layers, stage_channels[used], fpn_channels, extra_blocks=extra_blocks)


def _mobilenet_norm(norm: str):
    """MobileNetV3's norm layer: torchvision's own BatchNorm (eps 1e-3) for ``"bn"``, else kdlab's
    (``"gn"``: :func:`~kdlab.models.layers.group_norm`, whose group count divides MobileNet's widths)."""
    if norm == "bn":
        return None
    return norm_layer_factory(norm)
