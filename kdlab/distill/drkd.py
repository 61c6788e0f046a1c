"""DRKD: Dual Relation Knowledge Distillation for object detection (Ni et al., IJCAI 2023; METHODS.md §4).

Feature imitation suffers from two imbalances: background pixels outnumber foreground ones, and a
small object covers only a few cells. DRKD distils *relations* instead, on the FPN maps:

- **pixel-wise** (``loss_drkd_pixel``): on every level, a graph reasoning unit
  (:class:`~kdlab.distill.relation_units.GraphReasoningUnit`) per network; the student's output,
  1x1-adapted to the teacher's channels, is pulled towards the teacher's;
- **instance-wise** (``loss_drkd_instance``): the GT boxes RoIAligned (``3 x 3``) on the two
  finest levels, an :class:`~kdlab.distill.relation_units.InstanceRelationModule` per network
  relating the instances of each image through the relation filter; outputs compared;
- **instance features** (``loss_drkd_instance_feature``): the RoIAligned features themselves.

The losses are in :mod:`kdlab.losses.drkd`. :class:`DRKD` is a distillation *criterion*:
``forward(student_out, teacher_out, targets) -> {term: unweighted loss}`` with ``weight_dict``.
It reads only ``out.features`` (FPN maps ``[B, C, H, W]``, finest first), ``out.feature_strides``
and ``targets[i]["boxes"]``, so it works with RetinaNet (P3-P7) and Faster R-CNN (P2-P6, ``"pool"``
included, as the released code does) students alike; student and teacher must have the same
levels (same number and strides), their channels may differ.

It owns four kinds of modules, all trained with the student (optimiser, checkpoint): the student's
and the teacher's graph units and instance relation modules, and the adapters. The teacher's
*features* are detached (the teacher network gets no gradient), but the teacher-side units train,
through the distillation losses only. So does the released code: its ``teacher_non_local`` and
``teacher_relation`` are members of the student detector (``two_stage.py`` L202-230), hence in the
student's optimiser (``apis/train.py`` L118). Nothing else anchors them: student and teacher units
may co-adapt to make their outputs agree; the residual keeps each network's features in its output.

Variants (each default can be overridden alone):

=====================  =========================  ==================================
option                 ``"paper"`` (default)      ``"official"`` (released code)
=====================  =========================  ==================================
weights pixel/inst/ft  1.0 / 1.0 / 1.0 (kdlab's)  1e-3 / 4e-3 / 2.4e-3
distance               relative squared error     un-squared Frobenius, summed
over levels            mean                       sum
relation filter        trained pair gate          random, re-drawn at every forward
similarity f           divided by sqrt(E)         unscaled
graph node features    divided by H W             unnormalised
adapters               when channels differ       always (as released)
RoIAlign               aligned, sampling ratio 2  ``aligned=False``, adaptive sampling
relations need         >= 2 instances in an image >= 1 (an image of 1 still counts)
GT boxes pooled from   their own image            image 0 of the batch (see below)
=====================  =========================  ==================================

The released code pools image ``b``'s GT boxes with ``roi_align(x, boxes=[gt_bboxes[b]])``
(``two_stage.py`` L484-485): a one-tensor list means batch index 0, so every image's boxes are
RoIAligned on the *first* image's map (student and teacher alike, so they still agree with each
other). ``pool_from_first_image=True`` reproduces it; kdlab's default pools each image's own boxes.

The released weights go with the Frobenius norm; the squared distance's 1.0 are kdlab's (each
per-entry MSE then sits on the scale of the detection losses; the experiment sweeps them).
RetinaNet: the released ``single_stage.py`` does not run (``extract_feat(img, gt_bboxes)`` to a
one-argument method, L480; relation modules built for ``256 x 1 x 1`` inputs fed ``256 x 3 x 3``,
L381-391 vs L500) and has the pixel term and the filter commented out; kdlab applies the
two-stage recipe above to both detectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from kdlab.distill.base import DistillCriterion
from kdlab.distill.common import probe_output
from kdlab.distill.relation_units import GraphReasoningUnit, InstanceRelationModule
from kdlab.losses.common import zero_with_grad
from kdlab.losses.drkd import instance_feature_loss, instance_relation_loss, pixel_relation_loss, teacher_energy
from kdlab.utils.dist import reduce_mean, reduce_normalizer

DRKD_VARIANTS = ("paper", "official")
VARIANT_DEFAULTS = {
    "paper": dict(pixel_weight=1.0, instance_weight=1.0, instance_feature_weight=1.0, filter="trained",
                  distance="relative", always_adapt=False, roi_aligned=True, roi_sampling_ratio=2, min_instances=2,
                  pool_from_first_image=False, scale_relations=True, normalize_nodes=True),
    "official": dict(pixel_weight=1e-3, instance_weight=4e-3, instance_feature_weight=2.4e-3, filter="random",
                     distance="frobenius", always_adapt=True, roi_aligned=False, roi_sampling_ratio=-1, min_instances=1,
                     pool_from_first_image=True, scale_relations=False, normalize_nodes=False),
}
# the released sizes: GloRe_Unit_2D(256, 64) on the two finest levels, (256, 256) on the others; S = 2 N
RELEASED_NODES_FINE, RELEASED_NODES_COARSE = 64, 256


def probe_fpn(detector: nn.Module, image_size: int = 256) -> tuple[list[int], list[int]]:
    """``(channels, strides)`` of a detector's FPN maps, from one eval-mode pass on a blank image."""
    output = probe_output(detector, image_size)
    return [int(f.shape[1]) for f in output.features], output.feature_strides


