"""LD's baselines: feature imitation on four regions and plain classification KD (hand examples,
zero when the features are equal, adapters, errors)."""

import copy

import pytest
import torch

from kdlab.distill import DistillationTask, build_distillation
from kdlab.distill.imitation import (
    ClassificationKD,
    FineGrainedImitation,
    FitNet,
    GIImitation,
    InsideGTImitation,
    fine_grained_mask,
    general_instance_slots,
    masked_feature_mse,
)
from kdlab.distill.common import slot_mask_to_locations
from kdlab.losses.ld import ld_kl_div
from kdlab.models.box_ops import points_in_boxes
from kdlab.models import build_detector
from kdlab.models.outputs import DenseAssignment, DenseOutput


def _tiny_gfl(seed=0, fpn_channels=16, num_classes=3):
    torch.manual_seed(seed)
    return build_detector("gfl", num_classes, backbone="resnet18", backbone_width=8, backbone_norm="gn",
                          fpn_channels=fpn_channels, head_convs=1)


def test_masked_feature_mse_by_hand():
    student = [torch.zeros(1, 2, 2, 2)]
    teacher = [torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 5.0]]]])]  # [1, C=2, 2, 2]
    mask = [torch.tensor([[[True, True], [False, False]]])]  # top row
    # top row: (1^2 + 3^2) + (2^2 + 0^2) = 14 over 2 locations x 2 channels
    assert masked_feature_mse(student, teacher, mask).item() == pytest.approx(14 / 4)
    # two levels share one normaliser: the second adds 1 location (4^2) -> (14 + 16) / 6
    student2 = student + [torch.zeros(1, 2, 1, 1)]
    teacher2 = teacher + [torch.tensor([[[[4.0]], [[0.0]]]])]
    assert masked_feature_mse(student2, teacher2, mask + [torch.ones(1, 1, 1, dtype=torch.bool)]).item() == pytest.approx(30 / 6)
    # empty region: 0, not NaN
    assert masked_feature_mse(student, teacher, [torch.zeros(1, 2, 2, dtype=torch.bool)]).item() == 0.0


def test_region_masks_by_hand():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    points = torch.tensor([[5.0, 5.0], [10.0, 5.0], [12.0, 3.0], [0.5, 9.5]])
    assert points_in_boxes(points, gt).any(dim=1).tolist() == [True, False, False, True]  # strictly inside
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [5.0, 0.0, 15.0, 10.0], [-4.0, 0.0, 6.0, 10.0]])
    # IoUs 1, 2/3, 1/3, 3/7 with the GT; psi = 0.5 of the best (1) keeps IoU > 0.5
    assert fine_grained_mask(anchors, gt, psi=0.5).tolist() == [True, True, False, False]
    assert fine_grained_mask(anchors, gt, psi=0.4).tolist() == [True, True, False, True]
    assert fine_grained_mask(anchors, torch.zeros(0, 4)).tolist() == [False] * 4


def test_general_instance_selection_by_hand():
    # slot 0: teacher 0.9 vs student 0.1 on class 0 -> GI score 0.8, the teacher's box
    # slot 1: student higher by 0.5 on class 1 -> the student's box, which overlaps slot 0's teacher box: suppressed
    # slot 2: difference 0.3, a separate box
    teacher_scores = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.5, 0.5]])
    student_scores = torch.tensor([[0.1, 0.1], [0.1, 0.7], [0.2, 0.5]])
    teacher_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [20.0, 20.0, 30.0, 30.0]])
    student_boxes = torch.tensor([[80.0, 80.0, 90.0, 90.0], [1.0, 0.0, 11.0, 10.0], [70.0, 0.0, 80.0, 10.0]])
    keep = general_instance_slots(student_scores, teacher_scores, student_boxes, teacher_boxes, iou_threshold=0.3, top_k=10)
    assert keep.tolist() == [0, 2]
    # if slot 1 used the teacher's box (no overlap) it would be kept: the box choice matters
    keep_t = general_instance_slots(student_scores, teacher_scores, student_boxes, teacher_boxes.clone(), 0.3, 1)
    assert keep_t.tolist() == [0]  # top_k


def test_slot_mask_to_locations_with_two_anchors_per_location():
    feature = torch.zeros(1, 4, 2, 3)
    out = DenseOutput(features=[feature], cls_logits=torch.zeros(1, 12, 1), box_regression=torch.zeros(1, 12, 4),
                      pred_boxes=torch.zeros(1, 12, 4), points=torch.zeros(12, 2), anchors=None, strides=torch.ones(12),
                      levels=torch.zeros(12, dtype=torch.long), num_per_level=[12], image_sizes=[(2, 3)])
    slot_mask = torch.zeros(1, 12, dtype=torch.bool)
    slot_mask[0, 3] = True  # location (y=0, x=1), second anchor
    slot_mask[0, 10] = True  # location (y=1, x=2), first anchor
    (mask,) = slot_mask_to_locations(slot_mask, out)
    assert mask.tolist() == [[[False, True, False], [False, False, True]]]


@pytest.mark.parametrize("name", ["fitnet", "inside_gt", "fine_grained", "gi_imitation", "cls_kd"])
def test_baselines_zero_when_teacher_equals_student(name, tiny_batch):
    student = _tiny_gfl(0)
    distiller = build_distillation(name, student, copy.deepcopy(student))
    terms = distiller(*tiny_batch())
    key = "loss_cls_kd" if name == "cls_kd" else "loss_imitation"
    assert set(distiller.distillers[name].weight_dict) == {key}
    assert terms[key].abs().item() < 1e-6
    # and positive against a different teacher (the region is not empty)
    other = build_distillation(name, _tiny_gfl(0), _tiny_gfl(1))
    assert other(*tiny_batch())[key].item() > 1e-6


