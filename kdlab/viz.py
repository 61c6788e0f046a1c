"""Drawing helpers: images with boxes, detections next to ground truth.

Everything takes plain tensors/arrays and a matplotlib ``Axes``, so a notebook decides the layout;
:func:`draw_on_image` draws detections onto a PIL image at its own resolution (``kdlab predict``).
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
    avoid_overlap: bool = False,
) -> None:
    """Draw xyxy ``boxes`` ``[K, 4]`` on ``ax`` with optional labels and scores.

    ``avoid_overlap``: move a label down (in steps of its height) while it would cover one drawn
    before it, so that two boxes at the same place keep readable labels (image coordinates, y down).
    """
    placed: list[tuple[float, float, float, float]] = []  # x1, y1, x2, y2 of the labels drawn
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
        if not text:
            continue
        caption, x, y = " ".join(text), x1, y1 - 1
        if avoid_overlap:
            height = _text_height(ax, fontsize)
            width = 0.5 * height * len(caption)  # a character is about half a line high (imshow: equal axes)
            x = max(min(ax.get_xlim()), min(x1, max(ax.get_xlim()) - width))  # inside the image, left to right
            if y - height < min(ax.get_ylim()):  # no room above the box: inside its top edge
                y = y1 + height
            while any(x < px2 and px1 < x + width and y - height < py2 and py1 < y for px1, py1, px2, py2 in placed):
                y += height
            placed.append((x, y - height, x + width, y))
        text = ax.text(x, y, caption, color="white", fontsize=fontsize, va="bottom", clip_on=avoid_overlap,
                       bbox=dict(facecolor=c, alpha=0.7, pad=0.5, linewidth=0))
        text.set_in_layout(False)  # a label outside the image must not make a layout engine shrink the axes


def _text_height(ax: Axes, fontsize: float) -> float:
    """The height of one line of ``fontsize`` text in ``ax``'s data units (y), at the current layout
    (draw the figure first, ``fig.canvas.draw()``, when a layout engine will still move the axes)."""
    axis_pixels = ax.get_window_extent().height
    y_range = abs(ax.get_ylim()[1] - ax.get_ylim()[0])
    return 1.3 * fontsize / 72 * ax.figure.dpi * y_range / max(axis_pixels, 1e-6)


def draw_on_image(image, detections: dict, class_names: Sequence[str], *, line_width: int | None = None):
    """A copy of the PIL ``image`` with ``detections`` (``boxes`` xyxy in its pixels, ``scores``,
    ``labels``) drawn as class-coloured boxes captioned ``class score`` (captions stacked, never overlapping)."""
    from PIL import ImageDraw

    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    width = line_width or max(1, round(max(image.size) / 300))
    boxes, labels = detections["boxes"].tolist(), detections["labels"].tolist()
    colours = [tuple(int(255 * v) for v in PALETTE[int(label) % len(PALETTE)]) for label in labels]
    for box, colour in zip(boxes, colours):
        draw.rectangle(box, outline=colour, width=width)
    placed: list[tuple[float, float, float, float]] = []
    for box, score, label, colour in zip(boxes, detections["scores"].tolist(), labels, colours):
        caption = f"{class_names[int(label)]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption)
        text_width, text_height = right - left + 2, bottom - top + 3
        x = max(0.0, min(box[0], image.width - text_width))
        y = box[1] - text_height if box[1] - text_height >= 0 else box[1]  # above the box, else inside it
        while any(x < px2 and px1 < x + text_width and y < py2 and py1 < y + text_height for px1, py1, px2, py2 in placed):
            y += text_height  # below the captions already there: none is hidden
        placed.append((x, y, x + text_width, y + text_height))
        draw.rectangle((x, y, x + text_width, y + text_height), fill=colour)
        draw.text((x + 1 - left, y + 1 - top), caption, fill="white")
    return image


def show_image(ax: Axes, image: Tensor, title: str | None = None, *, muted: bool = False) -> None:
    """Show a ``[3, H, W]`` image tensor on ``ax`` (axis off, optional title).

    ``muted``: draw it in mid grey (``0.3 + 0.5 * luminance``, 32 levels) as a background for coloured
    overlays: any colour stands out on it, and a stored figure of photos stays small.
    """
    array = to_numpy_image(image)
    if muted:
        grey = np.round((0.3 + 0.5 * array.mean(axis=-1)) * 32) / 32
        ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(array)
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
