"""What the zoo detectors expose: documented shapes, hand-checked assignments, input errors."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from kdlab.models.faster_rcnn import FasterRCNN
from kdlab.models.fcos import FCOS
from kdlab.models.retinanet import RetinaNet
from kdlab.models.fpn_backbones import build_fpn_backbone

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cls, levels="p3p7", **options):
    torch.manual_seed(0)
    backbone = build_fpn_backbone("resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=32, levels=levels)
    return cls(backbone, NUM_CLASSES, **options)


def batch():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    sizes = [(64, 96), (60, 80)]
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 10.0, 90.0, 60.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, sizes, targets


def test_retinanet_output_shapes_and_assignment():
    model = tiny(RetinaNet)
    images, sizes, targets = batch()
    out = model(images, sizes, targets)
    grid = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]  # P3..P7 of a 64 x 96 batch
    num_per_level = [h * w * 9 for h, w in grid]
    n = sum(num_per_level)
    assert out.num_per_level == num_per_level
    assert [tuple(f.shape) for f in out.features] == [(2, 32, h, w) for h, w in grid]
    assert out.cls_logits.shape == (2, n, NUM_CLASSES) and out.box_regression.shape == (2, n, 4)
    assert out.pred_boxes.shape == (2, n, 4) and out.anchors.shape == (n, 4) and out.points.shape == (n, 2)
    assert out.levels.tolist() == sum(([lvl] * k for lvl, k in enumerate(num_per_level)), [])
    assert out.strides.unique().tolist() == [8, 16, 32, 64, 128]
    assert out.box_logits is None and out.centerness is None
    # slot order: level, then y, x, then the 9 anchors of a location; P3 location (y=1, x=2) is at (16, 8)
    assert out.points[(1 * 12 + 2) * 9 : (1 * 12 + 2) * 9 + 9].tolist() == [[16.0, 8.0]] * 9
    # decoded boxes invert torchvision's box coder
    deltas = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(out.pred_boxes[0], out.anchors)
    torch.testing.assert_close(deltas, out.box_regression[0], atol=1e-4, rtol=1e-4)

    a = out.assignment
    iou = box_iou(targets[0]["boxes"], out.anchors)  # [2, n]
    best_iou, best_gt = iou.max(dim=0)
    is_best_anchor = (iou == iou.max(dim=1, keepdim=True).values).any(dim=0)
    expected_pos = (best_iou >= 0.5) | is_best_anchor
    assert torch.equal(a.pos_mask[0], expected_pos) and expected_pos.sum() > 0
    assert torch.equal(a.ignore_mask[0], ~expected_pos & (best_iou >= 0.4))
    assert torch.equal(a.matched_gt[0][expected_pos], best_gt[expected_pos])
    assert torch.equal(a.labels[0][expected_pos], targets[0]["labels"][best_gt[expected_pos]])
    assert (a.labels[0][~expected_pos] == NUM_CLASSES).all() and (a.matched_gt[0][~expected_pos] == -1).all()
    torch.testing.assert_close(a.ious[0], torch.where(expected_pos, best_iou, 0.0))
    assert not a.pos_mask[1].any() and not a.ignore_mask[1].any()  # the empty image is all background


def test_retinanet_anchor_equal_to_a_box_is_positive_with_iou_one():
    model = tiny(RetinaNet)
    images, sizes, _ = batch()
    anchors = model(images, sizes).anchors
    k = 1000
    target = [{"boxes": anchors[k : k + 1].clone(), "labels": torch.tensor([2])}] * 2
    a = model(images, sizes, target).assignment
    assert a.pos_mask[0, k] and a.labels[0, k] == 2 and a.ious[0, k] == 1.0


def test_fcos_center_sampling_by_hand():
    """GT (8, 8, 40, 40): centre (24, 24), radius 1.5 strides. On P3 (stride 8) the locations
    x, y in {16, 24, 32} are within 12 px of the centre and inside the box, and their largest
    edge distance (<= 24) is below P3's upper bound 64. On P4 (stride 16) the candidates
    x, y in {16, 32} fail P4's lower bound (max distance 24 <= 4 * 16). So 9 positives."""
    model = tiny(FCOS)
    images, sizes, _ = batch()
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([3])}] * 2
    out = model(images, sizes, targets)
    pos = out.assignment.pos_mask[0]
    expected = {(x, y) for x in (16.0, 24.0, 32.0) for y in (16.0, 24.0, 32.0)}
    assert {tuple(p) for p in out.points[pos].tolist()} == expected
    assert (out.levels[pos] == 0).all() and (out.assignment.labels[0][pos] == 3).all()
    n = out.points.shape[0]
    assert n == sum(out.num_per_level) == 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1
    assert out.anchors is None and out.extras["anchor_boxes"].shape == (n, 4)
    assert out.centerness.shape == (2, n)
    # FCOS boxes: (x - l s, y - t s, x + r s, y + b s)
    s = out.strides[:, None]
    ltrb = out.box_regression[0]
    manual = torch.cat([out.points - ltrb[:, :2] * s, out.points + ltrb[:, 2:] * s], dim=1)
    torch.testing.assert_close(out.pred_boxes[0], manual)


