"""The zoo's torchvision names: identical state dicts, COCO weights in one call, clear errors offline.

No weights file exists on this machine and there is no internet: the loading tests write a
checkpoint in torchvision's format into a temporary ``$TORCH_HOME`` (or monkeypatch the
download), so nothing here touches the network.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection import RetinaNet_ResNet50_FPN_V2_Weights

from kdlab.models import weights as zoo_weights
from kdlab.models import DETECTORS
from kdlab.models.weights import (
    COCO91_CLASS_NAMES,
    WeightsUnavailableError,
    coco91_columns,
    coco91_columns_by_name,
    resolve_weights,
    weights_cache_path,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TORCHVISION_NAMES = [
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_state_dict_keys_and_shapes_equal_torchvision(name: str):
    kd_state = DETECTORS[name](num_classes=91).state_dict()
    tv_state = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=91).state_dict()
    assert list(kd_state) == list(tv_state)
    assert {k: v.shape for k, v in kd_state.items()} == {k: v.shape for k, v in tv_state.items()}


def test_faster_rcnn_kdlab_labels_add_a_background_column():
    model = DETECTORS["fasterrcnn_resnet50_fpn"](num_classes=80, torchvision_labels=False)
    assert model.roi_heads.box_predictor.cls_score.out_features == 81
    assert model.label_offset == 1


def test_coco_weights_load_in_one_call_from_the_cache(empty_torch_home, monkeypatch):
    torch.manual_seed(0)
    reference = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    weights = torchvision.models.detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1
    path = weights_cache_path(weights)
    assert path == empty_torch_home / "hub" / "checkpoints" / "retinanet_resnet50_fpn_coco-eeacb38b.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    def no_network(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(zoo_weights, "_download", no_network)
    model = DETECTORS["retinanet_resnet50_fpn"](num_classes=91, weights="COCO_V1")
    loaded = model.state_dict()
    for key, value in reference.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert key not in loaded  # COCO weights use frozen BN, as torchvision's builder
            continue
        assert torch.equal(loaded[key], value), key
    assert model.class_names == COCO91_CLASS_NAMES and model.num_classes == 91
    assert model.backbone.body.bn1.eps == 0.0  # torchvision's eps fix for the v1 COCO weights
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # 3 trainable stages by default
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad


def test_missing_weights_raise_a_clear_error(empty_torch_home, monkeypatch):
    calls = []

    def offline(url, destination, progress):
        calls.append((url, destination))
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(zoo_weights, "_download", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        DETECTORS["retinanet_resnet50_fpn_v2"](num_classes=91, weights="COCO_V1")
    message = str(info.value)
    file_name = "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth"
    assert file_name in message
    assert RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1.url in message
    assert str(empty_torch_home / "hub" / "checkpoints") in message and "TORCH_HOME" in message
    assert calls == [(RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1.url, empty_torch_home / "hub" / "checkpoints" / file_name)]
    assert isinstance(info.value, FileNotFoundError)


def test_missing_backbone_weights_raise_the_same_error(empty_torch_home, monkeypatch):
    monkeypatch.setattr(zoo_weights, "_download", lambda *a: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsUnavailableError, match="resnet18-f37072fd.pth"):
        DETECTORS["retinanet"](3, backbone="resnet18", backbone_weights="IMAGENET1K_V1")


def test_weights_arguments_are_checked():
    with pytest.raises(ValueError, match="num_classes=91"):
        DETECTORS["fcos_resnet50_fpn"](num_classes=80, weights="COCO_V1")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_weights("fcos_resnet50_fpn", "COCO_V2")
    assert resolve_weights("fcos_resnet50_fpn", "DEFAULT").name == "COCO_V1"
    assert resolve_weights("resnet18", "ResNet18_Weights.IMAGENET1K_V1").name == "IMAGENET1K_V1"
    with pytest.raises(ValueError, match="does not take option"):
        DETECTORS["retinanet_resnet50_fpn"](num_classes=91, score_threshold=0.1)


def test_coco91_columns_are_category_ids():
    assert COCO91_CLASS_NAMES[1] == "person" and COCO91_CLASS_NAMES[90] == "toothbrush" and len(COCO91_CLASS_NAMES) == 91
    assert coco91_columns([1, 3, 90]).tolist() == [1, 3, 90]
    assert coco91_columns_by_name(["car", "person"]).tolist() == [3, 1]
    with pytest.raises(ValueError, match=r"label_to_cat_id\[1\] = 12"):  # 12 is an unused ("N/A") COCO id
        coco91_columns([1, 12])
    with pytest.raises(ValueError, match="platelet"):
        coco91_columns_by_name(["person", "platelet"])


def test_coco91_columns_of_minicoco_match_names():
    ann_file = SHARED_DATA / "minicoco" / "annotations" / "instances_val2017.json"
    if not ann_file.is_file():
        pytest.skip(f"minicoco not found at {ann_file}")
    categories = sorted(json.loads(ann_file.read_text())["categories"], key=lambda c: c["id"])
    by_id = coco91_columns([c["id"] for c in categories])
    by_name = coco91_columns_by_name([c["name"] for c in categories])
    assert len(by_id) == 80 and torch.equal(by_id, by_name)
