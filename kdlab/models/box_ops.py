"""Box geometry not in ``torchvision.ops``: aligned IoU, the released LD code's "DIoU" (an IoF minus the
DIoU penalty), point-in-box tests, the point <-> (l, t, r, b) encoding.

Everything torchvision has (``box_iou``, ``distance_box_iou``, ``generalized_box_iou``, ``box_convert``,
``clip_boxes_to_image``, ``remove_small_boxes``) is used from ``torchvision.ops`` directly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` (``[..., 4]`` xyxy each) -> ``[...]``.

    ``torchvision.ops.box_iou`` is pairwise (``[N, M]``); losses need the element-wise version.
    """
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (boxes1[..., 3] - boxes1[..., 1]).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (boxes2[..., 3] - boxes2[..., 1]).clamp(min=0)
    return inter / (area1 + area2 - inter).clamp(min=eps)


def distance_box_iof(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """The released LD code's "DIoU" of every ``boxes1[i]`` with every ``boxes2[j]`` -> ``[N, M]``.

    ``inter(b1, b2) / area(b1)  -  rho^2(b1, b2) / c^2(b1, b2)``: the intersection over the *first* box's
    area (an IoF, mmdet's ``bbox_overlaps`` with ``union = area1`` in its ``diou`` mode) minus DIoU's
    penalty, ``rho`` the distance between the centres and ``c`` the diagonal of the smallest enclosing
    box. Paper (``torchvision.ops.distance_box_iou``): ``IoU - rho^2 / c^2``. The two agree when
    ``b1`` and ``b2`` have the same area and differ most for an anchor inside a larger box (IoF 1).

    Args:
        boxes1: ``[N, 4]`` xyxy (LD: the anchors).
        boxes2: ``[M, 4]`` xyxy (LD: the GT boxes).
        eps: floor of the area and of ``c^2`` (mmdet's).
    """
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # [N, M]
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(dim=-1)  # [N]
    iof = inter / area1.clamp(min=eps)[:, None]
    centre1 = (boxes1[:, None, :2] + boxes1[:, None, 2:]) / 2  # [N, 1, 2]
    centre2 = (boxes2[None, :, :2] + boxes2[None, :, 2:]) / 2  # [1, M, 2]
    rho2 = (centre1 - centre2).pow(2).sum(dim=-1)  # [N, M]
    enclosing = torch.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:]) - torch.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    c2 = enclosing.clamp(min=0).pow(2).sum(dim=-1).clamp(min=eps)  # [N, M]
    return iof - rho2 / c2


def distance2bbox(points: Tensor, distances: Tensor) -> Tensor:
    """Decode ``(l, t, r, b)`` distances from ``points`` ``(x, y)`` into xyxy boxes.

    Args:
        points: ``[..., 2]`` location centres.
        distances: ``[..., 4]`` non-negative distances to the left, top, right, bottom edges
            (same unit as ``points``).
    """
    x, y = points[..., 0], points[..., 1]
    return torch.stack(
        [x - distances[..., 0], y - distances[..., 1], x + distances[..., 2], y + distances[..., 3]], dim=-1
    )


def bbox2distance(points: Tensor, boxes: Tensor, max_distance: float | None = None) -> Tensor:
    """Inverse of :func:`distance2bbox`: ``(l, t, r, b)`` from ``points`` to the edges of ``boxes``.

    With ``max_distance`` the result is clamped to ``[0, max_distance]`` (GFL clamps its DFL targets to
    ``reg_max - 0.01`` so that the right-hand bin ``floor(y) + 1`` always exists).
    """
    x, y = points[..., 0], points[..., 1]
    ltrb = torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], dim=-1)
    if max_distance is not None:
        ltrb = ltrb.clamp(min=0, max=max_distance)
    return ltrb


def points_in_boxes(points: Tensor, boxes: Tensor) -> Tensor:
    """Whether each point lies strictly inside each box: ``x1 < x < x2`` and ``y1 < y < y2``.

    Broadcasts over leading dimensions: ``points`` ``[..., N, 2]`` and ``boxes`` ``[..., K, 4]``
    (xyxy) give ``[..., N, K]`` bool. A point on an edge is outside (FCOS's "inside the box" test,
    used for inside-GT imitation, the anchor-free VLR and GID's response mask of FCOS).
    """
    x, y = points[..., :, None, 0], points[..., :, None, 1]  # [..., N, 1]
    x1, y1, x2, y2 = (boxes[..., None, :, i] for i in range(4))  # [..., 1, K]
    return (x > x1) & (x < x2) & (y > y1) & (y < y2)
