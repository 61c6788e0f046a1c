"""LD: the KL by hand, T^2 scaling, the VLR on a hand-built layout, both normalisations, the
distiller's gradients and its mismatch errors (METHODS.md §1)."""

import copy
import math

import pytest
import torch
from torchvision.ops import distance_box_iou

from kdlab.config import load_config
from kdlab.distill import DistillationTask, FineGrainedImitation, build_distillation
from kdlab.distill.ld import (
    CALIBRATED_LD_WEIGHTS,
    LD,
    OFFICIAL_MAIN_LD_DIVISOR,
    OFFICIAL_VLR_LD_DIVISOR,
    PUBLISHED_LD_WEIGHTS,
)
from kdlab.distill.vlr import anchor_free_vlr, candidate_iou_threshold, valuable_localization_region, vlr_weights
from kdlab.losses.ld import edge_ld, ld_kl_div
from kdlab.models import build_detector
from kdlab.models.atss import atss_assign
from kdlab.models.box_ops import distance_box_iof
from kdlab.models.outputs import DenseAssignment, DenseOutput
from kdlab.models.priors import grid_priors

# ---------------------------------------------------------------- the loss


def test_ld_kl_div_hand_computed():
    teacher = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    student = torch.zeros(3)  # uniform
    # T = 1: KL(p || uniform) = sum p log p + log 3, averaged over the 3 bins
    kl = 0.5 * math.log(0.5) + 0.5 * math.log(0.25) + math.log(3)
    assert ld_kl_div(student, teacher, 1.0).item() == pytest.approx(kl / 3, rel=1e-5)
    # T = 2: p = softmax(log p / 2) is proportional to sqrt(p); times T^2 = 4
    roots = [math.sqrt(0.5), 0.5, 0.5]
    p2 = [r / sum(roots) for r in roots]
    kl2 = sum(p * math.log(p * 3) for p in p2)
    assert ld_kl_div(student, teacher, 2.0).item() == pytest.approx(4 * kl2 / 3, rel=1e-5)
    # unreduced: one value per distribution
    batch = torch.stack([student, teacher])
    out = ld_kl_div(batch, torch.stack([teacher, teacher]), 1.0)
    assert out.shape == (2,) and out[0].item() == pytest.approx(kl / 3, rel=1e-5) and out[1].item() == pytest.approx(0, abs=1e-7)


def test_ld_kl_div_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 17)
    assert ld_kl_div(logits, logits.clone(), 10.0).abs().max().item() < 1e-6
    assert (ld_kl_div(torch.randn(5, 4, 17), logits, 10.0) > 0).all()


def test_ld_kl_div_temperature_squared_scaling():
    torch.manual_seed(1)
    s, t = torch.randn(6, 17), torch.randn(6, 17)
    # identity: LD_T(s, t) = T^2 * LD_1(s / T, t / T)
    for temperature in (2.0, 10.0):
        assert torch.allclose(ld_kl_div(s, t, temperature), temperature**2 * ld_kl_div(s / temperature, t / temperature, 1.0), rtol=1e-5)
    # the T^2 factor keeps the loss finite as T grows: T^2 KL -> sum_k (d_k - mean d)^2 / (2K) with d = t - s,
    # then averaged over the K bins (second-order expansion around the uniform distribution)
    s, t = s.double(), t.double()  # float64: T^2 * KL at T = 1000 is a difference of nearly equal numbers
    d = t - s
    limit = ((d - d.mean(dim=1, keepdim=True)) ** 2).sum(dim=1) / (2 * 17) / 17
    assert torch.allclose(ld_kl_div(s, t, 1000.0), limit, rtol=1e-2)


def test_ld_kl_div_teacher_gets_no_gradient_and_bad_input():
    s = torch.randn(3, 17, requires_grad=True)
    t = torch.randn(3, 17, requires_grad=True)
    ld_kl_div(s, t, 10.0).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="same shape"):
        ld_kl_div(torch.zeros(3, 17), torch.zeros(3, 9), 10.0)
    with pytest.raises(ValueError, match="temperature"):
        ld_kl_div(torch.zeros(3, 17), torch.zeros(3, 17), 0.0)
    with pytest.raises(ValueError, match="4 \\* \\(reg_max \\+ 1\\) = 68"):
        edge_ld(torch.zeros(2, 60), torch.zeros(2, 60), 16, 10.0)


def test_edge_ld_is_the_mean_over_the_four_edges():
    torch.manual_seed(2)
    s, t = torch.randn(2, 4 * 9), torch.randn(2, 4 * 9)
    per_edge = ld_kl_div(s.reshape(2, 4, 9), t.reshape(2, 4, 9), 10.0)
    assert torch.allclose(edge_ld(s, t, reg_max=8, temperature=10.0), per_edge.mean(dim=1))


# ---------------------------------------------------------------- the valuable localization region

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
ANCHORS = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],    # a0: IoU 1,   DIoU 1
    [2.0, 0.0, 12.0, 10.0],    # a1: IoU 2/3, DIoU 2/3 - 4/244
    [5.0, 0.0, 15.0, 10.0],    # a2: IoU 1/3, DIoU 1/3 - 25/325
    [20.0, 20.0, 30.0, 30.0],  # a3: IoU 0
    [-4.0, 0.0, 6.0, 10.0],    # a4: IoU 3/7, DIoU 3/7 - 16/296
    [8.0, 0.0, 18.0, 10.0],    # a5: IoU 1/9, DIoU 1/9 - 64/424 < 0
])


