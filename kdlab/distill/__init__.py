"""Distillers: ``nn.Module``s that take a student and a frozen teacher and return named loss terms."""

from kdlab.distill.base import DetectionTask, Distiller, image_sizes_of

__all__ = ["DetectionTask", "Distiller", "image_sizes_of"]
