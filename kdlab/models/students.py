"""kdlab's configurable RetinaNet, FCOS and Faster R-CNN (``retinanet``, ``fcos``, ``faster_rcnn``): the students.

Same options as GFL's builder (``backbone``, ``backbone_width``, ``backbone_weights``,
``backbone_norm``, ``fpn_channels``, ``head_convs``, ``reg_max``) so that one YAML layout
configures every detector. Defaults are torchvision's detectors with a ResNet-50; the CPU
"quick" configurations shrink the ResNet width, the FPN and the heads.

Anchors scale with the stride: RetinaNet's are ``anchor_scale * stride * 2^(k/3)``,
``k = 0, 1, 2``, with aspect ratios 0.5, 1, 2 (torchvision: ``anchor_scale = 4``, i.e. 32 px
on P3); Faster R-CNN's RPN uses ``anchor_scale * stride`` (torchvision: 8, i.e. 32 px on P2).
"""

from __future__ import annotations

from torchvision.models.detection import fcos as tv_fcos
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from kdlab.models.distribution_heads import DistributionFCOS, DistributionRetinaNet
from kdlab.models.faster_rcnn import FasterRCNN
from kdlab.models.fcos import FCOS
from kdlab.models.fpn_backbones import LEVEL_LAYOUTS, build_fpn_backbone
from kdlab.models.layers import conv_tower, group_norm
from kdlab.models.retinanet import RetinaNet


def _backbone(levels, backbone, backbone_width, backbone_weights, backbone_norm, fpn_channels):
    if backbone_norm is None:  # pretrained backbones keep their statistics; from scratch, per-sample norm
        backbone_norm = "frozen_bn" if backbone_weights is not None else "gn"
    return build_fpn_backbone(backbone, backbone_width=backbone_width, backbone_norm=backbone_norm,
                              backbone_weights=backbone_weights, fpn_channels=fpn_channels, levels=levels)


def _dense(plain: type, distribution: type, body, num_classes: int, reg_max: int | None, head_convs: int,
           **options):
    """``plain(body, num_classes, **options)``, or with ``reg_max`` its distribution-head twin (GroupNorm towers)."""
    if reg_max is None:
        return plain(body, num_classes, **options)
    return distribution(body, num_classes, reg_max=reg_max, head_convs=head_convs, head_norm_layer=group_norm,
                        **options)


