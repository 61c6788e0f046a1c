"""GID (METHODS.md §2): general instance selection, the three losses, the response masks, the distiller.

Hand-built ``DenseOutput``s test the maths; small real detectors test the wiring (teacher frozen,
gradients, official variants, fewer than 3 GIs).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou, roi_align

from kdlab.data.transforms import image_sizes_of
from kdlab.distill.base import DistillationTask
from kdlab.distill.common import pool_fpn_boxes
from kdlab.distill.gid import GID, general_instance_kinds, response_mask, select_general_instances
from kdlab.distill.gism import GI_BACKGROUND, GI_POSITIVE, GI_SEMI, general_instance_scores, nms_first_k
from kdlab.losses.gid import (
    gi_feature_loss,
    gi_relation_loss,
    normalized_distances,
    response_cls_loss,
    response_reg_loss,
)
from kdlab.models.base import Criterion, Detector, weighted_total
from kdlab.models.box_ops import points_in_boxes
from kdlab.models.outputs import DenseOutput


# ----------------------------------------------------------------------------- helpers
def anchor_iou_mask(anchors, gi_boxes, iou_threshold=0.5):
    """Reference response mask of one image: some GI overlaps the anchor with IoU >= threshold."""
    return (box_iou(anchors, gi_boxes) >= iou_threshold).any(dim=1)


def center_in_box_mask(points, gi_boxes):
    """Reference response mask of one image: the location lies strictly inside some GI."""
    return points_in_boxes(points, gi_boxes).any(dim=1)


def dense_output(probs, pred_boxes, *, anchors=None, points=None, features=None, box_regression=None,
                 image_sizes=None, strides=(8,)) -> DenseOutput:
    """A hand-built ``DenseOutput`` with class probabilities ``probs`` ``[B, N, C]`` (stored as logits)."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    batch, num_slots, _ = probs.shape
    pred_boxes = torch.as_tensor(pred_boxes, dtype=torch.float32).expand(batch, num_slots, 4)
    if points is None:
        points = torch.zeros(num_slots, 2)
    if features is None:
        features = [torch.zeros(batch, 1, 4, 4) for _ in strides]
    return DenseOutput(
        features=features,
        cls_logits=torch.logit(probs).float(),
        box_regression=torch.zeros(batch, num_slots, 4) if box_regression is None else box_regression,
        pred_boxes=pred_boxes.clone(),
        points=points,
        anchors=anchors,
        strides=torch.full((num_slots,), float(strides[0])),
        levels=torch.zeros(num_slots, dtype=torch.int64),
        num_per_level=[num_slots],
        image_sizes=image_sizes or [(100, 100)] * batch,
    )


class _NoLoss(Criterion):
    weight_dict: dict = {}

    def forward(self, output, targets):
        return {}


class FakeDetector(Detector):
    """Just enough of a detector to build a GID around hand-built outputs."""

    def __init__(self, num_classes: int = 1):
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.zeros(1))

    def build_criterion(self):
        return _NoLoss()


def fake_gid(**options) -> GID:
    options.setdefault("student_channels", 1)
    options.setdefault("teacher_channels", 1)
    return GID(FakeDetector(), FakeDetector(), **options)


# GISM example (one class, one 100 x 100 image): slot -> (P_t, P_s, teacher box, student box)
BOX_A = [10.0, 10.0, 40.0, 40.0]
BOX_B = [12.0, 12.0, 42.0, 42.0]  # IoU(A, B) = 784 / 1016 = 0.77
BOX_C = [60.0, 10.0, 95.0, 45.0]
BOX_D = [70.0, 70.0, 130.0, 120.0]  # clipped to (70, 70, 100, 100)
BOX_E = [10.0, 60.0, 40.0, 90.0]
GISM_SLOTS = [
    (0.95, 0.05, BOX_A, [0.0, 0.0, 5.0, 5.0]),  # score 0.9, teacher's box
    (0.10, 0.90, [60.0, 60.0, 90.0, 90.0], BOX_B),  # 0.8, student's box, suppressed by A
    (0.80, 0.10, [50.0, 50.0, 55.0, 55.0], BOX_C),  # 0.7, teacher's 5 px box: too small
    (0.20, 0.80, BOX_A, BOX_C),  # 0.6, student's box
    (0.60, 0.10, BOX_D, BOX_E),  # 0.5, teacher's box, clipped
    (0.50, 0.45, BOX_E, BOX_A),  # 0.05, teacher's box
]


def gism_outputs():
    teacher = dense_output([[[s[0]] for s in GISM_SLOTS]], [[s[2] for s in GISM_SLOTS]])
    student = dense_output([[[s[1]] for s in GISM_SLOTS]], [[s[3] for s in GISM_SLOTS]])
    return teacher, student


# ----------------------------------------------------------------------------- GISM
def test_gi_scores_paper_and_official_by_hand():
    teacher = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.5, 0.5]])
    student = torch.tensor([[0.6, 0.7], [0.2, 0.3], [0.1, 0.4]])
    paper, higher = general_instance_scores(teacher, student, "paper")
    official, higher_official = general_instance_scores(teacher, student, "official")
    torch.testing.assert_close(paper, torch.tensor([0.6, 0.0, 0.4]))  # max_c |P_t - P_s|
    torch.testing.assert_close(official, torch.tensor([0.2, 0.0, 0.1]))  # |max P_t - max P_s|
    assert higher.tolist() == [True, False, True] == higher_official.tolist()  # a tie takes the student's box
    with pytest.raises(ValueError, match="variant"):
        general_instance_scores(teacher, student, "mmdet")