def per_level(value: int | Sequence[int], levels: list[int], name: str) -> list[int]:
    """``value`` for each of ``levels``: an int for all, or one entry per level."""
    if isinstance(value, int):
        return [value] * len(levels)
    if len(value) != len(levels):
        raise ValueError(f"{name} needs one entry per pixel level {levels}, got {list(value)}")
    return list(value)


def adapter(student_channels: int, teacher_channels: int, always: bool) -> nn.Module:
    """1x1 conv from the student's channels to the teacher's (identity when equal, unless ``always``)."""
    if always or student_channels != teacher_channels:
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
    return nn.Identity()


class DRKD(DistillCriterion):
    """Dual relation distillation criterion (see the module docstring).

    Args:
        student, teacher: detectors whose outputs carry ``features`` (read once, by a probe pass,
            for their channels and strides; neither is kept).
        variant: ``"paper"`` or ``"official"``: the defaults of every option marked *(variant)*.
        pixel_weight, instance_weight, instance_feature_weight: *(variant)* term weights; 0 = off
            (not computed, no modules built, not in ``weight_dict``).
        num_nodes: ``N`` per pixel level (int or one per level); default: released, 64 on the two
            finest maps and 256 on the others.
        num_state: ``S`` per pixel level; default ``2 N`` (released: 128 / 512).
        pixel_levels: indices of the maps with a graph unit (default: all).
        instance_levels: maps the GT boxes are pooled on ((0, 1): the two finest, released).
        filter: *(variant)* ``"trained"``, ``"random"`` or ``"none"``; see :class:`InstanceRelationModule`.
        distance: *(variant)* ``"relative"``, ``"squared"`` or ``"frobenius"``; see :mod:`kdlab.losses.drkd`.
        roi_output_size: ``S`` of the pooled instances (3).
        roi_sampling_ratio, roi_aligned: *(variant)* RoIAlign's options.
        instance_embed_dim: ``E`` of the instance modules (default ``C S² // 2``, released).
        min_instances: *(variant)* fewest GT boxes for an image's relations to count.
        norm: graph-unit norm, ``"batch"`` (released), ``"group"`` or ``"none"``.
        normalize_nodes: *(variant)* divide node features by ``H W`` (GloRe's option; released: no, and
            the unit's pre-norm activations then grow with the map's size).
        scale_relations: *(variant)* divide the instance similarities by ``sqrt(E)`` (released: no).
        zero_init: graph units start as the identity (released: no).
        always_adapt: *(variant)* adapters even when the channels match.
        pool_from_first_image: *(variant)* the released code's RoIAlign of every image's boxes on
            image 0's map (see the module docstring).
        probe_size: side of the blank image of the probe pass.
    """

    name = "drkd"
    method = "DRKD"
    supported_kinds = ("dense", "two_stage")
    teacher_features_only = True  # reads the teacher's FPN maps only: its heads are not run

    def __init__(self, student: nn.Module, teacher: nn.Module, *, variant: str = "paper",
                 pixel_weight: float | None = None, instance_weight: float | None = None,
                 instance_feature_weight: float | None = None, num_nodes: int | Sequence[int] | None = None,
                 num_state: int | Sequence[int] | None = None, pixel_levels: Sequence[int] | None = None,
                 instance_levels: Sequence[int] = (0, 1), filter: str | None = None, distance: str | None = None,
                 roi_output_size: int = 3, roi_sampling_ratio: int | None = None, roi_aligned: bool | None = None,
                 instance_embed_dim: int | None = None, min_instances: int | None = None, norm: str = "batch",
                 normalize_nodes: bool | None = None, scale_relations: bool | None = None, zero_init: bool = False,
                 always_adapt: bool | None = None,
                 pool_from_first_image: bool | None = None, probe_size: int = 256):
        super().__init__(student, teacher)
        if variant not in DRKD_VARIANTS:
            raise ValueError(f"DRKD variant must be one of {DRKD_VARIANTS}, got {variant!r}")
        given = dict(pixel_weight=pixel_weight, instance_weight=instance_weight,
                     instance_feature_weight=instance_feature_weight, filter=filter, distance=distance,
                     always_adapt=always_adapt, roi_aligned=roi_aligned, roi_sampling_ratio=roi_sampling_ratio,
                     min_instances=min_instances, pool_from_first_image=pool_from_first_image,
                     normalize_nodes=normalize_nodes, scale_relations=scale_relations)
        options = {k: VARIANT_DEFAULTS[variant][k] if v is None else v for k, v in given.items()}
        self.variant, self.filter, self.distance = variant, options["filter"], options["distance"]
        self.roi_output_size, self.roi_aligned = roi_output_size, options["roi_aligned"]
        self.roi_sampling_ratio, self.min_instances = options["roi_sampling_ratio"], options["min_instances"]
        self.pool_from_first_image = options["pool_from_first_image"]
        weights = {"loss_drkd_pixel": options["pixel_weight"], "loss_drkd_instance": options["instance_weight"],
                   "loss_drkd_instance_feature": options["instance_feature_weight"]}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"DRKD weights must be >= 0, got {weights}")
        self.weight_dict = {name: float(w) for name, w in weights.items() if w > 0}

        student_channels, student_strides = probe_fpn(student, probe_size)
        teacher_channels, teacher_strides = probe_fpn(teacher, probe_size)
        check_levels(student_strides, teacher_strides)
        self.strides = student_strides
        num_levels = len(student_strides)
        self.pixel_levels = list(range(num_levels)) if pixel_levels is None else list(pixel_levels)
        self.instance_levels = list(instance_levels)
        for name, levels in (("pixel_levels", self.pixel_levels), ("instance_levels", self.instance_levels)):
            if any(not 0 <= level < num_levels for level in levels):
                raise ValueError(f"{name} {levels} out of range: the detectors have {num_levels} FPN maps")
        always = options["always_adapt"]

        def adapters(levels: list[int]) -> nn.ModuleList:
            return nn.ModuleList(adapter(student_channels[level], teacher_channels[level], always) for level in levels)

        if "loss_drkd_pixel" in self.weight_dict:
            if num_nodes is None:
                num_nodes = [RELEASED_NODES_FINE if level < 2 else RELEASED_NODES_COARSE for level in self.pixel_levels]
            nodes = per_level(num_nodes, self.pixel_levels, "num_nodes")
            states = [2 * n for n in nodes] if num_state is None else per_level(num_state, self.pixel_levels, "num_state")

            def graph_units(channels: list[int]) -> nn.ModuleList:
                return nn.ModuleList(
                    GraphReasoningUnit(channels[level], n, s, norm=norm, normalize=options["normalize_nodes"],
                                       zero_init=zero_init)
                    for level, n, s in zip(self.pixel_levels, nodes, states))

            self.student_graph_units = graph_units(student_channels)
            self.teacher_graph_units = graph_units(teacher_channels)
            self.pixel_adapters = adapters(self.pixel_levels)
        if "loss_drkd_instance" in self.weight_dict:
            def relation_modules(channels: list[int]) -> nn.ModuleList:
                return nn.ModuleList(
                    InstanceRelationModule(channels[level] * roi_output_size ** 2, instance_embed_dim, self.filter,
                                           scale=options["scale_relations"])
                    for level in self.instance_levels)

            self.student_instance_relations = relation_modules(student_channels)
            self.teacher_instance_relations = relation_modules(teacher_channels)
            self.instance_adapters = adapters(self.instance_levels)
        if "loss_drkd_instance_feature" in self.weight_dict:
            self.instance_feature_adapters = adapters(self.instance_levels)

    def forward(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted DRKD terms of the enabled parts (the keys of ``weight_dict``)."""
        student_features = list(student_out.features)
        teacher_features = [f.detach() for f in teacher_out.features]  # the teacher network gets no gradient
        strides = student_out.feature_strides
        check_levels(strides, teacher_out.feature_strides)
        for level, (s, t) in enumerate(zip(student_features, teacher_features)):
            if s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
                raise ValueError(f"FPN map {level}: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                                 "differ in batch or spatial size (both must see the same padded batch)")
        terms = {}
        if "loss_drkd_pixel" in self.weight_dict:
            terms["loss_drkd_pixel"] = self.pixel_term(student_features, teacher_features)
        if "loss_drkd_instance" in self.weight_dict or "loss_drkd_instance_feature" in self.weight_dict:
            gt_boxes = [t["boxes"] for t in targets]
            terms.update(self.instance_terms(student_features, teacher_features, gt_boxes, strides))
        return terms

    def normalizer(self, teacher_side: list[Tensor]) -> Tensor | None:
        """The loss normaliser over the whole (all-process) batch: ``Σ t²`` (relative) or the number of
        entries (squared), averaged over processes so that ``W`` processes equal one big batch."""
        if self.distance == "frobenius":
            return None
        if self.distance == "relative":
            value = teacher_energy(teacher_side)
            return reduce_mean(value).clamp(min=1e-12) if torch.is_tensor(value) else None
        device = teacher_side[0].device if teacher_side else None
        return reduce_normalizer(torch.tensor(float(sum(t.numel() for t in teacher_side)), device=device))

    def combine_levels(self, losses: list[Tensor]) -> Tensor:
        """Mean over levels (relative, squared distance) or their sum (the released Frobenius recipe)."""
        total = torch.stack(losses).sum()
        return total if self.distance == "frobenius" else total / len(losses)

    def pixel_term(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> Tensor:
        """``loss_drkd_pixel``: each pixel level's :func:`pixel_relation_loss`, combined over levels."""
        losses = []
        for k, level in enumerate(self.pixel_levels):
            student_relation = self.pixel_adapters[k](self.student_graph_units[k](student_features[level]))
            teacher_relation = self.teacher_graph_units[k](teacher_features[level])
            losses.append(pixel_relation_loss(student_relation, teacher_relation, self.distance,
                                              self.normalizer([teacher_relation])))
        return self.combine_levels(losses)

    def pool_instances(self, features: Tensor, boxes: list[Tensor], stride: int) -> Tensor:
        """``[sum K_i, C, S, S]`` RoIAlign of the GT boxes on one map, images in batch order."""
        if self.pool_from_first_image:  # released: roi_align(x, boxes=[gt_b]) reads image 0 for every b
            features, boxes = features[:1], [torch.cat(boxes)]
        return roi_align(features.float(), boxes, self.roi_output_size, 1.0 / stride, self.roi_sampling_ratio,
                         aligned=self.roi_aligned)

    def instance_terms(self, student_features: list[Tensor], teacher_features: list[Tensor],
                       gt_boxes: list[Tensor], strides: list[int]) -> dict[str, Tensor]:
        """``loss_drkd_instance`` and ``loss_drkd_instance_feature`` over the instance levels."""
        boxes = [b.detach().float() for b in gt_boxes]
        counts = [len(b) for b in boxes]
        related = [i for i, n in enumerate(counts) if n >= self.min_instances and n > 0]
        relation_losses, feature_losses = [], []
        for k, level in enumerate(self.instance_levels):
            student_pooled = self.pool_instances(student_features[level], boxes, strides[level]).split(counts)
            teacher_pooled = self.pool_instances(teacher_features[level], boxes, strides[level]).split(counts)
            if "loss_drkd_instance_feature" in self.weight_dict:
                adapted = [self.instance_feature_adapters[k](p) for p in student_pooled]
                feature_losses.append(instance_feature_loss(adapted, list(teacher_pooled), self.distance,
                                                            self.normalizer(list(teacher_pooled))))
            if "loss_drkd_instance" in self.weight_dict:
                if not related:  # nothing to relate: a zero that keeps the modules and the map in the graph (DDP)
                    relation_losses.append(zero_with_grad(
                        student_features[level], *self.student_instance_relations[k].parameters(),
                        *self.teacher_instance_relations[k].parameters(), *self.instance_adapters[k].parameters()))
                    continue
                student_module, teacher_module = self.student_instance_relations[k], self.teacher_instance_relations[k]
                student_relations = [self.instance_adapters[k](student_module(student_pooled[i])) for i in related]
                teacher_relations = [teacher_module(teacher_pooled[i]) for i in related]  # per image [K_i, C_t, S, S]
                relation_losses.append(instance_relation_loss(student_relations, teacher_relations, self.distance,
                                                              self.normalizer(teacher_relations)))
        terms = {}
        if feature_losses:
            terms["loss_drkd_instance_feature"] = self.combine_levels(feature_losses)
            if not sum(counts):
                terms["loss_drkd_instance_feature"] = terms["loss_drkd_instance_feature"] + zero_with_grad(
                    *(student_features[level] for level in self.instance_levels),
                    *self.instance_feature_adapters.parameters())
        if relation_losses:
            terms["loss_drkd_instance"] = self.combine_levels(relation_losses)
        return terms


def check_levels(student_strides: list[int], teacher_strides: list[int]) -> None:
    """DRKD pairs the FPN maps one to one: same number, same strides."""
    if student_strides != teacher_strides:
        raise ValueError(
            f"DRKD pairs FPN maps one to one, but the student's strides are {student_strides} and the teacher's "
            f"{teacher_strides}: use a teacher with the student's FPN levels (e.g. RetinaNet P3-P7 with RetinaNet, "
            "Faster R-CNN P2-P6 with Faster R-CNN)")
