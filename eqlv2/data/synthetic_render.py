"""Lays out and draws one image of the offline benchmark from its :class:`PlannedImage`.

Each instance is a filled polygon (its category's shape, scaled, slightly stretched and rotated)
painted with the category's colour and texture on a noisy, cluttered background. Objects come at
several scales, some stick out of the image (truncated) and later objects may cover part of
earlier ones (occlusion), but every object keeps at least half of its area visible. A label map
records which object owns each pixel, so the annotations describe what is visible, as in LVIS:
the box is the extent of the visible pixels and the polygons (``cv2.findContours``) outline them.

Everything is drawn from one ``numpy`` generator per image, so equal seeds give equal pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .synthetic_plan import COLOURS, Appearance, PlannedImage

__all__ = ["DrawnInstance", "RenderedImage", "LayoutError", "shape_polygon", "render_image"]

#: Single instances are this big (box side in pixels for a 160-pixel image), log-uniformly.
_SIZE_RANGE = (14.0, 50.0)
#: Members of a cluster ("group of") are this big.
_CLUSTER_SIZE_RANGE = (9.0, 14.0)
#: Every object keeps at least this fraction of its pixels visible.
_MIN_VISIBLE = 0.5
#: Chance that a single instance is placed partly outside the image.
_P_TRUNCATED = 0.12
#: Placement attempts per object (or cluster) before giving up; sizes shrink as they fail.
_ATTEMPTS = 60


class LayoutError(RuntimeError):
    """The objects of an image do not fit (too many categories for too few images)."""


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (
            radius * math.cos(phase + 2 * math.pi * k / n),
            radius * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5), _regular(5, 0.45, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner, strict=True) for p in pair]


_UNIT_SHAPES: dict[str, list[tuple[float, float]]] = {
    "circle": _regular(24),
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "diamond": [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)],
    "pentagon": _regular(5),
    "hexagon": _regular(6, phase=0.0),
    "star": _star(),
    "cross": [
        (-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33),
        (0.33, 1), (-0.33, 1), (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33),
    ],
    "oval": [(x, 0.55 * y) for x, y in _regular(24)],
    "half_disc": [(math.cos(a), 0.45 - 1.1 * math.sin(a)) for a in np.linspace(0, math.pi, 13)],
    "arrow": [(-1, -0.3), (0.1, -0.3), (0.1, -0.8), (1, 0), (0.1, 0.8), (0.1, 0.3), (-1, 0.3)],
    "elbow": [(-0.9, -1), (-0.25, -1), (-0.25, 0.35), (0.9, 0.35), (0.9, 1), (-0.9, 1)],
}  # fmt: skip


def shape_polygon(
    shape: str, center: tuple[float, float], size: float, stretch: float = 1.0, angle: float = 0.0
) -> np.ndarray:
    """``(n, 2)`` vertices of ``shape`` with box side about ``size``, stretched and rotated."""
    unit = np.asarray(_UNIT_SHAPES[shape], dtype=np.float64)
    points = unit * (size / 2.0) * np.array([stretch, 1.0 / stretch])
    cos, sin = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[cos, sin], [-sin, cos]])
    return rotated + np.asarray(center, dtype=np.float64)


@dataclass
class DrawnInstance:
    """One drawn object and its (visible-part) annotation.

    Attributes:
        category: contiguous category id.
        group: index of its :class:`PlannedGroup` in the image.
        polygons: LVIS polygons ``[x0, y0, x1, y1, ...]`` of the visible part, in pixels.
        box: ``(x0, y0, x1, y1)`` extent of the visible pixels (pixel edges).
        area: number of visible pixels.
        occluded: other objects cover part of it.
        truncated: it extends beyond the image border.
    """

    category: int
    group: int
    polygons: list[list[float]] = field(default_factory=list)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    area: int = 0
    occluded: bool = False
    truncated: bool = False


@dataclass
class RenderedImage:
    """Pixels (``(H, W, 3)`` uint8) and instances of one image, in drawing order."""

    width: int
    height: int
    pixels: np.ndarray
    instances: list[DrawnInstance]


@dataclass
class _Placed:
    instance: DrawnInstance
    mask: np.ndarray
    x: int
    y: int
    appearance: Appearance


def _rasterize(polygon: np.ndarray, width: int, height: int) -> tuple[np.ndarray, int, int] | None:
    """Mask of the polygon inside the image, with its top-left corner, or None if outside."""
    x0 = max(int(math.floor(polygon[:, 0].min())), 0)
    y0 = max(int(math.floor(polygon[:, 1].min())), 0)
    x1 = min(int(math.ceil(polygon[:, 0].max())) + 1, width)
    y1 = min(int(math.ceil(polygon[:, 1].max())) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(canvas).polygon([(x - x0, y - y0) for x, y in polygon.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool), x0, y0


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    x_next, y_next = np.append(x[1:], x[0]), np.append(y[1:], y[0])
    return 0.5 * abs(float(np.dot(x, y_next) - np.dot(y, x_next)))


class _Layout:
    """Label map of the objects placed so far, with their full and visible pixel counts."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.labels = np.full((height, width), -1, dtype=np.int32)
        self.full: list[int] = []
        self.visible: list[int] = []
        self.placed: list[_Placed] = []

    def snapshot(self) -> tuple[np.ndarray, list[int], int]:
        return self.labels.copy(), list(self.visible), len(self.placed)

    def restore(self, state: tuple[np.ndarray, list[int], int]) -> None:
        self.labels, self.visible, count = state[0], state[1], state[2]
        del self.placed[count:], self.full[count:]

    def try_place(
        self, polygon: np.ndarray, instance: DrawnInstance, appearance: Appearance
    ) -> bool:
        """Add the object if it is mostly inside and leaves every earlier object visible enough."""
        raster = _rasterize(polygon, self.width, self.height)
        if raster is None:
            return False
        mask, x, y = raster
        pixels = int(mask.sum())
        if pixels < max(12.0, 0.6 * _polygon_area(polygon)):
            return False
        region = self.labels[y : y + mask.shape[0], x : x + mask.shape[1]]
        covered = region[mask]
        covered = covered[covered >= 0]
        if covered.size:
            ids, counts = np.unique(covered, return_counts=True)
            for index, count in zip(ids.tolist(), counts.tolist(), strict=True):
                if self.visible[index] - count < _MIN_VISIBLE * self.full[index]:
                    return False
            for index, count in zip(ids.tolist(), counts.tolist(), strict=True):
                self.visible[index] -= count
        region[mask] = len(self.placed)
        self.full.append(pixels)
        self.visible.append(pixels)
        instance.truncated = bool(
            polygon[:, 0].min() < 0 or polygon[:, 1].min() < 0
            or polygon[:, 0].max() > self.width or polygon[:, 1].max() > self.height
        )  # fmt: skip
        self.placed.append(_Placed(instance, mask, x, y, appearance))
        return True


