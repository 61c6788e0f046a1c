"""kdlab's RetinaNet, FCOS and Faster R-CNN equal torchvision's own models on identical inputs.

Each kdlab model is built small, then torchvision's class is built from a copy of the same
backbone and loads kdlab's ``state_dict``. Raw images go through torchvision's transform (inside
torchvision's model; via ``torchvision_preprocess`` for kdlab), so both see the same batch.
Checked: train-mode losses (and their gradients), eval-mode detections.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.detection import FCOS as TvFCOS
from torchvision.models.detection import FasterRCNN as TvFasterRCNN
from torchvision.models.detection import RetinaNet as TvRetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from kdlab.models.faster_rcnn import FasterRCNN
from kdlab.models.fcos import FCOS
from kdlab.models.retinanet import RetinaNet
from kdlab.models.fpn_backbones import build_fpn_backbone
from kdlab.models.common import predict_raw_images, torchvision_preprocess



pytestmark = pytest.mark.usefixtures("one_thread")


RAW_SIZE = dict(min_size=96, max_size=160)  # the second image is resized by torchvision's transform


def raw_batch(num_classes: int, first_label: int = 0):
    """Two raw images (0..1) of different sizes; the second has no object in one variant."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=generator), torch.rand(3, 80, 150, generator=generator)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 30.0, 120.0, 90.0], [0.0, 0.0, 128.0, 96.0]]),
         "labels": torch.tensor([first_label, first_label + 2, num_classes - 1])},
        {"boxes": torch.tensor([[5.0, 8.0, 30.0, 33.0]]), "labels": torch.tensor([first_label + 1])},
    ]
    return images, targets


def tiny_backbone(levels: str):
    torch.manual_seed(0)
    return build_fpn_backbone("resnet18", backbone_width=8, backbone_norm="bn", fpn_channels=32, levels=levels)


