"""RoIAlign as two small matrix products per image: torchvision's numbers, a fast backward.

``torchvision.ops.roi_align`` (``aligned=True``, a fixed ``sampling_ratio``) averages, in each of
the ``S x S`` bins of a box, ``r x r`` bilinear samples of the feature map. A sample is zero when
it lies outside ``[-1, H] x [-1, W]``; otherwise its coordinates are clamped at 0 and at the last
row/column, and it mixes the 2 x 2 neighbouring cells with weights ``(1 - ly, ly) x (1 - lx, lx)``.
Every one of these rules acts on ``y`` and ``x`` separately, so for one box

    pooled[c] = Wy @ F[c] @ Wx^T,

with ``Wy`` ``[S, H]`` (row ``s``: the mean over the ``r`` samples of bin ``s`` of their two
vertical bilinear weights) and ``Wx`` ``[S, W]`` likewise. The boxes of one image share ``F``,
so a level costs two batched matmuls, and the backward is two more, where torchvision's CPU
backward walks every (box, channel, bin, sample) serially and recomputes its weights for each
channel. On the shapes GID student that backward took most of GID's cost; this one is dense,
multi-threaded and deterministic (no atomics on GPU either).

The numbers are torchvision's up to the order of float additions (tests compare both, values and
gradients, including boxes that leave the map).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.utils.ragged import padded_layout


def axis_weights(start: Tensor, end: Tensor, size: int, output_size: int, sampling_ratio: int) -> Tensor:
    """Bilinear sampling weights along one axis, torchvision's ``aligned=True`` rules.

    Args:
        start, end: ``[N]`` box edges on this axis in *feature* coordinates, before the half-pixel
            shift (``x1 * spatial_scale``).
        size: map length on this axis (``H`` or ``W``).
        output_size: bins ``S``.
        sampling_ratio: samples per bin ``r`` (> 0).

    Returns:
        ``[N, S, size]``: row ``s`` holds the mean over bin ``s``'s samples of their bilinear weights.
    """
    start = start.float() - 0.5
    end = end.float() - 0.5
    bin_size = (end - start) / output_size  # [N]
    device = start.device
    bins = torch.arange(output_size, device=device, dtype=torch.float32).repeat_interleave(sampling_ratio)
    within = (torch.arange(sampling_ratio, device=device, dtype=torch.float32) + 0.5).repeat(output_size)
    # torchvision: start + p * bin + (i + .5) * bin / r, evaluated in this order
    pos = start[:, None] + bins[None] * bin_size[:, None] + within[None] * bin_size[:, None] / sampling_ratio
    inside = ((pos >= -1.0) & (pos <= size)).float()
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.float(), pos)
    frac = pos - low.float()
    weights = torch.zeros(start.shape[0], output_size * sampling_ratio, size, device=device)
    weights.scatter_add_(2, low[..., None], ((1.0 - frac) * inside)[..., None])
    weights.scatter_add_(2, high[..., None], (frac * inside)[..., None])
    return weights.view(-1, output_size, sampling_ratio, size).sum(2) / sampling_ratio


def roi_align_per_image(
    feature: Tensor,
    boxes: list[Tensor],
    spatial_scale: float,
    output_size: int,
    sampling_ratio: int = 2,
) -> Tensor:
    """``torchvision.ops.roi_align(feature, boxes, output_size, spatial_scale, sampling_ratio, aligned=True)``.

    Args:
        feature: ``[B, C, H, W]`` map (computed in float32 whatever its dtype).
        boxes: per image ``[K_b, 4]`` xyxy boxes in input coordinates.
        spatial_scale: feature cells per input pixel (``1 / stride``).
        output_size: ``S``.
        sampling_ratio: samples per bin side; must be > 0 (torchvision's adaptive 0 is not supported).

    Returns:
        ``[sum_b K_b, C, S, S]`` float32, boxes in image order.
    """
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be > 0 here (torchvision's adaptive 0 is not supported), got {sampling_ratio}")
    batch, channels, height, width = feature.shape
    if len(boxes) != batch:
        raise ValueError(f"got boxes for {len(boxes)} images but the feature map holds {batch}")
    counts = [int(b.shape[0]) for b in boxes]
    if sum(counts) == 0:
        return feature.new_zeros(0, channels, output_size, output_size, dtype=torch.float32)
    # pad every image to the same number of boxes; padded boxes get zero weights
    flat = torch.cat([b.float() for b in boxes]) * spatial_scale  # [M, 4]
    wy = axis_weights(flat[:, 1], flat[:, 3], height, output_size, sampling_ratio)  # [M, S, H]
    wx = axis_weights(flat[:, 0], flat[:, 2], width, output_size, sampling_ratio)  # [M, S, W]
    slot, _, per_image = padded_layout(counts, flat.device)  # [M] place of each box in the [B * K] grid
    wy_pad = wy.new_zeros(batch * per_image, output_size, height).index_copy(0, slot, wy)
    wx_pad = wx.new_zeros(batch * per_image, output_size, width).index_copy(0, slot, wx)
    # rows: [B, K*S, H] @ [B, H, C*W] -> [B, K*S, C*W]
    rows = feature.float().permute(0, 2, 1, 3).reshape(batch, height, channels * width)
    mixed = torch.bmm(wy_pad.view(batch, per_image * output_size, height), rows)
    # columns: [B*K, S*C, W] @ [B*K, W, S] -> [B*K, S*C, S]
    mixed = mixed.view(batch * per_image, output_size * channels, width)
    pooled = torch.bmm(mixed, wx_pad.transpose(1, 2))
    pooled = pooled.view(batch * per_image, output_size, channels, output_size).transpose(1, 2)  # [B*K, C, S, S]
    return pooled[slot].contiguous()