def test_gism_scores_box_choice_min_size_nms_topk():
    teacher, student = gism_outputs()
    gis = select_general_instances(teacher, student, k=10, nms_iou=0.3, min_size=10.0)
    assert gis.counts == [4]
    assert gis.slots[0].tolist() == [0, 3, 4, 5]  # 1: NMS (IoU 0.77 with slot 0), 2: 5 px side
    torch.testing.assert_close(gis.scores[0], torch.tensor([0.9, 0.6, 0.5, 0.05]), atol=1e-6, rtol=0)
    assert gis.from_teacher[0].tolist() == [True, False, True, True]
    expected = torch.tensor([BOX_A, BOX_C, [70.0, 70.0, 100.0, 100.0], BOX_E])
    torch.testing.assert_close(gis.boxes[0], expected)


@pytest.mark.parametrize(
    "options, slots",
    [
        (dict(k=2), [0, 3]),
        (dict(nms_iou=0.8), [0, 1, 3, 4, 5]),  # IoU(A, B) = 0.77 survives a 0.8 NMS
        (dict(pre_nms_topk=3), [0]),  # slots 0, 1, 2 only; 1 suppressed, 2 too small
        (dict(min_size=4.0), [0, 2, 3, 4, 5]),
    ],
)
def test_gism_knobs(options, slots):
    teacher, student = gism_outputs()
    gis = select_general_instances(teacher, student, **{"min_size": 10.0, **options})
    assert gis.slots[0].tolist() == slots


@pytest.mark.parametrize("k", [1, 10, 40, 1000])
def test_nms_first_k_equals_torchvision_nms(k):
    from torchvision.ops import nms

    generator = torch.Generator().manual_seed(k)
    xy = torch.rand(3000, 2, generator=generator) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(3000, 2, generator=generator) * 60], dim=1)
    scores = torch.rand(3000, generator=generator).sort(descending=True).values
    expected = nms(boxes, scores, 0.3)[:k]
    assert torch.equal(nms_first_k(boxes, scores, 0.3, k), expected)
    assert torch.equal(nms_first_k(boxes[:5], scores[:5], 0.3, k), nms(boxes[:5], scores[:5], 0.3)[:k])


def test_gism_official_variant_changes_the_ranking():
    # slot 0: classes swap (paper 0.8, official 0); slot 1: one class differs by 0.5 (both 0.5)
    teacher = dense_output([[[0.9, 0.1], [0.6, 0.01]]], [[BOX_A, BOX_C]])
    student = dense_output([[[0.1, 0.9], [0.1, 0.01]]], [[BOX_E, BOX_E]])
    paper = select_general_instances(teacher, student, min_size=0.0)
    official = select_general_instances(teacher, student, min_size=0.0, variant="official")
    assert paper.slots[0].tolist() == [0, 1] and official.slots[0].tolist() == [1, 0]
    torch.testing.assert_close(paper.scores[0], torch.tensor([0.8, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(official.scores[0], torch.tensor([0.5, 0.0]), atol=1e-6, rtol=0)
    # slot 0 ties at max 0.9: the student's box; slot 1: the teacher's
    assert official.from_teacher[0].tolist() == [True, False]
    torch.testing.assert_close(official.boxes[0], torch.tensor([BOX_C, BOX_E]))


def test_gism_official_minimum_side_drops_a_side_equal_to_min_size():
    # detectron2's Boxes.nonempty(threshold=10) keeps sides > 10; torchvision's remove_small_boxes sides >= 10
    exactly_ten = [10.0, 10.0, 20.0, 60.0]  # 10 wide
    clipped_to_ten = [90.0, 40.0, 130.0, 80.0]  # 10 wide once clipped to the 100 x 100 image
    teacher = dense_output([[[0.9], [0.8], [0.7]]], [[exactly_ten, clipped_to_ten, BOX_E]])
    student = dense_output([[[0.1], [0.1], [0.1]]], [[BOX_A, BOX_A, BOX_A]])
    kdlab_rule = select_general_instances(teacher, student, min_size=10.0)
    released = select_general_instances(teacher, student, min_size=10.0, strict_min_size=True)
    assert kdlab_rule.slots[0].tolist() == [0, 1, 2] and released.slots[0].tolist() == [2]
    # GID's official variant switches it on (and it can be set alone)
    gid = fake_gid(variant="official", feature_weight=0, relation_weight=0)
    assert gid.strict_min_size and not fake_gid().strict_min_size
    assert fake_gid(strict_min_size=True).gism_options["strict_min_size"] is True
    gid(student, teacher, [])
    assert gid.last_instances.slots[0].tolist() == [2]
    paper = fake_gid(feature_weight=0, relation_weight=0)
    paper(student, teacher, [])
    assert paper.last_instances.slots[0].tolist() == [0, 1, 2]


def test_gism_works_per_image():
    teacher, student = gism_outputs()
    # image 1: the same predictions on a 50 x 100 (h x w) image: D and E lie below y = 50 and vanish
    sizes = [(100, 100), (50, 100)]
    teacher2 = dense_output([[[s[0]] for s in GISM_SLOTS]] * 2, [[s[2] for s in GISM_SLOTS]], image_sizes=sizes)
    student2 = dense_output([[[s[1]] for s in GISM_SLOTS]] * 2, [[s[3] for s in GISM_SLOTS]], image_sizes=sizes)
    single = select_general_instances(teacher, student)
    batch = select_general_instances(teacher2, student2)
    assert batch.slots[0].tolist() == single.slots[0].tolist()
    torch.testing.assert_close(batch.boxes[0], single.boxes[0])
    assert batch.slots[1].tolist() == [0, 3]
    torch.testing.assert_close(batch.boxes[1], torch.tensor([BOX_A, BOX_C]))


def test_gism_rejects_mismatched_outputs():
    teacher, student = gism_outputs()
    short = dense_output([[[0.5]] * 5], [[BOX_A] * 5])
    with pytest.raises(ValueError, match="slot by slot"):
        select_general_instances(teacher, short)
    with pytest.raises(TypeError, match="DetectorOutput"):
        select_general_instances(object(), object())


def test_general_instance_kinds():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gis = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 40.0], [50.0, 50.0, 60.0, 60.0]])
    # IoU 1, 0.5, 0.25, 0
    assert general_instance_kinds(gis, gt).tolist() == [GI_POSITIVE, GI_SEMI, GI_BACKGROUND, GI_BACKGROUND]
    assert general_instance_kinds(gis, torch.zeros(0, 4)).tolist() == [GI_BACKGROUND] * 4


