"""LD: Localization Distillation for Dense Object Detection (Zheng et al., CVPR 2022), METHODS.md §1.

The student and the teacher are dense detectors with distribution box heads (GFL, or the GFL-style
RetinaNet/FCOS of the zoo) whose slots correspond one to one (same strides, same location layout).
Four terms, each switchable by its weight (0 = off, not computed):

==============  ==============================  ================  ==============  ==========  =====
term            region                          per-location w    weight (kdlab)  (official)  T
==============  ==============================  ================  ==============  ==========  =====
``loss_ld``     main: the positives             max_c sigma(s)    2.0             0.25        10
``loss_ld_vlr`` VLR (:mod:`kdlab.distill.vlr`)  1 or IoU          3.25            0.25        10
``loss_kd``     main: the positives             1                 10              10          2
``loss_kd_vlr`` VLR                             1 or IoU          0 (off)         0 (off)     2
==============  ==============================  ================  ==============  ==========  =====

The defaults are the published best recipe, Main KD + Main LD + VLR LD; Main LD alone is
``LD(student, teacher, vlr_ld_weight=0, main_kd_weight=0)``. Self-LD is the same class with a
teacher of the student's own architecture (a separately trained copy).

Normalisation (the paper-vs-code difference of METHODS.md §1):

- ``variant="kdlab"`` (default): each LD term is a weighted mean,
  ``sum_i w_i LD_i / max(sum_i w_i, 1)`` with the sums over the whole batch of all processes
  (``kdlab.utils.dist.reduce_normalizer``, like GFL's box losses); KD terms are (weighted) means over their region. Independent of images per batch.
- ``variant="official"``: the released code's constants: ``sum_i w_i sum_edges LD_i,e / 4`` (main)
  and ``/ 16`` (VLR), so the loss grows with the number of images per GPU; Main/VLR KD are means over
  each FPN level's locations, summed over levels; the VLR weighting defaults to ``"iou"`` and the
  VLR rule to the released code's ``inter / area(anchor) - rho^2/c^2`` (``vlr_rule="iof_diou"``,
  :mod:`kdlab.distill.vlr`).
  ``images_per_gpu=k`` reproduces the scale of a released-code run with ``k`` images per GPU from
  any batch: the LD sums are multiplied by ``k / B`` (``B`` = this process's images), i.e. the mean
  of the official loss over ``k``-image chunks, as DDP averages its GPUs' gradients. With ``k = 2``
  (the authors' setting) a one-process 16-image batch trains at the paper's effective LD strength.

Calibration of kdlab's weights. The published weights (0.25, 0.25, 10) were tuned under the official
constants at 2 images per GPU; ``variant="official"`` keeps them. Under kdlab's normalisation the
same 0.25 is far weaker, so kdlab's defaults are the published ones times the measured ratio
``official term (2 img/GPU) / kdlab term`` (``experiments/ld_calibration.py``: the shapes GFL
student and teacher, 12 batches of 16 training images, forward passes only; value and gradient
norm on the student's head outputs; mean ± std over the batches):

- Main LD: the ratio is exactly ``(2 / B) sum_{positives} max_c sigma(s)``, the student's summed
  scores over 2 images' positives (25 an image on shapes), so it follows the student's confidence:
  0.61 ± 0.06 untrained, 6.4 ± 0.5 after 100 iterations, 6.7 ± 0.6 after 200, 7.0 ± 0.7 after 300 of
  its 1500 (AP 1.4), and about 11 for a trained student (an earlier measurement). The released scale
  is thus a schedule kdlab's constant weight can match only on average: 2.0 = 0.25 x 8.
- VLR LD: 12.3-12.8 ± 2.2 (value), 13.1-13.4 ± 2.0 (gradient), the same from initialisation to
  300 iterations (it is set by the region's size, ~120 locations and their IoU weights an image,
  not by the student): 3.25 = 0.25 x 13.
- Main KD: 1.03-1.11 (value), 1.4-1.9 (gradient; a level with few positives weighs more in the
  released per-level means): the published 10 is kept.

The ratios are dataset-dependent: on COCO (more objects an image) the released scale is stronger
still; ``variant="official", images_per_gpu=2`` reproduces it exactly on any data.
``experiments/ld_shapes.py`` runs both scales.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from kdlab.distill.base import DistillCriterion
from kdlab.distill.common import check_corresponding_slots, check_teacher_student
from kdlab.distill.vlr import VLR_RULES, VLR_WEIGHTINGS, vlr_weights
from kdlab.losses.ld import edge_ld, ld_kl_div
from kdlab.models.base import Detector
from kdlab.utils.dist import reduce_normalizer

LD_VARIANTS = ("kdlab", "official")
# the published weights, tuned under the released code's normalisation (variant="official")
PUBLISHED_LD_WEIGHTS = {"loss_ld": 0.25, "loss_ld_vlr": 0.25}
# kdlab's normalisation: the published weights times the measured official / kdlab ratio (module docstring)
CALIBRATED_LD_WEIGHTS = {"loss_ld": 2.0, "loss_ld_vlr": 3.25}
# the released code's constant ``avg_factor`` of the per-edge LD sums (main region, VLR)
OFFICIAL_MAIN_LD_DIVISOR = 4.0
OFFICIAL_VLR_LD_DIVISOR = 16.0


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i v_i / max(sum_i w_i, 1)`` over the whole (all-process) batch (``reduce_normalizer``: DDP == big batch)."""
    normaliser = reduce_normalizer(weights.sum())
    return (values * weights).sum() / normaliser