def _thr_by_hand() -> float:
    # ATSS, topk 3: the candidates are a0, a1, a4 (centre distances 0, 2, 4); unbiased std
    ious = [1.0, 2 / 3, 3 / 7]
    mean = sum(ious) / 3
    return mean + math.sqrt(sum((v - mean) ** 2 for v in ious) / 2)


def test_vlr_single_gt_by_hand():
    thr = _thr_by_hand()  # 0.98544: alpha * thr = 0.24636
    atss = atss_assign(ANCHORS, [6], GT, topk=3)
    assert sorted(atss.candidate_idx[0].tolist()) == [0, 1, 4]
    assert candidate_iou_threshold(ANCHORS, GT, atss.candidate_idx).item() == pytest.approx(thr, rel=1e-6)
    assert atss.iou_thr.item() == pytest.approx(thr, rel=1e-6)
    vlr = valuable_localization_region(ANCHORS, GT, torch.tensor([thr]), alpha=0.25, weighting="mask")
    # DIoU in [0.246, 0.985): a1 (0.650), a2 (0.256), a4 (0.375); a0 is above thr (a positive), a3/a5 below
    assert vlr.mask.tolist() == [False, True, True, False, True, False]
    assert vlr.weight.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert vlr.matched_gt.tolist() == [-1, 0, 0, -1, 0, -1]
    iou = valuable_localization_region(ANCHORS, GT, torch.tensor([thr]), alpha=0.25, weighting="iou")
    assert torch.allclose(iou.weight, torch.tensor([0.0, 2 / 3, 1 / 3, 0.0, 3 / 7, 0.0]))
    # alpha moves the lower bound: with alpha = 0.3 (0.2956) a2 (DIoU 0.256) drops out
    assert valuable_localization_region(ANCHORS, GT, torch.tensor([thr]), alpha=0.3).mask.tolist() == [False, True, False, False, True, False]
    # the upper bound is strict: with thr = 1, a0's DIoU (exactly 1) is still outside
    assert valuable_localization_region(ANCHORS, GT, torch.tensor([1.0]), alpha=0.25).mask[0].item() is False


def test_vlr_two_gts_highest_iou_wins():
    gts = torch.cat([GT, torch.tensor([[6.0, 0.0, 16.0, 10.0]])])
    thr = torch.tensor([_thr_by_hand(), 0.9])
    vlr = valuable_localization_region(ANCHORS, gts, thr, alpha=0.25, weighting="iou")
    # GT 1 = [6, 0, 16, 10] (alpha * thr = 0.225): a1 DIoU 3/7 - 16/296 = 0.375 (IoU 3/7 < 2/3 with GT 0: stays GT 0);
    # a2 DIoU 9/11 - 1/221 = 0.814 (IoU 9/11 > 1/3: moves to GT 1); a5 DIoU 2/3 - 4/244 = 0.650 (only GT 1);
    # a0 DIoU 1/4 - 36/356 = 0.149 < 0.225 (in no region)
    assert vlr.matched_gt.tolist() == [-1, 0, 1, -1, 0, 1]
    assert torch.allclose(vlr.weight, torch.tensor([0.0, 2 / 3, 9 / 11, 0.0, 3 / 7, 2 / 3]))
    # no GT: empty region
    empty = valuable_localization_region(ANCHORS, torch.zeros(0, 4), torch.zeros(0))
    assert empty.weight.sum() == 0 and empty.matched_gt.eq(-1).all()
    with pytest.raises(ValueError, match="weighting"):
        valuable_localization_region(ANCHORS, GT, thr[:1], weighting="soft")
    with pytest.raises(ValueError, match="one per GT"):
        valuable_localization_region(ANCHORS, gts, thr[:1])


# the released code's VLR rule (METHODS.md §1): a 20 x 20 GT and anchors where IoF and IoU part ways
BIG_GT = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
RULE_ANCHORS = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],     # b0: corner, inside: IoF 1,   IoU 1/4; rho^2 50,  c^2 800  (penalty 1/16)
    [5.0, 5.0, 15.0, 15.0],     # b1: centred inside: IoF 1,   IoU 1/4; rho^2 0
    [0.0, 0.0, 20.0, 20.0],     # b2: the GT itself:  IoF 1,   IoU 1
    [10.0, 0.0, 30.0, 20.0],    # b3: half over:      IoF 1/2, IoU 1/3; rho^2 100, c^2 1300 (penalty 1/13)
    [14.0, 14.0, 24.0, 24.0],   # b4: corner overlap: IoF .36, IoU 36/464; rho^2 162, c^2 1152
    [-10.0, -10.0, 30.0, 30.0], # b5: around the GT:  IoF 1/4, IoU 1/4; rho^2 0
])
RULE_IOF_DIOU = [1 - 1 / 16, 1.0, 1.0, 1 / 2 - 1 / 13, 0.36 - 162 / 1152, 0.25]
RULE_DIOU = [1 / 4 - 1 / 16, 0.25, 1.0, 1 / 3 - 1 / 13, 36 / 464 - 162 / 1152, 0.25]
RULE_IOU = [0.25, 0.25, 1.0, 1 / 3, 36 / 464, 0.25]