# ----------------------------------------------------------------------------- losses
def test_relation_loss_by_hand():
    # teacher points 0, 1, 3: distances 1, 3, 2, mean 2 -> psi 0.5, 1.5, 1
    # student points 0, 2, 3: distances 2, 3, 1, mean 2 -> psi 1, 1.5, 0.5
    # differences 0.5, 0, 0.5, each twice: smoothL1 = 0.125 each -> 4 * 0.125 / 6
    teacher = torch.tensor([[0.0], [1.0], [3.0]])
    student = torch.tensor([[0.0], [2.0], [3.0]])
    torch.testing.assert_close(normalized_distances(teacher), torch.tensor([[0, 0.5, 1.5], [0.5, 0, 1], [1.5, 1, 0]]))
    torch.testing.assert_close(gi_relation_loss(teacher, student), torch.tensor(0.5 / 6))


def test_relation_loss_zero_for_equal_features_and_scale_invariant():
    torch.manual_seed(0)
    teacher = torch.randn(6, 8, 10, 10)
    student = torch.randn(6, 4, 10, 10)  # different channel counts are fine: distances stay within a network
    assert gi_relation_loss(teacher, teacher.clone()) == 0
    loss = gi_relation_loss(teacher, student)
    assert loss > 0
    torch.testing.assert_close(gi_relation_loss(3.0 * teacher, 3.0 * student), loss)
    torch.testing.assert_close(gi_relation_loss(teacher, 0.01 * student), loss)
    torch.testing.assert_close(gi_relation_loss(teacher + 5.0, student), loss)  # translation too


def test_relation_loss_skipped_below_three_gis():
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = gi_relation_loss(torch.randn(2, 4, 3, 3), student)
    assert loss == 0
    loss.backward()  # still in the graph
    assert torch.equal(student.grad, torch.zeros_like(student))
    with pytest.raises(ValueError, match="as many"):
        gi_relation_loss(torch.randn(3, 2), torch.randn(4, 2))


def test_feature_loss_by_hand():
    teacher = torch.zeros(2, 3, 2, 2)
    student = torch.ones(2, 3, 2, 2)
    # sum over 2 GIs x 4 cells of ||1 - 0||^2 over 3 channels = 24; / (2 GIs * 4 cells)
    torch.testing.assert_close(gi_feature_loss(teacher, student), torch.tensor(3.0))
    torch.testing.assert_close(gi_feature_loss(teacher, student, num_instances=4.0), torch.tensor(1.5))
    assert gi_feature_loss(student, student.clone()) == 0
    assert gi_feature_loss(torch.zeros(0, 3, 2, 2), torch.zeros(0, 3, 2, 2)) == 0
    with pytest.raises(ValueError, match="adapter"):
        gi_feature_loss(torch.zeros(2, 3, 2, 2), torch.zeros(2, 4, 2, 2))


def test_response_losses_by_hand():
    zeros = torch.zeros(2, 3)
    # BCE(sigmoid(0), 0.5) = log 2 per class: 6 log 2 over 2 outputs
    torch.testing.assert_close(response_cls_loss(zeros, zeros), torch.tensor(3 * math.log(2)))
    student = torch.tensor([[2.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.5, 0.3]])
    expected = -(torch.sigmoid(teacher) * torch.log(torch.sigmoid(student)) + (1 - torch.sigmoid(teacher)) * torch.log(1 - torch.sigmoid(student))).sum()
    torch.testing.assert_close(response_cls_loss(student, teacher), expected)
    # zero gradient when the student equals the teacher
    at_teacher = teacher.clone().requires_grad_(True)
    response_cls_loss(at_teacher, teacher).backward()
    torch.testing.assert_close(at_teacher.grad, torch.zeros_like(teacher))
    deltas_s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    deltas_t = torch.tensor([[0.0, 2.0, 1.0, 4.0], [1.0, -1.0, 0.0, 0.5]])
    torch.testing.assert_close(response_reg_loss(deltas_s, deltas_t), torch.tensor((3.0 + 2.5) / 2))
    assert response_reg_loss(torch.zeros(0, 4), torch.zeros(0, 4)) == 0


# ----------------------------------------------------------------------------- masks
def test_anchor_iou_mask_toy_layout():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 20.0, 20.0], [50.0, 50.0, 60.0, 60.0]])
    gi = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # IoU 1, 0.5 (>= 0.5 counts), 0.25, 0
    assert anchor_iou_mask(anchors, gi, 0.5).tolist() == [True, True, False, False]
    assert anchor_iou_mask(anchors, gi, 0.7).tolist() == [True, False, False, False]  # the RPN's threshold
    assert anchor_iou_mask(anchors, torch.zeros(0, 4)).tolist() == [False] * 4


