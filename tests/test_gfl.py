"""GFL: distribution maths, QFL/DFL by hand, ATSS on a hand-built layout, the detector's outputs."""

import math

import pytest
import torch

from kdlab.losses.gfl import distance_to_distribution, distribution_focal_loss, integral, quality_focal_loss
from kdlab.models import build_detector
from kdlab.models.atss import atss_assign
from torchvision.ops import distance_box_iou

from kdlab.models.box_ops import aligned_box_iou, bbox2distance, distance2bbox, points_in_boxes


def test_integral_is_the_expectation():
    # reg_max = 2: probabilities (0.25, 0.5, 0.25) -> expectation 1.0
    logits = torch.log(torch.tensor([0.25, 0.5, 0.25]))
    assert integral(logits, reg_max=2).item() == pytest.approx(1.0)
    # four edges at once: [..., 4 * (n + 1)] -> [..., 4]
    four = torch.log(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0]])).reshape(1, 12)
    assert torch.allclose(integral(four, reg_max=2), torch.tensor([[0.0, 1.0, 2.0, 0.5]]))


def test_integral_inverse_round_trip():
    reg_max = 16
    distances = torch.tensor([0.0, 0.3, 1.0, 7.25, 15.99])
    probs = distance_to_distribution(distances, reg_max)
    assert torch.allclose(probs.sum(-1), torch.ones(5))
    assert (probs > 0).sum(-1).le(2).all()  # two bins at most
    assert probs[3, 7].item() == pytest.approx(0.75) and probs[3, 8].item() == pytest.approx(0.25)
    assert torch.allclose(integral(probs.log(), reg_max), distances, atol=1e-5)
    with pytest.raises(ValueError, match="reg_max"):
        distance_to_distribution(torch.tensor([16.0]), reg_max)


def test_integral_rejects_wrong_bin_count():
    with pytest.raises(ValueError, match="reg_max \\+ 1 = 17"):
        integral(torch.zeros(3, 10), reg_max=16)


def test_dfl_hand_computed():
    # uniform over 3 bins, target 0.5 -> -(0.5 log 1/3 + 0.5 log 1/3) = log 3
    loss = distribution_focal_loss(torch.zeros(1, 3), torch.tensor([0.5]))
    assert loss.item() == pytest.approx(math.log(3))
    # probs (0.25, 0.5, 0.25), target 1.25 -> -(0.75 log 0.5 + 0.25 log 0.25) = 1.25 log 2
    logits = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    assert distribution_focal_loss(logits, torch.tensor([1.25])).item() == pytest.approx(1.25 * math.log(2))
    # integer target: all weight on one bin -> plain cross-entropy
    assert distribution_focal_loss(logits, torch.tensor([1.0])).item() == pytest.approx(math.log(2))


def test_qfl_hand_computed():
    logits = torch.zeros(2, 2)  # sigma = 0.5 everywhere
    labels = torch.tensor([0, 2])  # location 0: class 0 positive; location 1: background (== C)
    quality = torch.tensor([0.8, 0.0])
    loss = quality_focal_loss(logits, labels, quality)
    ln2 = math.log(2)
    # positive class: BCE(0, 0.8) = ln 2, scaled by |0.8 - 0.5|^2; other class: ln 2 * 0.5^2
    assert loss[0].item() == pytest.approx(0.09 * ln2 + 0.25 * ln2)
    assert loss[1].item() == pytest.approx(0.5 * ln2)
    # a perfect positive prediction of its quality contributes no loss
    q = torch.tensor([0.7])
    perfect = torch.tensor([[math.log(0.7 / 0.3), -30.0]])
    assert quality_focal_loss(perfect, torch.tensor([0]), q).item() == pytest.approx(0.0, abs=1e-6)


def test_box_encoding_round_trip_and_ious():
    points = torch.tensor([[5.0, 5.0], [20.0, 8.0]])
    boxes = torch.tensor([[0.0, 1.0, 12.0, 9.0], [15.0, 0.0, 30.0, 10.0]])
    ltrb = bbox2distance(points, boxes)
    assert torch.equal(ltrb, torch.tensor([[5.0, 4.0, 7.0, 4.0], [5.0, 8.0, 10.0, 2.0]]))
    assert torch.equal(distance2bbox(points, ltrb), boxes)
    assert torch.allclose(bbox2distance(points, boxes, 4.99).max(), torch.tensor(4.99))
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10]])
    assert aligned_box_iou(a, b).item() == pytest.approx(50 / 150)
    # DIoU = IoU - d^2 / c^2: centres 5 apart, enclosing box 15 x 10 -> diagonal^2 = 325
    assert distance_box_iou(a, b).item() == pytest.approx(1 / 3 - 25 / 325)  # the DIoU LD's VLR uses