def test_faster_rcnn_output_shapes_and_sampling():
    model = tiny(FasterRCNN, levels="p2p6", rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
                 box_batch_size_per_image=512).train()
    images, sizes, targets = batch()
    out = model(images, sizes, targets)
    grid = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]  # P2..P5 and pool
    num_anchors = [h * w * 3 for h, w in grid]
    a_total = sum(num_anchors)
    assert out.num_anchors_per_level == num_anchors and out.feature_names == ["0", "1", "2", "3", "pool"]
    assert out.rpn_objectness.shape == (2, a_total) and out.rpn_deltas.shape == (2, a_total, 4)
    assert out.anchors.shape == (a_total, 4) and out.anchor_levels.shape == (a_total,)
    assert all(p.shape[1] == 4 and len(p) <= 150 for p in out.proposals)
    r = sum(out.rois_per_image)
    assert out.roi_features.shape == (r, 32, 7, 7) and out.box_features.shape == (r, 1024)
    assert out.class_logits.shape == (r, NUM_CLASSES + 1) and out.box_deltas.shape == (r, 4 * (NUM_CLASSES + 1))
    # 512 RoIs per image exceed proposals + GT: every one is sampled (fewer than 128 foreground)
    assert out.rois_per_image == [len(out.proposals[0]) + 2, len(out.proposals[1])]

    rpn = out.rpn_assignment
    assert (rpn.objectness_targets[rpn.sampled_pos] == 1).all() and (rpn.objectness_targets[rpn.sampled_neg] == 0).all()
    assert not (rpn.sampled_pos & rpn.sampled_neg).any()
    assert ((rpn.sampled_pos | rpn.sampled_neg).sum(dim=1) == 256).all()
    assert (rpn.sampled_pos.sum(dim=1) <= 128).all() and not rpn.sampled_pos[1].any()
    roi = out.roi_assignment
    assert roi.labels.shape == roi.matched_gt.shape == (r,) and roi.regression_targets.shape == (r, 4)
    # every GT box is appended to its image's proposals, with its label
    rois_0 = out.rois[0]
    labels_0 = roi.labels[: len(rois_0)]
    for box, label in zip(targets[0]["boxes"], targets[0]["labels"]):
        rows = (rois_0 == box).all(dim=1)
        assert rows.any() and (labels_0[rows] == label).all()
    assert (roi.labels[len(rois_0):] == NUM_CLASSES).all()  # the empty image: background only
    assert (roi.matched_gt[roi.labels == NUM_CLASSES] == -1).all()


def test_outputs_detach_and_losses_need_targets():
    images, sizes, targets = batch()
    for cls, levels in ((RetinaNet, "p3p7"), (FCOS, "p3p7"), (FasterRCNN, "p2p6")):
        model = tiny(cls, levels=levels).train()
        out = model(images, sizes, targets)
        detached = out.detach()
        assert all(not f.requires_grad for f in detached.features)
        with pytest.raises(ValueError, match="targets"):
            model.build_criterion()(model(images, sizes), targets)
    with pytest.raises(ValueError, match="without targets"):
        model.eval().postprocess(model(images, sizes, targets))


