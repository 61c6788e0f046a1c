"""Checking a dataset before training on it: ``kdlab check-data CONFIG`` and the start of ``kdlab train``.

The annotation file is checked when it is read (:func:`~kdlab.data.coco_json.load_coco_json`).
:func:`find_bad_images` checks that every listed image file exists, is an image of the size the
JSON gives, and is complete. The quick check reads each file's header and its last bytes: a JPEG
must end with its end-of-image marker and a PNG with its ``IEND`` chunk, which is what a file cut
short (an interrupted download or copy) lacks; a file that fails this test, or of another format,
is decoded in full to decide. ``full=True`` decodes every file.

:func:`screen_images` is what training does with the result: stop with a message naming the first
bad files, or, with ``skip=True`` (``--skip-bad-images``), leave them out and say how many.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from kdlab.utils.notice import notice

JPEG_END = b"\xff\xd9"
PNG_END = b"IEND"


class BadImagesError(ValueError):
    """Image files of a split that cannot be used (missing, not decodable, truncated, wrong size)."""


@dataclass(frozen=True)
class BadImage:
    image_id: int
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path} (image id {self.image_id}): {self.reason}"


def _complete_ending(path: Path, image_format: str | None) -> bool | None:
    """Whether the file ends like a complete JPEG/PNG (``None``: no cheap test for this format)."""
    if image_format not in ("JPEG", "PNG"):
        return None
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 64))
        tail = handle.read().rstrip(b"\x00")  # some writers pad JPEGs with zeros after the marker
    return tail.endswith(JPEG_END) if image_format == "JPEG" else PNG_END in tail[-12:]


def check_image(path: Path, width: int, height: int, *, full: bool = False) -> str | None:
    """Why the image file cannot be used, or ``None`` if it can (see the module docstring)."""
    if not path.is_file():
        return "file does not exist"
    try:
        with Image.open(path) as image:
            if image.size != (width, height):
                return f"is {image.size[0]}x{image.size[1]} (w x h) but the annotation file says {width}x{height}"
            if full or not _complete_ending(path, image.format):
                image.load()  # decodes every pixel; raises on a truncated or corrupt file
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except (OSError, SyntaxError, ValueError) as error:  # PIL: "image file is truncated (N bytes not processed)"
        return f"cannot be decoded ({error})"
    return None


def find_bad_images(dataset, *, full: bool = False, workers: int = 8) -> list[BadImage]:
    """The images of a :class:`~kdlab.data.CocoDetection` that cannot be used, in id order.

    Args:
        dataset: the split to check (its ``coco``, ``img_dir`` and ``ids``).
        full: decode every file instead of the quick header and end-of-file test.
        workers: threads reading files in parallel.
    """
    infos = [dataset.coco.imgs[image_id] for image_id in dataset.ids]

    def check(info: dict) -> BadImage | None:
        reason = check_image(dataset.img_dir / info["file_name"], info["width"], info["height"], full=full)
        return None if reason is None else BadImage(int(info["id"]), dataset.img_dir / info["file_name"], reason)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [bad for bad in pool.map(check, infos, chunksize=64) if bad is not None]


def screen_images(dataset, split: str, *, skip: bool, announce: bool = True) -> list[BadImage]:
    """Quick-check ``dataset``'s images; raise on bad ones, or leave them out when ``skip``.

    Raises:
        BadImagesError: bad images and ``skip`` is false; the message names up to three and
            says how to list them all and how to skip them.
    """
    bad = find_bad_images(dataset)
    if not bad:
        return bad
    if not skip:
        listed = "; ".join(str(b) for b in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise BadImagesError(
            f"{len(bad)} of {len(dataset)} images of split {split!r} cannot be used: {listed}. "
            f"`kdlab check-data CONFIG` lists them all; fix or remove them, or pass --skip-bad-images to leave them out")
    dataset.exclude_images([b.image_id for b in bad])
    if announce:
        notice(f"--skip-bad-images: left out {len(bad)} of {len(bad) + len(dataset)} images of split {split!r}: "
               + "; ".join(str(b) for b in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return bad


def describe_split(dataset, split: str, layout: str | None = None) -> list[str]:
    """Lines that summarise a split for ``kdlab check-data``: files, counts, classes, boxes left out."""
    annotations = dataset.coco.dataset["annotations"]
    crowd = sum(1 for a in annotations if a.get("iscrowd", 0))
    with_boxes = dataset.num_images_with_boxes
    names = ", ".join(f"{name} (id {cat_id})" for name, cat_id in zip(dataset.class_names, dataset.cat_ids))
    return [
        f"{split}: {dataset.ann_file} + {dataset.img_dir}/" + (f" ({layout} layout)" if layout else ""),
        f"  {len(dataset.ids)} images ({len(dataset.ids) - with_boxes} without boxes), {len(annotations)} annotations: "
        f"{dataset.num_boxes} training boxes, {crowd} crowd, {len(dataset.dropped_ann_ids)} dropped as degenerate",
        f"  {dataset.num_classes} classes, from the file's 'categories': {names}",
    ]