def test_points_in_boxes_is_strict_and_broadcasts():
    points = torch.tensor([[5.0, 5.0], [10.0, 5.0], [12.0, 5.0], [1.0, 9.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [9.0, 4.0, 13.0, 6.0]])
    inside = points_in_boxes(points, boxes)  # [N, K]
    assert inside.tolist() == [[True, False], [False, True], [False, True], [True, False]]  # x = 10 is on the edge
    batched = points_in_boxes(points[None], torch.stack([boxes, boxes.flip(0)]))  # [2, N, K]
    assert torch.equal(batched[0], inside) and torch.equal(batched[1], inside.flip(1))
    assert points_in_boxes(points, torch.zeros(0, 4)).shape == (4, 0)


def test_atss_hand_built():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1,   centre distance 0
        [2.0, 0.0, 12.0, 10.0],    # IoU 2/3, distance 2
        [5.0, 0.0, 15.0, 10.0],    # IoU 1/3, distance 5
        [20.0, 20.0, 30.0, 30.0],  # IoU 0,   far
        [-4.0, 0.0, 6.0, 10.0],    # IoU 3/7, distance 4
    ])
    result = atss_assign(anchors, [5], gt, topk=3)
    # the 3 closest: anchors 0, 1, 4
    assert sorted(result.candidate_idx[0].tolist()) == [0, 1, 4]
    ious = torch.tensor([1.0, 2 / 3, 3 / 7])
    mean = ious.mean()
    std = math.sqrt(sum((v - mean.item()) ** 2 for v in ious.tolist()) / 2)  # unbiased, as in ATSS
    assert result.iou_thr[0].item() == pytest.approx(mean.item() + std)  # 0.98544...
    assert result.iou_thr[0].item() == pytest.approx(0.98544, abs=1e-4)
    assert result.matched_gt.tolist() == [0, -1, -1, -1, -1]


def test_atss_two_levels_centre_rule_and_overlaps():
    # level 0: two small anchors; level 1: two large ones. topk=2 -> every anchor is a candidate.
    anchors = torch.tensor([
        [0.0, 0.0, 4.0, 4.0], [4.0, 0.0, 8.0, 4.0],
        [0.0, 0.0, 8.0, 8.0], [8.0, 8.0, 16.0, 16.0],
    ])
    gts = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 7.0]])
    result = atss_assign(anchors, [2, 2], gts, topk=2)
    assert result.candidate_idx.shape == (2, 4)
    # anchor 2 equals GT 0 (IoU 1) and overlaps GT 1 with IoU 56/64: it takes GT 0, the higher IoU
    assert result.matched_gt[2].item() == 0
    # anchor 3's centre (12, 12) is outside both GTs: never positive
    assert result.matched_gt[3].item() == -1
    empty = atss_assign(anchors, [2, 2], torch.zeros(0, 4))
    assert empty.matched_gt.tolist() == [-1] * 4


def _tiny_gfl(num_classes=3, **kw):
    torch.manual_seed(0)
    return build_detector("gfl", num_classes, backbone="resnet18", backbone_width=8, backbone_norm="gn",
                          fpn_channels=16, head_convs=1, **kw)


