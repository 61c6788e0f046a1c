"""Torchvision's detectors under torchvision's names (:data:`TORCHVISION_BUILDERS`, in ``build_detector``).

 (``retinanet_resnet50_fpn``, ``retinanet_resnet50_fpn_v2``,
  ``fcos_resnet50_fpn``, ``fasterrcnn_resnet50_fpn``, ``fasterrcnn_resnet50_fpn_v2``,
  ``fasterrcnn_mobilenet_v3_large_fpn``, ``fasterrcnn_mobilenet_v3_large_320_fpn``): the same
  modules as torchvision's builder of that name, hence the same ``state_dict``, and
  ``weights="COCO_V1"`` loads torchvision's COCO weights in one call. Differences from
  torchvision: ``backbone_weights`` defaults to ``None`` (torchvision downloads ImageNet
  weights by default), files are read from the cache first (see :mod:`kdlab.models.weights`),
  and the COCO models speak torchvision's 91-slot COCO label space (label = category id).

kdlab's configurable students of the same families (any width, narrow FPN and heads) are in
:mod:`kdlab.models.students`.
"""

from __future__ import annotations

import inspect
from functools import partial

from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection import faster_rcnn as tv_faster_rcnn
from torchvision.models.detection import fcos as tv_fcos
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    _mobilenet_extractor,
    _resnet_fpn_extractor,
    _validate_trainable_layers,
)
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from kdlab.models.faster_rcnn import FasterRCNN
from kdlab.models.fcos import FCOS
from kdlab.models.retinanet import RetinaNet
from kdlab.models.weights import (
    COCO91_CLASS_NAMES,
    load_weights_state_dict,
    resolve_weights,
)


def _check_options(name: str, options: dict, torchvision_class: type) -> None:
    """Only the keyword arguments of torchvision's detector class may pass through."""
    allowed = set(inspect.signature(torchvision_class.__init__).parameters) - {
        "self", "backbone", "num_classes", "kwargs", "anchor_generator", "head", "rpn_anchor_generator",
        "rpn_head", "box_roi_pool", "box_head", "box_predictor"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"detector {name!r} does not take option(s) {unknown}; valid options: "
                         f"num_classes, weights, backbone_weights, trainable_backbone_layers, {sorted(allowed)}")


def _coco_setup(name: str, weights, backbone: str, backbone_weights, num_classes: int | None):
    """Resolve weights; with COCO weights ``num_classes`` must be torchvision's 91 (or ``None``)."""
    weights = resolve_weights(name, weights)
    if weights is None:
        return None, resolve_weights(backbone, backbone_weights), 91 if num_classes is None else num_classes, None
    coco_slots = len(weights.meta["categories"])
    if num_classes not in (None, coco_slots):
        raise ValueError(
            f"{name} with weights {weights} predicts torchvision's {coco_slots} COCO slots (label = COCO category id), "
            f"got num_classes={num_classes}: build with num_classes={coco_slots} and call "
            "detector.restrict_classes_(coco91_columns(dataset.label_to_cat_id)) for a dataset's classes"
        )
    return weights, None, coco_slots, list(COCO91_CLASS_NAMES)


def _resnet50_fpn(name: str, torchvision_class: type, detector_options: dict, num_classes: int | None, weights,
                  backbone_weights, trainable_backbone_layers: int | None, *, frozen_bn: bool = True,
                  p6p7_in: int | None = None, **fpn_options):
    """What the ResNet-50 builders share: options checked, weights resolved, torchvision's ResNet-50 (with
    FrozenBatchNorm when weights load and ``frozen_bn``, else BatchNorm) and its FPN (P3-P7 with P6/P7 from
    ``p6p7_in`` channels when given, else P2-P6), modules created in torchvision's order.

    Returns:
        ``(backbone, weights, num_classes, class_names)``.
    """
    _check_options(name, detector_options, torchvision_class)
    weights, backbone_weights, num_classes, names = _coco_setup(name, weights, "resnet50", backbone_weights, num_classes)
    trained = weights is not None or backbone_weights is not None
    layers = _validate_trainable_layers(trained, trainable_backbone_layers, 5, 3)
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d if trained and frozen_bn else nn.BatchNorm2d)
    if backbone_weights is not None:
        body.load_state_dict(load_weights_state_dict(backbone_weights))
    if p6p7_in is not None:
        fpn_options.update(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(p6p7_in, 256))
    return _resnet_fpn_extractor(body, layers, **fpn_options), weights, num_classes, names