def test_released_vlr_rule_is_the_iof_minus_the_diou_penalty_by_hand():
    torch.testing.assert_close(distance_box_iof(RULE_ANCHORS, BIG_GT)[:, 0], torch.tensor(RULE_IOF_DIOU))
    torch.testing.assert_close(distance_box_iou(RULE_ANCHORS, BIG_GT)[:, 0], torch.tensor(RULE_DIOU))
    # IoF >= IoU always; on the 10 x 10 layout above the regions still coincide (a1 0.78, a2 0.42, a4 0.55
    # against 0.65, 0.26, 0.38; a5 0.05): the official tests there keep the paper's region
    assert (distance_box_iof(ANCHORS, GT) >= distance_box_iou(ANCHORS, GT)).all()
    thr_10 = torch.tensor([_thr_by_hand()])
    assert torch.equal(valuable_localization_region(ANCHORS, GT, thr_10, rule="iof_diou").mask,
                       valuable_localization_region(ANCHORS, GT, thr_10, rule="diou").mask)
    # thr = 0.6, alpha = 0.25: the region is 0.15 <= overlap < 0.6
    thr = torch.tensor([0.6])
    paper = valuable_localization_region(RULE_ANCHORS, BIG_GT, thr, weighting="iou", rule="diou")
    released = valuable_localization_region(RULE_ANCHORS, BIG_GT, thr, weighting="iou", rule="iof_diou")
    # paper: b0 (0.1875), b1, b3 (0.256), b5; released: b0, b1 leave (IoF 1 -> 0.94, 1.0), b4 enters (0.219)
    assert paper.mask.tolist() == [True, True, False, True, False, True]
    assert released.mask.tolist() == [False, False, False, True, True, True]
    # under both rules the weight is the true IoU
    torch.testing.assert_close(released.weight, torch.tensor([0.0, 0.0, 0.0, 1 / 3, 36 / 464, 0.25]))
    assert valuable_localization_region(RULE_ANCHORS, BIG_GT, thr).mask.tolist() == paper.mask.tolist()  # default: paper
    with pytest.raises(ValueError, match="rule"):
        valuable_localization_region(RULE_ANCHORS, BIG_GT, thr, rule="iou")


def test_official_ld_uses_the_released_vlr_rule(models):
    def outputs():
        s_out = _toy_output(1, seed=0, anchors=RULE_ANCHORS, pos=(2,))
        t_out = _toy_output(1, seed=1, anchors=RULE_ANCHORS, pos=(2,))
        s_out.assignment.gt_boxes, s_out.assignment.iou_thr = [BIG_GT.clone()], [torch.tensor([0.6])]
        return s_out, t_out

    s_out, t_out = outputs()
    per_edge = ld_kl_div(s_out.box_logits[0].reshape(6, 4, 5), t_out.box_logits[0].reshape(6, 4, 5), 10.0).sum(dim=1)
    official = LD(*models, variant="official")
    assert official.vlr_rule == "iof_diou" and LD(*models).vlr_rule == "diou"
    got = official(s_out, t_out, [])["loss_ld_vlr"]
    # released region b3, b4, b5 weighted by their IoU, the per-edge sum over /16
    expected = (per_edge[3] / 3 + per_edge[4] * 36 / 464 + per_edge[5] / 4) / OFFICIAL_VLR_LD_DIVISOR
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # the paper's rule on the official normalisation: b0, b1, b3, b5
    paper_rule = LD(*models, variant="official", vlr_rule="diou")(*outputs(), [])["loss_ld_vlr"]
    expected_paper = (per_edge[[0, 1, 5]].sum() / 4 + per_edge[3] / 3) / OFFICIAL_VLR_LD_DIVISOR
    assert paper_rule.item() == pytest.approx(expected_paper.item(), rel=1e-5)
    with pytest.raises(ValueError, match="vlr_rule"):
        LD(*models, vlr_rule="iof")


def test_released_and_paper_vlr_rules_overlap_little_on_coco_sized_layouts():
    # METHODS.md §1: on random layouts the two regions share ~30 % (mask IoU 0.28). Here: GFL's anchors
    # (8 x stride, strides 8..128) on 800 x 1216 images, 7 GTs an image with sides log-uniform in 16..256 px
    # and aspect ratios in 1/2..2: mask IoU 0.284 over these 10 images (0.27 with sides 32..256, 0.20 with 16..512;
    # on shapes' 128 px images, objects 8..64 px, 0.87: the rules part ways on GTs larger than the anchors)
    generator = torch.Generator().manual_seed(0)
    height, width, strides = 800, 1216, (8, 16, 32, 64, 128)
    _, anchors, _, _, num_per_level = grid_priors([(math.ceil(height / s), math.ceil(width / s)) for s in strides],
                                                  strides, 8.0, torch.device("cpu"))
    shared = either = 0
    for _ in range(10):
        side = torch.empty(7).uniform_(math.log(16), math.log(256), generator=generator).exp()
        aspect = torch.empty(7).uniform_(math.log(0.5), math.log(2.0), generator=generator).exp()
        centre = torch.rand(7, 2, generator=generator) * torch.tensor([width, height])
        half = torch.stack([side * aspect.sqrt(), side / aspect.sqrt()], dim=1) / 2
        gt = torch.cat([centre - half, centre + half], dim=1)
        gt = torch.cat([gt[:, 0::2].clamp(0, width), gt[:, 1::2].clamp(0, height)], dim=1)[:, [0, 2, 1, 3]]
        thr = atss_assign(anchors, num_per_level, gt, 9).iou_thr
        paper = valuable_localization_region(anchors, gt, thr, rule="diou").mask
        released = valuable_localization_region(anchors, gt, thr, rule="iof_diou").mask
        shared += (paper & released).sum().item()
        either += (paper | released).sum().item()
    assert 0.2 < shared / either < 0.36