def _targets():
    return [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 50.0], [30.0, 30.0, 60.0, 60.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def test_gfl_output_shapes_and_assignment():
    model = _tiny_gfl()
    images = torch.randn(2, 3, 64, 96)
    out = model(images, [(64, 96), (60, 90)], _targets())
    n = 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1 * 1
    assert out.num_per_level == [96, 24, 6, 2, 1] and out.num_slots == n
    assert out.cls_logits.shape == (2, n, 3) and out.box_logits.shape == (2, n, 68)
    assert out.box_regression.shape == (2, n, 4) and out.pred_boxes.shape == (2, n, 4)
    assert out.points.shape == (n, 2) and out.anchors.shape == (n, 4)
    assert out.strides[:96].eq(8).all() and out.strides[-1] == 128 and out.levels[-1] == 4
    # first P3 location centre is (4, 4) and its anchor is 8 * 8 = 64 px wide
    assert out.points[0].tolist() == [4.0, 4.0] and out.anchors[0].tolist() == [-28.0, -28.0, 36.0, 36.0]
    # decoded boxes are the integral of the distributions times the stride
    assert torch.allclose(out.pred_boxes[0, 0], distance2bbox(out.points[0], out.box_regression[0, 0] * 8))
    a = out.assignment
    assert a.pos_mask[0].sum() > 0 and a.pos_mask[1].sum() == 0
    assert set(a.labels[0][a.pos_mask[0]].tolist()) <= {0, 2} and a.labels[1].eq(3).all()
    assert len(a.candidate_idx) == 2 and a.candidate_idx[0].shape == (2, 9 + 9 + 6 + 2 + 1)
    assert a.iou_thr[0].shape == (2,) and a.iou_thr[1].shape == (0,)


def test_gfl_criterion_normalisation_and_gradients():
    model = _tiny_gfl()
    criterion = model.build_criterion()
    assert criterion.weight_dict == {"loss_qfl": 1.0, "loss_giou": 2.0, "loss_dfl": 0.25}
    images = torch.randn(2, 3, 64, 64)
    targets = _targets()
    with torch.no_grad():  # confident scores: the summed location weights exceed the clamp at 1
        model.head.gfl_cls.bias.fill_(3.0)
    single = criterion(model(images[:1], [(64, 64)], targets[:1]), targets[:1])
    doubled = criterion(model(images[:1].repeat(2, 1, 1, 1), [(64, 64)] * 2, targets[:1] * 2), targets[:1] * 2)
    # losses are means over positives / location weights: duplicating the batch changes nothing
    for k in single:
        assert doubled[k].item() == pytest.approx(single[k].item(), rel=1e-5)
    total = sum(single.values())
    total.backward()
    # the reference code clamps the weight normaliser at 1: with the initial scores (~0.01) the box
    # losses are the plain weighted sums, so they double with a duplicated batch
    with torch.no_grad():
        model.head.gfl_cls.bias.fill_(-4.6)
    low = criterion(model(images[:1], [(64, 64)], targets[:1]), targets[:1])
    low2 = criterion(model(images[:1].repeat(2, 1, 1, 1), [(64, 64)] * 2, targets[:1] * 2), targets[:1] * 2)
    assert low2["loss_giou"].item() == pytest.approx(2 * low["loss_giou"].item(), rel=1e-5)
    assert model.head.gfl_reg.weight.grad.abs().sum() > 0 and model.backbone.body.conv1.weight.grad.abs().sum() > 0


def test_gfl_criterion_no_objects_only_background_qfl():
    model = _tiny_gfl()
    targets = _targets()[1:]
    out = model(torch.randn(1, 3, 64, 64), [(64, 64)], targets)
    losses = model.build_criterion()(out, targets)
    assert losses["loss_giou"].item() == 0 and losses["loss_dfl"].item() == 0
    sigma = out.cls_logits.sigmoid()
    expected = (torch.nn.functional.binary_cross_entropy_with_logits(out.cls_logits, torch.zeros_like(sigma), reduction="none") * sigma**2).sum()
    assert losses["loss_qfl"].item() == pytest.approx(expected.item(), rel=1e-5)  # divided by max(num_pos, 1) = 1


def test_gfl_postprocess_nms_and_threshold():
    model = _tiny_gfl(num_classes=2, score_thresh=0.3, nms_thresh=0.5)
    model.eval()
    out = model(torch.randn(1, 3, 64, 64), [(64, 64)])
    n = out.num_slots
    out.cls_logits = torch.full((1, n, 2), -10.0)
    out.pred_boxes = torch.zeros(1, n, 4) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    # two near-identical class-0 boxes (one suppressed), one class-1 box on top (kept: class-wise NMS)
    out.cls_logits[0, 0, 0], out.pred_boxes[0, 0] = 2.0, torch.tensor([10.0, 10.0, 30.0, 30.0])
    out.cls_logits[0, 1, 0], out.pred_boxes[0, 1] = 1.0, torch.tensor([11.0, 10.0, 31.0, 30.0])
    out.cls_logits[0, 2, 1], out.pred_boxes[0, 2] = 0.0, torch.tensor([10.0, 10.0, 30.0, 30.0])
    out.cls_logits[0, 3, 1], out.pred_boxes[0, 3] = -2.0, torch.tensor([40.0, 40.0, 80.0, 70.0])  # below threshold
    (det,) = model.postprocess(out)
    assert det["labels"].tolist() == [0, 1]
    assert torch.allclose(det["scores"], torch.sigmoid(torch.tensor([2.0, 0.0])))
    assert det["boxes"].tolist() == [[10.0, 10.0, 30.0, 30.0], [10.0, 10.0, 30.0, 30.0]]


def test_build_detector_errors():
    with pytest.raises(ValueError, match="unknown detector 'yolo'"):
        build_detector("yolo", 3)
    with pytest.raises(ValueError, match="does not take option\\(s\\) \\['fpn_width'\\]"):
        build_detector("gfl", 3, fpn_width=8)
    with pytest.raises(ValueError, match="backbone_weights='IMAGENET1K_V1' needs backbone_width=64"):
        build_detector("gfl", 3, backbone="resnet18", backbone_width=16, backbone_weights="IMAGENET1K_V1")


def test_backbone_weights_missing_offline_names_file(monkeypatch, tmp_path):
    import kdlab.models.weights as zoo_weights
    from kdlab.models.weights import WeightsUnavailableError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, destination, progress):
        raise OSError("no network")

    monkeypatch.setattr(zoo_weights, "_download", no_network)
    with pytest.raises(WeightsUnavailableError, match="resnet18-f37072fd.pth") as info:
        build_detector("gfl", 3, backbone="resnet18", backbone_weights="IMAGENET1K_V1")
    assert str(tmp_path) in str(info.value)