def _finish(model: nn.Module, weights, eps_zero: bool = False) -> nn.Module:
    if weights is not None:
        model.load_state_dict(load_weights_state_dict(weights))
        if eps_zero:  # torchvision's v1 COCO weights were trained with FrozenBatchNorm eps = 0
            overwrite_eps(model, 0.0)
    return model


def retinanet_resnet50_fpn(num_classes: int | None = None, weights: str | None = None,
                           backbone_weights: str | None = None, trainable_backbone_layers: int | None = None,
                           **detector_options) -> RetinaNet:
    """Torchvision's ``retinanet_resnet50_fpn`` (36.4 COCO AP with ``weights="COCO_V1"``)."""
    backbone, weights, num_classes, names = _resnet50_fpn(
        "retinanet_resnet50_fpn", tv_retinanet.RetinaNet, detector_options, num_classes, weights, backbone_weights,
        trainable_backbone_layers, p6p7_in=256)
    model = RetinaNet(backbone, num_classes, class_names=names, **detector_options)
    return _finish(model, weights, eps_zero=weights is not None and weights.name == "COCO_V1")


def retinanet_resnet50_fpn_v2(num_classes: int | None = None, weights: str | None = None,
                              backbone_weights: str | None = None, trainable_backbone_layers: int | None = None,
                              **detector_options) -> RetinaNet:
    """Torchvision's ``retinanet_resnet50_fpn_v2``: GroupNorm head, GIoU loss, P6 from C5 (41.5 AP)."""
    backbone, weights, num_classes, names = _resnet50_fpn(
        "retinanet_resnet50_fpn_v2", tv_retinanet.RetinaNet, detector_options, num_classes, weights, backbone_weights,
        trainable_backbone_layers, frozen_bn=False, p6p7_in=2048)
    anchor_generator = tv_retinanet._default_anchorgen()
    head = tv_retinanet.RetinaNetHead(256, anchor_generator.num_anchors_per_location()[0], num_classes,
                                      norm_layer=partial(nn.GroupNorm, 32))
    model = RetinaNet(backbone, num_classes, anchor_generator=anchor_generator, head=head, box_loss="giou",
                      class_names=names, **detector_options)
    return _finish(model, weights)


def fcos_resnet50_fpn(num_classes: int | None = None, weights: str | None = None,
                      backbone_weights: str | None = None, trainable_backbone_layers: int | None = None,
                      **detector_options) -> FCOS:
    """Torchvision's ``fcos_resnet50_fpn`` (39.2 COCO AP with ``weights="COCO_V1"``)."""
    backbone, weights, num_classes, names = _resnet50_fpn(
        "fcos_resnet50_fpn", tv_fcos.FCOS, detector_options, num_classes, weights, backbone_weights,
        trainable_backbone_layers, p6p7_in=256)
    return _finish(FCOS(backbone, num_classes, class_names=names, **detector_options), weights)


def fasterrcnn_resnet50_fpn(num_classes: int | None = None, weights: str | None = None,
                            backbone_weights: str | None = None, trainable_backbone_layers: int | None = None,
                            torchvision_labels: bool = True, **detector_options) -> FasterRCNN:
    """Torchvision's ``fasterrcnn_resnet50_fpn`` (37.0 COCO AP with ``weights="COCO_V1"``).

    ``torchvision_labels=True`` (default) keeps torchvision's layout: ``num_classes`` counts the
    background column 0 and labels start at 1; ``False`` adds a background column instead.
    """
    backbone, weights, num_classes, names = _resnet50_fpn(
        "fasterrcnn_resnet50_fpn", tv_faster_rcnn.FasterRCNN, detector_options, num_classes, weights, backbone_weights,
        trainable_backbone_layers)
    model = FasterRCNN(backbone, num_classes, torchvision_labels=torchvision_labels, class_names=names, **detector_options)
    return _finish(model, weights, eps_zero=weights is not None and weights.name == "COCO_V1")


