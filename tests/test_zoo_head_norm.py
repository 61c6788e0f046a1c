"""kdlab's one GroupNorm rule: torchvision's 32 groups at 256 channels, >= 4 channels a group."""

import torch

from kdlab.models import build_detector, weighted_total
from kdlab.models.layers import group_norm


def test_group_norm_groups():
    assert group_norm(256).num_groups == 32  # torchvision's v2 heads
    assert group_norm(128).num_groups == 32
    assert group_norm(64).num_groups == 16
    assert group_norm(32).num_groups == 8
    assert group_norm(24).num_groups == 6
    assert group_norm(4).num_groups == 1
    assert group_norm(72).num_groups == 18  # MobileNetV3 widths: a divisor of the width
    assert group_norm(16).num_groups == 4


def test_narrow_students_train_on_one_image():
    # P7 is 1 x 1 for a 128-px image: one channel a group used to fail here ("more than 1 value").
    torch.manual_seed(0)
    images = torch.rand(1, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([2])}]
    for name in ("retinanet", "fcos"):
        detector = build_detector(name, num_classes=8, backbone="resnet18", backbone_width=16, fpn_channels=32)
        detector.train()
        output = detector(images, [(128, 128)], targets)
        criterion = detector.build_criterion()
        total = weighted_total(criterion(output, targets), criterion.weight_dict)
        assert torch.isfinite(total)
        total.backward()
        p7_norm = [m for m in detector.modules() if isinstance(m, torch.nn.GroupNorm)][-1]
        assert p7_norm.num_groups == 8 and p7_norm.weight.grad is not None
