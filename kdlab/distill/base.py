"""What the training engine trains: a detector alone, or a student distilled from a teacher.

Both are ``nn.Module``s with the same interface:

- ``forward(images, targets) -> {name: unweighted scalar loss}``,
- ``weight_dict``: how the engine weights each term (every term is logged both ways),
- ``student``: the detector being trained (the exported checkpoint holds it alone),
- ``trainable_parameters()`` / ``trainable_state_dict()``: what the optimiser updates and what a
  resumable checkpoint saves. A distiller's own parts (adapters, graph units) are included; the
  teacher never is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdlab.models.base import Detector


def image_sizes_of(targets: list[dict]) -> list[tuple[int, int]]:
    """``(h, w)`` of each unpadded input image, read from the batch's targets."""
    return [(int(t["size"][0]), int(t["size"][1])) for t in targets]


class DetectionTask(nn.Module):
    """Train a detector on its own detection loss."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.student = detector
        self.criterion = detector.build_criterion()

    @property
    def weight_dict(self) -> dict[str, float]:
        return dict(self.criterion.weight_dict)

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        output = self.student(images, image_sizes_of(targets), targets)
        return self.criterion(output, targets)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return self.state_dict()

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        self.load_state_dict(state)


class Distiller(nn.Module):
    """Base distiller: a trainable student, a frozen teacher, and distillation terms.

    Subclasses implement :meth:`distill_terms` and set ``distill_weight_dict``. The teacher is
    put in ``eval()`` mode, has ``requires_grad=False`` everywhere and runs under
    ``torch.no_grad()``; it is registered as a submodule only so that ``.to(device)`` moves it,
    and is left out of :meth:`trainable_parameters` and :meth:`trainable_state_dict`.

    Args:
        student: the detector to train.
        teacher: a trained detector (its weights are never changed).
        teacher_needs_targets: run the teacher's forward with the targets, so that its output
            carries its own label assignment (some methods use it).
    """

    distill_weight_dict: dict[str, float] = {}

    def __init__(self, student: Detector, teacher: Detector, *, teacher_needs_targets: bool = False):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.criterion = student.build_criterion()
        self.teacher_needs_targets = teacher_needs_targets
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode (frozen BN/GN statistics, no dropout)
        return self

    @property
    def weight_dict(self) -> dict[str, float]:
        return {**self.criterion.weight_dict, **self.distill_weight_dict}

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        sizes = image_sizes_of(targets)
        student_out = self.student(images, sizes, targets)
        with torch.no_grad():
            teacher_out = self.teacher(images, sizes, targets if self.teacher_needs_targets else None)
        terms = dict(self.criterion(student_out, targets))
        terms.update(self.distill_terms(student_out, teacher_out, targets))
        return terms

    def distill_terms(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:
        """Unweighted distillation terms (keys must appear in ``distill_weight_dict``)."""
        raise NotImplementedError

    def _is_teacher_key(self, name: str) -> bool:
        return name == "teacher" or name.startswith("teacher.")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not self._is_teacher_key(n)]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not self._is_teacher_key(k)}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not self._is_teacher_key(k)]
        if missing or unexpected:
            raise KeyError(f"checkpoint does not match the distiller: missing {missing}, unexpected {unexpected}")