def test_center_in_box_mask_toy_layout():
    points = torch.tensor([[5.0, 5.0], [10.0, 5.0], [15.0, 15.0], [55.0, 52.0]])
    gis = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    assert center_in_box_mask(points, gis).tolist() == [True, False, False, True]  # on the edge is outside
    assert center_in_box_mask(points, torch.zeros(0, 4)).tolist() == [False] * 4


def test_each_detector_gets_its_own_mask_rule():
    retina_like = dense_output([[[0.5]]], [[BOX_A]], anchors=torch.tensor([BOX_A]))
    fcos_like = dense_output([[[0.5]]], [[BOX_A]])  # anchors None

    assert retina_like.response_rule == ("anchor_iou", 0.5)
    assert fcos_like.response_rule == ("center", 0.0)  # the RPN's ("anchor_iou", 0.7): test_gid_on_the_zoo_detectors
    points = torch.tensor([[25.0, 25.0], [80.0, 80.0]])
    anchors = torch.tensor([[11.0, 11.0, 41.0, 41.0], [20.0, 20.0, 30.0, 30.0]])
    mask = response_mask(anchors, points, [torch.tensor([BOX_A]), torch.zeros(0, 4)], "anchor_iou", 0.5)
    assert mask.tolist() == [[True, False], [False, False]]
    mask = response_mask(None, points, [torch.tensor([BOX_A]), torch.tensor([BOX_D])], "center", 0.0)
    assert mask.tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="needs anchors"):
        response_mask(None, points, [torch.tensor([BOX_A])], "anchor_iou", 0.5)


def test_official_response_mask_keeps_each_gis_best_anchors_below_the_threshold():
    # RetinaNet's matcher (allow_low_quality_matches=True) also matches each GI's best anchor(s), however low
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1/4 with GI 0 (tied best)
        [10.0, 10.0, 20.0, 20.0],  # IoU 1/4 with GI 0 (tied best)
        [15.0, 15.0, 25.0, 25.0],  # IoU 25/475 with GI 0
        [40.0, 40.0, 50.0, 50.0],  # IoU 100/120 with GI 1 (>= 0.5)
        [45.0, 40.0, 55.0, 50.0],  # IoU 50/170 = 0.29 with GI 1: below 0.5, not GI 1's best
        [70.0, 70.0, 80.0, 80.0],  # overlaps nothing
    ])
    gis = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 52.0, 50.0]]), torch.zeros(0, 4)]
    points = (anchors[:, :2] + anchors[:, 2:]) / 2
    paper = response_mask(anchors, points, gis, "anchor_iou", 0.5)
    official = response_mask(anchors, points, gis, "anchor_iou", 0.5, low_quality=True)
    assert paper.tolist() == [[False, False, False, True, False, False], [False] * 6]
    assert official.tolist() == [[True, True, False, True, False, False], [False] * 6]
    # the point rule has no low-quality matches
    assert torch.equal(response_mask(None, points, gis, "center", 0.0, low_quality=True),
                       response_mask(None, points, gis, "center", 0.0))


def test_low_quality_response_mask_equals_torchvisions_matcher():
    from torchvision.models.detection._utils import Matcher

    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)  # torchvision's RetinaNet
    rpn_matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)  # torchvision's RPN
    generator = torch.Generator().manual_seed(3)
    xy = (torch.rand(400, 2, generator=generator) * 25).round() * 4  # a coarse grid: many exact IoU ties
    anchors = torch.cat([xy, xy + 8 * torch.randint(1, 5, (400, 2), generator=generator)], dim=1).float()
    points = (anchors[:, :2] + anchors[:, 2:]) / 2
    gis = []
    for n in (10, 3, 1):
        corner = torch.rand(n, 2, generator=generator) * 90
        gis.append(torch.cat([corner, corner + 10 + torch.rand(n, 2, generator=generator) * 60], dim=1))
    gis.append(anchors[5:7] * 1.0)  # copies of anchors
    for threshold, reference in ((0.5, matcher), (0.7, rpn_matcher)):
        got = response_mask(anchors, points, gis, "anchor_iou", threshold, low_quality=True)
        for b, boxes in enumerate(gis):
            assert torch.equal(got[b], reference(box_iou(boxes, anchors)) >= 0), (threshold, b)
        assert (got & ~response_mask(anchors, points, gis, "anchor_iou", threshold)).any()  # some below threshold


def test_gid_official_response_mask_has_the_low_quality_matches():
    # one GI (slot 0's teacher box, 20 x 20): no anchor reaches IoU 0.5; anchors 0 and 1 tie for its best (1/4)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0], [15.0, 15.0, 25.0, 25.0],
                            [60.0, 60.0, 70.0, 70.0]])
    teacher_deltas = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    teacher = dense_output([[[0.9], [0.5], [0.5], [0.5]]], [[[0.0, 0.0, 20.0, 20.0]] + [BOX_C] * 3],
                           anchors=anchors, box_regression=teacher_deltas[None])
    student = dense_output([[[0.1], [0.5], [0.5], [0.5]]], [[BOX_E] * 4], anchors=anchors)
    options = dict(feature_weight=0, relation_weight=0, num_instances=1)
    paper = fake_gid(**options)
    paper_terms = paper(student, teacher, [])
    assert not paper.response_low_quality and not paper.last_response_mask.any()
    assert paper_terms["loss_gid_reg"].item() == 0.0
    official = fake_gid(variant="official", **options)
    terms = official(student, teacher, [])
    assert official.response_low_quality
    assert official.last_response_mask.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(terms["loss_gid_reg"], torch.tensor((1.0 + 3.0) / 2))  # L1 over the 2 masked slots
    switched_off = fake_gid(variant="official", response_low_quality=False, **options)
    switched_off(student, teacher, [])
    assert not switched_off.last_response_mask.any()


