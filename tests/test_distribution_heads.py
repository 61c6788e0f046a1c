"""Distribution-head RetinaNet/FCOS (GFL-style box branch for LD) and a training sanity check."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.models.base import DetectionTask
from kdlab.losses.gfl import integral
from kdlab.models.base import weighted_total
from kdlab.models.distribution_heads import DistributionFCOS, DistributionRetinaNet, dfl_per_positive
from kdlab.models.outputs import DenseAssignment, DenseOutput
from kdlab.models import DETECTORS

REG_MAX = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, **options):
    torch.manual_seed(0)
    defaults = dict(backbone="resnet18", backbone_width=8, fpn_channels=16, head_convs=1)
    return DETECTORS[name](3, **{**defaults, **options})


def batch():
    torch.manual_seed(0)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 44.0], [30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[2.0, 30.0, 20.0, 62.0]]), "labels": torch.tensor([1])}]
    for t in targets:
        t["size"] = torch.tensor([64, 64])
    return torch.randn(2, 3, 64, 64), [(64, 64), (64, 64)], targets


@pytest.mark.parametrize("name,cls", [("retinanet", DistributionRetinaNet), ("fcos", DistributionFCOS)])
def test_distribution_heads_expose_edge_distributions(name, cls):
    model = tiny(name, reg_max=REG_MAX)
    assert isinstance(model, cls)
    images, sizes, targets = batch()
    out = model(images, sizes, targets)
    n = out.points.shape[0]
    assert out.box_logits.shape == (2, n, 4 * (REG_MAX + 1))
    torch.testing.assert_close(out.box_regression, integral(out.box_logits, REG_MAX))
    ltrb = out.box_regression * out.strides[None, :, None]
    torch.testing.assert_close(out.pred_boxes, torch.cat([out.points - ltrb[..., :2], out.points + ltrb[..., 2:]], -1))
    terms = model.build_criterion()(out, targets)
    assert "bbox_dfl" in terms and model.build_criterion().weight_dict["bbox_dfl"] == 0.25
    weighted_total(terms, model.build_criterion().weight_dict).backward()
    assert model.head.regression_head.bbox_dist.weight.grad.abs().sum() > 0


def test_student_and_teacher_slots_correspond_for_ld():
    student = tiny("retinanet", reg_max=REG_MAX)
    teacher = tiny("retinanet", reg_max=REG_MAX, backbone="resnet34", backbone_width=16, fpn_channels=32)
    images, sizes, _ = batch()
    s_out, t_out = student(images, sizes), teacher(images, sizes)
    assert s_out.box_logits.shape == t_out.box_logits.shape
    assert torch.equal(s_out.points, t_out.points) and torch.equal(s_out.strides, t_out.strides)


def test_dfl_by_hand():
    """Edge logits (0, ln 2, 0, 0, 0): softmax (1, 2, 1, 1, 1) / 6. A target distance of 1.25 strides
    splits 0.75 / 0.25 over bins 1 and 2: DFL = 0.75 ln 3 + 0.25 ln 6, the same for the four edges."""
    edge = torch.tensor([0.0, math.log(2.0), 0.0, 0.0, 0.0])
    stride = 8.0
    point = torch.tensor([[100.0, 100.0]])
    gt = torch.tensor([[100.0 - 1.25 * stride, 100.0 - 1.25 * stride, 100.0 + 1.25 * stride, 100.0 + 1.25 * stride]])
    output = DenseOutput(
        features=[], cls_logits=torch.zeros(1, 1, 1), box_regression=torch.zeros(1, 1, 4), pred_boxes=gt[None],
        points=point, anchors=None, strides=torch.tensor([stride]), levels=torch.zeros(1, dtype=torch.int64),
        num_per_level=[1], image_sizes=[(200, 200)], box_logits=edge.repeat(4)[None, None],
        assignment=DenseAssignment(labels=torch.zeros(1, 1, dtype=torch.int64), matched_gt=torch.zeros(1, 1, dtype=torch.int64),
                                   pos_mask=torch.ones(1, 1, dtype=torch.bool), gt_boxes=[gt], gt_labels=[torch.tensor([0])]),
    )
    expected = 0.75 * math.log(3.0) + 0.25 * math.log(6.0)
    torch.testing.assert_close(dfl_per_positive(output, REG_MAX), torch.tensor([expected]))


def test_distribution_retinanet_rejects_delta_losses():
    with pytest.raises(ValueError, match="IoU loss"):
        tiny("retinanet", reg_max=REG_MAX, box_loss="l1")


@pytest.mark.parametrize("name,options", [("retinanet", {}), ("fcos", {}), ("faster_rcnn", {"representation_size": 64}),
                                          ("retinanet", {"reg_max": REG_MAX}), ("fcos", {"reg_max": REG_MAX})])
def test_a_few_steps_on_one_batch_lower_the_loss(name, options):
    if name == "faster_rcnn":
        model = DETECTORS[name](3, backbone="resnet18", backbone_width=8, fpn_channels=16, anchor_scale=4.0, **options)
    else:
        model = tiny(name, **options)
    task = DetectionTask(model).train()
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.01, momentum=0.9)
    images, _, targets = batch()
    losses = []
    for step in range(10):
        torch.manual_seed(step)  # Faster R-CNN samples anchors and RoIs
        total = weighted_total(task(images, targets), task.weight_dict)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < 0.9 * losses[0], losses