def test_anchor_free_vlr_is_negatives_inside_a_gt_weighted_by_score():
    points = torch.tensor([[5.0, 5.0], [9.0, 5.0], [15.0, 5.0], [10.0, 5.0]])  # the last one on the GT's edge
    pos_mask = torch.tensor([True, False, False, False])
    logits = torch.tensor([[2.0, 0.0], [0.0, -1.0], [3.0, 3.0], [1.0, 1.0]])
    weight = anchor_free_vlr(points, GT, pos_mask, logits)
    assert torch.allclose(weight, torch.tensor([0.0, 0.5, 0.0, 0.0]))  # sigma(max(0, -1)) = 0.5


# ---------------------------------------------------------------- the distiller on hand-built outputs


def _tiny_gfl(seed=0, num_classes=3, **kw):
    torch.manual_seed(seed)
    return build_detector("gfl", num_classes, backbone="resnet18", backbone_width=8, backbone_norm="gn",
                          fpn_channels=16, head_convs=1, **kw)


def _toy_output(batch: int, reg_max: int = 4, seed: int = 0, anchors=ANCHORS, pos=(0,), num_per_level=(6,)):
    """A DenseOutput over the 6 hand-built anchors (one GT), ``batch`` copies of the same image."""
    g = torch.Generator().manual_seed(seed)
    n = anchors.shape[0]
    cls_logits = torch.randn(1, n, 2, generator=g).repeat(batch, 1, 1) + 3.0  # confident: summed weights > 1
    box_logits = torch.randn(1, n, 4 * (reg_max + 1), generator=g).repeat(batch, 1, 1)
    pos_mask = torch.zeros(batch, n, dtype=torch.bool)
    pos_mask[:, list(pos)] = True
    levels = torch.cat([torch.full((k,), i) for i, k in enumerate(num_per_level)])
    assignment = DenseAssignment(
        labels=torch.where(pos_mask, 0, 2), matched_gt=torch.where(pos_mask, 0, -1), pos_mask=pos_mask,
        gt_boxes=[GT.clone() for _ in range(batch)], gt_labels=[torch.tensor([0]) for _ in range(batch)],
        candidate_idx=None, iou_thr=[torch.tensor([_thr_by_hand()]) for _ in range(batch)],
    )
    points = (anchors[:, :2] + anchors[:, 2:]) / 2
    return DenseOutput(
        features=[], cls_logits=cls_logits, box_regression=torch.zeros(batch, n, 4), pred_boxes=torch.zeros(batch, n, 4),
        points=points, anchors=anchors, strides=torch.full((n,), 8.0), levels=levels, num_per_level=list(num_per_level),
        image_sizes=[(32, 32)] * batch, box_logits=box_logits, assignment=assignment,
    )


@pytest.fixture(scope="module")
def models():
    return _tiny_gfl(0), _tiny_gfl(1)


def distil(student, teacher, **options):
    """LD as the engine trains it: the student's detection loss plus LD's terms."""
    return DistillationTask(student, teacher, LD(student, teacher, **options))


def _all_terms(student, teacher, **options):
    return LD(student, teacher, vlr_kd_weight=1.0, **options)


def test_ld_terms_by_hand_default_normalisation(models):
    distiller = _all_terms(*models, vlr_weighting="iou")
    s_out, t_out = _toy_output(1, seed=0, pos=(0, 1)), _toy_output(1, seed=1, pos=(0, 1))
    terms = distiller(s_out, t_out, [])
    s_box, t_box = s_out.box_logits[0], t_out.box_logits[0]
    ld = ld_kl_div(s_box.reshape(6, 4, 5), t_box.reshape(6, 4, 5), 10.0).mean(dim=1)  # [6] per location
    score = s_out.cls_logits[0].sigmoid().max(dim=1).values
    # main LD over the positives a0, a1, weighted by the student's max score, normalised by the summed weights
    expected_main = (ld[0] * score[0] + ld[1] * score[1]) / (score[0] + score[1])
    assert terms["loss_ld"].item() == pytest.approx(expected_main.item(), rel=1e-5)
    # VLR = a1, a2, a4 with IoU weights 2/3, 1/3, 3/7 (positives are not excluded, as in the released code)
    w = torch.tensor([2 / 3, 1 / 3, 3 / 7])
    expected_vlr = (ld[[1, 2, 4]] * w).sum() / w.sum()
    assert terms["loss_ld_vlr"].item() == pytest.approx(expected_vlr.item(), rel=1e-5)
    kd = ld_kl_div(s_out.cls_logits[0], t_out.cls_logits[0], 2.0)
    assert terms["loss_kd"].item() == pytest.approx(kd[[0, 1]].mean().item(), rel=1e-5)
    assert terms["loss_kd_vlr"].item() == pytest.approx(((kd[[1, 2, 4]] * w).sum() / w.sum()).item(), rel=1e-5)
    # mask weighting: a plain mean over the region; excluding positives drops a1
    masked = LD(*models, vlr_weighting="mask")(s_out, t_out, [])
    assert masked["loss_ld_vlr"].item() == pytest.approx(ld[[1, 2, 4]].mean().item(), rel=1e-5)
    no_pos = LD(*models, vlr_weighting="mask", vlr_exclude_positives=True)(s_out, t_out, [])
    assert no_pos["loss_ld_vlr"].item() == pytest.approx(ld[[2, 4]].mean().item(), rel=1e-5)


