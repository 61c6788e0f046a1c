"""Drawing primitives of the *shapes* set: class outlines, distractors, textures, backgrounds.

A drawable is a list of *strokes* in image pixels (continuous coordinates, pixel ``(i, j)``
covers ``[j, j+1) x [i, i+1)``):

- ``("polygon", points [K, 2], paint)``: a filled polygon; ``paint=False`` erases (a ring's hole);
- ``("line", points [K, 2], width)``: an open polyline ``width`` pixels wide (scribbles, arcs).

:func:`rasterize` turns strokes into an anti-aliased coverage mask by drawing at
``SUPERSAMPLE`` x resolution (only inside the strokes' bounding box) and box-filtering down.
Every function takes an explicit ``np.random.Generator``, so a scene is a pure function of its
seed. numpy + PIL + scipy only: generating the set needs no torch.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

SUPERSAMPLE = 4

# The classes, told apart by outline only: colour and texture are drawn per object at random.
SHAPES_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "star", "ring", "cross", "hexagon", "heart")

Stroke = tuple  # ("polygon", points, paint) | ("line", points, width)


def _regular_polygon(num_vertices: int, radius: float = 1.0, phase: float = math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(num_vertices) / num_vertices
    return radius * np.stack([np.cos(angles), -np.sin(angles)], axis=1)


def class_outline(name: str, rng: np.random.Generator) -> list[Stroke]:
    """Strokes of one class shape in a unit frame (the shape spans about ``[-1, 1]^2``).

    Args:
        name: one of :data:`SHAPES_CLASSES`.
        rng: draws the class's own free parameter (a ring's hole radius).
    """
    if name == "disc":
        return [("polygon", _regular_polygon(48), True)]
    if name == "square":
        return [("polygon", np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.8, True)]
    if name == "triangle":
        return [("polygon", _regular_polygon(3), True)]
    if name == "star":
        outer, inner = _regular_polygon(5, 1.0), _regular_polygon(5, 0.42, math.pi / 2 + math.pi / 5)
        return [("polygon", np.stack([outer, inner], axis=1).reshape(10, 2), True)]
    if name == "ring":
        hole = float(rng.uniform(0.45, 0.7))
        return [("polygon", _regular_polygon(48), True), ("polygon", _regular_polygon(48, hole), False)]
    if name == "cross":
        a, b = 0.3, 1.0  # arm half-width, arm length
        points = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        return [("polygon", np.array(points, dtype=np.float64), True)]
    if name == "hexagon":
        return [("polygon", _regular_polygon(6, 1.0, 0.0), True)]
    if name == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [("polygon", np.stack([x / 17.0, (y + 2.5) / 17.0], axis=1), True)]
    raise ValueError(f"unknown shape class {name!r}; expected one of {SHAPES_CLASSES}")


def distractor_strokes(rng: np.random.Generator, image_size: int) -> list[Stroke]:
    """An object-like shape of no class, in image pixels: a blob, an elongated ellipse, a scribble or an arc.

    Blobs are kept clearly irregular and ellipses clearly elongated (aspect >= 2.2) so no
    distractor is a disc, ring or polygon of a class: the set has no label noise by design.
    """
    kind = rng.choice(["blob", "ellipse", "scribble", "arc"])
    centre = rng.uniform(0, image_size, size=2)
    radius = image_size * math.exp(rng.uniform(math.log(0.04), math.log(0.3)))
    if kind == "blob":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        r = 1 + sum(rng.uniform(0.15, 0.3) * np.cos(k * t + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5))
        outline = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        return [("polygon", transform(outline, centre, radius, rng.uniform(0, 2 * math.pi), 1.0), True)]
    if kind == "ellipse":
        outline = _regular_polygon(48)
        aspect = rng.uniform(2.2, 4.0)
        return [("polygon", transform(outline, centre, radius, rng.uniform(0, 2 * math.pi), aspect), True)]
    width = float(rng.uniform(1.0, 3.0))
    if kind == "scribble":
        steps = rng.normal(0, radius, size=(int(rng.integers(3, 7)), 2))
        return [("line", centre + np.cumsum(steps, axis=0), width)]
    start, span = rng.uniform(0, 2 * math.pi), rng.uniform(math.pi / 3, 4 * math.pi / 3)
    t = start + np.linspace(0, span, 24)
    return [("line", centre + radius * np.stack([np.cos(t), np.sin(t)], axis=1), width)]


def transform(points: np.ndarray, centre: np.ndarray, size: float, angle: float, aspect: float) -> np.ndarray:
    """Unit-frame points -> image pixels: stretch x by ``aspect``, rotate by ``angle``, scale, shift.

    Args:
        points: ``[K, 2]`` xy in the unit frame.
        centre: ``[2]`` xy of the shape's centre in pixels.
        size: half the nominal extent in pixels (the unit frame's radius).
        angle: rotation in radians.
        aspect: x/y stretch; the area is kept (x scaled by ``sqrt(aspect)``, y by ``1/sqrt``).
    """
    stretched = points * np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])
    cos, sin = math.cos(angle), math.sin(angle)
    rotated = stretched @ np.array([[cos, sin], [-sin, cos]])
    return centre + size * rotated


def place(strokes: list[Stroke], centre: np.ndarray, size: float, angle: float, aspect: float) -> list[Stroke]:
    """:func:`transform` applied to every polygon of a unit-frame drawable."""
    return [(kind, transform(points, centre, size, angle, aspect), arg) for kind, points, arg in strokes]


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area ``|sum_k x_k y_{k+1} - x_{k+1} y_k| / 2`` of a simple polygon ``[K, 2]``."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def drawn_area(strokes: list[Stroke]) -> float:
    """Exact area of a class drawable: painted polygons minus erased ones (holes lie inside)."""
    return sum(polygon_area(p) * (1 if paint else -1) for kind, p, paint in strokes if kind == "polygon")


def drawn_box(strokes: list[Stroke], image_size: int) -> np.ndarray:
    """``[4]`` xyxy extent of the painted polygons, clipped to the image (may be empty)."""
    points = np.concatenate([p for kind, p, paint in strokes if kind == "polygon" and paint])
    low, high = np.clip(points.min(axis=0), 0, image_size), np.clip(points.max(axis=0), 0, image_size)
    return np.concatenate([low, high])


def rasterize(strokes: list[Stroke], image_size: int) -> np.ndarray:
    """Anti-aliased coverage ``[H, W]`` float32 in ``[0, 1]`` of a drawable (``H = W = image_size``)."""
    mask = np.zeros((image_size, image_size), dtype=np.float32)
    points = np.concatenate([p for _, p, _ in strokes])
    pad = max([arg for kind, _, arg in strokes if kind == "line"], default=0.0) + 1
    x0, y0 = np.clip(np.floor(points.min(axis=0) - pad), 0, image_size).astype(int)
    x1, y1 = np.clip(np.ceil(points.max(axis=0) + pad), 0, image_size).astype(int)
    if x1 <= x0 or y1 <= y0:
        return mask
    canvas = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for kind, stroke_points, arg in strokes:
        # PIL puts supersampled pixel k's centre at coordinate k: continuous x -> x * S - 0.5.
        xy = [tuple(p) for p in (stroke_points - [x0, y0]) * SUPERSAMPLE - 0.5]
        if kind == "polygon":
            draw.polygon(xy, fill=255 if arg else 0)
        else:
            draw.line(xy, fill=255, width=max(1, round(arg * SUPERSAMPLE)), joint="curve")
    small = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    mask[y0:y1, x0:x1] = np.asarray(small, dtype=np.float32) / 255.0
    return mask


def soften(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blurred copy of a coverage mask: a soft edge whose true position is ambiguous."""
    return gaussian_filter(mask, sigma) if sigma > 0 else mask


@lru_cache(maxsize=4)
def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)``, each ``[H, W]``, normalised to ``[0, 1)``."""
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    return np.meshgrid(coords, coords, indexing="ij")


def _oriented(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """``[H, W]`` coordinate along a random direction (units: image sides)."""
    y, x = _grid(image_size)
    angle = rng.uniform(0, 2 * math.pi)
    return x * math.cos(angle) + y * math.sin(angle)


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 1, size=3).astype(np.float32)


def paint(rng: np.random.Generator, base: np.ndarray, image_size: int) -> np.ndarray:
    """``[H, W, 3]`` texture around colour ``base``: solid, gradient, stripes or speckle."""
    kind = rng.choice(["solid", "gradient", "stripes", "speckle"], p=[0.4, 0.25, 0.15, 0.2])
    texture = np.broadcast_to(base, (image_size, image_size, 3)).astype(np.float32)
    if kind == "gradient":
        other = np.clip(base + rng.uniform(-0.3, 0.3, size=3), 0, 1)
        t = _oriented(rng, image_size)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        texture = texture + t[..., None] * (other - base).astype(np.float32)
    elif kind == "stripes":
        other = np.clip(base + rng.uniform(-0.35, 0.35, size=3), 0, 1)
        periods = rng.uniform(6, 20)
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * periods * _oriented(rng, image_size))
        texture = texture + wave[..., None] * (other - base).astype(np.float32)
    elif kind == "speckle":
        texture = texture + rng.normal(0, 0.08, size=texture.shape).astype(np.float32)
    return np.clip(texture, 0, 1)


def _blotches(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Smooth low-frequency colour field ``[H, W, 3]``: a coarse random grid, bicubic-upsampled."""
    cells = int(rng.integers(3, 9))
    coarse = (rng.uniform(0, 1, size=(cells, cells, 3)) * 255).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) / 255.0


