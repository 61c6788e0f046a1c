"""Drawing helpers for the notebooks: images with boxes, detections next to ground truth.

Everything takes plain tensors/arrays and a matplotlib ``Axes``, so a notebook decides the layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle
from torch import Tensor

from kdlab.data.transforms import denormalize

# a qualitative palette (tab10) indexed by class label
PALETTE = plt.get_cmap("tab10").colors


def to_numpy_image(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` normalised tensor (or float in [0, 1]) -> ``[H, W, 3]`` array in [0, 1]."""
    if image.min() < 0 or image.max() > 1:  # normalised with ImageNet mean/std
        image = denormalize(image[None])[0]
    return image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def draw_boxes(
    ax: Axes,
    boxes: Tensor,
    labels: Tensor | None = None,
    scores: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    *,
    color: str | None = None,
    linestyle: str = "-",
    linewidth: float = 1.5,
    fontsize: int = 7,
) -> None:
    """Draw xyxy ``boxes`` ``[K, 4]`` on ``ax`` with optional labels and scores."""
    for k, box in enumerate(boxes.tolist()):
        label = int(labels[k]) if labels is not None else None
        c = color or (PALETTE[label % len(PALETTE)] if label is not None else "lime")
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=linewidth, linestyle=linestyle))
        text = []
        if label is not None:
            text.append(class_names[label] if class_names is not None else str(label))
        if scores is not None:
            text.append(f"{float(scores[k]):.2f}")
        if text:
            ax.text(x1, y1 - 1, " ".join(text), color="white", fontsize=fontsize, va="bottom",
                    bbox=dict(facecolor=c, alpha=0.7, pad=0.5, linewidth=0))


def show_image(ax: Axes, image: Tensor, title: str | None = None) -> None:
    ax.imshow(to_numpy_image(image))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def show_detections(
    images: Tensor,
    targets: list[dict],
    detections: list[dict],
    class_names: Sequence[str],
    *,
    score_thresh: float = 0.3,
    max_images: int = 4,
) -> plt.Figure:
    """A figure with ground truth (top row) and detections above ``score_thresh`` (bottom row)."""
    n = min(max_images, len(targets))
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6), squeeze=False)
    for i in range(n):
        h, w = (int(v) for v in targets[i]["size"])
        image = images[i, :, :h, :w]
        show_image(axes[0, i], image, "ground truth")
        draw_boxes(axes[0, i], targets[i]["boxes"], targets[i]["labels"], class_names=class_names)
        keep = detections[i]["scores"] >= score_thresh
        show_image(axes[1, i], image, f"detections (score >= {score_thresh})")
        draw_boxes(axes[1, i], detections[i]["boxes"][keep], detections[i]["labels"][keep],
                   detections[i]["scores"][keep], class_names=class_names)
    fig.tight_layout()
    return fig