# ----------------------------------------------------------------------------- RoIAlign on the FPN level
def test_pool_fpn_boxes_uses_the_fpn_level_rule():
    strides = [8, 16, 32, 64, 128]
    size = 2048
    features = [torch.full((1, 1, size // s, size // s), float(level + 1)) for level, s in enumerate(strides)]
    # k = floor(4 + log2(sqrt(wh) / 224)), clamped to [3, 7]: side 50 -> 3, 223.9 -> 3, 224 -> 4, 448 -> 5, 1000 -> 6, 1800 -> 7
    sides = [50.0, 223.9, 224.0, 448.0, 1000.0, 1800.0]
    boxes = torch.tensor([[10.0, 10.0, 10.0 + s, 10.0 + s] for s in sides])
    pooled = pool_fpn_boxes(features, strides, [boxes], output_size=10, sampling_ratio=2)
    assert pooled.shape == (6, 1, 10, 10)
    assert pooled.mean(dim=(1, 2, 3)).tolist() == [1.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_pool_fpn_boxes_equals_aligned_roi_align_and_keeps_image_order():
    torch.manual_seed(0)
    features = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    boxes = [torch.tensor([[3.0, 4.0, 40.0, 50.0]]), torch.tensor([[10.0, 10.0, 100.0, 120.0], [0.0, 0.0, 30.0, 20.0]])]
    pooled = pool_fpn_boxes(features, [8, 16], boxes, output_size=10, sampling_ratio=2)
    # every box here maps to the finest level (sides < 224)
    rois = torch.tensor([[0, 3.0, 4.0, 40.0, 50.0], [1, 10.0, 10.0, 100.0, 120.0], [1, 0.0, 0.0, 30.0, 20.0]])
    torch.testing.assert_close(pooled, roi_align(features[0], rois, 10, 1 / 8, 2, aligned=True))
    assert pool_fpn_boxes(features, [8, 16], [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 3, 10, 10)
    with pytest.raises(ValueError, match="powers of two"):
        pool_fpn_boxes(features, [8, 24], boxes)


# ----------------------------------------------------------------------------- the distiller on hand-built outputs
def test_gid_response_terms_on_a_hand_built_output():
    # 3 anchors; the GI is slot 0's teacher box, which overlaps anchors 0 and 1 with IoU >= 0.5
    anchors = torch.tensor([BOX_A, [10.0, 10.0, 40.0, 50.0], [60.0, 60.0, 90.0, 90.0]])
    teacher_boxes = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])[None]
    teacher = dense_output([[[0.9], [0.5], [0.5]]], [[BOX_A, BOX_A, BOX_C]], anchors=anchors, box_regression=teacher_boxes)
    student = dense_output([[[0.1], [0.5], [0.5]]], [[BOX_E, BOX_E, BOX_C]], anchors=anchors)
    gid = fake_gid(feature_weight=0, relation_weight=0, num_instances=1)
    terms = gid(student, teacher, [])
    assert set(terms) == {"loss_gid_cls", "loss_gid_reg"} == set(gid.weight_dict)
    torch.testing.assert_close(gid.last_instances.boxes[0], torch.tensor([BOX_A]))
    # masked slots 0 and 1: BCE(logit 0.1, 0.9) + BCE(0.5, 0.5) over 2; L1 |1| + |2| over 2
    bce = lambda p, q: -(q * math.log(p) + (1 - q) * math.log(1 - p))  # noqa: E731
    torch.testing.assert_close(terms["loss_gid_cls"], torch.tensor((bce(0.1, 0.9) + bce(0.5, 0.5)) / 2))
    torch.testing.assert_close(terms["loss_gid_reg"], torch.tensor(1.5))
    # FCOS-style output (no anchors): points inside the GI box instead
    points = torch.tensor([[25.0, 25.0], [45.0, 25.0], [70.0, 70.0]])
    teacher.anchors = student.anchors = None
    teacher.points = student.points = points
    terms = gid(student, teacher, [])
    torch.testing.assert_close(terms["loss_gid_reg"], torch.tensor(1.0))  # slot 0 only


def test_gid_feature_and_relation_terms_follow_the_pipeline():
    torch.manual_seed(0)
    num_slots = 6
    teacher_feats = [torch.randn(1, 1, 13, 13)]
    student_feats = [torch.randn(1, 1, 13, 13)]
    teacher = dense_output([[[s[0]] for s in GISM_SLOTS]], [[s[2] for s in GISM_SLOTS]], features=teacher_feats)
    student = dense_output([[[s[1]] for s in GISM_SLOTS]], [[s[3] for s in GISM_SLOTS]], features=student_feats)
    for variant in ("paper", "official"):
        gid = fake_gid(response_cls_weight=0, response_reg_weight=0, variant=variant)
        terms = gid(student, teacher, [])
        boxes = gid.last_instances.boxes
        pooled_t = pool_fpn_boxes(teacher_feats, [8], boxes)
        pooled_s = pool_fpn_boxes(student_feats, [8], boxes)
        torch.testing.assert_close(terms["loss_gid_feature"], gi_feature_loss(pooled_t, pooled_s))
        torch.testing.assert_close(terms["loss_gid_relation"], gi_relation_loss(pooled_t, pooled_s))
    assert isinstance(gid.adapter, nn.Identity)
    assert num_slots == len(GISM_SLOTS)


def test_gid_relation_scope_image_vs_batch():
    torch.manual_seed(0)
    teacher_feats, student_feats = torch.randn(7, 2, 3, 3), torch.randn(7, 2, 3, 3)
    counts = [4, 2, 1]  # images 1 and 2 have fewer than 3 GIs: skipped per image
    per_image = fake_gid(variant="paper").relation_loss(teacher_feats, student_feats, counts)
    torch.testing.assert_close(per_image, gi_relation_loss(teacher_feats[:4], student_feats[:4]))
    counts = [3, 4]
    per_image = fake_gid(relation_scope="image").relation_loss(teacher_feats, student_feats, counts)
    expected = (gi_relation_loss(teacher_feats[:3], student_feats[:3]) + gi_relation_loss(teacher_feats[3:], student_feats[3:])) / 2
    torch.testing.assert_close(per_image, expected)
    per_batch = fake_gid(variant="official").relation_loss(teacher_feats, student_feats, counts)
    torch.testing.assert_close(per_batch, gi_relation_loss(teacher_feats, student_feats))
    assert fake_gid(variant="official", relation_scope="image").relation_scope == "image"
    assert fake_gid(variant="official").gism_options["variant"] == "official"
    assert fake_gid(variant="official", gi_score="paper").gism_options["variant"] == "paper"


def test_gid_rejects_bad_options():
    with pytest.raises(ValueError, match="variant"):
        fake_gid(variant="mmdet")
    with pytest.raises(ValueError, match="relation_scope"):
        fake_gid(relation_scope="epoch")
    with pytest.raises(ValueError, match="loss_gid_relation"):
        fake_gid(relation_weight=-1.0)
    with pytest.raises(ValueError, match="response_mask_rule"):
        fake_gid(response_mask_rule="ious")
    with pytest.raises(ValueError, match="classes"):
        GID(FakeDetector(2), FakeDetector(3), student_channels=1, teacher_channels=1)


# ----------------------------------------------------------------------------- the distiller on real detectors
def tiny_gfl(fpn_channels: int, seed: int):
    from kdlab.models import build_detector

    torch.manual_seed(seed)
    detector = build_detector("gfl", 3, backbone="resnet18", backbone_width=8, backbone_norm="gn",
                              fpn_channels=fpn_channels, head_convs=1)
    with torch.no_grad():  # untrained boxes cover the whole image; make them ~2 strides wide, like a trained head's
        detector.head.gfl_reg.bias.view(4, -1)[:, 1] = 5.0
    return detector


def tiny_batch():
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1]), "size": torch.tensor([96, 96])},
        {"boxes": torch.tensor([[30.0, 20.0, 90.0, 90.0], [5.0, 5.0, 20.0, 20.0]]), "labels": torch.tensor([0, 2]),
         "size": torch.tensor([90, 96])},
    ]
    return images, targets