def retinanet(
    num_classes: int,
    backbone: str = "resnet50", backbone_width: int = 64, backbone_weights: str | None = None,
    backbone_norm: str | None = None, fpn_channels: int = 256, head_convs: int = 4, reg_max: int | None = None,
    anchor_scale: float = 4.0, box_loss: str = "giou",
    score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
) -> RetinaNet:
    """RetinaNet with torchvision's v2 head (GroupNorm towers, GIoU loss) on any backbone.

    Args:
        num_classes: number of classes ``C``.
        backbone: ``resnet18/34/50/101`` or ``mobilenet_v3_small/large``.
        backbone_width: ResNet base width (64 = torchvision's).
        backbone_weights: ImageNet weights name (e.g. ``"IMAGENET1K_V1"``) or ``None``.
        backbone_norm: ``"frozen_bn"``, ``"bn"`` or ``"gn"``; default ``"frozen_bn"`` with
            weights, ``"gn"`` without.
        fpn_channels: FPN and head width.
        head_convs: conv layers per head tower (4 in the paper).
        reg_max: ``None`` for torchvision's delta head; ``n`` for the distribution head
            (:class:`~kdlab.models.distribution_heads.DistributionRetinaNet`, ``4 (n + 1)`` logits).
        anchor_scale: anchor side / stride of the smallest of the 3 scales.
        box_loss: ``"giou"`` (v2) or ``"l1"`` (v1, delta head only).
        score_thresh, nms_thresh, detections_per_img: post-processing.
    """
    body = _backbone("p3p7", backbone, backbone_width, backbone_weights, backbone_norm, fpn_channels)
    strides = LEVEL_LAYOUTS["p3p7"]
    sizes = tuple(tuple(int(anchor_scale * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
    anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    num_anchors = anchor_generator.num_anchors_per_location()[0]
    head = tv_retinanet.RetinaNetHead(fpn_channels, num_anchors, num_classes, norm_layer=group_norm)
    head.classification_head.conv = conv_tower(fpn_channels, head_convs, group_norm, blocks=True)
    head.regression_head.conv = conv_tower(fpn_channels, head_convs, group_norm, blocks=True)
    return _dense(RetinaNet, DistributionRetinaNet, body, num_classes, reg_max, head_convs, strides=strides,
                  anchor_generator=anchor_generator, head=head, box_loss=box_loss, score_thresh=score_thresh,
                  nms_thresh=nms_thresh, detections_per_img=detections_per_img)


def fcos(
    num_classes: int,
    backbone: str = "resnet50", backbone_width: int = 64, backbone_weights: str | None = None,
    backbone_norm: str | None = None, fpn_channels: int = 256, head_convs: int = 4, reg_max: int | None = None,
    score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
) -> FCOS:
    """FCOS (torchvision's head: GroupNorm towers, centre-ness on the box tower) on any backbone.

    Args are those of :func:`retinanet`; ``reg_max`` gives
    :class:`~kdlab.models.distribution_heads.DistributionFCOS`. Post-processing: NMS 0.6 as torchvision,
    score threshold 0.05 as for COCO-style AP (torchvision's FCOS uses 0.2).
    """
    body = _backbone("p3p7", backbone, backbone_width, backbone_weights, backbone_norm, fpn_channels)
    head = tv_fcos.FCOSHead(fpn_channels, 1, num_classes, num_convs=0)  # towers replaced below (any width)
    head.classification_head = tv_fcos.FCOSClassificationHead(fpn_channels, 1, num_classes, head_convs,
                                                              norm_layer=group_norm)
    head.regression_head = tv_fcos.FCOSRegressionHead(fpn_channels, 1, head_convs, norm_layer=group_norm)
    return _dense(FCOS, DistributionFCOS, body, num_classes, reg_max, head_convs, strides=LEVEL_LAYOUTS["p3p7"],
                  head=head, score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img)


def faster_rcnn(
    num_classes: int,
    backbone: str = "resnet50", backbone_width: int = 64, backbone_weights: str | None = None,
    backbone_norm: str | None = None, fpn_channels: int = 256,
    representation_size: int | None = None, anchor_scale: float = 8.0,
    rpn_pre_nms_top_n_train: int = 1000, rpn_post_nms_top_n_train: int = 1000, rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 128, box_score_thresh: float = 0.05, box_detections_per_img: int = 100,
) -> FasterRCNN:
    """Faster R-CNN with FPN P2-P6 (torchvision's layout) on any backbone; kdlab labels ``0 .. C-1``.

    The sampling defaults suit the small CPU configurations (RoIAlign's backward dominates a
    CPU step); torchvision's full-size values are ``rpn_pre/post_nms_top_n_train=2000``,
    ``box_batch_size_per_image=512`` and ``representation_size=1024`` (or build
    ``fasterrcnn_resnet50_fpn`` with ``torchvision_labels=False``).

    Args:
        num_classes, backbone, backbone_width, backbone_weights, backbone_norm, fpn_channels:
            as :func:`retinanet`.
        representation_size: width of the box head's two FC layers (default ``4 * fpn_channels``,
            torchvision's 1024 for 256 channels).
        anchor_scale: RPN anchor side / stride (3 aspect ratios per location).
        rpn_pre_nms_top_n_train: proposals kept per level before NMS in training (1000 at test).
        rpn_post_nms_top_n_train / _test: proposals kept per image after NMS.
        box_batch_size_per_image: RoIs sampled per image for the box head's loss (a quarter foreground).
        box_score_thresh, box_detections_per_img: post-processing.
    """
    if representation_size is None:
        representation_size = 4 * fpn_channels
    body = _backbone("p2p6", backbone, backbone_width, backbone_weights, backbone_norm, fpn_channels)
    sizes = tuple((int(anchor_scale * s),) for s in LEVEL_LAYOUTS["p2p6"])
    anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    model = FasterRCNN(
        body, num_classes, rpn_anchor_generator=anchor_generator, box_roi_pool=roi_pool,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        box_batch_size_per_image=box_batch_size_per_image, box_score_thresh=box_score_thresh,
        box_detections_per_img=box_detections_per_img,
    )
    # torchvision sizes its default predictor for 1024 features; match the box head's width
    model.roi_heads.box_predictor = FastRCNNPredictor(representation_size, num_classes + model.label_offset)
    return model


STUDENT_BUILDERS = {"retinanet": retinanet, "fcos": fcos, "faster_rcnn": faster_rcnn}
"""kdlab's configurable detector families (``build_detector`` dispatches to these)."""
