"""Structured outputs of DETR-family detectors (DAB-DETR): a *set* of predictions per image.

Conventions (DETR's, which differ from the dense detectors' :mod:`kdlab.models.outputs`):

- ``B`` images, ``Q`` detection queries, ``L`` decoder layers, ``C`` classes (sigmoid focal
  logits, no background column), ``D`` the transformer width, ``HW`` encoder tokens.
- Boxes are ``(cx, cy, w, h)`` normalised to ``[0, 1]`` by each image's *unpadded* size
  ``(h_i, w_i)``; :attr:`SetOutput.pred_boxes_xyxy` gives ``(x1, y1, x2, y2)`` in input pixels.
- Query ``q`` of a teacher and query ``q`` of a student are *not* related: the prediction sets
  are unordered and only a matching (Hungarian, per image) pairs them. Extra query passes
  (:class:`QueryPassOutput`) are how two models are made to answer the *same* queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor
from torchvision.ops import box_convert

from kdlab.models.outputs import DetectorOutput, _detach


def cxcywh_to_pixels(boxes: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
    """``[B, N, 4]`` normalised ``(cx, cy, w, h)`` -> ``[B, N, 4]`` ``(x1, y1, x2, y2)`` in input pixels."""
    scale = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=boxes.dtype, device=boxes.device)
    return box_convert(boxes, "cxcywh", "xyxy") * scale[:, None, :]


@dataclass
class QueryPassOutput:
    """One extra decoder pass over the encoder memory with caller-given anchor queries.

    Attributes:
        layer_logits: ``[L, B, P, C]`` class logits after every decoder layer.
        layer_boxes: ``[L, B, P, 4]`` normalised cxcywh boxes after every decoder layer.
        layer_references: ``[L, B, P, 4]`` the (sigmoid) anchor boxes each layer started from:
            ``layer_references[0] = sigmoid(anchors)``, ``layer_references[l]`` the anchor layer ``l - 1``
            updated (from its content before the decoder's final norm, as the released code; the
            prediction ``layer_boxes[l - 1]`` comes from the content after it), detached.
        matches: for a Group DETR training group given targets, its final layer's Hungarian matching per
            image (as :attr:`SetOutput.matches`); None otherwise.
    """

    layer_logits: Tensor
    layer_boxes: Tensor
    layer_references: Tensor
    matches: list[tuple[Tensor, Tensor]] | None = None

    @property
    def pred_logits(self) -> Tensor:
        """``[B, P, C]`` the final layer's logits."""
        return self.layer_logits[-1]

    @property
    def pred_boxes(self) -> Tensor:
        """``[B, P, 4]`` the final layer's boxes (normalised cxcywh)."""
        return self.layer_boxes[-1]

    def detach(self) -> "QueryPassOutput":
        return _detach(self)


@dataclass
class SetOutput(DetectorOutput):
    """What one forward pass of a DETR-family detector returns (output kind ``"set"`` of the
    :class:`~kdlab.models.outputs.DetectorOutput` protocol; it has no dense slots).

    Attributes:
        features: the backbone map(s) fed to the encoder, ``[B, C_backbone, H, W]`` each.
        feature_strides: stride of each map in input pixels.
        memory: ``[B, HW, D]`` encoder output, tokens row-major over ``(y, x)`` of ``features[0]``.
        memory_mask: ``[B, HW]`` bool, ``True`` at tokens that lie in the padding.
        pred_logits: ``[B, Q, C]`` final-layer sigmoid focal logits.
        pred_boxes: ``[B, Q, 4]`` final-layer boxes, normalised cxcywh.
        layer_logits: ``[L, B, Q, C]`` logits after every decoder layer (``[-1]`` is ``pred_logits``).
        layer_boxes: ``[L, B, Q, 4]`` boxes after every decoder layer (``[-1]`` is ``pred_boxes``).
        layer_references: ``[L, B, Q, 4]`` the sigmoid anchors each layer started from.
        query_anchors: ``[Q, 4]`` the learned anchor queries, inverse-sigmoid space.
        image_sizes: ``(h, w)`` of each unpadded input image.
        extra: per named extra query set (``forward(..., extra_queries={name: anchors})``) its
            separate decoder pass.
        matches: when the forward was given targets, the final layer's Hungarian matching per image,
            ``(query_idx [K_i], gt_idx [K_i])`` with ``K_i = min(Q, G_i)``.
        groups: in training with Group DETR (``train_groups = K > 1``), the ``K - 1`` further groups'
            separate passes (each with its own ``matches``); empty otherwise.
        source: what produced the output (for messages).
    """

    kind: ClassVar[str] = "set"

    features: list[Tensor]
    feature_strides: list[int]
    memory: Tensor
    memory_mask: Tensor
    pred_logits: Tensor
    pred_boxes: Tensor
    layer_logits: Tensor
    layer_boxes: Tensor
    layer_references: Tensor
    query_anchors: Tensor
    image_sizes: list[tuple[int, int]]
    extra: dict[str, QueryPassOutput] = field(default_factory=dict)
    matches: list[tuple[Tensor, Tensor]] | None = None
    groups: list[QueryPassOutput] = field(default_factory=list)
    source: str = "DAB-DETR"

    @property
    def detector_name(self) -> str:
        return self.source

    @property
    def num_queries(self) -> int:
        return self.pred_logits.shape[1]

    @property
    def pred_boxes_xyxy(self) -> Tensor:
        """``[B, Q, 4]`` final-layer boxes as ``(x1, y1, x2, y2)`` in input pixels."""
        return cxcywh_to_pixels(self.pred_boxes, self.image_sizes)