def test_official_normalisation_by_hand(models):
    distiller = _all_terms(*models, variant="official")
    assert distiller.vlr_weighting == "iou"  # the released code's weighting comes with the variant
    s_out, t_out = _toy_output(1, seed=0, pos=(0, 1)), _toy_output(1, seed=1, pos=(0, 1))
    terms = distiller(s_out, t_out, [])
    per_edge = ld_kl_div(s_out.box_logits[0].reshape(6, 4, 5), t_out.box_logits[0].reshape(6, 4, 5), 10.0)  # [6, 4]
    score = s_out.cls_logits[0].sigmoid().max(dim=1).values
    expected_main = (per_edge[[0, 1]].sum(dim=1) * score[[0, 1]]).sum() / OFFICIAL_MAIN_LD_DIVISOR
    assert terms["loss_ld"].item() == pytest.approx(expected_main.item(), rel=1e-5)
    w = torch.tensor([2 / 3, 1 / 3, 3 / 7])
    expected_vlr = (per_edge[[1, 2, 4]].sum(dim=1) * w).sum() / OFFICIAL_VLR_LD_DIVISOR
    assert terms["loss_ld_vlr"].item() == pytest.approx(expected_vlr.item(), rel=1e-5)
    assert (OFFICIAL_MAIN_LD_DIVISOR, OFFICIAL_VLR_LD_DIVISOR) == (4.0, 16.0)


def test_official_kd_is_a_per_level_mean_summed_over_levels(models):
    # two levels of 3 slots; positives a0 (level 0), a4 and a5 (level 1)
    s_out = _toy_output(1, seed=0, pos=(0, 4, 5), num_per_level=(3, 3))
    t_out = _toy_output(1, seed=1, pos=(0, 4, 5), num_per_level=(3, 3))
    kd = ld_kl_div(s_out.cls_logits[0], t_out.cls_logits[0], 2.0)
    official = LD(*models, variant="official")(s_out, t_out, [])
    assert official["loss_kd"].item() == pytest.approx((kd[0] + (kd[4] + kd[5]) / 2).item(), rel=1e-5)
    default = LD(*models)(s_out, t_out, [])
    assert default["loss_kd"].item() == pytest.approx(kd[[0, 4, 5]].mean().item(), rel=1e-5)


def test_official_grows_with_images_per_batch_default_does_not(models):
    for batch in (2, 4):
        single = [_toy_output(1, seed=0, pos=(0, 1)), _toy_output(1, seed=1, pos=(0, 1))]
        repeated = [_toy_output(batch, seed=0, pos=(0, 1)), _toy_output(batch, seed=1, pos=(0, 1))]
        default_1 = LD(*models)(*single, [])
        default_b = LD(*models)(*repeated, [])
        official_1 = LD(*models, variant="official")(*single, [])
        official_b = LD(*models, variant="official")(*repeated, [])
        for name in ("loss_ld", "loss_ld_vlr", "loss_kd"):
            assert default_b[name].item() == pytest.approx(default_1[name].item(), rel=1e-5)
        for name in ("loss_ld", "loss_ld_vlr"):  # constant divisors: the sum over images grows
            assert official_b[name].item() == pytest.approx(batch * official_1[name].item(), rel=1e-5)
        assert official_b["loss_kd"].item() == pytest.approx(official_1["loss_kd"].item(), rel=1e-5)


def test_official_images_per_gpu_reproduces_a_k_image_gpu(models):
    # images_per_gpu=k: the official LD sums scaled by k / B (the mean over k-image chunks, as DDP
    # averages gradients). Four copies of one image with k = 2 == the released code on 2 copies;
    # k = 4 == the code as released on this batch; the KD terms (means) are untouched.
    single = [_toy_output(1, seed=0, pos=(0, 1)), _toy_output(1, seed=1, pos=(0, 1))]
    four = [_toy_output(4, seed=0, pos=(0, 1)), _toy_output(4, seed=1, pos=(0, 1))]
    two = [_toy_output(2, seed=0, pos=(0, 1)), _toy_output(2, seed=1, pos=(0, 1))]
    official_1 = LD(*models, variant="official")(*single, [])
    official_2 = LD(*models, variant="official")(*two, [])
    official_4 = LD(*models, variant="official")(*four, [])
    chunked = LD(*models, variant="official", images_per_gpu=2)(*four, [])
    as_released = LD(*models, variant="official", images_per_gpu=4)(*four, [])
    for name in ("loss_ld", "loss_ld_vlr"):
        assert official_1[name].item() > 0
        assert chunked[name].item() == pytest.approx(official_2[name].item(), rel=1e-5)
        assert chunked[name].item() == pytest.approx(2 * official_1[name].item(), rel=1e-5)
        assert as_released[name].item() == pytest.approx(official_4[name].item(), rel=1e-6)
    assert chunked["loss_kd"].item() == pytest.approx(official_4["loss_kd"].item(), rel=1e-6)
    for bad in ({"images_per_gpu": 0}, {"images_per_gpu": 2.0}, {"images_per_gpu": True}):
        with pytest.raises(ValueError, match="images_per_gpu"):
            LD(*models, variant="official", **bad)
    with pytest.raises(ValueError, match="variant='official' only"):
        LD(*models, images_per_gpu=2)