def test_no_gradient_reaches_the_teacher_and_the_adapter_trains():
    student, teacher = tiny_gfl(8, 0), tiny_gfl(16, 1)
    gid = GID(student, teacher, min_size=2.0)
    task = DistillationTask(student, teacher, gid)
    assert isinstance(gid.adapter, nn.Conv2d) and gid.adapter.in_channels == 8 and gid.adapter.out_channels == 16
    images, targets = tiny_batch()
    terms = task(images, targets)
    assert {"loss_gid_feature", "loss_gid_relation", "loss_gid_cls", "loss_gid_reg"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    assert gid.last_instances.counts == [10, 10]
    # each distillation term alone sends gradient to the student
    student_params = [p for p in student.parameters() if p.requires_grad]
    for name in ("loss_gid_feature", "loss_gid_relation", "loss_gid_cls", "loss_gid_reg"):
        grads = torch.autograd.grad(terms[name], student_params, retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, name
    weighted_total(terms, task.weight_dict).backward()
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert gid.adapter.weight.grad is not None and gid.adapter.weight.grad.abs().sum() > 0
    trainable = {id(p) for p in task.trainable_parameters()}
    assert id(gid.adapter.weight) in trainable
    assert not trainable & {id(p) for p in task.teacher.parameters()}
    assert not any(k.startswith("teacher.") for k in task.trainable_state_dict())
    assert not task.teacher.training


def test_fewer_than_three_gis_and_no_gi_at_all():
    student, teacher = tiny_gfl(8, 0), tiny_gfl(8, 1)
    images, targets = tiny_batch()
    gid = GID(student, teacher, num_instances=2, min_size=2.0)
    task = DistillationTask(student, teacher, gid)
    terms = task(images, targets)
    assert gid.last_instances.counts == [2, 2]
    assert terms["loss_gid_relation"] == 0 and terms["loss_gid_feature"] > 0
    weighted_total(terms, task.weight_dict).backward()
    # no GI survives a 1000 px minimum side: every GID term is an exact, finite zero
    gid = GID(student, teacher, min_size=1000.0)
    task = DistillationTask(student, teacher, gid)
    terms = task(images, targets)
    assert gid.last_instances.counts == [0, 0]
    for name in ("loss_gid_feature", "loss_gid_relation", "loss_gid_cls", "loss_gid_reg"):
        assert terms[name] == 0, name
    weighted_total(terms, task.weight_dict).backward()


def test_feature_strides_of_a_dense_output():
    student = tiny_gfl(8, 0)
    output = student(torch.zeros(1, 3, 64, 64), [(64, 64)])
    assert output.feature_strides == [8, 16, 32, 64, 128]


def tiny_zoo_detector(family: str, fpn_channels: int, seed: int):
    from kdlab.models import build_detector

    torch.manual_seed(seed)
    options = dict(backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=fpn_channels)
    if family == "faster_rcnn":
        return build_detector(family, 3, **options, representation_size=64, box_batch_size_per_image=64)
    return build_detector(family, 3, **options, head_convs=1)


@pytest.mark.parametrize("family", ["retinanet", "fcos", pytest.param("faster_rcnn", marks=pytest.mark.slow)])
def test_gid_on_the_zoo_detectors_uses_each_detectors_mask(family):
    student, teacher = tiny_zoo_detector(family, 32, 0), tiny_zoo_detector(family, 64, 1)
    gid = GID(student, teacher, min_size=2.0)
    task = DistillationTask(student, teacher, gid)
    assert gid.adapter.in_channels == 32 and gid.adapter.out_channels == 64
    images, targets = tiny_batch()
    terms = task(images, targets)
    assert all(torch.isfinite(terms[k]) for k in gid.weight_dict)
    gis = gid.last_instances.boxes
    assert all(0 < len(b) <= 10 for b in gis)
    output = student(images, [(96, 96), (90, 96)])
    if family == "retinanet":  # anchors with IoU >= 0.5
        expected = torch.stack([anchor_iou_mask(output.anchors, b, 0.5) for b in gis])
    elif family == "fcos":  # locations inside a GI
        expected = torch.stack([center_in_box_mask(output.points, b) for b in gis])
    else:  # the RPN's anchors with IoU >= 0.7 (its own positive threshold)
        expected = torch.stack([anchor_iou_mask(output.anchors, b, 0.7) for b in gis])
        assert output.feature_strides == [4, 8, 16, 32, 64]
        assert output.dense_slots().response_rule == ("anchor_iou", 0.7)
    assert torch.equal(gid.last_response_mask, expected)
    # each term alone reaches the student (Faster R-CNN: the response terms through the RPN head)
    student_params = [p for p in student.parameters() if p.requires_grad]
    for name in gid.weight_dict:
        grads = torch.autograd.grad(terms[name], student_params, retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, name
    weighted_total(terms, task.weight_dict).backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert gid.adapter.weight.grad is not None


def test_a_two_stage_teacher_stops_after_its_rpn_and_gid_is_unchanged():
    # GID reads the teacher's FPN maps and RPN slots only: forward_dense gives exactly those of the full
    # forward, the RoI head never runs, and every GID term is the same as with the full teacher forward
    student, teacher = tiny_zoo_detector("faster_rcnn", 32, 0), tiny_zoo_detector("faster_rcnn", 64, 1).eval()
    images, targets = tiny_batch()
    sizes = [(96, 96), (90, 96)]
    with torch.no_grad():
        full, dense = teacher(images, sizes), teacher.forward_dense(images, sizes)
    for name in ("rpn_objectness", "rpn_deltas", "anchors", "anchor_levels"):
        assert torch.equal(getattr(full, name), getattr(dense, name)), name
    assert all(torch.equal(a, b) for a, b in zip(full.features, dense.features))
    assert dense.num_anchors_per_level == full.num_anchors_per_level and dense.feature_strides == full.feature_strides
    assert dense.rois_per_image == [0, 0] and dense.class_logits.shape[0] == 0 and sum(full.rois_per_image) > 0
    assert torch.equal(dense.dense_slots().pred_boxes, full.dense_slots().pred_boxes)

    gid = GID(student, teacher, min_size=2.0)
    task = DistillationTask(student, teacher, gid)
    assert task.teacher_dense_only and not task.teacher_features_only
    torch.manual_seed(0)
    expected = task(images, targets)  # the teacher runs to its RPN
    calls = []
    teacher.roi_heads.box_head.register_forward_hook(lambda *args: calls.append(1))
    task(images, targets)
    assert calls == []  # the RoI head never ran
    task.teacher_forward = lambda images, targets, shared=None: teacher(images, image_sizes_of(targets))
    torch.manual_seed(0)
    with torch.no_grad():
        whole = task(images, targets)  # the same step with the teacher's full forward
    assert calls  # this time it did
    for name in gid.weight_dict:
        torch.testing.assert_close(expected[name], whole[name], rtol=0, atol=0, msg=name)


def test_rpn_slots_read_first_under_no_grad_keep_the_students_gradient():
    # GISM reads the RPN slots under no_grad before GID's response loss reads them again: the cached
    # slots must still lead back to the RPN head (they once did not, and the objectness term was inert)
    student = tiny_zoo_detector("faster_rcnn", 16, 0)
    images, targets = tiny_batch()
    output = student(images, [(96, 96), (90, 96)], targets)
    with torch.no_grad():
        assert output.dense_slots().cls_logits.shape[-1] == 1
    slots = output.dense_slots()
    assert slots.cls_logits.grad_fn is not None and slots.box_regression.grad_fn is not None
    slots.cls_logits.sum().backward()
    assert student.rpn.head.cls_logits.weight.grad.abs().sum() > 0
    assert student.rpn.head.bbox_pred.weight.grad is None  # the objectness alone: only its own layer


def test_pooling_and_feature_loss_with_bfloat16_maps():
    # under CUDA autocast the FPN maps are bf16: GI boxes and pooled features stay float32
    torch.manual_seed(0)
    features = [torch.randn(1, 4, 32, 32)]
    boxes = [torch.tensor([[100.5, 60.25, 180.75, 140.0]])]
    exact = pool_fpn_boxes(features, [8], boxes)
    half = pool_fpn_boxes([features[0].bfloat16()], [8], boxes)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, exact, atol=0.05, rtol=0.02)
    assert gi_feature_loss(half.bfloat16(), exact).dtype == torch.float32


@pytest.mark.slow
def test_gid_with_torchvisions_coco_retinanet_architecture_as_teacher():
    # the COCO recipe: torchvision's retinanet_resnet50_fpn (random weights here, COCO_V1 in practice)
    from kdlab.models import build_detector

    torch.manual_seed(0)
    teacher = build_detector("retinanet_resnet50_fpn", 91)
    student = build_detector("retinanet", 91, backbone="resnet18", backbone_width=8, fpn_channels=32, head_convs=1)
    gid = GID(student, teacher, min_size=2.0)
    task = DistillationTask(student, teacher, gid)
    assert gid.adapter.in_channels == 32 and gid.adapter.out_channels == 256
    images, targets = tiny_batch()
    terms = task(images, targets)
    weighted_total(terms, task.weight_dict).backward()
    assert all(torch.isfinite(terms[k]) for k in gid.weight_dict)
    assert all(p.grad is None for p in teacher.parameters())


def test_batched_relation_loss_equals_the_per_image_sum():
    from kdlab.losses.gid import gi_relation_loss, gi_relation_loss_groups

    generator = torch.Generator().manual_seed(5)
    # padded groups (2 and 0 GIs are skipped), then equal groups (the reshaped fast path)
    for counts, expected_used in (([4, 2, 0, 10, 3], 3), ([5, 5, 5], 3)):
        teacher = torch.randn(sum(counts), 6, 3, 3, generator=generator)
        student = torch.randn(sum(counts), 4, 3, 3, generator=generator, requires_grad=True)
        loss, used = gi_relation_loss_groups(teacher, student, counts)
        expected = sum(gi_relation_loss(t, s) for t, s in zip(teacher.split(counts), student.split(counts))
                       if t.shape[0] >= 3)
        assert used == expected_used
        assert torch.allclose(loss, expected, atol=1e-6)
        (grad,) = torch.autograd.grad(loss, student)
        (grad_expected,) = torch.autograd.grad(expected, student)
        assert torch.allclose(grad, grad_expected, atol=1e-6)
    assert grad.abs().sum() > 0
    counts = [4, 2, 3]
    teacher = torch.randn(9, 6, 3, 3, generator=generator)
    student = torch.randn(9, 4, 3, 3, generator=generator, requires_grad=True)
    loss, _ = gi_relation_loss_groups(teacher, student, counts)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad[4:6].abs().sum() == 0 and grad[:4].abs().sum() > 0  # the 2-GI group gets no gradient
    zero, none_used = gi_relation_loss_groups(teacher[:2], student[:2], [2])
    assert none_used == 0 and zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="counts sum to"):
        gi_relation_loss_groups(teacher, student, [1, 2])


def test_batched_response_mask_equals_per_image_masks():
    generator = torch.Generator().manual_seed(11)
    xy = torch.rand(300, 2, generator=generator) * 120
    anchors = torch.cat([xy, xy + 4 + torch.rand(300, 2, generator=generator) * 40], dim=1)
    points = (anchors[:, :2] + anchors[:, 2:]) / 2
    gis = []
    for n in (6, 0, 3):
        corner = torch.rand(n, 2, generator=generator) * 100
        gis.append(torch.cat([corner, corner + 2 + torch.rand(n, 2, generator=generator) * 50], dim=1))
    gis[2][0] = torch.tensor([50.0, 50.0, 50.0, 70.0])  # zero area: hits nothing by IoU
    gis.append(anchors[:2].clone())  # exact copies of anchors: IoU 1
    for iou in (0.5, 0.7):
        got = response_mask(anchors, points, gis, "anchor_iou", iou)
        expected = torch.stack([anchor_iou_mask(anchors, b, iou) for b in gis])
        assert torch.equal(got, expected) and got[3, :2].all()
    got = response_mask(anchors, points, gis, "center", 0.0)
    assert torch.equal(got, torch.stack([center_in_box_mask(points, b) for b in gis]))
    assert got[0].any() and not got[1].any()


@pytest.mark.parametrize("k,pre_nms_topk", [(10, 3000), (3, 50), (40, 3000)])
def test_select_from_scores_equals_the_plain_algorithm(k, pre_nms_topk):
    # the plain GISM filtering: rank all, keep pre_nms_topk, clip, drop small, NMS, first k
    from torchvision.ops import nms

    from kdlab.distill.gism import select_from_scores

    generator = torch.Generator().manual_seed(k + pre_nms_topk)
    batch, num = 3, 2000
    scores = torch.rand(batch, num, generator=generator)
    centre = torch.rand(batch, num, 2, generator=generator) * 100
    size = 1 + torch.rand(batch, num, 2, generator=generator) * 40
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    boxes[1] = boxes[1, :1] + 0.01 * boxes[1]  # image 1: near-identical boxes, so ranking must go deep
    from_teacher = torch.rand(batch, num, generator=generator) > 0.5
    sizes = [(100, 100), (90, 110), (100, 100)]
    got = select_from_scores(scores, boxes, from_teacher, sizes, k=k, nms_iou=0.3, pre_nms_topk=pre_nms_topk, min_size=4.0)
    for b, (h, w) in enumerate(sizes):
        top, slots = scores[b].topk(min(pre_nms_topk, num))
        clipped = torch.stack([boxes[b, slots, 0].clamp(0, w), boxes[b, slots, 1].clamp(0, h),
                               boxes[b, slots, 2].clamp(0, w), boxes[b, slots, 3].clamp(0, h)], dim=1)
        keep = ((clipped[:, 2:] - clipped[:, :2]) >= 4.0).all(dim=1).nonzero().flatten()
        keep = keep[nms(clipped[keep], top[keep], 0.3)[:k]]
        assert torch.equal(got.slots[b], slots[keep])
        assert torch.allclose(got.boxes[b], clipped[keep])
        assert torch.equal(got.from_teacher[b], from_teacher[b, slots[keep]])
    assert len(got.slots[0]) == k
