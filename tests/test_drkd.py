"""DRKD (METHODS.md §4): the graph unit, the instance relation module and its filter, the losses, the criterion.

Hand-built inputs test the maths; a stand-in FPN detector tests the wiring quickly; small real
RetinaNet and Faster R-CNN detectors test that DRKD runs on kdlab's outputs.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from kdlab.distill.drkd import DRKD
from kdlab.models.outputs import DetectorOutput
from kdlab.distill.relation_units import GraphReasoningUnit, InstanceRelationModule
from kdlab.losses.drkd import frobenius_distance, instance_feature_loss, instance_relation_loss, pixel_relation_loss


# ----------------------------------------------------------------------------- helpers
@dataclass
class FPNOutput(DetectorOutput):
    """The part of a detector output DRKD reads: FPN maps and image sizes (strides from the map heights)."""

    features: list
    image_sizes: list

    @property
    def feature_strides(self) -> list[int]:
        max_height = max(h for h, _ in self.image_sizes)
        return [2 ** round(math.log2(max_height / f.shape[-2])) for f in self.features]


class FakeFPN(nn.Module):
    """A stand-in detector: FPN maps of ``channels`` at ``strides`` (a 1x1 conv of the pooled image)."""

    def __init__(self, channels: int, strides=(4, 8, 16)):
        super().__init__()
        self.proj = nn.Conv2d(3, channels, 1)
        self.strides = strides

    def forward(self, images, image_sizes, targets=None):
        x = self.proj(images)
        return FPNOutput(features=[F.avg_pool2d(x, s, ceil_mode=True) for s in self.strides],
                               image_sizes=image_sizes)


def fpn_output(channels: int, seed: int, size: int = 64, strides=(4, 8, 16), batch: int = 2, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(batch, channels, size // s, size // s, generator=g).requires_grad_(requires_grad)
                for s in strides]
    return FPNOutput(features=features, image_sizes=[(size, size)] * batch)


def box_targets(*counts: int, size: int = 64):
    g = torch.Generator().manual_seed(sum(counts) + 7)
    targets = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = 4 + torch.rand(n, 2, generator=g) * size * 0.35
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1), "labels": torch.zeros(n, dtype=torch.int64)})
    return targets


def small_drkd(student_channels=4, teacher_channels=4, **options) -> DRKD:
    torch.manual_seed(0)
    options.setdefault("num_nodes", 3)
    return DRKD(FakeFPN(student_channels), FakeFPN(teacher_channels), **options)


# ----------------------------------------------------------------------------- graph reasoning unit
def test_graph_unit_shapes_and_identity_at_zero_weights():
    x = torch.randn(2, 6, 5, 7)
    unit = GraphReasoningUnit(6, num_nodes=4, num_state=10)
    steps = unit.steps(x)
    assert steps.state.shape == (2, 10, 5, 7) and steps.assignment.shape == (2, 4, 5, 7)
    assert steps.nodes.shape == steps.reasoned_nodes.shape == (2, 10, 4)
    assert steps.back_projected.shape == (2, 10, 5, 7) and steps.output.shape == x.shape
    assert unit.adjacency.shape == (4, 4) and unit.adjacency is unit.node_mixing.weight
    assert not torch.allclose(steps.output, x)
    # the residual: with the norm's scale at 0 (zero_init) or the last conv at 0, the unit is the identity
    for norm in ("batch", "group", "none"):
        assert torch.equal(GraphReasoningUnit(6, 4, 10, norm=norm, zero_init=True)(x), x), norm
    with torch.no_grad():
        unit.to_features.weight.zero_()
    torch.testing.assert_close(unit(x), x)


def test_graph_unit_equals_a_hand_computation():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 2, 3)  # C = 2, L = 6 pixels
    unit = GraphReasoningUnit(2, num_nodes=2, num_state=3, norm="none")
    steps = unit.steps(x)
    pixels = x[0].reshape(2, 6)
    state = unit.to_state.weight[:, :, 0, 0] @ pixels + unit.to_state.bias[:, None]  # [S, L]
    assign = unit.to_assignment.weight[:, :, 0, 0] @ pixels + unit.to_assignment.bias[:, None]  # [N, L]
    nodes = torch.tensor([[sum(state[s, p] * assign[i, p] for p in range(6)).item() for i in range(2)] for s in range(3)])
    torch.testing.assert_close(steps.nodes[0], nodes)
    a, b_a = unit.node_mixing.weight, unit.node_mixing.bias
    mixed = torch.tensor([[(nodes[s, i] + sum(a[i, j] * nodes[s, j] for j in range(2)) + b_a[i]).item() for i in range(2)]
                          for s in range(3)])
    reasoned = unit.state_mixing.weight @ mixed.relu()
    torch.testing.assert_close(steps.reasoned_nodes[0], reasoned)
    back = reasoned @ assign  # [S, L]
    out = pixels + unit.to_features.weight[:, :, 0, 0] @ back
    torch.testing.assert_close(steps.output[0].reshape(2, 6), out)
    # GloRe's option: node features divided by the number of pixels
    unit.normalize = True
    torch.testing.assert_close(unit.steps(x).nodes[0], nodes / 6)


# ----------------------------------------------------------------------------- instance relation module
@pytest.mark.parametrize("filter", ["trained", "none"])
def test_instance_relations_are_permutation_equivariant(filter):
    torch.manual_seed(0)
    module = InstanceRelationModule(4 * 9, filter=filter)
    x = torch.randn(5, 4, 3, 3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    steps, permuted = module.steps(x), module.steps(x[perm])
    torch.testing.assert_close(permuted.output, steps.output[perm])
    torch.testing.assert_close(permuted.similarity, steps.similarity[perm][:, perm])
    torch.testing.assert_close(permuted.gate, steps.gate[perm][:, perm])
    torch.testing.assert_close(steps.attention.sum(dim=1), torch.ones(5))


def test_trained_gate_is_a_bilinear_pair_score_that_gates_the_attention():
    torch.manual_seed(0)
    module = InstanceRelationModule(6, embed_dim=4, filter="trained", gate_rank=3)
    x = torch.randn(4, 6) * 3
    steps = module.steps(x)
    u, v = x @ module.pair_gate.query.weight.T, x @ module.pair_gate.key.weight.T  # [K, r]
    expected_gate = torch.sigmoid(u @ v.T / math.sqrt(3) + module.pair_gate.bias)
    torch.testing.assert_close(steps.gate, expected_gate)
    assert ((steps.gate >= 0) & (steps.gate <= 1)).all()
    # f is scaled by sqrt(E); the gate multiplies each pair's attention weight before normalising
    f = module.theta(x) @ module.phi(x).T / math.sqrt(4)
    torch.testing.assert_close(steps.similarity, f)
    weights = expected_gate * torch.exp(f)
    torch.testing.assert_close(steps.attention, weights / weights.sum(dim=1, keepdim=True))
    # a pair-specific gate: it can close one pair (i, j) and leave (i, k) and (l, j) open
    with torch.no_grad():
        module.pair_gate.query.weight.zero_(); module.pair_gate.key.weight.zero_()
        module.pair_gate.query.weight[0, 0] = 10.0; module.pair_gate.key.weight[0, 1] = 10.0
        module.pair_gate.bias.fill_(0.0)
    x = torch.zeros(3, 6)
    x[0, 0], x[1, 1] = 1.0, -1.0  # (U x_0)(V x_1) = 10 * -10: only the pair (0, 1) is closed
    gate = module.steps(x).gate
    assert gate[0, 1] < 1e-3 and gate[0, 2] == 0.5 and gate[2, 1] == 0.5
    assert module.steps(x).attention[0, 1] < 1e-3  # the closed pair gathers (almost) nothing
    # the released code does not scale f
    unscaled = InstanceRelationModule(6, embed_dim=4, filter="none", scale=False)
    assert torch.allclose(unscaled.steps(x).similarity, unscaled.theta(x) @ unscaled.phi(x).T)


def test_random_filter_is_the_released_fresh_linear_layer_and_changes_between_calls():
    module = InstanceRelationModule(8, filter="random")
    x = torch.randn(3, 8)
    torch.manual_seed(5)
    gate = module.relation_gate(x)
    torch.manual_seed(5)
    released = torch.softmax(nn.Linear(8, 3)(x), dim=-1)  # two_stage.py: fc = nn.Linear(in, b) at every forward
    torch.testing.assert_close(gate, released)
    assert ((gate >= 0) & (gate <= 1)).all() and torch.allclose(gate.sum(dim=1), torch.ones(3))
    assert not torch.allclose(module(x), module(x))  # a new filter at every call
    trained = InstanceRelationModule(8, filter="trained")
    torch.testing.assert_close(trained(x), trained(x))
    assert not any("pair_gate" in k for k in module.state_dict())


@pytest.mark.parametrize("filter", ["trained", "random", "none"])
def test_zero_and_one_instance(filter):
    module = InstanceRelationModule(4 * 9, filter=filter)
    empty = torch.zeros(0, 4, 3, 3, requires_grad=True)
    steps = module.steps(empty)
    assert steps.output.shape == (0, 4, 3, 3) and steps.attention.shape == (0, 0)
    one = torch.randn(1, 4, 3, 3, requires_grad=True)
    steps = module.steps(one)
    assert torch.equal(steps.attention, torch.ones(1, 1)) and torch.isfinite(steps.output).all()
    steps.output.sum().backward()
    assert torch.isfinite(one.grad).all()


# ----------------------------------------------------------------------------- losses
def test_losses_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    t = torch.tensor([[1.0, 0.0], [3.0, 2.0]]).view(1, 1, 2, 2)  # difference (0, 2, 0, 2): 8 squared, norm sqrt(8)
    # relative: 8 over the teacher's squared norm 1 + 9 + 4 = 14
    assert pixel_relation_loss(s, t) == pytest.approx(8 / 14)
    assert pixel_relation_loss(s, t, "squared") == pytest.approx(8 / 4)
    assert pixel_relation_loss(s, t, "squared", num_entries=2.0) == pytest.approx(4.0)
    # the relative distance does not change when both sides are scaled
    assert pixel_relation_loss(20 * s, 20 * t) == pytest.approx(8 / 14)
    assert pixel_relation_loss(s, t, "frobenius") == pytest.approx(math.sqrt(8))
    assert frobenius_distance(s, t) == pytest.approx(torch.dist(s, t).item())
    # instances, per image: image 0 difference 8 (4 entries), image 1 difference 1 (4 entries)
    s_images = [s, torch.ones(1, 1, 2, 2)]
    t_images = [t, torch.tensor([0.0, 1, 1, 1]).view(1, 1, 2, 2)]
    for loss in (instance_relation_loss, instance_feature_loss):
        assert loss(s_images, t_images, "squared") == pytest.approx(9 / 8)
        assert loss(s_images, t_images) == pytest.approx(9 / (14 + 3))  # teacher squared norms 14 and 3
        assert loss(s_images, t_images, "frobenius") == pytest.approx(math.sqrt(8) + 1.0)
    with pytest.raises(ValueError, match="adapter"):
        pixel_relation_loss(s, torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="distance"):
        pixel_relation_loss(s, t, "l1")


def test_losses_are_zero_with_gradient_when_there_is_nothing_to_compare():
    empty = [torch.zeros(0, 2, 3, 3, requires_grad=True)]
    for distance in ("relative", "squared", "frobenius"):
        loss = instance_relation_loss(empty, [torch.zeros(0, 2, 3, 3)], distance)
        assert loss == 0 and loss.requires_grad
        loss.backward()
        same = torch.ones(1, 2, 3, 3, requires_grad=True)
        loss = pixel_relation_loss(same, torch.ones(1, 2, 3, 3), distance)
        loss.backward()
        assert loss == 0 and torch.equal(same.grad, torch.zeros_like(same))  # the Frobenius norm too: no NaN at 0


# ----------------------------------------------------------------------------- the criterion
def test_zero_loss_when_student_equals_teacher_and_units_share_weights():
    drkd = small_drkd()
    assert all(isinstance(a, nn.Identity) for a in (*drkd.pixel_adapters, *drkd.instance_adapters))
    drkd.teacher_graph_units.load_state_dict(drkd.student_graph_units.state_dict())
    drkd.teacher_instance_relations.load_state_dict(drkd.student_instance_relations.state_dict())
    output = fpn_output(4, seed=0)
    terms = drkd(output, output, box_targets(3, 2))
    assert set(terms) == set(drkd.weight_dict) == {"loss_drkd_pixel", "loss_drkd_instance", "loss_drkd_instance_feature"}
    for name, value in terms.items():
        assert value.item() == pytest.approx(0.0, abs=1e-6), name


def test_no_gradient_reaches_the_teacher_and_every_relation_module_trains():
    drkd = small_drkd(student_channels=4, teacher_channels=6)
    student, teacher = fpn_output(4, 0, requires_grad=True), fpn_output(6, 1, requires_grad=True)
    terms = drkd(student, teacher, box_targets(3, 2))
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    sum(terms.values()).backward()
    assert all(f.grad is None for f in teacher.features)
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student.features[:2])
    for name, p in drkd.named_parameters():  # student- and teacher-side units, relation modules, gates, adapters
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any("teacher_graph_units" in n for n, _ in drkd.named_parameters())
    assert any("pair_gate" in n for n, _ in drkd.named_parameters())


def test_images_with_zero_or_one_instance():
    drkd = small_drkd(student_channels=4, teacher_channels=6)
    student, teacher = fpn_output(4, 0, requires_grad=True), fpn_output(6, 1)
    # no instance at all: the instance terms are exact zeros with a gradient
    terms = drkd(student, teacher, box_targets(0, 0))
    assert terms["loss_drkd_instance"] == 0 and terms["loss_drkd_instance_feature"] == 0
    assert terms["loss_drkd_instance"].requires_grad and terms["loss_drkd_instance_feature"].requires_grad
    sum(terms.values()).backward()
    # one instance per image: no relation to learn (paper: images need >= 2), the features still count
    terms = drkd(student, teacher, box_targets(1, 1))
    assert terms["loss_drkd_instance"] == 0 and terms["loss_drkd_instance_feature"] > 0
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in drkd.student_instance_relations.parameters())
    # the released code relates an image's single instance to itself: a finite, non-zero term
    official = small_drkd(student_channels=4, teacher_channels=6, variant="official")
    terms = official(student, teacher, box_targets(1, 0))
    assert torch.isfinite(terms["loss_drkd_instance"]) and terms["loss_drkd_instance"] > 0


def test_official_variant_equals_the_released_formulas():
    # filter="none" makes it deterministic; the rest is the released recipe (two_stage.py L449-493),
    # including its roi_align(x, boxes=[gt_b]), which pools every image's boxes on image 0's map
    drkd = small_drkd(variant="official", filter="none")
    assert drkd.weight_dict == {"loss_drkd_pixel": 1e-3, "loss_drkd_instance": 4e-3, "loss_drkd_instance_feature": 2.4e-3}
    assert all(isinstance(a, nn.Conv2d) for a in drkd.pixel_adapters)  # always adapted, as released
    student, teacher = fpn_output(4, 0), fpn_output(4, 1)
    targets = box_targets(3, 1)
    terms = drkd(student, teacher, targets)
    x, t_feats = student.features, teacher.features
    with torch.no_grad():
        pixel = sum(torch.dist(drkd.pixel_adapters[i](drkd.student_graph_units[i](x[i])),
                               drkd.teacher_graph_units[i](t_feats[i]), p=2) for i in range(3))
        relation, foreground = 0, 0
        for i in range(2):
            spatial_scale = x[i].size(-1) / (x[0].size(-1) * 4)
            for b in range(2):
                s_region = roi_align(x[i], boxes=[targets[b]["boxes"]], output_size=3, spatial_scale=spatial_scale)
                t_region = roi_align(t_feats[i], boxes=[targets[b]["boxes"]], output_size=3, spatial_scale=spatial_scale)
                s_relation = drkd.student_instance_relations[i](s_region)
                t_relation = drkd.teacher_instance_relations[i](t_region)
                relation += torch.dist(drkd.instance_adapters[i](s_relation), t_relation, p=2)
                foreground += torch.dist(drkd.instance_feature_adapters[i](s_region), t_region, p=2)
    torch.testing.assert_close(terms["loss_drkd_pixel"], pixel)
    torch.testing.assert_close(terms["loss_drkd_instance"], relation)
    torch.testing.assert_close(terms["loss_drkd_instance_feature"], foreground)


def test_each_image_pools_its_own_boxes_unless_the_released_first_image_pooling_is_asked_for():
    features = fpn_output(4, 0).features[0]
    boxes = [b["boxes"] for b in box_targets(2, 3)]
    own = roi_align(features, boxes, 3, 1 / 4, 2, aligned=True)
    torch.testing.assert_close(small_drkd().pool_instances(features, boxes, 4), own)
    first = small_drkd(pool_from_first_image=True).pool_instances(features, boxes, 4)
    torch.testing.assert_close(first, roi_align(features[:1], [torch.cat(boxes)], 3, 1 / 4, 2, aligned=True))
    torch.testing.assert_close(first[:2], own[:2])  # image 0's boxes agree, image 1's come from image 0's map
    assert not torch.allclose(first[2:], own[2:])


def test_a_zero_weight_switches_a_term_off():
    drkd = small_drkd(pixel_weight=0, instance_feature_weight=0)
    assert drkd.weight_dict == {"loss_drkd_instance": 1.0}
    assert not hasattr(drkd, "student_graph_units") and not hasattr(drkd, "instance_feature_adapters")
    terms = drkd(fpn_output(4, 0), fpn_output(4, 1), box_targets(2, 2))
    assert set(terms) == {"loss_drkd_instance"}


def test_options_per_level_and_errors():
    drkd = small_drkd(num_nodes=[2, 3, 5], pixel_levels=None)
    assert [u.num_nodes for u in drkd.student_graph_units] == [2, 3, 5]
    assert [u.num_state for u in drkd.student_graph_units] == [4, 6, 10]
    released = DRKD(FakeFPN(4, strides=(8, 16, 32, 64, 128)), FakeFPN(4, strides=(8, 16, 32, 64, 128)), instance_weight=0)
    assert [(u.num_nodes, u.num_state) for u in released.teacher_graph_units] == [(64, 128)] * 2 + [(256, 512)] * 3
    with pytest.raises(ValueError, match="one entry per pixel level"):
        small_drkd(num_nodes=[2, 3])
    with pytest.raises(ValueError, match="out of range"):
        small_drkd(instance_levels=(0, 3))
    with pytest.raises(ValueError, match="variant"):
        small_drkd(variant="released")
    with pytest.raises(ValueError, match="filter"):
        small_drkd(filter="learned")
    with pytest.raises(ValueError, match="one to one"):  # 3 levels against 4
        DRKD(FakeFPN(4), FakeFPN(4, strides=(4, 8, 16, 32)))
    drkd = small_drkd()
    with pytest.raises(ValueError, match="one to one"):
        drkd(fpn_output(4, 0), fpn_output(4, 1, strides=(8, 16, 32), size=128), box_targets(1, 1))


def test_state_dict_round_trip_restores_the_losses():
    drkd = small_drkd(student_channels=4, teacher_channels=6)
    student, teacher, targets = fpn_output(4, 0), fpn_output(6, 1), box_targets(3, 2)
    drkd.eval()  # batch-norm running statistics are part of the state
    restored = small_drkd(student_channels=4, teacher_channels=6)
    torch.manual_seed(3)
    restored.load_state_dict(drkd.state_dict())
    restored.eval()
    expected, got = drkd(student, teacher, targets), restored(student, teacher, targets)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_bfloat16_maps_under_autocast(variant):
    # kdlab's AMP (CUDA) gives bf16 FPN maps: the terms stay float32 and finite, the student still gets gradient
    drkd = small_drkd(student_channels=4, teacher_channels=6, variant=variant)
    student, teacher = fpn_output(4, 0, requires_grad=True), fpn_output(6, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = drkd(FPNOutput(features=[f.bfloat16() for f in student.features], image_sizes=student.image_sizes),
                     FPNOutput(features=[f.bfloat16() for f in teacher.features], image_sizes=teacher.image_sizes),
                     box_targets(3, 2))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in student.features)


# ----------------------------------------------------------------------------- on kdlab's detectors
def tiny_detector(family: str, fpn_channels: int, seed: int, num_classes: int = 3):
    """Options of configs/shapes_{retinanet,fasterrcnn}_r18.yaml, narrower."""
    from kdlab.models import build_detector

    torch.manual_seed(seed)
    options = dict(backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=fpn_channels)
    if family == "faster_rcnn":
        return build_detector(family, num_classes, **options, anchor_scale=4.0, representation_size=64,
                              box_batch_size_per_image=64)
    return build_detector(family, num_classes, **options, head_convs=1, anchor_scale=2.0)


def detector_batch():
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1]), "size": torch.tensor([96, 96])},
        {"boxes": torch.tensor([[30.0, 20.0, 90.0, 90.0], [5.0, 5.0, 20.0, 20.0], [40.0, 50.0, 60.0, 70.0]]),
         "labels": torch.tensor([0, 2, 1]), "size": torch.tensor([90, 96])},
    ]
    return images, targets


@pytest.mark.parametrize("family, strides", [("retinanet", [8, 16, 32, 64, 128]), ("faster_rcnn", [4, 8, 16, 32, 64])])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_drkd_on_kdlabs_detectors(family, strides, variant):
    student, teacher = tiny_detector(family, 16, 0), tiny_detector(family, 32, 1)
    drkd = DRKD(student, teacher, variant=variant, num_nodes=4)
    assert drkd.strides == strides
    images, targets = detector_batch()
    sizes = [(96, 96), (90, 96)]
    student_out = student(images, sizes, targets)
    with torch.no_grad():
        teacher_out = teacher(images, sizes)
    assert student_out.feature_strides == strides
    terms = drkd(student_out, teacher_out, targets)
    assert set(terms) == set(drkd.weight_dict) and all(torch.isfinite(v) and v > 0 for v in terms.values())
    sum(drkd.weight_dict[k] * v for k, v in terms.items()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone.body.conv1.weight.grad.abs().sum() > 0
    state = drkd.state_dict()
    for prefix in ("student_graph_units.4.", "teacher_graph_units.4.", "pixel_adapters.0.",
                   "student_instance_relations.1.", "teacher_instance_relations.1."):
        assert any(k.startswith(prefix) for k in state), prefix
    assert any("pair_gate" in k for k in state) == (variant == "paper")


def test_unsupported_pairing_raises():
    with pytest.raises(ValueError, match=r"strides are \[8, 16, 32, 64, 128\].*\[4, 8, 16, 32, 64\]"):
        DRKD(tiny_detector("retinanet", 16, 0), tiny_detector("faster_rcnn", 16, 1))


@pytest.mark.parametrize("family", ["gfl", "retinanet", "fcos", "faster_rcnn"])
def test_forward_features_are_the_full_forwards_maps(family):
    """What a features-only teacher computes: the full forward's FPN maps, bit for bit, with its strides."""
    if family in ("gfl", "fcos"):
        from kdlab.models import build_detector

        torch.manual_seed(2)
        model = build_detector(family, 3, backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=16,
                               head_convs=1, reg_max=4)
    else:
        model = tiny_detector(family, 16, 2)
    model.eval()
    images, _ = detector_batch()
    sizes = [(96, 96), (90, 96)]
    with torch.no_grad():
        full, maps = model(images, sizes), model.forward_features(images, sizes)
    assert maps.kind == "features" and maps.feature_strides == full.feature_strides
    assert len(maps.features) == len(full.features)
    for ours, theirs in zip(maps.features, full.features):
        assert torch.equal(ours, theirs)