def test_weights_switch_terms_and_published_defaults(models):
    default = LD(*models)
    assert default.weight_dict == {"loss_ld": 2.0, "loss_ld_vlr": 3.25, "loss_kd": 10.0}  # calibrated (below)
    assert LD(*models, variant="official").weight_dict == {"loss_ld": 0.25, "loss_ld_vlr": 0.25, "loss_kd": 10.0}
    assert default.temperatures == {"loss_ld": 10.0, "loss_ld_vlr": 10.0, "loss_kd": 2.0, "loss_kd_vlr": 2.0}
    assert default.vlr_alpha == 0.25 and default.vlr_weighting == "mask" and default.variant == "kdlab"
    main_only = LD(*models, vlr_ld_weight=0, main_kd_weight=0)
    terms = main_only(_toy_output(1, seed=0), _toy_output(1, seed=1), [])
    assert set(terms) == {"loss_ld"} and main_only.weight_dict["loss_ld"] == 2.0
    assert LD(*models, main_ld_weight=0.25).weight_dict["loss_ld"] == 0.25  # an explicit weight wins
    # Main KD alone (experiments/ld_shapes.py's main_kd row): only the class KD term is computed
    kd_only = LD(*models, main_ld_weight=0, vlr_ld_weight=0)
    assert kd_only.weight_dict == {"loss_kd": 10.0}
    assert set(kd_only(_toy_output(1, seed=0), _toy_output(1, seed=1), [])) == {"loss_kd"}


def test_kdlab_weights_are_the_published_ones_times_the_measured_ratio(models):
    # experiments/ld_calibration.py on the shapes GFL student and teacher (12 batches of 16 training images),
    # official term at 2 images per GPU / kdlab term, value and gradient on the head outputs:
    # Main LD 0.61 untrained, 6.4 / 6.7 / 7.0 after 100 / 200 / 300 iterations (~11 trained): 0.25 x 8;
    # VLR LD 12.3-12.8 (value), 13.1-13.4 (gradient) throughout: 0.25 x 13; Main KD ~1: 10 unchanged
    assert CALIBRATED_LD_WEIGHTS == {"loss_ld": 0.25 * 8, "loss_ld_vlr": 0.25 * 13}
    assert PUBLISHED_LD_WEIGHTS == {"loss_ld": 0.25, "loss_ld_vlr": 0.25}
    # the Main LD ratio is the student's summed scores over the positives of 2 images (the measured quantity)
    s_out, t_out = _toy_output(4, seed=0, pos=(0, 1)), _toy_output(4, seed=1, pos=(0, 1))
    kdlab_term = LD(*models)(s_out, t_out, [])["loss_ld"]
    official_term = LD(*models, variant="official", images_per_gpu=2)(s_out, t_out, [])["loss_ld"]
    scores = s_out.cls_logits[0, :2].sigmoid().max(dim=1).values  # the same image 4 times
    assert (official_term / kdlab_term).item() == pytest.approx(2 * scores.sum().item(), rel=1e-5)
    for bad in ({"variant": "paper"}, {"vlr_weighting": "soft"}, {"main_ld_weight": -1.0}, {"vlr_ld_temperature": 0.0}):
        with pytest.raises(ValueError):
            LD(*models, **bad)


def test_ld_anchor_free_branch_and_computed_thresholds(models):
    s_out, t_out = _toy_output(1, seed=0, pos=(0,)), _toy_output(1, seed=1, pos=(0,))
    reference = LD(*models)(s_out, t_out, [])["loss_ld_vlr"]
    # a head without ATSS thresholds: LD computes them (topk 3 reproduces the hand layout's candidates)
    s_out.assignment.iou_thr = None
    assert LD(*models, atss_topk=3)(s_out, t_out, [])["loss_ld_vlr"].item() == pytest.approx(reference.item())
    # FCOS-style output: no anchors -> negatives inside the GT, weighted by the student's max score
    s_out.anchors = t_out.anchors = None
    weights = vlr_weights(s_out)
    expected = anchor_free_vlr(s_out.points, GT, s_out.assignment.pos_mask[0], s_out.cls_logits[0])
    assert torch.equal(weights[0], expected) and weights[0, 0] == 0 and (weights[0] > 0).sum() == 2  # a1, a4 centres inside
    ld = edge_ld(s_out.box_logits[0], t_out.box_logits[0], 4, 10.0)
    got = LD(*models)(s_out, t_out, [])["loss_ld_vlr"]
    w = expected[expected > 0]
    assert got.item() == pytest.approx(((ld[expected > 0] * w).sum() / w.sum().clamp(min=1)).item(), rel=1e-5)