def test_imitation_regions_on_a_real_output(tiny_batch):
    images, targets = tiny_batch()
    student, teacher = _tiny_gfl(0), _tiny_gfl(1)
    s_out = student(images, [(64, 64)] * 2, targets)
    with torch.no_grad():
        t_out = teacher(images, [(64, 64)] * 2)
    fitnet = FitNet(student, teacher).region(s_out, t_out, targets)
    inside = InsideGTImitation(student, teacher).region(s_out, t_out, targets)
    fine = FineGrainedImitation(student, teacher).region(s_out, t_out, targets)
    gi = GIImitation(student, teacher).region(s_out, t_out, targets)
    assert [m.shape for m in fitnet] == [(2, *f.shape[-2:]) for f in s_out.features] and all(m.all() for m in fitnet)
    # P3 (stride 8): location (y, x) is inside image 1's GT [4, 20, 28, 36] when 4 < 8x + 4 < 28 and 20 < 8y + 4 < 36,
    # i.e. x in {1, 2} (x = 0 sits on the left edge) and y = 3
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[3, 1:3] = True
    assert torch.equal(inside[0][1], expected)
    # one anchor per location: the location masks hold exactly the fine-grained anchors
    expected_fine = sum(int(fine_grained_mask(s_out.anchors, t["boxes"]).sum()) for t in targets)
    assert 0 < sum(int(m.sum()) for m in fine) == expected_fine < sum(m.numel() for m in fine)
    # at most 10 GI locations per image and level
    assert all((m.flatten(1).sum(dim=1) <= 10).all() for m in gi) and gi[0].sum() > 0


def test_adapter_when_widths_differ_and_only_student_parts_train(tiny_batch):
    student, teacher = _tiny_gfl(0, fpn_channels=16), _tiny_gfl(1, fpn_channels=24)
    fitnet = FitNet(student, teacher)
    distiller = DistillationTask(student, teacher, fitnet)
    assert isinstance(fitnet.adapter, torch.nn.Conv2d) and fitnet.adapter.weight.shape == (24, 16, 1, 1)
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert id(fitnet.adapter.weight) in trainable and not trainable & {id(p) for p in teacher.parameters()}
    assert any(k.startswith("distillers.fitnet.adapter.") for k in distiller.trainable_state_dict())
    terms = distiller(*tiny_batch())
    terms["loss_imitation"].backward()
    assert fitnet.adapter.weight.grad.abs().sum() > 0 and student.backbone.fpn.layer_blocks[0][0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    same = FitNet(student, _tiny_gfl(1, fpn_channels=16))
    assert isinstance(same.adapter, torch.nn.Identity)
    with pytest.raises(ValueError, match="adapter='none'"):
        FitNet(student, teacher, adapter="none")
    with pytest.raises(ValueError, match="strides"):
        odd = _tiny_gfl(1)
        odd.strides = (8, 16)
        FitNet(student, odd)


def test_classification_kd_by_hand_and_errors():
    student, teacher = _tiny_gfl(0), _tiny_gfl(1)
    kd = ClassificationKD(student, teacher, region="positives")
    assert kd.weight_dict["loss_cls_kd"] == 10.0 and kd.temperature == 2.0
    n = 4
    pos_mask = torch.tensor([[True, False, True, False]])

    def output(cls_logits):
        assignment = DenseAssignment(labels=torch.zeros(1, n, dtype=torch.long), matched_gt=torch.zeros(1, n, dtype=torch.long),
                                     pos_mask=pos_mask, gt_boxes=[torch.zeros(1, 4)], gt_labels=[torch.zeros(1, dtype=torch.long)])
        return DenseOutput(features=[], cls_logits=cls_logits, box_regression=torch.zeros(1, n, 4), pred_boxes=torch.zeros(1, n, 4),
                           points=torch.zeros(n, 2), anchors=None, strides=torch.ones(n), levels=torch.zeros(n, dtype=torch.long),
                           num_per_level=[n], image_sizes=[(1, 1)], assignment=assignment)

    s_logits, t_logits = torch.randn(1, n, 3), torch.randn(1, n, 3)
    per_slot = ld_kl_div(s_logits[0], t_logits[0], 2.0)
    terms = kd(output(s_logits), output(t_logits), [])
    assert terms["loss_cls_kd"].item() == pytest.approx(per_slot[[0, 2]].mean().item(), rel=1e-5)
    every = ClassificationKD(student, teacher, region="all")(output(s_logits), output(t_logits), [])
    assert every["loss_cls_kd"].item() == pytest.approx(per_slot.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="number of classes"):
        ClassificationKD(student, _tiny_gfl(1, num_classes=5))
    with pytest.raises(ValueError, match="number of classes"):
        kd(output(s_logits), output(torch.randn(1, n, 5)), [])
    with pytest.raises(ValueError, match="region"):
        ClassificationKD(student, teacher, region="negatives")


def test_fine_grained_needs_anchors(tiny_batch):
    student, teacher = _tiny_gfl(0), _tiny_gfl(1)
    images, targets = tiny_batch()
    s_out = student(images, [(64, 64)] * 2, targets)
    s_out.anchors = None
    with pytest.raises(ValueError, match="anchor"):
        FineGrainedImitation(student, teacher).region(s_out, s_out, targets)
