"""DAB-DETR: Hungarian matching against brute force, the set loss by hand, the decoder's anchor chain,
separate extra query passes, the padding mask, post-processing, config and checkpoint round trip."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.config import ConfigError, config_from_dict, load_config
from kdlab.engine.checkpoint import export_student, load_detector
from kdlab.engine.optim import is_backbone_parameter
from kdlab.models import build_detector
from kdlab.models.base import weighted_total
from kdlab.models.dab_detr import DABDETR, feature_padding_mask
from kdlab.models.detr_criterion import HungarianMatcher, SetCriterion, hungarian_match, normalized_gt_boxes
from kdlab.models.detr_outputs import SetOutput
from kdlab.models.detr_transformer import image_position_embedding, sine_embedding

REPO = Path(__file__).resolve().parents[1]
TINY = dict(backbone="resnet18", backbone_width=8, backbone_norm="frozen_bn", feature_level="C4", hidden_dim=32,
            num_queries=8, enc_layers=1, dec_layers=2, num_heads=4, dim_feedforward=64)


def tiny_detr(num_classes: int = 3, **overrides) -> DABDETR:
    torch.manual_seed(0)
    return build_detector("dab_detr", num_classes, **{**TINY, **overrides})


def target(boxes, labels, size):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "size": torch.tensor(size)}


def brute_force_match(cost: torch.Tensor) -> tuple[float, set]:
    """Minimum total cost over every one-to-one assignment of the smaller side into the larger one."""
    num_q, num_g = cost.shape
    if min(num_q, num_g) == 0:
        return 0.0, set()
    best = (math.inf, set())
    if num_q >= num_g:
        for queries in itertools.permutations(range(num_q), num_g):  # queries[g] is matched to target g
            total = sum(cost[q, g].item() for g, q in enumerate(queries))
            best = min(best, (total, {(q, g) for g, q in enumerate(queries)}), key=lambda t: t[0])
    else:
        for gts in itertools.permutations(range(num_g), num_q):
            total = sum(cost[q, g].item() for q, g in enumerate(gts))
            best = min(best, (total, set(enumerate(gts))), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("num_q,num_g", [(3, 3), (5, 2), (6, 4), (4, 0), (2, 3)])
def test_hungarian_match_equals_brute_force(num_q, num_g):
    generator = torch.Generator().manual_seed(num_q * 10 + num_g)
    for _ in range(5):
        cost = torch.rand(num_q, num_g, generator=generator)
        query_idx, gt_idx = hungarian_match(cost)
        total, pairs = brute_force_match(cost)
        assert len(query_idx) == len(gt_idx) == min(num_q, num_g)
        assert set(zip(query_idx.tolist(), gt_idx.tolist())) == pairs  # continuous costs: a unique optimum
        assert cost[query_idx, gt_idx].sum().item() == pytest.approx(total)


def giou_by_hand(a, b):
    """GIoU of two xyxy boxes (python floats)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_matcher_cost_by_hand_and_brute_force():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 5, 3, generator=generator)
    boxes = torch.cat([torch.rand(1, 5, 2, generator=generator) * 0.6 + 0.2,
                       torch.rand(1, 5, 2, generator=generator) * 0.3 + 0.1], dim=-1)  # cxcywh
    gt = target([[10, 20, 60, 50], [100, 5, 190, 95]], [2, 0], (100, 200))
    gt_cxcywh = [[35 / 200, 35 / 100, 50 / 200, 30 / 100], [145 / 200, 50 / 100, 90 / 200, 90 / 100]]
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(logits[0], boxes[0], gt["labels"], torch.tensor(gt_cxcywh))
    for q in range(5):
        for g, label in enumerate([2, 0]):
            p = torch.sigmoid(logits[0, q, label]).item()
            focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
            l1 = sum(abs(boxes[0, q, i].item() - gt_cxcywh[g][i]) for i in range(4))
            cx, cy, w, h = boxes[0, q].tolist()
            gx, gy, gw, gh = gt_cxcywh[g]
            giou = giou_by_hand([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                                [gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2])
            assert cost[q, g].item() == pytest.approx(2 * focal + 5 * l1 - 2 * giou, abs=1e-5)
    (query_idx, gt_idx), = matcher(logits, boxes, [gt])
    assert cost[query_idx, gt_idx].sum().item() == pytest.approx(brute_force_match(cost)[0])


def test_batched_matcher_solves_each_image_on_its_own_cost():
    """The matcher computes one cost matrix for the batch; each image must still be matched on its own
    block only (an image with no box gets empty indices; a batch with no box at all works too)."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 4, generator=generator)
    boxes = torch.cat([torch.rand(3, 6, 2, generator=generator) * 0.6 + 0.2,
                       torch.rand(3, 6, 2, generator=generator) * 0.3 + 0.1], dim=-1)
    targets = [target([[10, 20, 60, 50], [100, 5, 190, 95], [30, 30, 40, 45]], [2, 0, 3], (100, 200)),
               target([], [], (100, 200)),
               target([[0, 0, 50, 50]], [1], (80, 120))]
    matcher = HungarianMatcher()
    matches = matcher(logits, boxes, targets)
    for image, (query_idx, gt_idx) in enumerate(matches):
        cost = matcher.cost_matrix(logits[image], boxes[image], targets[image]["labels"], normalized_gt_boxes(targets[image]))
        assert len(query_idx) == len(gt_idx) == len(targets[image]["labels"])
        if len(gt_idx):
            assert cost[query_idx, gt_idx].sum().item() == pytest.approx(brute_force_match(cost)[0], abs=1e-5)
    assert [len(q) for q, _ in matcher(logits, boxes, [targets[1]] * 3)] == [0, 0, 0]


def set_output(layer_logits, layer_boxes, image_sizes):
    layer_logits, layer_boxes = torch.tensor(layer_logits), torch.tensor(layer_boxes)
    batch, num_q = layer_boxes.shape[1:3]
    return SetOutput(features=[], feature_strides=[], memory=torch.zeros(batch, 1, 4),
                     memory_mask=torch.zeros(batch, 1, dtype=torch.bool), pred_logits=layer_logits[-1],
                     pred_boxes=layer_boxes[-1], layer_logits=layer_logits, layer_boxes=layer_boxes,
                     layer_references=layer_boxes, query_anchors=torch.zeros(num_q, 4), image_sizes=image_sizes)


def focal_by_hand(logits, onehot, alpha=0.25):
    total = 0.0
    for x, t in zip(logits, onehot):
        p = 1 / (1 + math.exp(-x))
        total += alpha * (1 - p) ** 2 * -math.log(p) if t else (1 - alpha) * p ** 2 * -math.log(1 - p)
    return total


def test_criterion_one_query_one_box_by_hand():
    # GT: xyxy (40, 30, 120, 70) in a 100 x 200 (h x w) image = cxcywh (0.4, 0.5, 0.4, 0.4), class 0
    gt = target([[40, 30, 120, 70]], [0], (100, 200))
    # layer 0 predicts the GT box exactly; the final layer predicts (0.5, 0.5, 0.4, 0.2)
    output = set_output([[[[0.2, 0.3]]], [[[0.5, -1.0]]]],
                        [[[[0.4, 0.5, 0.4, 0.4]]], [[[0.5, 0.5, 0.4, 0.2]]]], [(100, 200)])
    criterion = SetCriterion(num_classes=2, num_layers=2)
    terms = criterion(output, [gt])
    assert criterion.weight_dict == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0,
                                     "loss_ce_0": 1.0, "loss_bbox_0": 5.0, "loss_giou_0": 2.0}
    # pred xyxy (0.3, 0.4, 0.7, 0.6), GT xyxy (0.2, 0.3, 0.6, 0.7): IoU 0.06 / 0.18, hull 0.5 x 0.4
    giou = 0.06 / 0.18 - (0.2 - 0.18) / 0.2
    assert terms["loss_ce"].item() == pytest.approx(focal_by_hand([0.5, -1.0], [1, 0]), rel=1e-5)
    assert terms["loss_bbox"].item() == pytest.approx(0.1 + 0.2, rel=1e-5)
    assert terms["loss_giou"].item() == pytest.approx(1 - giou, rel=1e-5)
    assert terms["loss_ce_0"].item() == pytest.approx(focal_by_hand([0.2, 0.3], [1, 0]), rel=1e-5)
    assert terms["loss_bbox_0"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["loss_giou_0"].item() == pytest.approx(0.0, abs=1e-6)


def test_criterion_without_ground_truth():
    # two queries, no GT: every class of every query is a negative; the box terms are zero; N clamps to 1
    output = set_output([[[[0.1, -2.0], [1.5, 0.0]]]], [[[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.4]]]], [(64, 64)])
    output.layer_logits.requires_grad_(True)
    output.layer_boxes.requires_grad_(True)
    terms = SetCriterion(num_classes=2, num_layers=1)(output, [target([], [], (64, 64))])
    assert terms["loss_ce"].item() == pytest.approx(focal_by_hand([0.1, -2.0, 1.5, 0.0], [0, 0, 0, 0]), rel=1e-5)
    assert terms["loss_bbox"].item() == 0.0 and terms["loss_giou"].item() == 0.0
    sum(terms.values()).backward()  # the graph stays connected
    assert torch.equal(output.layer_boxes.grad, torch.zeros_like(output.layer_boxes))


def test_sine_embeddings_by_hand():
    # F = 4, T = 100: frequencies 1, 1, 1/10, 1/10 of the angle 2 pi c
    emb = sine_embedding(torch.tensor([[0.25]]), num_feats=4, temperature=100)
    angle = 2 * math.pi * 0.25
    expected = [math.sin(angle), math.cos(angle), math.sin(angle / 10), math.cos(angle / 10)]
    assert torch.allclose(emb, torch.tensor([expected]), atol=1e-6)
    # the image embedding normalises over the unpadded cells: padding does not change them
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True
    pos = image_position_embedding(mask, num_feats=4, temperature=20)  # [B, H, W, 8]
    small = image_position_embedding(torch.zeros(1, 2, 3, dtype=torch.bool), num_feats=4, temperature=20)
    assert pos.shape == (2, 4, 6, 8)
    assert torch.allclose(pos[1, :2, :3], small[0], atol=1e-5)
    # Cat(PE(y), PE(x)): the bottom-right valid cell has y = x = 1
    assert torch.allclose(small[0, -1, -1], sine_embedding(torch.tensor([1.0, 1.0]), 4, 20), atol=1e-5)


def test_feature_padding_mask_by_hand():
    mask = feature_padding_mask([(128, 128), (100, 60)], (4, 4), stride=32, device=torch.device("cpu"))
    assert not mask[0].any()
    # ceil(100 / 32) = 4 valid rows, ceil(60 / 32) = 2 valid columns
    assert torch.equal(mask[1], torch.tensor([[False, False, True, True]] * 4))


def batch_and_targets():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    targets = [target([[4, 6, 30, 40], [35, 20, 60, 60]], [0, 2], (64, 64)), target([[10, 10, 50, 30]], [1], (64, 64))]
    return images, targets


def test_decoder_anchor_chain_and_shapes():
    model = tiny_detr().eval()
    images, targets = batch_and_targets()
    out = model(images, [(64, 64), (64, 64)], targets)
    num_layers, batch, num_q, num_classes = 2, 2, 8, 3
    assert out.layer_logits.shape == (num_layers, batch, num_q, num_classes)
    assert out.layer_boxes.shape == out.layer_references.shape == (num_layers, batch, num_q, 4)
    assert out.memory.shape == (batch, 16, 32) and out.memory_mask.shape == (batch, 16)  # C4 of 64 px: 4 x 4
    assert out.feature_strides == [16] and out.features[0].shape == (batch, 32, 4, 4)
    assert torch.equal(out.pred_logits, out.layer_logits[-1]) and torch.equal(out.pred_boxes, out.layer_boxes[-1])
    # layer 0 starts from the learned anchors; at the box head's zero init layer l's anchor is layer l-1's box
    assert torch.equal(out.layer_references[0], model.query_anchors.sigmoid().expand(batch, -1, -1))
    assert torch.equal(out.layer_references[1], out.layer_boxes[0])
    # the box head's last layer starts at zero: every layer's box is its anchor (up to logit clamping)
    assert torch.allclose(out.layer_boxes, out.layer_references.expand_as(out.layer_boxes), atol=1e-6)
    # with targets, the final layer's matching is in the output: min(Q, G) pairs per image
    assert [len(q) for q, _ in out.matches] == [2, 1]


def test_set_output_follows_the_output_protocol():
    from kdlab.models.outputs import DetectorOutput, MissingOutputError

    model = tiny_detr().train()
    images, targets = batch_and_targets()
    out = model(images, [(64, 64), (64, 64)], targets, extra_queries={"general": torch.randn(5, 4)})
    assert model.output_kind == "set" and isinstance(out, DetectorOutput) and out.kind == "set"
    assert out.feature_strides == [16] and out.detector_name == "DAB-DETR"
    with pytest.raises(MissingOutputError, match="KD-DETR needs .* from the teacher, but the teacher's output \\(DAB-DETR\\)"):
        out.dense_slots("KD-DETR", "teacher")
    with pytest.raises(MissingOutputError, match="has no box_logits"):
        out.require("box_logits", "LD", "teacher")
    assert out.require("query_anchors", "KD-DETR", "teacher") is out.query_anchors
    assert out.layer_logits.requires_grad and out.extra["general"].layer_boxes.requires_grad
    detached = out.detach()  # every tensor, the extra passes included
    assert isinstance(detached, SetOutput) and not detached.layer_logits.requires_grad
    assert not detached.extra["general"].layer_boxes.requires_grad
    assert torch.equal(detached.extra["general"].layer_logits, out.extra["general"].layer_logits)
    assert detached.matches is not None and detached.feature_strides == [16]


def test_anchor_update_and_box_prediction_follow_the_released_decoder():
    """DAB-DETR's released decoder: box_l = sigmoid(head(LN(c_l)) + logit(R_l)) from the normalised content,
    the next anchor R_(l+1) = sigmoid(head(c_l) + logit(r_l)) from the content before the norm; the queries of
    layer l+1 use r_(l+1) = R_(l+1) detached, box_(l+1) uses R_(l+1) with its gradient."""
    model = tiny_detr().train()
    torch.nn.init.normal_(model.box_head.layers[-1].weight, std=0.5)  # a box head that moves the anchors
    decoder, head = model.decoder, model.box_head
    # a trained shared norm (the layers' outputs are already layer-normed: at its init LN(c) = c)
    torch.nn.init.normal_(decoder.norm.weight, mean=1.0, std=0.5)
    torch.nn.init.normal_(decoder.norm.bias, std=0.5)
    before_norm = []
    handle = decoder.norm.register_forward_hook(lambda module, inputs, output: before_norm.append(inputs[0]))
    images, _ = batch_and_targets()
    out = model(images, [(64, 64), (64, 64)])
    handle.remove()
    hidden = [decoder.norm(c) for c in before_norm]
    anchor = model.query_anchors.sigmoid().expand(2, -1, -1)
    logit = torch.logit
    chain = [anchor]  # R_l, with gradients
    for layer in range(len(before_norm) - 1):
        chain.append((head(before_norm[layer]) + logit(chain[-1].detach() if layer else chain[-1], eps=1e-3)).sigmoid())
    for layer, (h, reference) in enumerate(zip(hidden, chain)):
        box = (head(h) + logit(reference, eps=1e-3)).sigmoid()
        assert torch.allclose(out.layer_boxes[layer], box, atol=1e-6)
        assert torch.allclose(out.layer_references[layer], reference, atol=1e-6)
    assert not torch.allclose(out.layer_references[1], out.layer_boxes[0], atol=1e-3)  # not the normalised content's box
    # the gradient of layer 1's box reaches the box head through layer 0's anchor update too
    params = list(head.parameters())
    grads = torch.autograd.grad(out.layer_boxes[1].sum(), params, retain_graph=True)
    hand = torch.autograd.grad((head(hidden[1]) + logit(chain[1], eps=1e-3)).sigmoid().sum(), params, retain_graph=True)
    cut = torch.autograd.grad((head(hidden[1]) + logit(chain[1].detach(), eps=1e-3)).sigmoid().sum(), params)
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(grads, hand))
    assert not all(torch.allclose(g, c, atol=1e-4) for g, c in zip(grads, cut))


def test_gradient_reaches_anchors_and_exposed_references_are_detached():
    model = tiny_detr().train()
    images, targets = batch_and_targets()
    out = model(images, [(64, 64), (64, 64)], targets)
    assert not out.layer_references.requires_grad  # what each layer's queries were built from, for readers
    criterion = model.build_criterion()
    weighted_total(criterion(out, targets), criterion.weight_dict).backward()
    assert model.anchor_embed.weight.grad.abs().sum() > 0


def test_extra_queries_are_separate_passes():
    model = tiny_detr(dropout=0.1).train()  # dropout on: the passes must not shift each other's random draws
    images, _ = batch_and_targets()
    sizes = [(64, 64), (64, 64)]
    torch.manual_seed(5)
    plain = model(images, sizes)
    general = torch.randn(2, 6, 4)  # per image
    torch.manual_seed(5)
    with_extra = model(images, sizes, extra_queries={"specific": model.query_anchors.detach(), "general": general})
    for name in ("memory", "pred_logits", "pred_boxes", "layer_logits", "layer_boxes", "layer_references"):
        assert torch.equal(getattr(plain, name), getattr(with_extra, name)), name
    assert with_extra.extra["general"].layer_logits.shape == (2, 2, 6, 3)
    assert with_extra.extra["general"].layer_boxes.shape == (2, 2, 6, 4)
    assert with_extra.extra["specific"].layer_references.shape == (2, 2, 8, 4)
    assert torch.equal(with_extra.extra["general"].layer_references[0], general.sigmoid())
    # without dropout, decoding the model's own anchors again reproduces the detection outputs exactly:
    # nothing of the detection queries leaks into (or out of) the extra pass
    model.eval()
    out = model(images, sizes, extra_queries={"again": model.query_anchors.detach()})
    assert torch.equal(out.extra["again"].layer_logits, out.layer_logits)
    assert torch.equal(out.extra["again"].layer_boxes, out.layer_boxes)
    with pytest.raises(ValueError, match="extra_queries"):
        model(images, sizes, extra_queries={"bad": torch.zeros(3, 6, 4)})


class PatchStem(nn.Module):
    """A stride-16 patch embedding: unlike a ResNet, its valid cells never see the padding."""

    stride = 16

    def __init__(self, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(3, out_channels, kernel_size=16, stride=16)

    def forward(self, images):
        return self.proj(images)


def test_padded_image_gives_the_unpadded_output():
    # A CNN's receptive field crosses the image border (in DETR too), so the transformer's masking is
    # checked behind a patch stem: whatever fills the padding, the image's predictions do not change.
    model = tiny_detr().eval()
    model.backbone = PatchStem(model.input_proj.in_channels)
    image = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(2))
    alone = model(image, [(64, 48)])
    batch = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3)) * 5  # garbage padding
    batch[0, :, :64, :48] = image[0]
    padded = model(batch, [(64, 48), (96, 96)])
    assert padded.memory_mask[0].sum().item() == 6 * 6 - 4 * 3 and not padded.memory_mask[1].any()
    assert torch.allclose(padded.pred_logits[0], alone.pred_logits[0], atol=1e-4)
    assert torch.allclose(padded.pred_boxes[0], alone.pred_boxes[0], atol=1e-5)
    assert torch.allclose(padded.pred_boxes_xyxy[0], alone.pred_boxes_xyxy[0], atol=1e-3)


def test_postprocess_top_k_in_pixels():
    model = tiny_detr(num_classes=2, detections_per_img=3)
    logits = [[[[2.0, -5.0], [-5.0, 0.5], [1.0, 3.0]]]]  # sigmoid ranking: (q2, c1), (q0, c0), (q2, c0)
    boxes = [[[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]]]
    output = set_output(logits, boxes, [(100, 200)])  # h = 100, w = 200
    (result,) = model.postprocess(output)
    assert result["labels"].tolist() == [1, 0, 0]
    assert torch.allclose(result["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    expected = torch.tensor([[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])
    assert torch.allclose(result["boxes"], expected)
    assert torch.allclose(output.pred_boxes_xyxy[0, 0], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_loss_decreases_when_overfitting_one_batch():
    model = tiny_detr(backbone_norm="gn", num_queries=10).train()
    criterion = model.build_criterion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, targets = batch_and_targets()
    losses = []
    for _ in range(40):  # about 1 s
        terms = criterion(model(images, [(64, 64), (64, 64)], targets), targets)
        total = weighted_total(terms, criterion.weight_dict)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert sum(losses[-5:]) / 5 < 0.45 * losses[0]  # measured: 10.1 -> 3.0


def test_config_detector_options_and_checkpoint_round_trip(tmp_path):
    options = {k: v for k, v in TINY.items() if k not in ("backbone", "backbone_width", "backbone_norm")}
    cfg = config_from_dict({"model": "dab_detr", "backbone": "resnet18", "backbone_width": 8,
                            "backbone_norm": "frozen_bn", "detector_options": options})
    assert cfg.model_options() == {"backbone": "resnet18", "backbone_width": 8, "backbone_norm": "frozen_bn", **options}
    with pytest.raises(ConfigError, match="model fields"):
        config_from_dict({"detector_options": {"backbone": "resnet50"}})
    model = tiny_detr()
    export_student(tmp_path / "student.pt", cfg, 3, ["a", "b", "c"], model)
    loaded = load_detector(tmp_path / "student.pt")
    assert isinstance(loaded, DABDETR) and loaded.num_queries == 8 and loaded.class_names == ["a", "b", "c"]
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    images, _ = batch_and_targets()
    assert torch.equal(model.eval()(images, [(64, 64)] * 2).pred_boxes, loaded(images, [(64, 64)] * 2).pred_boxes)


def test_backbone_parameters_get_the_backbone_lr():
    names = [n for n, _ in tiny_detr().named_parameters()]
    backbone = {n for n in names if is_backbone_parameter(f"student.{n}")}
    assert backbone == {n for n in names if n.startswith("backbone.body.")} and backbone
    assert not any(is_backbone_parameter(f"student.{n}") for n in names if n.startswith("input_proj"))


@pytest.mark.parametrize("options,message", [
    ({"feature_level": "C6"}, "feature_level"),
    ({"hidden_dim": 30}, "hidden_dim"),
    ({"feature_level": "DC5"}, "Bottleneck"),
    ({"num_queries": 0}, "num_queries"),
    ({"activation": "gelu"}, "activation"),
])
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_detr(**options)


def test_backbone_weights_from_a_detector_checkpoint(tmp_path):
    # the shapes configs start DAB-DETR from another kdlab detector's ResNet (a stand-in for ImageNet weights)
    torch.manual_seed(1)
    gfl = build_detector("gfl", 3, backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=16, head_convs=1)
    torch.save({"state_dict": gfl.state_dict()}, tmp_path / "gfl.pt")
    model = tiny_detr(backbone_norm="gn", backbone_weights=str(tmp_path / "gfl.pt"))
    for name, value in model.backbone.body.state_dict().items():
        assert torch.equal(value, gfl.backbone.body.state_dict()[name]), name
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # stem + layer1 frozen, as DETR
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="does not fit"):
        tiny_detr(backbone="resnet34", backbone_norm="gn", backbone_weights=str(tmp_path / "gfl.pt"))


@pytest.mark.parametrize("name,backbone", [("coco_dab_detr_r50", "resnet50"), ("coco_dab_detr_r18", "resnet18")])
def test_coco_configs_are_the_released_recipe(name, backbone):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert (cfg.epochs, cfg.lr_steps, cfg.optimizer, cfg.lr, cfg.base_batch_size) == (50, [40], "adamw", 1e-4, 16)
    assert (cfg.backbone_lr_mult, cfg.weight_decay, cfg.grad_clip, cfg.backbone_weights) == (0.1, 1e-4, 0.1, "IMAGENET1K_V1")
    model = build_detector(cfg.model, 80, **{**cfg.model_options(), "backbone_weights": None})
    assert model.num_queries == 300 and model.backbone.stride == 32 and model.dec_layers == 6
    assert cfg.backbone == backbone


def test_group_detr_groups_are_separate_matched_passes_and_the_loss_is_their_mean():
    torch.manual_seed(0)
    model = tiny_detr(train_groups=3).train()
    images, targets = batch_and_targets()
    sizes = [(64, 64), (64, 64)]
    assert model.group_anchor_embed.weight.shape == (2 * 8, 4)
    out = model(images, sizes, targets)
    assert len(out.groups) == 2 and out.layer_logits.shape == (2, 2, 8, 3)
    # the detection pass is the plain model's: a model without groups, same weights, gives it bit for bit
    plain = tiny_detr().train()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("group_anchor_embed")})
    reference = plain(images, sizes, targets)
    assert torch.equal(reference.layer_logits, out.layer_logits) and torch.equal(reference.layer_boxes, out.layer_boxes)
    # each further group is a separate pass of its own anchors (as an extra query set), matched on its own
    anchors = model.group_anchor_embed.weight.detach()
    for k, group in enumerate(out.groups):
        alone = model(images, sizes, extra_queries={"g": anchors[8 * k:8 * (k + 1)]}).extra["g"]
        assert torch.equal(alone.layer_logits, group.layer_logits) and torch.equal(alone.layer_boxes, group.layer_boxes)
        assert [(q.tolist(), g.tolist()) for q, g in group.matches] == \
            [(q.tolist(), g.tolist()) for q, g in model.matcher(group.pred_logits, group.pred_boxes, targets)]
    # the loss: the mean over the 3 groups of each group's own DAB-DETR loss
    criterion = model.build_criterion()
    terms = criterion(out, targets)
    per_group = [criterion.pass_losses(p.layer_logits, p.layer_boxes, p.matches, targets,
                                       [t["labels"] for t in targets],
                                       [normalized_gt_boxes(t) for t in targets], torch.tensor(float(sum(len(t["labels"]) for t in targets))))
                 for p in [out, *out.groups]]
    for name, value in terms.items():
        assert torch.allclose(value, sum(g[name] for g in per_group) / 3), name
    # every group's anchors get a gradient from the loss
    weighted_total(terms, criterion.weight_dict).backward()
    assert model.group_anchor_embed.weight.grad.abs().sum(dim=1).gt(0).all()
    # in evaluation only the first group runs: the outputs of the plain model
    model.eval(), plain.eval()
    with torch.no_grad():
        evaluated, reference = model(images, sizes), plain(images, sizes)
    assert evaluated.groups == [] and torch.equal(evaluated.pred_logits, reference.pred_logits)
    with pytest.raises(ValueError, match="train_groups"):
        tiny_detr(train_groups=0)