def perturb_(model: torch.nn.Module) -> None:
    """Random non-trivial head weights (the init's 0.01 std makes every score equal)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "head" in name and param.dim() == 4:
                param.normal_(0, 0.05)


def compare_train(kd_model, tv_model, images, targets, tv_targets, seed=None):
    kd_model.train()
    tv_model.train()
    tv_model.transform.eval()  # no random size draw: keep the RNG identical for the samplers
    batch, sizes, kd_targets = torchvision_preprocess(kd_model, images, copy.deepcopy(targets))
    if seed is not None:
        torch.manual_seed(seed)
    kd_terms = kd_model.build_criterion()(kd_model(batch, sizes, kd_targets), kd_targets)
    if seed is not None:
        torch.manual_seed(seed)
    tv_terms = tv_model(images, copy.deepcopy(tv_targets))
    assert kd_terms.keys() == tv_terms.keys()
    for name in tv_terms:
        torch.testing.assert_close(kd_terms[name], tv_terms[name], rtol=1e-5, atol=1e-6, msg=name)
        assert tv_terms[name] > 0, name  # the comparison is not vacuous
    sum(kd_terms.values()).backward()
    sum(tv_terms.values()).backward()
    tv_params = dict(tv_model.named_parameters())
    compared = 0
    for name, param in kd_model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, tv_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
            compared += 1
    assert compared > 10


def compare_eval(kd_model, tv_model, images, label_offset=0, min_detections=10):
    kd_model.eval()
    tv_model.eval()
    with torch.no_grad():
        kd_dets = predict_raw_images(kd_model, images)
        tv_dets = tv_model(images)
    for kd, tv in zip(kd_dets, tv_dets):
        assert len(tv["boxes"]) >= min_detections
        torch.testing.assert_close(kd["boxes"], tv["boxes"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(kd["scores"], tv["scores"], rtol=1e-5, atol=1e-6)
        assert torch.equal(kd["labels"] + label_offset, tv["labels"])


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_retinanet_equals_torchvision(variant: str):
    num_classes = 5
    backbone = tiny_backbone("p3p7")
    anchors = dict(sizes=tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (16, 32, 64, 128, 256)),
                   aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    norm = (lambda c: torch.nn.GroupNorm(8, c)) if variant == "v2" else None
    kd_model = RetinaNet(backbone, num_classes, box_loss="l1" if variant == "v1" else "giou",
                         anchor_generator=AnchorGenerator(**anchors),
                         head=RetinaNetHead(32, 9, num_classes, norm_layer=norm), score_thresh=0.0, **RAW_SIZE)
    perturb_(kd_model)
    tv_head = RetinaNetHead(32, 9, num_classes, norm_layer=norm)
    tv_head.regression_head._loss_type = kd_model.box_loss
    tv_model = TvRetinaNet(copy.deepcopy(backbone), num_classes, anchor_generator=AnchorGenerator(**anchors),
                           head=tv_head, score_thresh=0.0, **RAW_SIZE)
    tv_model.load_state_dict(kd_model.state_dict())
    images, targets = raw_batch(num_classes)
    compare_train(kd_model, tv_model, images, targets, targets)
    compare_eval(kd_model, tv_model, images)


def test_retinanet_equals_torchvision_with_an_empty_image():
    num_classes = 3
    kd_model = RetinaNet(tiny_backbone("p3p7"), num_classes, **RAW_SIZE)
    tv_model = TvRetinaNet(copy.deepcopy(kd_model.backbone), num_classes, **RAW_SIZE)
    tv_model.load_state_dict(kd_model.state_dict())
    images, targets = raw_batch(num_classes)
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    compare_train(kd_model, tv_model, images, targets, targets)


def test_fcos_equals_torchvision():
    num_classes = 5
    kd_model = FCOS(tiny_backbone("p3p7"), num_classes, score_thresh=0.0, **RAW_SIZE)
    perturb_(kd_model)
    tv_model = TvFCOS(copy.deepcopy(kd_model.backbone), num_classes, score_thresh=0.0, **RAW_SIZE)
    tv_model.load_state_dict(kd_model.state_dict())
    images, targets = raw_batch(num_classes)
    compare_train(kd_model, tv_model, images, targets, targets)
    compare_eval(kd_model, tv_model, images)


@pytest.mark.parametrize("torchvision_labels", [False, True])
def test_faster_rcnn_equals_torchvision(torchvision_labels: bool):
    num_classes = 5
    offset = 0 if torchvision_labels else 1
    options = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                   rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, box_score_thresh=0.0)
    anchors = lambda: AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)  # noqa: E731
    kd_model = FasterRCNN(tiny_backbone("p2p6"), num_classes, torchvision_labels=torchvision_labels,
                          rpn_anchor_generator=anchors(), **options, **RAW_SIZE)
    perturb_(kd_model)
    tv_model = TvFasterRCNN(copy.deepcopy(kd_model.backbone), num_classes + offset, rpn_anchor_generator=anchors(),
                            **options, **RAW_SIZE)
    tv_model.load_state_dict(kd_model.state_dict())
    images, targets = raw_batch(num_classes, first_label=1 - offset)
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + offset} for t in targets]
    compare_train(kd_model, tv_model, images, targets, tv_targets, seed=3)
    compare_eval(kd_model, tv_model, images, label_offset=offset)


def test_faster_rcnn_sampling_follows_the_seed():
    """Different seeds sample different RoIs (so the seeded equality above is not a coincidence)."""
    model = FasterRCNN(tiny_backbone("p2p6"), 3, box_batch_size_per_image=16, rpn_batch_size_per_image=32,
                       rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100).train()
    images, targets = raw_batch(3)
    batch, sizes, targets = torchvision_preprocess(model, images, targets)
    rois = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        rois.append(model(batch, sizes, targets).rois[0])
    assert torch.equal(rois[0], rois[1])
    assert not torch.equal(rois[0], rois[2])