def test_drkd_runs_the_teacher_to_its_fpn_only_and_the_terms_do_not_change():
    from kdlab.distill import DistillationTask
    from kdlab.distill.base import DistillCriterion
    from kdlab.models.outputs import FeatureOutput

    class ReadsPredictions(DistillCriterion):  # any method without teacher_features_only
        def forward(self, student_out, teacher_out, targets):
            return {}

    student, teacher = tiny_detector("faster_rcnn", 16, 0), tiny_detector("faster_rcnn", 32, 1)
    drkd = DRKD(student, teacher, num_nodes=4)
    task = DistillationTask(student, teacher, [drkd]).train()
    images, targets = detector_batch()
    teacher_out = task.teacher_forward(images, targets)
    assert isinstance(teacher_out, FeatureOutput) and teacher_out.feature_strides == [4, 8, 16, 32, 64]
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append("full forward"))
    torch.manual_seed(0)
    terms = task(images, targets)
    assert calls == []  # the teacher's heads never ran
    with torch.no_grad():
        full = teacher(images, [(96, 96), (90, 96)])
    student_out = student(images, [(96, 96), (90, 96)], targets)
    by_full = drkd(student_out, full, targets)
    for name, value in by_full.items():
        assert torch.equal(terms[name], value), name
    # with a method that reads the teacher's predictions the whole teacher runs
    calls.clear()
    mixed = DistillationTask(student, teacher, [drkd, ReadsPredictions(student, teacher)])
    assert not isinstance(mixed.teacher_forward(images, targets), FeatureOutput)
    assert calls == ["full forward"]


