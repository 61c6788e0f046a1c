"""kdlab.utils.roi_align: torchvision's aligned RoIAlign as per-image matrix products."""

import pytest
import torch
from torchvision.ops import roi_align

from kdlab.distill.common import pool_fpn_boxes
from kdlab.utils.roi_align import axis_weights, roi_align_per_image


def random_boxes(generator, counts, low=-20.0, high=150.0):
    boxes = []
    for n in counts:
        xy = low + torch.rand(n, 2, generator=generator) * (high - low)
        wh = 0.3 + torch.rand(n, 2, generator=generator) * 80
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    return boxes


def test_linear_map_gives_the_bin_centres_by_hand():
    # F[y, x] = 10 y + x is linear, so bilinear sampling is exact and each bin's mean is the value
    # at its centre. Box [8, 8, 24, 24] at stride 8 -> feature [1, 3] - 0.5 = [0.5, 2.5]; two
    # bins of 1 cell centred at 1.0 and 2.0.
    height, width = 5, 10
    feature = (10 * torch.arange(height)[:, None] + torch.arange(width)[None]).float()[None, None]
    pooled = roi_align_per_image(feature, [torch.tensor([[8.0, 8.0, 24.0, 24.0]])], 1 / 8, 2, 2)
    assert torch.allclose(pooled[0, 0], torch.tensor([[11.0, 12.0], [21.0, 22.0]]))


def test_axis_weights_rules_by_hand():
    # one bin of [-0.5, 1.5] on a 3-cell axis: samples at 0.0 and 1.0 -> cells 0 and 1, 1/2 each
    w = axis_weights(torch.tensor([0.0]), torch.tensor([2.0]), 3, 1, 2)
    assert torch.allclose(w, torch.tensor([[[0.5, 0.5, 0.0]]]))
    # a sample beyond the last cell clamps to it; one below -1 contributes nothing
    w = axis_weights(torch.tensor([-3.5]), torch.tensor([4.5]), 3, 2, 1)  # samples at -2.0 and 2.0
    assert torch.allclose(w, torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]))


@pytest.mark.parametrize("output_size,ratio,scale", [(7, 2, 1 / 8), (10, 2, 1 / 16), (3, 1, 1 / 4), (5, 3, 1 / 8)])
def test_equals_torchvision_values_and_gradients(output_size, ratio, scale):
    generator = torch.Generator().manual_seed(output_size * 10 + ratio)
    feature = torch.randn(3, 4, 13, 17, generator=generator, requires_grad=True)
    boxes = random_boxes(generator, [5, 0, 8])
    boxes[2][:4] = torch.tensor([[-30.0, -30.0, -10.0, -10.0],  # fully outside
                                 [0.0, 0.0, 136.0, 104.0],  # the whole map
                                 [120.0, 90.0, 140.0, 110.0],  # over the far corner
                                 [40.0, 40.0, 40.2, 40.1]])  # sub-pixel
    expected = roi_align(feature, boxes, output_size, scale, ratio, aligned=True)
    got = roi_align_per_image(feature, boxes, scale, output_size, ratio)
    assert got.shape == expected.shape == (13, 4, output_size, output_size)
    assert torch.allclose(got, expected, atol=1e-5)
    upstream = torch.randn(expected.shape, generator=generator)
    (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), feature)
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), feature)
    assert torch.allclose(grad_got, grad_expected, atol=1e-5)


def test_no_boxes_bf16_and_bad_arguments():
    feature = torch.randn(2, 3, 8, 8)
    assert roi_align_per_image(feature, [torch.zeros(0, 4), torch.zeros(0, 4)], 1 / 8, 4).shape == (0, 3, 4, 4)
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0]]), torch.tensor([[0.0, 8.0, 60.0, 64.0]])]
    half = roi_align_per_image(feature.bfloat16(), boxes, 1 / 8, 4)
    assert half.dtype == torch.float32
    assert torch.allclose(half, roi_align(feature.bfloat16().float(), boxes, 4, 1 / 8, 2, aligned=True), atol=1e-5)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_per_image(feature, boxes, 1 / 8, 4, sampling_ratio=0)
    with pytest.raises(ValueError, match="boxes for 1 images"):
        roi_align_per_image(feature, boxes[:1], 1 / 8, 4)


def test_pool_fpn_boxes_implementations_agree():
    generator = torch.Generator().manual_seed(3)
    features = [torch.randn(2, 6, 32, 32, generator=generator), torch.randn(2, 6, 16, 16, generator=generator),
                torch.randn(2, 6, 8, 8, generator=generator)]
    boxes = [b.clamp(0, 256) for b in random_boxes(generator, [7, 4], low=0.0, high=200.0)]
    boxes[0][0] = torch.tensor([0.0, 0.0, 250.0, 250.0])  # a large box lands on a coarser level
    a = pool_fpn_boxes(features, [8, 16, 32], boxes, impl="separable")
    b = pool_fpn_boxes(features, [8, 16, 32], boxes, impl="torchvision")
    assert a.shape == (11, 6, 10, 10)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="impl"):
        pool_fpn_boxes(features, [8, 16, 32], boxes, impl="cuda")
    assert torch.equal(pool_fpn_boxes(features, [8, 16, 32], boxes), a)  # "auto": small CPU maps -> separable


def test_auto_roi_align_choice_by_device_and_map_size():
    from kdlab.distill.common import SEPARABLE_MAX_CELLS, resolve_roi_align_impl

    side = int(SEPARABLE_MAX_CELLS ** 0.5)
    assert resolve_roi_align_impl("auto", torch.zeros(1, 1, side, side)) == "separable"
    assert resolve_roi_align_impl("auto", torch.zeros(1, 1, side + 1, side + 1)) == "torchvision"
    assert resolve_roi_align_impl("auto", torch.zeros(1, 1, 8, 8, device="meta")) == "torchvision"  # not CPU (GPU)
    assert resolve_roi_align_impl("separable", torch.zeros(1, 1, 200, 200)) == "separable"


def test_padded_layout_by_hand():
    from kdlab.utils.ragged import padded_layout

    slot, valid, width = padded_layout([2, 0, 3])
    assert width == 3
    assert slot.tolist() == [0, 1, 6, 7, 8]
    assert valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    slot, valid, width = padded_layout([])
    assert width == 0 and slot.numel() == 0 and valid.shape == (0, 0)
