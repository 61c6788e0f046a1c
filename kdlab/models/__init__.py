"""Detectors that expose what distillers need, and ``build_detector``."""

from __future__ import annotations

import inspect

from kdlab.models.base import Criterion, Detector, weighted_total
from kdlab.models.dab_detr import DABDETR
from kdlab.models.detr_outputs import QueryPassOutput, SetOutput
from kdlab.models.gfl import GFL
from kdlab.models.outputs import DenseAssignment, DenseOutput
from kdlab.models.students import STUDENT_BUILDERS
from kdlab.models.torchvision_models import TORCHVISION_BUILDERS

# name -> class or builder taking (num_classes, **options): kdlab's GFL and DAB-DETR, kdlab's configurable
# students, torchvision's detectors under torchvision's names
DETECTORS = {"gfl": GFL, "dab_detr": DABDETR, **STUDENT_BUILDERS, **TORCHVISION_BUILDERS}


def build_detector(name: str, num_classes: int, **options) -> Detector:
    """Build a detector by name, e.g. ``build_detector("gfl", 80, backbone="resnet50")`` or
    ``build_detector("retinanet_resnet50_fpn_v2", num_classes=91, weights="COCO_V1")``.

    Unknown names or options raise a ``ValueError`` that lists the valid ones.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {sorted(DETECTORS)}")
    builder = DETECTORS[name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            valid = sorted(k for k in params if k != "num_classes")
            raise ValueError(f"detector {name!r} does not take option(s) {unknown}; valid options: {valid}")
    return builder(num_classes=num_classes, **options)


__all__ = ["build_detector", "DETECTORS", "Detector", "Criterion", "DenseOutput", "DenseAssignment", "GFL", "DABDETR",
           "SetOutput", "QueryPassOutput", "weighted_total"]