# ----------------------------------------------------------------------------- through the engine
def drkd_run_config(data_root, output_dir, teacher_path, **changes):
    from kdlab.config import TrainConfig

    cfg = TrainConfig(data_root=str(data_root), min_size=64, max_size=64, batch_size=4, num_workers=0,
                      model="retinanet", backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=16,
                      head_convs=1, anchor_scale=2.0, optimizer="adamw", lr=1e-3, base_batch_size=4, epochs=2,
                      lr_steps=[1], warmup_iters=2, grad_clip=10.0, log_every=1, eval_every=0, output_dir=str(output_dir),
                      distill="drkd", distill_options={"num_nodes": 4, "norm": "group"}, teacher_checkpoint=str(teacher_path))
    return dataclasses.replace(cfg, **changes)


@pytest.mark.slow
def test_relation_modules_train_are_checkpointed_and_resume_exactly(tiny_shapes, tmp_path):
    import warnings

    from kdlab.engine import read_metrics, safe_load, train
    from kdlab.engine.checkpoint import export_student

    teacher_path = tmp_path / "teacher.pt"
    teacher_cfg = drkd_run_config(tiny_shapes, tmp_path, teacher_path, distill=None, distill_options={},
                                  teacher_checkpoint=None, fpn_channels=24)
    export_student(teacher_path, teacher_cfg, 8, [f"c{i}" for i in range(8)], tiny_detector("retinanet", 24, 5, 8).eval())

    def quiet(cfg, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="coco_metrics: no detections")
            return train(cfg, progress=False, **kwargs)

    quiet(drkd_run_config(tiny_shapes, tmp_path / "whole", teacher_path))
    quiet(drkd_run_config(tiny_shapes, tmp_path / "parts", teacher_path, max_iters=5))
    at_five = safe_load(tmp_path / "parts" / "last.pt")["task"]
    quiet(drkd_run_config(tiny_shapes, tmp_path / "parts", teacher_path), resume=True)
    whole, parts = safe_load(tmp_path / "whole" / "last.pt")["task"], safe_load(tmp_path / "parts" / "last.pt")["task"]
    units = [k for k in whole if k.startswith("distillers.drkd.")]
    for prefix in ("student_graph_units.", "teacher_graph_units.", "student_instance_relations.",
                   "teacher_instance_relations.", "pixel_adapters."):
        assert any(k.startswith("distillers.drkd." + prefix) for k in units), prefix
    assert not any(k.startswith("teacher.") for k in whole)
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    records = [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    resumed = [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in read_metrics(tmp_path / "parts" / "metrics.jsonl")]
    assert records == resumed and "loss_drkd_pixel" in records[0]
    # both sides' units train: their weights moved between iteration 5 and the end
    for side in ("student", "teacher"):
        weights = [k for k in units if k.startswith(f"distillers.drkd.{side}_graph_units.") and k.endswith("weight")]
        assert weights and any(not torch.equal(at_five[k], whole[k]) for k in weights), side
