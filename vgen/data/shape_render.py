"""Rasterising the Shapes world: shape outlines, anti-aliased coverage, textured backgrounds, tight boxes.

Coordinates are continuous pixel coordinates: pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``, x to
the right, y down. A shape is a polygon (a circle is a 96-gon) drawn at ``SUPERSAMPLE`` times the output resolution
and averaged down, so each output pixel holds the fraction of its area the shape covers (anti-aliasing). An object's
box is the tight box around the pixels it covers at least half (``x1``/``y1`` exclusive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from einops import reduce
from PIL import Image, ImageDraw

SUPERSAMPLE = 4
MIN_RESOLUTION, MAX_RESOLUTION = 32, 512  # of the procedural worlds
BOX_COVERAGE = 0.5

# Background pixels are clipped to this grey band, which keeps them far (> 55 in RGB distance) from every palette
# colour, white and black included, so an object's colour is always separable from the background.
BACKGROUND_RANGE = (140.0, 205.0)


def _regular_polygon(num_vertices: int, radius: float, start_angle: float) -> np.ndarray:
    angles = start_angle + 2 * math.pi * np.arange(num_vertices) / num_vertices
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=-1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)


def _centre_extent(vertices: np.ndarray) -> np.ndarray:
    """Shift so the vertex bounding box is centred on the origin (the box centre is the object's position)."""
    return vertices - (vertices.min(0) + vertices.max(0)) / 2


# Unit outlines (N, 2), x right and y down, spanning roughly [-1, 1]; chosen so the shapes look about equally large.
UNIT_OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular_polygon(96, 1.0, 0.0),
    "square": np.array([[-0.82, -0.82], [0.82, -0.82], [0.82, 0.82], [-0.82, 0.82]]),
    "triangle": _centre_extent(_regular_polygon(3, 1.12, -math.pi / 2)),
    "star": _centre_extent(_star(5, 1.08, 0.46)),
    "hexagon": _regular_polygon(6, 1.0, 0.0),
    "diamond": np.array([[0.0, -1.05], [0.68, 0.0], [0.0, 1.05], [-0.68, 0.0]]),
}


def shape_vertices(shape: str, center: tuple[float, float], size: float, angle_deg: float = 0.0) -> np.ndarray:
    """Polygon of ``shape`` scaled by ``size`` (pixels per unit), rotated by ``angle_deg``, at ``center``: (N, 2)."""
    theta = math.radians(angle_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return UNIT_OUTLINES[shape] @ rotation.T * size + np.asarray(center, dtype=np.float64)


def bounding_radius(shape: str, size: float) -> float:
    """Radius of the circle around the shape's centre that contains it at any rotation (pixels)."""
    return float(np.linalg.norm(UNIT_OUTLINES[shape], axis=-1).max() * size)


@dataclass
class Coverage:
    """Fraction of each pixel an object covers, stored for the patch ``[y0:y0+h, x0:x0+w]`` of the image."""

    values: np.ndarray  # (h, w) float32 in [0, 1]
    x0: int
    y0: int

    def box(self) -> tuple[int, int, int, int] | None:
        """Tight ``(x0, y0, x1, y1)`` around pixels covered at least ``BOX_COVERAGE`` (exclusive ends), or None."""
        rows, cols = np.nonzero(self.values >= BOX_COVERAGE)
        if rows.size == 0:
            return None
        return (
            self.x0 + int(cols.min()),
            self.y0 + int(rows.min()),
            self.x0 + int(cols.max()) + 1,
            self.y0 + int(rows.max()) + 1,
        )


def rasterize(vertices: np.ndarray, height: int, width: int, supersample: int = SUPERSAMPLE) -> Coverage:
    """Anti-aliased coverage of a polygon (N, 2) in an image of ``height x width`` pixels."""
    x0 = max(math.floor(vertices[:, 0].min()), 0)
    y0 = max(math.floor(vertices[:, 1].min()), 0)
    x1 = min(math.ceil(vertices[:, 0].max()), width)
    y1 = min(math.ceil(vertices[:, 1].max()), height)
    if x1 <= x0 or y1 <= y0:
        return Coverage(np.zeros((0, 0), np.float32), 0, 0)
    canvas = Image.new("L", ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
    # PIL puts integer coordinates at pixel centres; continuous coordinate u maps to u * s - 0.5.
    points = (vertices - np.array([x0, y0])) * supersample - 0.5
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=255)
    fine = np.asarray(canvas, dtype=np.float32) / 255.0
    values = reduce(fine, "(h s1) (w s2) -> h w", "mean", s1=supersample, s2=supersample)
    return Coverage(values.astype(np.float32), x0, y0)


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Light, low-contrast textured background (H, W, 3) float32 in ``BACKGROUND_RANGE``.

    A grey with a faint tint, a linear gradient in a random direction, smooth blotches (a coarse random grid
    upsampled bicubically) and fine per-pixel grain.
    """
    grey = rng.uniform(158.0, 184.0)
    tint = rng.normal(size=3)
    tint = tint / (np.linalg.norm(tint) + 1e-8) * rng.uniform(0.0, 8.0)
    base = grey + tint

    theta = rng.uniform(0.0, 2 * math.pi)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
    ramp = rng.uniform(0.0, 16.0) * (math.cos(theta) * xs[None, :] + math.sin(theta) * ys[:, None])

    cells = int(rng.integers(3, 7))
    coarse = (rng.normal(size=(cells, cells)) * rng.uniform(1.5, 4.5)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))

    grain = rng.normal(scale=1.5, size=(height, width, 3))
    background = base + (ramp + blotches)[..., None] + grain
    return np.clip(background, *BACKGROUND_RANGE).astype(np.float32)


def paint(image: np.ndarray, coverage: Coverage, color: tuple[int, int, int]) -> None:
    """Blend a flat ``color`` into ``image`` (H, W, 3) float32 in place, weighted by ``coverage``."""
    h, w = coverage.values.shape
    if h == 0 or w == 0:
        return
    region = image[coverage.y0 : coverage.y0 + h, coverage.x0 : coverage.x0 + w]
    alpha = coverage.values[..., None]
    region[...] = region * (1.0 - alpha) + np.asarray(color, dtype=np.float32) * alpha


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
