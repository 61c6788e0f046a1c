"""A detection dataset on any COCO-format folder: COCO 2017, the generated *shapes*, minicoco, BCCD.

``CocoDetection(img_dir, ann_file, transforms)[i]`` returns ``(image, target)`` in kdlab's batch
format (see :func:`kdlab.data.transforms.collate_fn`):

- ``image``: float32 ``[3, H, W]`` after the transforms;
- ``target``: ``boxes`` float32 ``[G, 4]`` xyxy in pixels of the transformed image, ``labels``
  int64 ``[G]`` contiguous ``0..C-1``, ``image_id`` int, ``orig_size`` int64 ``[2]`` = file's
  ``(h, w)``, ``size`` int64 ``[2]`` = ``(h, w)`` after the transforms (before padding).

Category ids (sorted) map to contiguous labels: ``label = cat_id_to_label[cat_id]``,
``cat_id = label_to_cat_id[label]``. Crowd annotations are left out of the targets; boxes are
clipped to the image and boxes thinner than ``min_box_size`` are dropped once, with a warning
(:func:`~kdlab.data.coco_json.training_boxes`), from training *and* from evaluation: ``coco`` is
the annotation file as read, ``eval_coco`` the ground truth without those boxes, which is what
COCOeval scores against (a zero-width box can never be matched; scoring it only lowers AP).

Augmentation is a function of ``(seed, epoch, index)`` only: :meth:`CocoDetection.__getitem__`
runs the transforms under a forked torch RNG seeded from those three numbers, so a sample does not
depend on the number of DataLoader workers, on which worker loads it, or on where a resumed run
restarts. The epoch lives in shared memory, so :meth:`~CocoDetection.set_epoch` also reaches
persistent workers (call it before ``iter(loader)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision import tv_tensors

from kdlab.data.coco_json import evaluation_ground_truth, load_coco_json, training_boxes
from kdlab.data.transforms import build_transforms


def read_rgb(path: Path) -> Image.Image:
    """Open an image file as 8-bit RGB: grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit converted."""
    with Image.open(path) as image:
        image.load()
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image as 8-bit RGB (see :func:`read_rgb`)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL asks for this step before dropping a palette's alpha
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale: rescale to 0..255
        values = np.asarray(image, dtype=np.float64)
        values = values / 257.0 if values.max(initial=0) > 255 else values
        image = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


class CocoDetection(torch.utils.data.Dataset):
    """Images and training targets of a COCO-format annotation file (see the module docstring).

    Args:
        img_dir: folder holding the images' ``file_name``\\ s.
        ann_file: the ``instances_*.json`` file.
        transforms: ``transforms(image, target) -> (image, target)`` in ``torchvision.transforms.v2``
            style, called with a ``tv_tensors.Image`` uint8 ``[3, H, W]`` and ``{"boxes":
            tv_tensors.BoundingBoxes XYXY, "labels": int64 [G]}`` (e.g.
            :func:`~kdlab.data.transforms.build_transforms`). ``None``: the image is only scaled
            to float32 in ``[0, 1]``.
        min_box_size: boxes narrower or shorter than this (pixels, after clipping) are dropped.
        seed: augmentation seed; sample ``i`` of epoch ``e`` is drawn with ``(seed, e, i)``.

    Attributes:
        coco: the pycocotools ``COCO`` object of ``ann_file``, as read.
        eval_coco: the ground truth COCOeval scores against: ``coco`` without the annotations
            training drops (``dropped_ann_ids``), so that evaluation and training agree on what
            the objects are (the same object as ``coco`` when nothing is dropped).
        ann_file: ``Path`` of the annotation file.
        ids: sorted image ids; sample ``i`` is image ``ids[i]``.
        cat_ids, class_names: sorted category ids and their names.
        num_classes: ``C``.
        label_to_cat_id: list, contiguous label -> category id; ``cat_id_to_label`` the inverse dict.
        dropped_ann_ids: ids of the annotations dropped as too small (reported once, at construction).
        excluded_image_ids: images left out with :meth:`exclude_images`.
    """

    def __init__(self, img_dir: str | Path, ann_file: str | Path, transforms: Callable | None = None, *,
                 min_box_size: float = 2.0, seed: int = 0):
        self.img_dir = Path(img_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.min_box_size = float(min_box_size)
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

        self.coco = load_coco_json(self.ann_file)
        categories = sorted(self.coco.dataset["categories"], key=lambda category: category["id"])
        self.cat_ids: list[int] = [int(category["id"]) for category in categories]
        self.class_names: list[str] = [str(category["name"]) for category in categories]
        self.label_to_cat_id: list[int] = list(self.cat_ids)
        self.cat_id_to_label: dict[int, int] = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}
        self.ids: list[int] = sorted(int(image_id) for image_id in self.coco.imgs)

        self._kept = training_boxes(self.coco, self.ann_file, self.min_box_size)
        self.dropped_ann_ids: list[int] = self._kept["dropped_ann_ids"].tolist()
        self.eval_coco = evaluation_ground_truth(self.coco, self.dropped_ann_ids)
        self.excluded_image_ids: list[int] = []
        self._index_boxes()

    def _index_boxes(self) -> None:
        """Group the kept boxes of the images in ``ids``: sample i owns rows ``offsets[i]:offsets[i + 1]``."""
        kept = self._kept
        listed = np.isin(kept["image_ids"], np.array(self.ids, dtype=np.int64))
        sample_index = np.searchsorted(np.array(self.ids, dtype=np.int64), kept["image_ids"][listed])
        order = np.argsort(sample_index, kind="stable")
        self._boxes = kept["boxes"][listed][order]  # [N, 4] float32 xyxy, original pixels
        self._labels = np.array([self.cat_id_to_label[c] for c in kept["cat_ids"][listed][order].tolist()], dtype=np.int64)
        self._offsets = np.searchsorted(sample_index[order], np.arange(len(self.ids) + 1))

    def exclude_images(self, image_ids) -> None:
        """Leave these images out (e.g. files that do not decode): they are no longer samples.

        Evaluation follows: :func:`~kdlab.engine.evaluate` scores only the images its loader visited.
        """
        excluded = {int(i) for i in image_ids}
        self.excluded_image_ids = sorted(set(self.excluded_image_ids) | excluded)
        self.ids = [i for i in self.ids if i not in excluded]
        self._index_boxes()

    @property
    def num_boxes(self) -> int:
        """Training boxes over the samples (crowd and dropped boxes not counted)."""
        return len(self._boxes)

    @property
    def num_images_with_boxes(self) -> int:
        """Samples with at least one training box."""
        return int((np.diff(self._offsets) > 0).sum())

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of epoch ``epoch`` (shared with the DataLoader's workers)."""
        self._epoch.fill_(int(epoch))

    def sample_seed(self, index: int) -> int:
        """Torch seed of sample ``index`` in the current epoch: a hash of ``(seed, epoch, index)``."""
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, dtype=np.uint32)
        return (int(state[0]) << 31) ^ int(state[1])  # < 2**63

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.ann_file}, {len(self)} images, {self.num_classes} classes, "
                f"{len(self._boxes)} training boxes)")

    def raw_target(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``[G, 4]`` xyxy (file pixels, clipped) and labels ``[G]`` of sample ``index``, untransformed."""
        start, stop = self._offsets[index], self._offsets[index + 1]
        return self._boxes[start:stop].copy(), self._labels[start:stop].copy()

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of sample ``index``, checked against the size its annotation file gives."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.img_dir / info["file_name"]
        try:
            image = read_rgb(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {path} of image id {image_id} (listed in {self.ann_file}) "
                                    f"does not exist") from None
        except (UnidentifiedImageError, OSError) as error:
            raise OSError(f"cannot read image file {path} of image id {image_id}: {error}") from None
        if image.size != (info["width"], info["height"]):
            raise ValueError(f"image file {path} of image id {image_id} is {image.size[0]}x{image.size[1]} (w x h) "
                             f"but {self.ann_file} says {info['width']}x{info['height']}")
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} images")
        index = index % len(self)
        image = self.load_image(index)
        boxes, labels = self.raw_target(index)
        orig_size = (image.height, image.width)
        pixels = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))  # [3, H, W] uint8
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=orig_size),
                  "labels": torch.from_numpy(labels)}
        if self.transforms is None:
            pixels = pixels.to(torch.float32) / 255.0
        else:
            # the CPU generator only: fork_rng restores just that one, and torch.manual_seed would also (re)seed
            # every accelerator's generator (a GPU run's dropout stream) and pay for it on each sample
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self.sample_seed(index))
                pixels, target = self.transforms(pixels, target)
        pixels = pixels.as_subclass(Tensor)
        return pixels, {
            "boxes": target["boxes"].as_subclass(Tensor).to(torch.float32).reshape(-1, 4),
            "labels": target["labels"].as_subclass(Tensor).to(torch.int64),
            "image_id": self.ids[index],
            "orig_size": torch.tensor(orig_size, dtype=torch.int64),
            "size": torch.tensor(pixels.shape[-2:], dtype=torch.int64),
        }


def dataset_layouts(root: str | Path, split: str) -> list[tuple[str, Path, Path]]:
    """The folder layouts :func:`build_dataset` recognises: ``(name, ann_file, img_dir)``, in the order tried."""
    root = Path(root)
    return [
        ("COCO 2017", root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"),
        ("shapes", root / "annotations" / f"instances_{split}.json", root / split),
        ("BCCD-style", root / f"instances_{split}.json", root / "images"),
    ]


def build_dataset(root: str | Path, split: str, *, train: bool, min_size: int, max_size: int | None,
                  flip_prob: float = 0.5, min_box_size: float = 2.0, seed: int = 0) -> CocoDetection:
    """A :class:`CocoDetection` of split ``split`` under ``root``, whose layout is detected.

    Layouts (first match wins, see :func:`dataset_layouts`): COCO 2017
    (``annotations/instances_{split}2017.json`` + ``{split}2017/``), *shapes*
    (``annotations/instances_{split}.json`` + ``{split}/``), BCCD-style
    (``instances_{split}.json`` + ``images/``).

    Args:
        root: dataset folder.
        split: ``"train"``, ``"val"``, ``"test"``, ...
        train: training transforms (random horizontal flip) or evaluation ones.
        min_size, max_size: resize, see :func:`~kdlab.data.transforms.build_transforms`.
        flip_prob: horizontal flip probability in training.
        min_box_size, seed: see :class:`CocoDetection`.

    Raises:
        FileNotFoundError: ``root`` does not exist (the message says how to get COCO or make
            *shapes*) or matches no layout (the message lists the paths tried).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset root {root} does not exist. Generate the shapes set with `kdlab data shapes --out {root}` "
            f"(or kdlab.data.make_shapes('{root}')), or download COCO 2017 from https://cocodataset.org "
            f"(train2017.zip, val2017.zip, annotations_trainval2017.zip) and unzip them into {root}")
    layouts = dataset_layouts(root, split)
    for _, ann_file, img_dir in layouts:
        if ann_file.is_file() and img_dir.is_dir():
            transforms = build_transforms(train, min_size, max_size, flip_prob=flip_prob)
            return CocoDetection(img_dir, ann_file, transforms, min_box_size=min_box_size, seed=seed)
    tried = "\n".join(f"  {name}: {ann_file} + {img_dir}/" for name, ann_file, img_dir in layouts)
    raise FileNotFoundError(f"no COCO-format split {split!r} found under {root}; tried (annotation file + image "
                            f"folder):\n{tried}")