# ---------------------------------------------------------------- mismatch errors


def test_mismatch_errors(models):
    student, teacher = models
    with pytest.raises(ValueError, match="reg_max"):
        LD(student, _tiny_gfl(2, reg_max=8))
    with pytest.raises(ValueError, match="number of classes"):
        LD(student, _tiny_gfl(2, num_classes=4))
    odd_strides = _tiny_gfl(2)
    odd_strides.strides = (8, 16, 32, 64)
    with pytest.raises(ValueError, match="strides"):
        LD(student, odd_strides)
    with pytest.raises(ValueError, match="same module"):
        LD(student, student)
    distiller = LD(student, teacher)
    s_out = _toy_output(1, seed=0)
    with pytest.raises(ValueError, match="reg_max"):
        distiller(s_out, _toy_output(1, reg_max=8), [])
    with pytest.raises(ValueError, match="slot layout"):
        distiller(s_out, _toy_output(1, num_per_level=(3, 3)), [])
    shifted = _toy_output(1)
    shifted.points = shifted.points + 1.0
    with pytest.raises(ValueError, match="slot layout"):
        distiller(s_out, shifted, [])
    no_dist = _toy_output(1)
    no_dist.box_logits = None
    with pytest.raises(ValueError, match="edge-distribution box logits"):
        distiller(s_out, no_dist, [])
    no_assignment = _toy_output(1)
    no_assignment.assignment = None
    with pytest.raises(ValueError, match="assignment"):
        distiller(no_assignment, _toy_output(1), [])


# ---------------------------------------------------------------- end to end on a tiny GFL


def test_self_ld_zero_when_student_equals_teacher(tiny_batch):
    student = _tiny_gfl(0)
    distiller = build_distillation("ld", student, copy.deepcopy(student), {"vlr_kd_weight": 1.0})
    assert isinstance(distiller.distillers["ld"], LD)
    terms = distiller(*tiny_batch())
    for name in ("loss_ld", "loss_ld_vlr", "loss_kd", "loss_kd_vlr"):
        assert terms[name].abs().item() < 1e-6, name
    official = distil(student, copy.deepcopy(student), variant="official")(*tiny_batch())
    assert all(official[k].abs().item() < 1e-6 for k in ("loss_ld", "loss_ld_vlr", "loss_kd"))
    # the regions are not empty: a perturbed copy of the student (self-LD's teacher) gives positive terms
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.head.gfl_reg.weight.add_(0.05 * torch.randn_like(teacher.head.gfl_reg.weight))
        teacher.head.gfl_cls.weight.add_(0.05 * torch.randn_like(teacher.head.gfl_cls.weight))
    perturbed = distil(student, teacher, vlr_kd_weight=1.0)(*tiny_batch())
    assert all(perturbed[k].item() > 1e-6 for k in ("loss_ld", "loss_ld_vlr", "loss_kd", "loss_kd_vlr"))


def test_no_gradient_reaches_the_teacher(tiny_batch):
    student, teacher = _tiny_gfl(0), _tiny_gfl(1)
    distiller = distil(student, teacher)
    distiller.train()
    assert not teacher.training and student.training
    terms = distiller(*tiny_batch())
    assert terms["loss_ld"].item() > 0 and terms["loss_ld_vlr"].item() > 0 and terms["loss_kd"].item() > 0
    distill_total = sum(distiller.weight_dict[k] * terms[k] for k in ("loss_ld", "loss_ld_vlr", "loss_kd"))
    distill_total.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.head.gfl_reg.weight.grad.abs().sum() > 0  # LD reaches the student's box branch
    assert not any(k.startswith("teacher.") for k in distiller.trainable_state_dict())
    assert {id(p) for p in distiller.trainable_parameters()} == {id(p) for p in student.parameters()}
    # the teacher's output in the distiller's forward is computed without a graph
    with torch.no_grad():
        t_out = teacher(tiny_batch()[0], [(64, 64)] * 2)
    assert not t_out.box_logits.requires_grad


def test_released_recipe_is_official_ld_at_2_images_per_gpu_plus_fine_grained_imitation(tmp_path, tiny_batch):
    student, teacher = _tiny_gfl(0), _tiny_gfl(1)
    task = build_distillation("ld_released", student, teacher)
    ld, imitation = task.distillers["ld"], task.distillers["fine_grained"]
    assert isinstance(ld, LD) and (ld.variant, ld.images_per_gpu) == ("official", 2)
    assert (ld.vlr_rule, ld.vlr_weighting) == ("iof_diou", "iou")  # the released region and weighting
    assert ld.weight_dict == {"loss_ld": 0.25, "loss_ld_vlr": 0.25, "loss_kd": 10.0}  # the published weights
    assert isinstance(imitation, FineGrainedImitation) and imitation.weight_dict == {"loss_imitation": 2.0}
    terms = task(*tiny_batch())
    assert {"loss_ld", "loss_ld_vlr", "loss_kd", "loss_imitation"} <= set(terms)
    # a config overrides one method's option, keyed by the method's name; the rest stays the recipe's
    path = tmp_path / "recipe.yaml"
    path.write_text("distill: ld_released\nteacher_checkpoint: t.pt\ndistill_options:\n  ld:\n    main_kd_weight: 5.0\n")
    cfg = load_config(path)
    task = build_distillation(cfg.distill, student, teacher, cfg.distill_options)
    ld, imitation = task.distillers["ld"], task.distillers["fine_grained"]
    assert ld.weight_dict == {"loss_ld": 0.25, "loss_ld_vlr": 0.25, "loss_kd": 5.0} and ld.images_per_gpu == 2
    assert imitation.weight_dict == {"loss_imitation": 2.0}
    with pytest.raises(ValueError, match="keyed by"):
        build_distillation("ld_released", student, teacher, {"main_kd_weight": 5.0})


