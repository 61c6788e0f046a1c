"""CocoDetection on real and hand-written COCO files, bad input, transforms, batching, determinism."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoDetection,
    build_dataset,
    build_transforms,
    collate_fn,
    denormalize,
)

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


def write_dataset(root: Path, images: list[tuple[int, Image.Image | None, int, int]], annotations: list[dict],
                  categories: list[dict] = CATEGORIES) -> tuple[Path, Path]:
    """A COCO-format folder: ``images`` are ``(id, PIL image or None for a missing file, width, height)``."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, image, width, height in images:
        file_name = f"{image_id:04d}.png"
        if image is not None:
            image.save(img_dir / file_name)
        records.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return img_dir, ann_file


def ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------- real data


def test_minicoco_val_counts_label_mapping_and_crowd(shared_data: Path):
    with pytest.warns(UserWarning, match=r"dropped 1 of 1180 .*annotation ids 1400933\)"):
        dataset = build_dataset(shared_data / "minicoco", "val", train=False, min_size=800, max_size=1333)
    assert len(dataset) == 129 and dataset.num_classes == 80
    assert dataset.ids == sorted(dataset.ids)
    assert dataset.class_names[0] == "person" and dataset.class_names[-1] == "toothbrush"
    assert dataset.cat_id_to_label[13] == 11 and dataset.class_names[11] == "stop sign"  # id 12 is a COCO gap
    assert dataset.label_to_cat_id[79] == 90
    assert all(dataset.label_to_cat_id[dataset.cat_id_to_label[c]] == c for c in dataset.cat_ids)
    assert list(dataset.cat_id_to_label.values()) == list(range(80))
    # 1196 annotations - 16 crowd - 1 box of 4 x 1.85 px = 1179 training boxes
    assert len(dataset._boxes) == 1179 and dataset.dropped_ann_ids == [1400933]
    crowd_image = next(a["image_id"] for a in dataset.coco.dataset["annotations"] if a["iscrowd"])
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[crowd_image]))
    image, target = dataset[dataset.ids.index(crowd_image)]
    assert len(target["labels"]) == sum(not a["iscrowd"] for a in anns) < len(anns)
    assert target["labels"].tolist() == [dataset.cat_id_to_label[a["category_id"]] for a in anns if not a["iscrowd"]]
    info = dataset.coco.imgs[crowd_image]
    assert target["orig_size"].tolist() == [info["height"], info["width"]]
    assert min(target["size"].tolist()) == 800 or max(target["size"].tolist()) == 1333
    assert image.shape[1:] == tuple(target["size"].tolist())


def test_minicoco_grayscale_image_becomes_three_equal_channels(shared_data: Path):
    with pytest.warns(UserWarning, match="dropped 3 of 2079"):
        dataset = CocoDetection(shared_data / "minicoco" / "train2017",
                                shared_data / "minicoco" / "annotations" / "instances_train2017.json")
    gray_index = next(i for i, image_id in enumerate(dataset.ids)
                      if Image.open(dataset.img_dir / dataset.coco.imgs[image_id]["file_name"]).mode == "L")
    image, _ = dataset[gray_index]
    assert image.shape[0] == 3 and image.dtype == torch.float32
    torch.testing.assert_close(image[0], image[1], rtol=0, atol=0)
    torch.testing.assert_close(image[0], image[2], rtol=0, atol=0)


@pytest.mark.parametrize("split, dropped_id, image_id, remaining", [
    ("train", 4005, 305, 2804), ("val", 3951, 300, 1137), ("test", None, None, 945)])
