"""Location priors of dense detectors: points, strides, levels and square anchors per FPN level."""

from __future__ import annotations

import torch
from torch import Tensor


def grid_priors(
    feature_sizes: list[tuple[int, int]],
    strides: tuple[int, ...],
    octave_base_scale: float,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    center_offset: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """One prior per location, flattened over levels (row-major ``(y, x)`` within a level).

    Args:
        feature_sizes: ``(H_l, W_l)`` of each level.
        strides: stride of each level.
        octave_base_scale: the anchor side is ``octave_base_scale * stride`` (ATSS/GFL: 8).
        center_offset: location ``(i, j)`` sits at ``((j + offset) * s, (i + offset) * s)``.
    Returns:
        points ``[N, 2]``, anchors ``[N, 4]`` xyxy, strides ``[N]``, levels ``[N]``, ``num_per_level``.
    """
    points, anchors, stride_list, levels, num_per_level = [], [], [], [], []
    for level, ((h, w), s) in enumerate(zip(feature_sizes, strides)):
        ys = (torch.arange(h, device=device, dtype=dtype) + center_offset) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + center_offset) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        p = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)  # [H*W, 2]
        half = octave_base_scale * s / 2
        points.append(p)
        anchors.append(torch.cat([p - half, p + half], dim=1))
        stride_list.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
        levels.append(torch.full((h * w,), level, device=device, dtype=torch.long))
        num_per_level.append(h * w)
    return torch.cat(points), torch.cat(anchors), torch.cat(stride_list), torch.cat(levels), num_per_level
