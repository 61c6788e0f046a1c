"""The contract every kdlab detector follows (GFL here; RetinaNet, FCOS, Faster R-CNN in the zoo).

A detector is an ``nn.Module`` with

- ``forward(images, image_sizes, targets=None) -> output``: ``images`` is a normalised, padded
  batch ``[B, 3, H, W]``; ``image_sizes`` the ``(h, w)`` of each unpadded image; ``targets``
  (training) a list of dicts with ``boxes`` ``[G, 4]`` xyxy input pixels and ``labels`` ``[G]``
  contiguous. The output (e.g. :class:`~kdlab.models.outputs.DenseOutput`) holds features, raw
  head outputs, anchors/points and, when targets were given, the label assignment.
- ``postprocess(output) -> list[dict]``: per image ``boxes`` ``[K, 4]`` xyxy input pixels,
  ``scores`` ``[K]``, ``labels`` ``[K]`` contiguous.
- ``build_criterion() -> Criterion``: the detection loss, a separate module.

A :class:`Criterion` returns *unweighted* named loss terms; its ``weight_dict`` says how the
training loop weights them (DETR's convention), so every term can be logged both ways.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdlab.data.transforms import image_sizes_of


class Criterion(nn.Module):
    """Detection loss. ``forward(output, targets) -> {name: unweighted scalar}``.

    Attributes:
        weight_dict: ``{name: weight}``; the total loss is ``sum(weight_dict[k] * terms[k])``.
    """

    weight_dict: dict[str, float]

    def forward(self, output, targets: list[dict]) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError


class Detector(nn.Module):
    """Base class of kdlab detectors (see the module docstring for the contract).

    ``output_kind`` says which output class ``forward`` returns: ``"dense"``
    (:class:`~kdlab.models.outputs.DenseOutput`), ``"two_stage"`` or ``"set"``; distillation
    methods check it when they are built.
    """

    num_classes: int
    output_kind: str = "dense"

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None = None):  # pragma: no cover
        raise NotImplementedError

    def postprocess(self, output) -> list[dict[str, Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def forward_features(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> "FeatureOutput":
        """The FPN maps of :meth:`forward` (:class:`~kdlab.models.outputs.FeatureOutput`), for a teacher
        whose methods read nothing else. This default runs the whole forward; detectors that can stop
        after their FPN override it (kdlab's GFL, RetinaNet, FCOS and Faster R-CNN)."""
        from kdlab.models.outputs import FeatureOutput

        output = self(images, image_sizes)
        return FeatureOutput(list(output.features), list(output.feature_strides), [tuple(s) for s in image_sizes],
                             type(self).__name__)

    def forward_dense(self, images: Tensor, image_sizes: list[tuple[int, int]]):
        """The output of :meth:`forward` as far as its dense stage, for a teacher whose methods read only its
        FPN maps and that stage (:meth:`~kdlab.models.outputs.DetectorOutput.dense_slots`: GID). A one-stage
        detector's dense stage is the whole detector, so this default is the plain forward; a two-stage
        detector stops after its RPN (:meth:`kdlab.models.faster_rcnn.FasterRCNN.forward_dense`)."""
        return self(images, image_sizes)

    def build_criterion(self) -> Criterion:  # pragma: no cover
        raise NotImplementedError

    def predict(self, images: list, *, score_thresh: float = 0.0, **resize) -> list[dict[str, Tensor]]:
        """Detections of a list of images (PIL, ``[3, H, W]`` tensors or paths) in their own pixels.

        See :func:`kdlab.engine.inference.predict_images` (``resize``: ``min_size``, ``max_size``,
        ``size_divisor``, by default those the detector was trained with).
        """
        from kdlab.engine.inference import predict_images  # the engine imports the models, not the reverse

        return predict_images(self, images, score_thresh=score_thresh, **resize)


def weighted_total(terms: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """``sum_k weight_dict[k] * terms[k]`` over the terms that have a weight."""
    missing = [k for k in terms if k not in weight_dict]
    if missing:
        raise KeyError(f"loss terms {missing} have no entry in weight_dict {sorted(weight_dict)}")
    total = None
    for name, value in terms.items():
        w = weight_dict[name]
        if w == 0:
            continue
        total = value * w if total is None else total + value * w
    if total is None:  # every weight is zero: keep the graph connected for DDP
        total = sum(v * 0.0 for v in terms.values())
    return total


class DetectionTask(nn.Module):
    """What the engine trains when nothing is distilled: a detector on its own detection loss.

    The engine trains any module with this interface (``kdlab.distill.DistillationTask`` adds a
    frozen teacher and distillation terms):

    - ``forward(images, targets) -> {name: unweighted scalar loss}``,
    - ``weight_dict``: how each term is weighted (every term is logged both ways),
    - ``student``: the detector being trained (the exported checkpoint holds it alone),
    - ``trainable_parameters()`` / ``trainable_state_dict()``: what the optimiser updates and what
      a resumable checkpoint saves.
    """

    def __init__(self, detector: Detector):
        super().__init__()
        self.student = detector
        self.criterion = detector.build_criterion()

    @property
    def weight_dict(self) -> dict[str, float]:
        return dict(self.criterion.weight_dict)

    def forward(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        return self.criterion(self.student(images, image_sizes_of(targets), targets), targets)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return self.state_dict()

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        self.load_state_dict(state)