def test_bccd_drops_the_one_pixel_boxes_with_a_warning(shared_data: Path, split, dropped_id, image_id, remaining):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_dataset(shared_data / "bccd", split, train=False, min_size=480, max_size=640)
    messages = [str(w.message) for w in caught]
    assert len(dataset._boxes) == remaining
    if dropped_id is None:
        assert messages == [] and dataset.dropped_ann_ids == []
        return
    assert len(messages) == 1 and f"annotation ids {dropped_id})" in messages[0] and "instances_" in messages[0]
    assert dataset.dropped_ann_ids == [dropped_id]
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[image_id]))
    _, target = dataset[dataset.ids.index(image_id)]  # 640 x 480 with min_size 480: no resize
    expected = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns if a["id"] != dropped_id]
    torch.testing.assert_close(target["boxes"], torch.tensor(expected, dtype=torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once at construction, never again per sample
        dataset[dataset.ids.index(image_id)]


# ---------------------------------------------------------------- bad input


def test_corrupt_json_names_file_and_position(tmp_path: Path):
    ann_file = tmp_path / "broken.json"
    ann_file.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON: .* line 2, column 18"):
        CocoDetection(tmp_path, ann_file)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        CocoDetection(tmp_path, tmp_path / "absent.json")


def test_missing_keys_are_named(tmp_path: Path):
    ann_file = tmp_path / "a.json"
    ann_file.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="missing required top-level key 'categories'"):
        CocoDetection(tmp_path, ann_file)
    _, ann_file = write_dataset(tmp_path, [(1, rgb(8, 8), 8, 8)], [{"id": 41, "image_id": 1, "category_id": 3}])
    with pytest.raises(ValueError, match="annotations entry with id 41 has no required key 'bbox'"):
        CocoDetection(tmp_path, ann_file)
    ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "width": 8}], "annotations": [],
                                    "categories": CATEGORIES}))
    with pytest.raises(ValueError, match="images entry with id 1 has no required key 'height'"):
        CocoDetection(tmp_path, ann_file)


def test_unknown_category_id_names_annotation(tmp_path: Path):
    img_dir, ann_file = write_dataset(tmp_path, [(1, rgb(8, 8), 8, 8)],
                                      [ann(5, 1, 3, [0, 0, 4, 4]), ann(6, 1, 5, [1, 1, 4, 4])])
    with pytest.raises(ValueError, match=r"annotation id 6 has category_id 5, which is not among the file's categories"):
        CocoDetection(img_dir, ann_file)


def test_missing_image_file_fails_at_getitem_naming_path_and_id(tmp_path: Path):
    img_dir, ann_file = write_dataset(tmp_path, [(1, rgb(8, 8), 8, 8), (2, None, 8, 8)], [])
    dataset = CocoDetection(img_dir, ann_file)  # no up-front scan of the image files
    assert dataset[0][0].shape == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match=r"0002\.png of image id 2 .* does not exist"):
        dataset[1]


def test_degenerate_boxes_dropped_and_partial_boxes_clipped(tmp_path: Path):
    annotations = [
        ann(1, 1, 3, [2, 3, 10, 5]),      # kept as is: [2, 3, 12, 8]
        ann(2, 1, 7, [5, 5, 0, 4]),       # zero width
        ann(3, 1, 3, [5, 5, -3, 4]),      # negative width
        ann(4, 1, 7, [-4, 14, 10, 30]),   # partly outside a 20 x 16 image: clipped to [0, 14, 6, 16]
        ann(5, 1, 3, [25, 2, 5, 5]),      # entirely right of the image: zero width after clipping
        ann(6, 1, 7, [3, 3, 1.5, 6]),     # 1.5 px wide < min_box_size = 2
        ann(7, 1, 3, [0, 0, 20, 16], iscrowd=1),  # crowd: never a training target, never warned about
    ]
    img_dir, ann_file = write_dataset(tmp_path, [(1, rgb(20, 16), 20, 16)], annotations)
    with pytest.warns(UserWarning, match=r"dropped 4 of 6 non-crowd boxes .* \(annotation ids 2, 3, 5, 6\)"):
        dataset = CocoDetection(img_dir, ann_file)
    _, target = dataset[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [0, 14, 6, 16]]))
    assert target["labels"].tolist() == [0, 1] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and isinstance(target["image_id"], int)
    assert target["orig_size"].tolist() == [16, 20] and target["size"].tolist() == [16, 20]


def test_malformed_bbox_and_bad_image_size_are_named(tmp_path: Path):
    img_dir, ann_file = write_dataset(tmp_path, [(1, rgb(8, 8), 8, 8)], [ann(9, 1, 3, [0, 0, 4, 4]) | {"bbox": [1, 2, 3]}])
    with pytest.raises(ValueError, match=r"annotation id 9 has bbox \[1, 2, 3\]"):
        CocoDetection(img_dir, ann_file)
    img_dir, ann_file = write_dataset(tmp_path, [(1, rgb(8, 6), 10, 6)], [])
    with pytest.raises(ValueError, match=r"0001\.png of image id 1 is 8x6 .* says 10x6"):
        CocoDetection(img_dir, ann_file)[0]


