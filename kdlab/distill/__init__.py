"""Distillation: methods are criteria, a task runs student and frozen teacher (:mod:`kdlab.distill.base`).

:data:`METHODS` maps a config's ``distill`` name to its criterion class:

- ``"ld"``: :class:`kdlab.distill.ld.LD` (Localization Distillation, METHODS.md §1)
- ``"gid"``: :class:`kdlab.distill.gid.GID` (General Instance Distillation, METHODS.md §2)
- ``"drkd"``: :class:`kdlab.distill.drkd.DRKD` (Dual Relation Knowledge Distillation, METHODS.md §4)
- ``"kd_detr"``: :class:`kdlab.distill.kd_detr.KDDETR` (KD-DETR's consistent distillation points, METHODS.md §3;
  DETR-family teacher and student, e.g. ``dab_detr``)
- ``"detr_matched_kd"``: :class:`kdlab.distill.kd_detr.MatchedQueryKD`, the baseline KD-DETR argues against
  (detection queries paired by Hungarian matching)
- ``"fitnet"``, ``"inside_gt"``, ``"fine_grained"``, ``"gi_imitation"``, ``"cls_kd"``: the
  feature-imitation and logit-KD baselines of :mod:`kdlab.distill.imitation`

A config names one method (``distill: ld``), a combination (``distill: ld+fine_grained``, options per
method: ``distill_options: {ld: {...}, fine_grained: {weight: 2.0}}``) or a recipe of :data:`RECIPES`
(``distill: ld_released``). :func:`build_distillation` turns that into a
:class:`~kdlab.distill.base.DistillationTask`.
"""

from __future__ import annotations

from typing import Any

from kdlab.distill.base import DistillationTask, DistillCriterion
from kdlab.distill.drkd import DRKD
from kdlab.distill.gid import GID
from kdlab.distill.imitation import ClassificationKD, FineGrainedImitation, FitNet, GIImitation, InsideGTImitation
from kdlab.distill.kd_detr import KDDETR, MatchedQueryKD
from kdlab.distill.ld import LD
from kdlab.models.base import Detector

METHODS: dict[str, type[DistillCriterion]] = {
    "ld": LD,
    "gid": GID,
    "drkd": DRKD,
    "kd_detr": KDDETR,
    "detr_matched_kd": MatchedQueryKD,
    "fitnet": FitNet,
    "inside_gt": InsideGTImitation,
    "fine_grained": FineGrainedImitation,
    "gi_imitation": GIImitation,
    "cls_kd": ClassificationKD,
}
"""Config name -> distillation criterion."""

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # LD's released R-18/34/50 COCO configs: Main KD + Main LD + VLR LD at the released code's loss scale
    # (constant normaliser, 2 images per GPU) plus fine-grained feature imitation, weight 2.0 (METHODS.md §1)
    "ld_released": {"ld": {"variant": "official", "images_per_gpu": 2}, "fine_grained": {"weight": 2.0}},
}
"""Named combinations: recipe -> {method: default options}."""


def parse_distill(spec: str) -> dict[str, dict[str, Any]]:
    """``"ld"``, ``"ld+fine_grained"`` or a recipe name -> ``{method: default options}``.

    Raises:
        ValueError: an unknown name (the message lists the methods and recipes).
    """
    if spec in RECIPES:
        return {name: dict(options) for name, options in RECIPES[spec].items()}
    names = [part.strip() for part in spec.split("+")]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not all(names):
        raise ValueError(f"unknown distillation method {unknown[0] if unknown else spec!r} in distill={spec!r}; methods: "
                         f"{sorted(METHODS)}, recipes: {sorted(RECIPES)} (combine methods with '+')")
    if len(set(names)) != len(names):
        raise ValueError(f"distill={spec!r} names a method twice")
    return {name: {} for name in names}


def method_options(spec: str, options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The keyword arguments of each method of ``spec``: the recipe's defaults updated by ``options``.

    For a single method, ``options`` are its keyword arguments; for a combination or a recipe they
    are keyed by method name (``{"ld": {...}, "fine_grained": {...}}``).
    """
    methods = parse_distill(spec)
    options = dict(options or {})
    if len(methods) == 1 and spec not in RECIPES:
        (name,) = methods
        return {name: options}
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise ValueError(f"distill={spec!r} combines {sorted(methods)}: distill_options must be keyed by these method "
                         f"names, got {unknown}")
    for name, extra in options.items():
        if not isinstance(extra, dict):
            raise ValueError(f"distill_options.{name} must be a mapping of {name}'s options, got {extra!r}")
        methods[name].update(extra)
    return methods


def build_distillation(spec: str, student: Detector, teacher: Detector, options: dict[str, Any] | None = None
                       ) -> DistillationTask:
    """The :class:`DistillationTask` of ``spec`` (a method, ``"a+b"`` or a recipe) around the two models."""
    criteria = [METHODS[name](student, teacher, **kwargs) for name, kwargs in method_options(spec, options).items()]
    return DistillationTask(student, teacher, criteria)


__all__ = ["METHODS", "RECIPES", "DistillationTask", "DistillCriterion", "build_distillation", "method_options",
           "parse_distill", "LD", "GID", "DRKD", "KDDETR", "MatchedQueryKD", "FitNet", "InsideGTImitation", "FineGrainedImitation", "GIImitation",
           "ClassificationKD"]