def per_level_mean_sum(values: Tensor, levels: Tensor, num_levels: int) -> Tensor:
    """``sum_l mean_{i in level l} v_i`` over the levels that have values (the released code's KD reduction)."""
    sums = values.new_zeros(num_levels).index_add(0, levels, values)
    counts = torch.bincount(levels, minlength=num_levels).to(values.dtype)
    return (sums / counts.clamp(min=1.0)).sum()


class LD(DistillCriterion):
    """Localization Distillation: Main LD, VLR LD, Main KD and VLR KD (see the module docstring).

    Args:
        student: dense detector with a distribution head (``DenseOutput.box_logits``).
        teacher: trained detector with the same ``reg_max``, strides, classes and slot layout.
        main_ld_weight, main_ld_temperature: Main LD (T = 10); weight ``None``: 2.0 for ``variant="kdlab"``
            (calibrated, see the module docstring), the published 0.25 for ``variant="official"``.
        vlr_ld_weight, vlr_ld_temperature: VLR LD (T = 10); weight ``None``: 3.25 (kdlab) or 0.25 (official).
        main_kd_weight, main_kd_temperature: Main KD on the class logits (10, T = 2).
        vlr_kd_weight, vlr_kd_temperature: VLR KD (0: off in the published recipe, T = 2).
        vlr_alpha: the VLR's lower bound ``alpha * thr`` (0.25).
        vlr_weighting: ``"mask"`` (paper) or ``"iou"`` (released code); ``None``: ``"mask"`` for
            ``variant="kdlab"``, ``"iou"`` for ``variant="official"``.
        vlr_rule: the overlap the VLR bounds, ``"diou"`` (paper) or ``"iof_diou"`` (released code:
            ``inter / area(anchor) - rho^2/c^2``); ``None``: ``"diou"`` for ``variant="kdlab"``,
            ``"iof_diou"`` for ``variant="official"`` (anchor-based heads; FCOS has its own region).
        vlr_exclude_positives: drop positives from the VLR (the released GFL head keeps them).
        variant: ``"kdlab"`` (normalised by the summed location weights) or ``"official"``
            (the released code's constant normalisation).
        images_per_gpu: with ``variant="official"``, the images per GPU of the released-code run
            whose loss scale to reproduce (``None``: this process's batch, the code as released).
        atss_topk: ATSS candidates per level for the VLR thresholds of heads not assigned by ATSS.
    """

    name = "ld"
    method = "LD"
    supported_kinds = ("dense",)

    def __init__(
        self,
        student: Detector,
        teacher: Detector,
        *,
        main_ld_weight: float | None = None, main_ld_temperature: float = 10.0,
        vlr_ld_weight: float | None = None, vlr_ld_temperature: float = 10.0,
        main_kd_weight: float = 10.0, main_kd_temperature: float = 2.0,
        vlr_kd_weight: float = 0.0, vlr_kd_temperature: float = 2.0,
        vlr_alpha: float = 0.25,
        vlr_weighting: str | None = None,
        vlr_rule: str | None = None,
        vlr_exclude_positives: bool = False,
        variant: str = "kdlab",
        images_per_gpu: int | None = None,
        atss_topk: int = 9,
    ):
        check_teacher_student(student, teacher, self.method)
        super().__init__(student, teacher)
        if variant not in LD_VARIANTS:
            raise ValueError(f"LD variant must be one of {LD_VARIANTS}, got {variant!r}")
        if images_per_gpu is not None:
            if variant != "official":
                raise ValueError(f"images_per_gpu applies to variant='official' only (got variant={variant!r})")
            if isinstance(images_per_gpu, bool) or not isinstance(images_per_gpu, int) or images_per_gpu < 1:
                raise ValueError(f"images_per_gpu must be a positive integer, got {images_per_gpu!r}")
        if vlr_weighting is None:
            vlr_weighting = "iou" if variant == "official" else "mask"
        if vlr_weighting not in VLR_WEIGHTINGS:
            raise ValueError(f"vlr_weighting must be one of {VLR_WEIGHTINGS}, got {vlr_weighting!r}")
        if vlr_rule is None:
            vlr_rule = "iof_diou" if variant == "official" else "diou"
        if vlr_rule not in VLR_RULES:
            raise ValueError(f"vlr_rule must be one of {tuple(VLR_RULES)}, got {vlr_rule!r}")
        defaults = PUBLISHED_LD_WEIGHTS if variant == "official" else CALIBRATED_LD_WEIGHTS
        main_ld_weight = defaults["loss_ld"] if main_ld_weight is None else main_ld_weight
        vlr_ld_weight = defaults["loss_ld_vlr"] if vlr_ld_weight is None else vlr_ld_weight
        weights = {"loss_ld": main_ld_weight, "loss_ld_vlr": vlr_ld_weight, "loss_kd": main_kd_weight, "loss_kd_vlr": vlr_kd_weight}
        temperatures = {"loss_ld": main_ld_temperature, "loss_ld_vlr": vlr_ld_temperature,
                        "loss_kd": main_kd_temperature, "loss_kd_vlr": vlr_kd_temperature}
        for name, w in weights.items():
            if w < 0:
                raise ValueError(f"LD weight of {name} must be >= 0, got {w}")
            if not temperatures[name] > 0:
                raise ValueError(f"LD temperature of {name} must be > 0, got {temperatures[name]}")
        self.weight_dict = {name: float(w) for name, w in weights.items() if w > 0}
        kd_terms = [name for name in ("loss_kd", "loss_kd_vlr") if name in self.weight_dict]
        if getattr(student, "num_classes", None) == 1 and kd_terms:
            warnings.warn(f"LD: with one class the classification KD terms {kd_terms} (a softmax over the classes) are "
                          "identically 0: they cost time and transfer nothing; set main_kd_weight=0 (and "
                          "vlr_kd_weight=0)", stacklevel=2)
        self.temperatures = {name: float(t) for name, t in temperatures.items()}
        self.variant = variant
        self.images_per_gpu = images_per_gpu
        self.vlr_alpha = vlr_alpha
        self.vlr_weighting = vlr_weighting
        self.vlr_rule = vlr_rule
        self.vlr_exclude_positives = vlr_exclude_positives
        self.atss_topk = atss_topk

    def forward(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted LD/KD terms of the enabled parts (keys of ``weight_dict``)."""
        student_out = student_out.dense_slots(self.method, "student")
        teacher_out = teacher_out.dense_slots(self.method, "teacher")
        check_corresponding_slots(student_out, teacher_out, self.method, need_box_logits=True)
        student_out.require("assignment", self.method, "student")
        enabled = self.weight_dict
        official = self.variant == "official"
        # the official sums are per GPU: k-image chunks averaged (k / B); the code as released: 1
        chunk_scale = self.images_per_gpu / student_out.cls_logits.shape[0] if self.images_per_gpu else 1.0
        reg_max = student_out.box_logits.shape[-1] // 4 - 1
        num_levels = len(student_out.num_per_level)
        terms: dict[str, Tensor] = {}

        # per-slot losses of the whole batch, once per temperature ([B, N]); every term weights them by
        # its region (0 outside), so main and VLR LD share one softmax of each model's distributions
        ld_maps: dict[float, Tensor] = {}
        kd_maps: dict[float, Tensor] = {}

        def ld_term(name: str, weight: Tensor, official_divisor: float) -> Tensor:
            """LD averaged over the 4 edges ([B, N] map), weighted by ``weight`` [B, N]."""
            temperature = self.temperatures[name]
            if temperature not in ld_maps:
                s_box, t_box = student_out.box_logits, teacher_out.box_logits
                ld_maps[temperature] = edge_ld(s_box.flatten(0, 1), t_box.flatten(0, 1), reg_max, temperature).view(s_box.shape[:2])
            if official:  # sum_i w_i sum_e LD_i,e / 4 (main), / 16 (VLR)
                return (4 * ld_maps[temperature] * weight).sum() / official_divisor * chunk_scale
            return weighted_mean(ld_maps[temperature], weight)

        def kd_term(name: str, weight: Tensor) -> Tensor:
            """Class KD ([B, N] map), weighted by ``weight`` [B, N]; official: per-level means over ``weight > 0``."""
            temperature = self.temperatures[name]
            if temperature not in kd_maps:
                kd_maps[temperature] = ld_kl_div(student_out.cls_logits, teacher_out.cls_logits, temperature)
            if official:
                region = weight > 0
                return per_level_mean_sum(kd_maps[temperature][region], student_out.levels.expand_as(region)[region],
                                          num_levels)
            return weighted_mean(kd_maps[temperature], weight)

        pos_mask = student_out.assignment.pos_mask  # [B, N]
        if "loss_ld" in enabled:
            # location weight: the student's max class score, detached (the weight GFL uses for DFL)
            score = student_out.cls_logits.detach().float().sigmoid().max(dim=-1).values  # [B, N]
            terms["loss_ld"] = ld_term("loss_ld", torch.where(pos_mask, score, torch.zeros_like(score)),
                                       OFFICIAL_MAIN_LD_DIVISOR)
        if "loss_kd" in enabled:
            terms["loss_kd"] = kd_term("loss_kd", pos_mask.float())

        if "loss_ld_vlr" in enabled or "loss_kd_vlr" in enabled:
            region_weight = vlr_weights(student_out, self.vlr_alpha, self.vlr_weighting, self.atss_topk, self.vlr_rule)  # [B, N]
            if self.vlr_exclude_positives:
                region_weight = region_weight * (~pos_mask).float()
            if "loss_ld_vlr" in enabled:
                terms["loss_ld_vlr"] = ld_term("loss_ld_vlr", region_weight, OFFICIAL_VLR_LD_DIVISOR)
            if "loss_kd_vlr" in enabled:
                terms["loss_kd_vlr"] = kd_term("loss_kd_vlr", region_weight)
        return terms