def test_grayscale_palette_rgba_cmyk_images_become_rgb(tmp_path: Path):
    gray = Image.fromarray(np.full((4, 6), 100, dtype=np.uint8), mode="L")
    rgba = Image.fromarray(np.dstack([np.full((4, 6, 3), (10, 20, 30), np.uint8), np.full((4, 6), 7, np.uint8)]), "RGBA")
    palette = gray.convert("P")
    gray16 = Image.fromarray(np.full((4, 6), 257 * 50, dtype=np.uint16))
    images = [(1, gray, 6, 4), (2, rgba, 6, 4), (3, palette, 6, 4), (4, gray16, 6, 4)]
    img_dir, ann_file = write_dataset(tmp_path, images, [])
    Image.new("CMYK", (6, 4), (0, 255, 0, 0)).save(img_dir / "0005.jpg", quality=100)  # magenta
    data = json.loads(ann_file.read_text())
    data["images"].append({"id": 5, "file_name": "0005.jpg", "width": 6, "height": 4})
    ann_file.write_text(json.dumps(data))
    dataset = CocoDetection(img_dir, ann_file)  # no transforms: float32 in [0, 1]
    expected = {0: (100, 100, 100), 1: (10, 20, 30), 2: (100, 100, 100), 3: (50, 50, 50)}
    for index, colour in expected.items():
        image, target = dataset[index]
        assert image.shape == (3, 4, 6) and image.dtype == torch.float32
        torch.testing.assert_close(image, torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).expand(3, 4, 6) / 255)
    cmyk, _ = dataset[4]
    assert cmyk.shape == (3, 4, 6)
    assert cmyk[0].mean() > 0.9 and cmyk[1].mean() < 0.1 and cmyk[2].mean() > 0.9


def test_image_without_boxes_gives_empty_targets(tmp_path: Path):
    img_dir, ann_file = write_dataset(tmp_path, [(1, rgb(40, 30), 40, 30), (2, rgb(40, 30), 40, 30)],
                                      [ann(1, 2, 7, [1, 1, 5, 5])])
    dataset = CocoDetection(img_dir, ann_file, build_transforms(True, 60, None, flip_prob=1.0))
    image, target = dataset[0]
    assert image.shape == (3, 60, 80)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    images, targets = collate_fn([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 64, 96) and [len(t["boxes"]) for t in targets] == [0, 1]


def test_build_dataset_layout_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"does not exist\. Generate the shapes set with `kdlab data shapes"):
        build_dataset(tmp_path / "nowhere", "train", train=True, min_size=128, max_size=None)
    with pytest.raises(FileNotFoundError) as error:
        build_dataset(tmp_path, "val", train=False, min_size=128, max_size=None)
    for tried in ("annotations/instances_val2017.json", "val2017", "annotations/instances_val.json",
                  "instances_val.json", "images"):
        assert str(tmp_path / tried) in str(error.value)


# ---------------------------------------------------------------- transforms and batching


def _one_box_dataset(tmp_path: Path, width: int, height: int, box_xywh: list[float], transforms) -> CocoDetection:
    img_dir, ann_file = write_dataset(tmp_path, [(1, rgb(width, height), width, height)], [ann(1, 1, 3, box_xywh)])
    return CocoDetection(img_dir, ann_file, transforms)