# ---------------------------------------------------------------- the zoo's distribution-head RetinaNet and FCOS


def _tiny_zoo(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_detector(name, 3, backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=16,
                          head_convs=1, **kw)


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_ld_on_distribution_retinanet_and_fcos(name, tiny_batch):
    student, teacher = _tiny_zoo(name, 0, reg_max=8), _tiny_zoo(name, 1, reg_max=8)
    images, targets = tiny_batch()
    s_out = student(images, [(64, 64)] * 2, targets)
    assert s_out.box_logits.shape[-1] == 4 * 9
    if name == "fcos":  # anchor-free: the VLR is the negatives inside a GT, weighted by the student's score
        assert s_out.anchors is None
        expected = anchor_free_vlr(s_out.points, targets[0]["boxes"], s_out.assignment.pos_mask[0], s_out.cls_logits[0])
        assert torch.equal(vlr_weights(s_out)[0], expected) and (expected > 0).any()
    else:  # max-IoU assignment without ATSS thresholds: LD computes them from the anchors
        assert s_out.assignment.iou_thr is None and s_out.anchors is not None
        thr = atss_assign(s_out.anchors, s_out.num_per_level, targets[0]["boxes"], 9).iou_thr
        region = valuable_localization_region(s_out.anchors, targets[0]["boxes"], thr, 0.25, "mask").weight
        assert torch.equal(vlr_weights(s_out)[0], region) and region.sum() > 0
    terms = distil(student, teacher, vlr_kd_weight=1.0)(images, targets)
    assert all(terms[k].item() > 0 for k in ("loss_ld", "loss_ld_vlr", "loss_kd", "loss_kd_vlr"))
    same = distil(student, copy.deepcopy(student), vlr_kd_weight=1.0)(images, targets)
    assert all(same[k].abs().item() < 1e-6 for k in ("loss_ld", "loss_ld_vlr", "loss_kd", "loss_kd_vlr"))


def test_ld_errors_across_detectors(tiny_batch):
    images, targets = tiny_batch()
    with pytest.raises(ValueError, match="slot layout"):  # 9 anchors per location vs 1
        distil(_tiny_gfl(0, reg_max=8), _tiny_zoo("retinanet", 1, reg_max=8))(images, targets)
    with pytest.raises(ValueError, match="edge-distribution box logits"):  # a plain (delta-regression) RetinaNet
        distil(_tiny_zoo("retinanet", 0, reg_max=8), _tiny_zoo("retinanet", 1))(images, targets)


def test_vlr_degenerate_gt_boxes_stay_finite():
    # BCCD holds 1 x 1 pixel boxes; a zero-area box must not give NaNs either
    gts = torch.tensor([[3.0, 3.0, 4.0, 4.0], [7.0, 7.0, 7.0, 7.0]])
    atss = atss_assign(ANCHORS, [6], gts, topk=3)
    vlr = valuable_localization_region(ANCHORS, gts, atss.iou_thr, alpha=0.25, weighting="iou")
    assert torch.isfinite(atss.iou_thr).all() and torch.isfinite(vlr.weight).all()
    # the zero-area box overlaps nothing: its threshold is 0 and its region is empty
    assert atss.iou_thr[1].item() == 0.0 and not (vlr.matched_gt == 1).any()


def test_vlr_batched_equals_per_image():
    gts = [GT, torch.cat([GT, torch.tensor([[6.0, 0.0, 16.0, 10.0]])]), torch.zeros(0, 4)]
    thrs = [torch.tensor([_thr_by_hand()]), torch.tensor([_thr_by_hand(), 0.9]), torch.zeros(0)]
    padded_gt, padded_thr = torch.zeros(3, 2, 4), torch.zeros(3, 2)  # zero boxes with threshold 0: in no region
    for b, (g, t) in enumerate(zip(gts, thrs)):
        padded_gt[b, : len(g)], padded_thr[b, : len(g)] = g, t
    batched = valuable_localization_region(ANCHORS, padded_gt, padded_thr, weighting="iou")
    for b, (g, t) in enumerate(zip(gts, thrs)):
        single = valuable_localization_region(ANCHORS, g, t, weighting="iou")
        assert torch.equal(batched.weight[b], single.weight) and torch.equal(batched.matched_gt[b], single.matched_gt)


def test_one_class_warns_that_classification_kd_is_zero():
    student, teacher = _tiny_gfl(0, num_classes=1), _tiny_gfl(1, num_classes=1)
    with pytest.warns(UserWarning, match="identically 0"):
        LD(student, teacher)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LD(student, teacher, main_kd_weight=0)  # nothing to warn about