def fasterrcnn_resnet50_fpn_v2(num_classes: int | None = None, weights: str | None = None,
                               backbone_weights: str | None = None, trainable_backbone_layers: int | None = None,
                               torchvision_labels: bool = True, **detector_options) -> FasterRCNN:
    """Torchvision's ``fasterrcnn_resnet50_fpn_v2``: 2-conv RPN head, 4-conv + FC box head (46.7 AP)."""
    backbone, weights, num_classes, names = _resnet50_fpn(
        "fasterrcnn_resnet50_fpn_v2", tv_faster_rcnn.FasterRCNN, detector_options, num_classes, weights,
        backbone_weights, trainable_backbone_layers, frozen_bn=False, norm_layer=nn.BatchNorm2d)
    anchor_generator = tv_faster_rcnn._default_anchorgen()
    rpn_head = RPNHead(256, anchor_generator.num_anchors_per_location()[0], conv_depth=2)
    box_head = tv_faster_rcnn.FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)
    model = FasterRCNN(backbone, num_classes, torchvision_labels=torchvision_labels, class_names=names,
                       rpn_anchor_generator=anchor_generator, rpn_head=rpn_head, box_head=box_head, **detector_options)
    return _finish(model, weights)


def _fasterrcnn_mobilenet(name: str, num_classes, weights, backbone_weights, trainable_backbone_layers,
                          torchvision_labels, defaults: dict, detector_options: dict) -> FasterRCNN:
    _check_options(name, detector_options, tv_faster_rcnn.FasterRCNN)
    weights, bb_weights, num_classes, names = _coco_setup(
        name, weights, "mobilenet_v3_large", backbone_weights, num_classes)
    trained = weights is not None or bb_weights is not None
    layers = _validate_trainable_layers(trained, trainable_backbone_layers, 6, 3)
    body = mobilenet_v3_large(weights=None, norm_layer=FrozenBatchNorm2d if trained else nn.BatchNorm2d)
    if bb_weights is not None:
        body.load_state_dict(load_weights_state_dict(bb_weights))
    backbone = _mobilenet_extractor(body, True, layers)
    anchor_sizes = ((32, 64, 128, 256, 512),) * 3
    anchor_generator = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    model = FasterRCNN(backbone, num_classes, torchvision_labels=torchvision_labels, class_names=names,
                       rpn_anchor_generator=anchor_generator, **{**defaults, **detector_options})
    return _finish(model, weights)


def fasterrcnn_mobilenet_v3_large_fpn(num_classes: int | None = None, weights: str | None = None,
                                      backbone_weights: str | None = None,
                                      trainable_backbone_layers: int | None = None,
                                      torchvision_labels: bool = True, **detector_options) -> FasterRCNN:
    """Torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` (32.8 COCO AP with ``weights="COCO_V1"``)."""
    return _fasterrcnn_mobilenet("fasterrcnn_mobilenet_v3_large_fpn", num_classes, weights, backbone_weights,
                                 trainable_backbone_layers, torchvision_labels, {"rpn_score_thresh": 0.05},
                                 detector_options)


def fasterrcnn_mobilenet_v3_large_320_fpn(num_classes: int | None = None, weights: str | None = None,
                                          backbone_weights: str | None = None,
                                          trainable_backbone_layers: int | None = None,
                                          torchvision_labels: bool = True, **detector_options) -> FasterRCNN:
    """Torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn`` (22.8 COCO AP, 320-pixel inputs)."""
    defaults = {"min_size": 320, "max_size": 640, "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 150,
                "rpn_score_thresh": 0.05}
    return _fasterrcnn_mobilenet("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes, weights, backbone_weights,
                                 trainable_backbone_layers, torchvision_labels, defaults, detector_options)


TORCHVISION_BUILDERS = {
    "retinanet_resnet50_fpn": retinanet_resnet50_fpn,
    "retinanet_resnet50_fpn_v2": retinanet_resnet50_fpn_v2,
    "fcos_resnet50_fpn": fcos_resnet50_fpn,
    "fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": fasterrcnn_mobilenet_v3_large_320_fpn,
}
"""Torchvision's builder name -> kdlab builder ``(num_classes, **options)`` (``build_detector`` dispatches to these)."""