def _gfl_postprocess_by_hand(scores, boxes, num_per_level, image_sizes, score_thresh, pre_nms_topk, nms_thresh, keep_top):
    """mmdet's GFL test pipeline written out: per level top-k slots by max score, pairs above the threshold, NMS."""
    from torchvision.ops import batched_nms, clip_boxes_to_image

    results = []
    for b, (h, w) in enumerate(image_sizes):
        kept_boxes, kept_scores, kept_labels, start = [], [], [], 0
        for n_level in num_per_level:
            level_scores, level_boxes = scores[b, start:start + n_level], boxes[b, start:start + n_level]
            start += n_level
            if n_level > pre_nms_topk:
                top = level_scores.max(dim=1).values.topk(pre_nms_topk).indices
                level_scores, level_boxes = level_scores[top], level_boxes[top]
            slot, cls = (level_scores > score_thresh).nonzero(as_tuple=True)
            kept_boxes.append(level_boxes[slot]); kept_scores.append(level_scores[slot, cls]); kept_labels.append(cls)
        all_boxes = clip_boxes_to_image(torch.cat(kept_boxes), (h, w))
        all_scores, labels = torch.cat(kept_scores), torch.cat(kept_labels)
        keep = batched_nms(all_boxes, all_scores, labels, nms_thresh)[:keep_top]
        results.append({"boxes": all_boxes[keep], "scores": all_scores[keep], "labels": labels[keep]})
    return results


def test_gfl_postprocess_is_mmdets_pipeline():
    torch.manual_seed(0)
    model = build_detector("gfl", 3, backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=16,
                           head_convs=1, pre_nms_topk=20, score_thresh=0.02).eval()
    with torch.no_grad():
        model.head.gfl_cls.bias.fill_(-2.0)  # many scores above the threshold, so the per-level top-k matters
        out = model(torch.randn(2, 3, 96, 96), [(96, 96), (80, 96)])
    got = model.postprocess(out)
    expected = _gfl_postprocess_by_hand(out.cls_logits.sigmoid(), out.pred_boxes, out.num_per_level, out.image_sizes,
                                        0.02, 20, model.nms_thresh, model.detections_per_img)
    above = (out.cls_logits.sigmoid()[:, : out.num_per_level[0]].max(dim=2).values > 0.02).sum(dim=1)
    assert (above > 20).all()  # the per-level top-20 cut acts on P3
    for g, e in zip(got, expected):
        assert len(e["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], e[key]), key