def background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """``[H, W, 3]`` textured background: gradient, stripes, checks, blotches or noise, then blotches mixed in."""
    kind = rng.choice(["gradient", "stripes", "checks", "blotches", "noise"])
    first, second = random_colour(rng), random_colour(rng)
    if kind == "gradient":
        t = _oriented(rng, image_size)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        image = first + t[..., None] * (second - first)
    elif kind == "stripes":
        wave = np.sin(2 * math.pi * rng.uniform(3, 12) * _oriented(rng, image_size))
        wave = np.sign(wave) * 0.5 + 0.5 if rng.uniform() < 0.5 else 0.5 + 0.5 * wave
        image = first + wave[..., None] * (second - first)
    elif kind == "checks":
        period = rng.uniform(0.05, 0.2)
        u, v = _oriented(rng, image_size), _oriented(rng, image_size)
        check = (np.floor(u / period) + np.floor(v / period)) % 2
        image = first + check[..., None] * (second - first)
    elif kind == "blotches":
        image = _blotches(rng, image_size)
    else:
        image = first + rng.normal(0, 0.1, size=(image_size, image_size, 3))
    mix = rng.uniform(0.0, 0.6)
    image = (1 - mix) * image + mix * _blotches(rng, image_size)
    return np.clip(image, 0, 1).astype(np.float32)