def test_horizontal_flip_maps_x1_to_width_minus_x2(tmp_path: Path):
    plain = _one_box_dataset(tmp_path, 40, 30, [2, 3, 8, 17], build_transforms(False, 30, None))
    flipped = _one_box_dataset(tmp_path, 40, 30, [2, 3, 8, 17], build_transforms(True, 30, None, flip_prob=1.0))
    plain_image, plain_target = plain[0]
    flipped_image, flipped_target = flipped[0]
    torch.testing.assert_close(plain_target["boxes"], torch.tensor([[2.0, 3, 10, 20]]))
    torch.testing.assert_close(flipped_target["boxes"], torch.tensor([[40.0 - 10, 3, 40 - 2, 20]]))
    torch.testing.assert_close(flipped_image, plain_image.flip(-1))
    expected = (torch.from_numpy(np.array(rgb(40, 30))).permute(2, 0, 1) / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(plain_image, expected)


@pytest.mark.parametrize("width, height, min_size, max_size, new_width, new_height", [
    (40, 30, 60, None, 80, 60),     # shorter side 30 -> 60: factor 2
    (100, 40, 60, 120, 120, 48),    # 60 * 100 / 40 = 150 > 120: capped, factor 1.2
    (50, 30, 40, 1000, 66, 40),     # longer side int(40 * 50 / 30) = 66: factors 1.32 and 4/3
    (100, 50, 80, 80, 80, 40),      # max_size == min_size: longer side -> 80
    (128, 128, 128, 128, 128, 128),  # shapes images at their own size: untouched
])
def test_resize_scales_boxes_by_the_exact_factor(tmp_path: Path, width, height, min_size, max_size, new_width, new_height):
    dataset = _one_box_dataset(tmp_path, width, height, [5, 4, 20, 10], build_transforms(False, min_size, max_size))
    image, target = dataset[0]
    assert image.shape == (3, new_height, new_width)
    assert target["size"].tolist() == [new_height, new_width] and target["orig_size"].tolist() == [height, width]
    sx, sy = new_width / width, new_height / height
    torch.testing.assert_close(target["boxes"], torch.tensor([[5 * sx, 4 * sy, 25 * sx, 14 * sy]]))


def test_build_transforms_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_size"):
        build_transforms(True, 800, 600)
    with pytest.raises(ValueError, match="min_size"):
        build_transforms(True, 0, None)
    with pytest.raises(ValueError, match="flip_prob"):
        build_transforms(True, 800, 1333, flip_prob=1.5)


def test_collate_pads_to_multiple_of_divisor_and_keeps_pixels():
    first, second = torch.rand(3, 30, 40), torch.rand(3, 50, 33)
    targets = [{"image_id": 1}, {"image_id": 2}]
    images, out_targets = collate_fn([(first, targets[0]), (second, targets[1])])
    assert images.shape == (2, 3, 64, 64) and out_targets == targets
    assert torch.equal(images[0, :, :30, :40], first) and torch.equal(images[1, :, :50, :33], second)
    assert images[0, :, 30:].abs().sum() == 0 and images[0, :, :, 40:].abs().sum() == 0
    assert images[1, :, 50:].abs().sum() == 0 and images[1, :, :, 33:].abs().sum() == 0
    assert collate_fn([(first, {}), (second, {})], size_divisor=1)[0].shape == (2, 3, 50, 40)
    assert collate_fn([(torch.rand(3, 64, 96), {})])[0].shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn([])
    with pytest.raises(ValueError, match=r"image 1 has shape \(1, 5, 5\)"):
        collate_fn([(first, {}), (torch.rand(1, 5, 5), {})])


def test_denormalize_inverts_normalize():
    pixels = torch.rand(2, 3, 5, 7)
    normalised = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(denormalize(normalised), pixels)
    torch.testing.assert_close(denormalize(normalised[0]), pixels[0])


def _flipped(dataset: CocoDetection, index: int) -> bool:
    """Whether sample ``index`` came out flipped (its boxes differ from the unflipped ones)."""
    boxes, _ = dataset.raw_target(index)
    return not torch.equal(dataset[index][1]["boxes"], torch.from_numpy(boxes))


def test_augmentation_is_a_function_of_seed_epoch_index(tiny_shapes: Path):
    dataset = build_dataset(tiny_shapes, "train", train=True, min_size=128, max_size=None, seed=5)
    torch.manual_seed(0)
    reference = dataset[3]
    torch.manual_seed(123)  # the global RNG plays no part ...
    dataset[7]  # ... nor does which samples were drawn before
    again = dataset[3]
    assert torch.equal(reference[0], again[0]) and torch.equal(reference[1]["boxes"], again[1]["boxes"])
    state = torch.get_rng_state()
    dataset[3]
    assert torch.equal(torch.get_rng_state(), state)  # and is not advanced
    flips = []
    for epoch in range(5):
        dataset.set_epoch(epoch)
        flips.append(tuple(_flipped(dataset, index) for index in range(4)))
    assert len(set(flips)) > 1 and any(any(f) for f in flips) and not all(all(f) for f in flips)
    dataset.set_epoch(0)
    assert torch.equal(dataset[3][1]["boxes"], reference[1]["boxes"])
    other_seed = build_dataset(tiny_shapes, "train", train=True, min_size=128, max_size=None, seed=6)
    assert [_flipped(other_seed, i) for i in range(8)] != [_flipped(dataset, i) for i in range(8)]


def test_samples_do_not_depend_on_worker_count_and_epoch_reaches_persistent_workers(tiny_shapes: Path):
    dataset = build_dataset(tiny_shapes, "train", train=True, min_size=128, max_size=None)
    expected = {}
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        expected[epoch] = [dataset[i][1]["boxes"] for i in range(len(dataset))]
    assert any(not torch.equal(a, b) for a, b in zip(expected[0], expected[1]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, persistent_workers=True,
                                         collate_fn=collate_fn)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        boxes = [target["boxes"] for _, targets in loader for target in targets]
        assert len(boxes) == len(dataset)
        assert all(torch.equal(a, b) for a, b in zip(boxes, expected[epoch]))
