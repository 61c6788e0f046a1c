"""Torchvision's published weights for kdlab's zoo, and torchvision's 91-index COCO labels.

Weights files. Torchvision's weights API (``RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1`` ...)
downloads a ``.pth`` file once into ``$TORCH_HOME/hub/checkpoints/`` and reads it from there
afterwards. :func:`load_weights_state_dict` does the same, but looks in the cache *first* and,
when the file is absent and cannot be downloaded (no internet), raises
:class:`WeightsUnavailableError` naming the file, its URL and the directory to put it in.

COCO labels. Torchvision's COCO detectors have 91 class slots: slot ``k`` is the COCO category
id ``k`` (``COCO91_CLASS_NAMES[k]``); slot 0 (``"__background__"``) and the ten ``"N/A"`` slots
(ids COCO never used) are never trained. A kdlab zoo model loaded with COCO weights keeps this
label space (its labels *are* COCO category ids); :func:`coco91_columns` lists, for a dataset
with contiguous labels, the slot of each of its classes, and the detectors'
``restrict_classes_(columns)`` turns the COCO model into one that speaks the dataset's labels.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor
from torchvision.models import WeightsEnum
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    FCOS_ResNet50_FPN_Weights,
    RetinaNet_ResNet50_FPN_V2_Weights,
    RetinaNet_ResNet50_FPN_Weights,
)

COCO91_CLASS_NAMES: list[str] = list(_COCO_CATEGORIES)
"""Torchvision's COCO class slots: index ``k`` is COCO category id ``k`` (0 and "N/A" unused)."""

DETECTOR_WEIGHTS: dict[str, type[WeightsEnum]] = {
    "retinanet_resnet50_fpn": RetinaNet_ResNet50_FPN_Weights,
    "retinanet_resnet50_fpn_v2": RetinaNet_ResNet50_FPN_V2_Weights,
    "fcos_resnet50_fpn": FCOS_ResNet50_FPN_Weights,
    "fasterrcnn_resnet50_fpn": FasterRCNN_ResNet50_FPN_Weights,
    "fasterrcnn_resnet50_fpn_v2": FasterRCNN_ResNet50_FPN_V2_Weights,
    "fasterrcnn_mobilenet_v3_large_fpn": FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    "fasterrcnn_mobilenet_v3_large_320_fpn": FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
}
"""The weights enum of each torchvision detector kdlab can build with identical parameters."""

_HASH_IN_FILE_NAME = re.compile(r"-([a-f0-9]*)\.")


class WeightsUnavailableError(FileNotFoundError):
    """A weights file is neither in ``$TORCH_HOME/hub/checkpoints`` nor downloadable."""


def resolve_weights(model_name: str, weights: str | WeightsEnum | None) -> WeightsEnum | None:
    """The torchvision weights enum member meant by ``weights`` for ``model_name``.

    Args:
        model_name: a torchvision model name (a key of :data:`DETECTOR_WEIGHTS`, or a
            classification backbone such as ``"resnet18"``).
        weights: ``None``, a member name (``"COCO_V1"``, ``"IMAGENET1K_V1"``, ``"DEFAULT"``),
            its full name (``"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"``) or the member itself.
    """
    if weights is None:
        return None
    if model_name in DETECTOR_WEIGHTS:
        enum = DETECTOR_WEIGHTS[model_name]
    else:
        try:
            enum = torchvision.models.get_model_weights(model_name)
        except (ValueError, KeyError) as err:
            raise ValueError(f"torchvision publishes no weights for a model named {model_name!r}") from err
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum):
            raise ValueError(f"weights {weights} do not belong to {model_name!r}; expected a member of {enum.__name__}")
        return weights
    member = str(weights).split(".")[-1]
    if member not in enum.__members__:
        raise ValueError(
            f"unknown weights {weights!r} for {model_name!r}: expected one of {sorted(enum.__members__)} or None"
        )
    return enum[member]


def weights_cache_path(weights: WeightsEnum) -> Path:
    """Where torchvision caches ``weights``: ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``."""
    file_name = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def is_weights_cached(weights: WeightsEnum) -> bool:
    """Whether the weights file is already in the cache (loading it needs no network)."""
    return weights_cache_path(weights).is_file()


def _download(url: str, destination: Path, progress: bool) -> None:
    """Download ``url`` to ``destination`` checking the hash prefix in its name (torchvision's check)."""
    match = _HASH_IN_FILE_NAME.search(destination.name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(destination), match.group(1) if match else None, progress=progress)


def load_weights_state_dict(weights: WeightsEnum, progress: bool = False) -> dict[str, Tensor]:
    """Torchvision's state dict for ``weights``: from the cache, else downloaded into it.

    Raises:
        WeightsUnavailableError: the file is not cached and the download failed; the message
            names the file, the URL and the directory (``$TORCH_HOME/hub/checkpoints``).
    """
    path = weights_cache_path(weights)
    if not path.is_file():
        try:
            _download(weights.url, path, progress)
        except Exception as err:  # no network, proxy, HTTP error, hash mismatch: all mean "not available"
            torch_home = os.environ.get("TORCH_HOME")
            where = f"TORCH_HOME={torch_home}" if torch_home else "TORCH_HOME is unset, so torch uses ~/.cache/torch"
            raise WeightsUnavailableError(
                f"{weights} needs the file {path.name}, which is not in {path.parent} and could not be "
                f"downloaded ({type(err).__name__}: {err}). Download {weights.url} on a machine with "
                f"internet and copy it to {path} ({where}; the file must sit in $TORCH_HOME/hub/checkpoints/)."
            ) from err
    return torch.load(path, map_location="cpu", weights_only=True)


def coco91_columns(label_to_cat_id: list[int]) -> Tensor:
    """Torchvision COCO slot of each contiguous label of a dataset with COCO category ids.

    Args:
        label_to_cat_id: the dataset's ``label_to_cat_id`` (contiguous label -> COCO category
            id), e.g. minicoco's 80 ids in ``1..90``.

    Returns:
        ``[C]`` int64, ``columns[label] = category id`` (slot of torchvision's 91 outputs).
    """
    columns = torch.as_tensor(list(label_to_cat_id), dtype=torch.int64)
    for label, cat_id in enumerate(columns.tolist()):
        if not 1 <= cat_id <= 90 or COCO91_CLASS_NAMES[cat_id] == "N/A":
            raise ValueError(
                f"label_to_cat_id[{label}] = {cat_id} is not a COCO category id (1..90, not an unused 'N/A' id); "
                "for a dataset with its own ids use coco91_columns_by_name(class_names)"
            )
    return columns


def coco91_columns_by_name(class_names: list[str]) -> Tensor:
    """Torchvision COCO slot of each class, matched by COCO class name (e.g. ``"person"``).

    Raises:
        ValueError: naming the classes that are not COCO classes.
    """
    slot_of_name = {name: k for k, name in enumerate(COCO91_CLASS_NAMES) if name not in ("__background__", "N/A")}
    missing = [name for name in class_names if name not in slot_of_name]
    if missing:
        raise ValueError(f"classes {missing} are not COCO class names; COCO has {sorted(slot_of_name)}")
    return torch.tensor([slot_of_name[name] for name in class_names], dtype=torch.int64)
