"""Distillers: ``nn.Module``s that take a student and a frozen teacher and return named loss terms.

``build_distiller(name, student, teacher, **options)`` maps a config's ``distill`` name to a class:

- ``"ld"``: :class:`kdlab.distill.ld.LD` (Localization Distillation, METHODS.md §1)
- ``"fitnet"``, ``"inside_gt"``, ``"fine_grained"``, ``"gi_imitation"``, ``"cls_kd"``: the
  feature-imitation and logit-KD baselines in :mod:`kdlab.distill.imitation`
- ``"gid"``: :class:`kdlab.distill.gid.GID` (General Instance Distillation, METHODS.md §2)
"""

from __future__ import annotations

import importlib

from kdlab.distill.base import DetectionTask, Distiller, image_sizes_of
from kdlab.distill.gid import GID
from kdlab.distill.ld import LD

# config name -> (module, class); imported lazily so one method's module never slows another's
DISTILLERS = {
    "ld": ("kdlab.distill.ld", "LD"),
    "fitnet": ("kdlab.distill.imitation", "FitNet"),
    "inside_gt": ("kdlab.distill.imitation", "InsideGTImitation"),
    "fine_grained": ("kdlab.distill.imitation", "FineGrainedImitation"),
    "gi_imitation": ("kdlab.distill.imitation", "GIImitation"),
    "cls_kd": ("kdlab.distill.imitation", "ClassificationKD"),
    "gid": ("kdlab.distill.gid", "GID"),
}


def build_distiller(name: str, student, teacher, **options) -> Distiller:
    """Build the distiller called ``name`` (see the module docstring) around ``student`` and ``teacher``."""
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller {name!r}; available: {sorted(DISTILLERS)}")
    module_name, class_name = DISTILLERS[name]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"distiller {name!r} ({module_name}.{class_name}) is not available: {exc}") from exc
    return cls(student, teacher, **options)


__all__ = ["DetectionTask", "Distiller", "image_sizes_of", "build_distiller", "DISTILLERS", "LD", "GID"]