@pytest.mark.parametrize("cls,levels", [(RetinaNet, "p3p7"), (FCOS, "p3p7"), (FasterRCNN, "p2p6")])
def test_restrict_classes_keeps_the_chosen_columns(cls, levels):
    model = tiny(cls, levels=levels).eval()
    model.class_names = ["a", "b", "c", "d"]
    images, sizes, _ = batch()
    with torch.no_grad():
        before = model(images, sizes)
        model.restrict_classes_([2, 0])
        after = model(images, sizes)
    assert model.num_classes == 2 and model.class_names == ["c", "a"]
    if cls is FasterRCNN:
        torch.testing.assert_close(after.class_logits, before.class_logits[:, [0, 3, 1]])
        kept_deltas = before.box_deltas.view(-1, 5, 4)[:, [0, 3, 1]].flatten(1)
        torch.testing.assert_close(after.box_deltas, kept_deltas)
    else:
        torch.testing.assert_close(after.cls_logits, before.cls_logits[..., [2, 0]])
    with pytest.raises(ValueError, match="columns"):
        model.restrict_classes_([5])


def test_torchvision_label_space_faster_rcnn():
    model = tiny(FasterRCNN, levels="p2p6", torchvision_labels=True).train()
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES
    images, sizes, targets = batch()
    with pytest.raises(ValueError, match=r"must lie in \[1, 4\)"):  # label 0 is the background column
        model(images, sizes, [{"boxes": targets[0]["boxes"], "labels": torch.tensor([0, 3])}, targets[1]])
    out = model(images, sizes, targets)
    assert set(out.roi_assignment.labels.unique().tolist()) <= {1, 3, NUM_CLASSES}
    model.restrict_classes_([2, 1])
    assert model.label_offset == 1 and model.roi_heads.box_predictor.cls_score.out_features == 3


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda i, s, t: (i[0], s, t), r"\[B, 3, H, W\]"),
        (lambda i, s, t: (i, s[:1], t), "image_sizes"),
        (lambda i, s, t: (i, [(70, 96), (60, 80)], t), r"image_sizes\[0\] = \(70, 96\)"),
        (lambda i, s, t: (i, s, [dict(t[0], labels=torch.tensor([1, 4])), t[1]]), r'targets\[0\]\["labels"\]'),
        (lambda i, s, t: (i, s, [t[0], {"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([0])}]),
         r'targets\[1\]\["boxes"\]\[0\] = \[5.0, 5.0, 5.0, 9.0\] has no area'),
        (lambda i, s, t: (i, s, [{"boxes": t[0]["boxes"]}, t[1]]), r'targets\[0\] has no "labels"'),
    ],
)
def test_bad_input_gets_a_clear_error(change, message):
    model = tiny(RetinaNet)
    with pytest.raises((ValueError, KeyError), match=message):
        model(*change(*batch()))


@pytest.mark.parametrize("cls,levels", [(RetinaNet, "p3p7"), (FCOS, "p3p7"), (FasterRCNN, "p2p6")])
def test_head_outputs_are_float32_under_bf16_autocast(cls, levels):
    """bf16 resolves ~8 px at 1000 px: boxes are decoded and losses computed in float32."""
    model = tiny(cls, levels=levels).train()
    images, sizes, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, sizes, targets)
        terms = model.build_criterion()(out, targets)
    if cls is FasterRCNN:
        assert out.features[0].dtype == torch.bfloat16  # autocast is really on
        assert out.rpn_deltas.dtype == out.class_logits.dtype == out.proposals[0].dtype == torch.float32
    else:
        assert out.features[0].dtype == torch.bfloat16
        assert out.cls_logits.dtype == out.box_regression.dtype == out.pred_boxes.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