def _jitter(rng: np.random.Generator) -> tuple[float, float]:
    """Random stretch and rotation of one instance."""
    return float(np.exp(rng.uniform(-0.15, 0.15))), float(rng.uniform(-0.25, 0.25))


def _place_single(
    layout: _Layout,
    rng: np.random.Generator,
    appearance: Appearance,
    instance: DrawnInstance,
    scale: float,
) -> bool:
    """Place one instance at a random spot, shrinking it after repeated failures."""
    low, high = _SIZE_RANGE
    size = math.exp(rng.uniform(math.log(low), math.log(high))) * scale
    for attempt in range(_ATTEMPTS):
        side = size * 0.9 ** (attempt // 6)
        margin = -0.25 * side if rng.random() < _P_TRUNCATED else 0.5 * side
        center = (
            rng.uniform(margin, layout.width - margin),
            rng.uniform(margin, layout.height - margin),
        )
        stretch, angle = _jitter(rng)
        polygon = shape_polygon(appearance.shape, center, side, stretch, angle)
        if layout.try_place(polygon, instance, appearance):
            return True
    return False


def _place_cluster(
    layout: _Layout,
    rng: np.random.Generator,
    appearance: Appearance,
    instances: list[DrawnInstance],
    scale: float,
) -> bool:
    """Place small touching instances on a jittered grid, all or none."""
    count = len(instances)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    low, high = _CLUSTER_SIZE_RANGE
    size = rng.uniform(low, high) * scale
    for attempt in range(_ATTEMPTS):
        side = size * 0.93 ** (attempt // 6)
        step = 0.8 * side
        half_w, half_h = (columns * step + side) / 2, (rows * step + side) / 2
        if 2 * half_w >= layout.width or 2 * half_h >= layout.height:
            continue
        cx = rng.uniform(half_w, layout.width - half_w)
        cy = rng.uniform(half_h, layout.height - half_h)
        state = layout.snapshot()
        placed = True
        for k, instance in enumerate(instances):
            row, column = divmod(k, columns)
            center = (
                cx + (column - (columns - 1) / 2) * step + rng.uniform(-0.1, 0.1) * side,
                cy + (row - (rows - 1) / 2) * step + rng.uniform(-0.1, 0.1) * side,
            )
            stretch, angle = _jitter(rng)
            member = side * rng.uniform(0.9, 1.1)
            polygon = shape_polygon(appearance.shape, center, member, stretch, angle)
            if not layout.try_place(polygon, instance, appearance):
                placed = False
                break
        if placed:
            return True
        layout.restore(state)
    return False


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Dull, noisy background with a colour gradient and a few unannotated distractor strokes."""
    base = rng.uniform(35, 95, size=3).astype(np.float32)
    slope_x, slope_y = rng.uniform(-25, 25, size=2)
    gradient = (np.arange(width, dtype=np.float32) * np.float32(slope_x / width))[None, :] + (
        np.arange(height, dtype=np.float32) * np.float32(slope_y / height)
    )[:, None]
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * np.float32(7.0)
    pixels = np.clip(base + gradient[..., None] + noise, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):
        grey = int(rng.integers(70, 140))
        tint = tuple(int(v) for v in np.clip(grey + rng.integers(-12, 13, size=3), 0, 255))
        points = rng.uniform(0, 1, size=(2, 2)) * (width, height)
        if rng.random() < 0.5:
            draw.line([tuple(p) for p in points.tolist()], fill=tint, width=int(rng.integers(1, 3)))
        else:
            x0, x1 = sorted(points[:, 0].tolist())
            y0, y1 = sorted(points[:, 1].tolist())
            draw.ellipse([x0, y0, x0 + min(x1 - x0, 30), y0 + min(y1 - y0, 30)], outline=tint)
    return np.array(canvas)


def _texture(
    rng: np.random.Generator, appearance: Appearance, height: int, width: int, side: float
) -> np.ndarray:
    """``(height, width, 3)`` patch of the category's colour and pattern."""
    colour = np.clip(
        np.array(COLOURS[appearance.colour], dtype=np.float64) + rng.integers(-12, 13, 3), 0, 255
    )
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    shade = 1.0 + 0.12 * (1.0 - (xx + yy) / max(width + height, 1))
    patch = colour * shade[..., None]
    period = max(2.5, side / 6.0)
    if appearance.texture == "striped":
        direction = rng.uniform(0, math.pi)
        dark = ((xx * math.cos(direction) + yy * math.sin(direction)) / period) % 2.0 < 1.0
    elif appearance.texture == "checkered":
        dark = ((xx // period + yy // period) % 2) == 1
    else:
        dark = np.zeros((height, width), dtype=bool)
    patch[dark] *= 0.45
    return np.clip(patch, 0, 255).astype(np.uint8)


def _annotate(placed: _Placed, index: int, labels: np.ndarray, full: int) -> None:
    """Fill box, area, polygons and occlusion of one instance from the final label map."""
    height, width = placed.mask.shape
    visible = labels[placed.y : placed.y + height, placed.x : placed.x + width] == index
    ys, xs = np.nonzero(visible)
    instance = placed.instance
    instance.area = int(xs.size)
    instance.box = (
        placed.x + int(xs.min()), placed.y + int(ys.min()),
        placed.x + int(xs.max()) + 1, placed.y + int(ys.max()) + 1,
    )  # fmt: skip
    instance.occluded = instance.area < 0.95 * full
    contours, _ = cv2.findContours(
        visible.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons = []
    for contour in sorted(contours, key=cv2.contourArea, reverse=True):
        if len(contour) < 3 or (polygons and cv2.contourArea(contour) < 2.0):
            continue
        points = contour[:, 0, :].astype(np.float64) + (placed.x + 0.5, placed.y + 0.5)
        polygons.append(points.reshape(-1).tolist())
    if not polygons:
        x0, y0, x1, y1 = instance.box
        polygons = [
            [x0 + 0.5, y0 + 0.5, x1 - 0.5, y0 + 0.5, x1 - 0.5, y1 - 0.5, x0 + 0.5, y1 - 0.5]
        ]
    instance.polygons = polygons


def render_image(
    plan: PlannedImage,
    appearances: list[Appearance],
    rng: np.random.Generator,
    min_size: int,
    max_size: int,
) -> RenderedImage:
    """Lay out and draw ``plan`` with the generator ``rng``.

    Raises:
        LayoutError: an object found no place after many attempts.
    """
    width = int(rng.integers(min_size, max_size + 1))
    height = int(rng.integers(min_size, max_size + 1))
    scale = min(width, height) / 160.0
    layout = _Layout(width, height)
    for group_index in rng.permutation(len(plan.groups)).tolist():
        group = plan.groups[group_index]
        appearance = appearances[group.category]
        instances = [DrawnInstance(group.category, group_index) for _ in range(group.num_instances)]
        if group.cluster:
            placed = _place_cluster(layout, rng, appearance, instances, scale)
        else:
            placed = all(_place_single(layout, rng, appearance, i, scale) for i in instances)
        if not placed:
            raise LayoutError(
                f"image {plan.index}: no room left for {appearance.name} in a {width}x{height} "
                f"image with {sum(g.num_instances for g in plan.groups)} objects"
            )
    pixels = _background(rng, width, height)
    for item in layout.placed:
        h, w = item.mask.shape
        side = math.sqrt(h * w)
        patch = _texture(rng, item.appearance, h, w, side)
        pixels[item.y : item.y + h, item.x : item.x + w][item.mask] = patch[item.mask]
    for index, item in enumerate(layout.placed):
        _annotate(item, index, layout.labels, layout.full[index])
    return RenderedImage(width, height, pixels, [item.instance for item in layout.placed])
