"""A distillation method is a criterion; a distillation task runs the two models and adds them up.

- :class:`DistillCriterion`: one method, ``forward(student_out, teacher_out, targets) -> {term:
  unweighted}`` with its ``weight_dict``, in the shape of the detection criteria (DETR's
  convention). It reads the outputs through their common interface
  (:class:`~kdlab.models.outputs.DetectorOutput`) and never asks which detector produced them. Its
  own trainable parts (adapters, graph units) are submodules and train with the student.
- :class:`DistillationTask`: what the engine trains. It runs the student and the frozen teacher on
  a batch (:meth:`DistillationTask.run_models`, the step a method may override, e.g. to feed the
  same extra queries to both decoders) and returns the detection terms plus every criterion's
  terms. Criteria combine: the released LD recipe is ``[LD, FineGrainedImitation]``.

The teacher is put in ``eval()`` mode, has ``requires_grad=False`` everywhere and runs under
``torch.no_grad()``; it is a submodule only so that ``.to(device)`` moves it, and is left out of
:meth:`~DistillationTask.trainable_parameters` and :meth:`~DistillationTask.trainable_state_dict`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdlab.data.transforms import image_sizes_of
from kdlab.models.base import DetectionTask, Detector


class DistillCriterion(nn.Module):
    """Base class of the distillation methods (see the module docstring).

    Subclasses set ``name`` (their key in :data:`kdlab.distill.METHODS`), ``method`` (how messages
    name them), ``weight_dict`` (every term they return; a term switched off is absent), and may set:

    - ``supported_kinds``: the output kinds they read (``"dense"``, ``"two_stage"``, ``"set"``),
      checked against both models when the criterion is built;
    - ``teacher_needs_targets``: run the teacher with the targets (its own label assignment);
    - ``teacher_features_only``: the method reads only the teacher's FPN maps; when every method of a
      task says so, the teacher stops after its FPN (:meth:`~kdlab.models.base.Detector.forward_features`:
      no heads, no post-processing; the same maps);
    - ``teacher_dense_only``: the method reads only the teacher's FPN maps and its dense stage
      (:meth:`~kdlab.models.outputs.DetectorOutput.dense_slots`); when every method of a task reads no
      more, the teacher stops there (:meth:`~kdlab.models.base.Detector.forward_dense`: a two-stage
      teacher skips its proposals and RoI head; a one-stage teacher runs as usual);
    - :meth:`shared_inputs`: keyword arguments fed to the forward of both models.

    Args:
        student: the detector being trained.
        teacher: the trained detector.
    """

    name: str = "distill"
    method: str = "distillation"
    supported_kinds: tuple[str, ...] = ("dense", "two_stage", "set")
    teacher_needs_targets: bool = False
    teacher_features_only: bool = False
    teacher_dense_only: bool = False

    def __init__(self, student: Detector, teacher: Detector):
        super().__init__()
        self.weight_dict: dict[str, float] = {}
        for who, model in (("student", student), ("teacher", teacher)):
            kind = getattr(model, "output_kind", "dense")
            if kind not in self.supported_kinds:
                raise ValueError(f"{self.method} distils {' / '.join(self.supported_kinds)} detectors; the {who} is a "
                                 f"{type(model).__name__} ({kind.replace('_', '-')} output)")

    def forward(self, student_out, teacher_out, targets: list[dict]) -> dict[str, Tensor]:  # pragma: no cover
        """Unweighted terms (the keys of ``weight_dict``)."""
        raise NotImplementedError

    def shared_inputs(self, images: Tensor, targets: list[dict], student: Detector, teacher: Detector) -> dict:
        """Extra keyword arguments for the forward of both models in this step (none by default)."""
        return {}


class DistillationTask(DetectionTask):
    """The student's detection loss plus the terms of one or more distillation criteria.

    Args:
        student: the detector to train.
        teacher: a trained detector (its weights are never changed).
        criteria: one :class:`DistillCriterion` or several (their terms must have distinct names).
    """

    def __init__(self, student: Detector, teacher: Detector, criteria: DistillCriterion | list[DistillCriterion]):
        super().__init__(student)
        criteria = [criteria] if isinstance(criteria, DistillCriterion) else list(criteria)
        if not criteria:
            raise ValueError("DistillationTask needs at least one distillation criterion")
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        names = [c.name for c in criteria]
        if len(set(names)) != len(names):
            raise ValueError(f"a distillation method can appear once in a combination, got {names}")
        self.distillers = nn.ModuleDict({c.name: c for c in criteria})
        seen = dict(self.criterion.weight_dict)
        for c in criteria:
            clash = sorted(set(seen) & set(c.weight_dict))
            if clash:
                raise ValueError(f"{c.method} returns term(s) {clash} that another criterion of the task returns too")
            seen.update(c.weight_dict)

    def train(self, mode: bool = True) -> "DistillationTask":
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode (frozen BN/GN statistics, no dropout)
        return self

    @property
    def weight_dict(self) -> dict[str, float]:
        weights = dict(self.criterion.weight_dict)
        for c in self.distillers.values():
            weights.update(c.weight_dict)
        return weights

    def run_models(self, images: Tensor, targets: list[dict]):
        """The student's output (with its label assignment) and the teacher's (no gradient).

        Every criterion's :meth:`~DistillCriterion.shared_inputs` go to both forwards; a method
        whose step differs more overrides this.
        """
        sizes = image_sizes_of(targets)
        shared: dict = {}
        for c in self.distillers.values():
            shared.update(c.shared_inputs(images, targets, self.student, self.teacher))
        student_out = self.student(images, sizes, targets, **shared)
        return student_out, self.teacher_forward(images, targets, shared)

    @property
    def teacher_features_only(self) -> bool:
        """Every method reads only the teacher's FPN maps (``DistillCriterion.teacher_features_only``)."""
        return all(c.teacher_features_only for c in self.distillers.values())

    @property
    def teacher_dense_only(self) -> bool:
        """Every method reads at most the teacher's FPN maps and dense stage (``teacher_features_only`` or
        ``teacher_dense_only``)."""
        return all(c.teacher_features_only or c.teacher_dense_only for c in self.distillers.values())

    def teacher_forward(self, images: Tensor, targets: list[dict], shared: dict | None = None):
        """The teacher's output of this step, without gradient: its FPN maps only when every method reads
        nothing else (``teacher_features_only``), its dense stage only when no method reads more
        (``teacher_dense_only``; Faster R-CNN: no proposals, no RoI head), provided no method feeds it extra
        inputs or needs its label assignment; else its full output (with the assignment when a method
        needs it). Benchmarks time the teacher through this."""
        sizes = image_sizes_of(targets)
        needs_targets = any(c.teacher_needs_targets for c in self.distillers.values())
        with torch.no_grad():
            if not shared and self.teacher_features_only:
                return self.teacher.forward_features(images, sizes)
            if not shared and not needs_targets and self.teacher_dense_only:
                return self.teacher.forward_dense(images, sizes)
            return self.teacher(images, sizes, targets if needs_targets else None, **(shared or {}))

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        student_out, teacher_out = self.run_models(images, targets)
        terms = dict(self.criterion(student_out, targets))
        for c in self.distillers.values():
            terms.update(c(student_out, teacher_out, targets))
        return terms

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
            raise KeyError(f"checkpoint does not match the distillation task: missing {missing}, unexpected {unexpected}")
