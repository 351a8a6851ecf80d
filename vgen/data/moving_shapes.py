"""The Moving Shapes world: short videos of 1-3 coloured shapes gliding at constant velocity and bouncing off the
image borders, on a static textured background (the Shapes world's renderer and palette).

An object's centre moves at constant velocity between bounces; it bounces (elastically, equal masses) off the
walls and off the other objects, so shapes stay inside the frame and do not pass over each other (in a rare crowded
pile-up they may touch; later objects are drawn on top). Boxes are always the objects' own silhouettes.
Caption: ``"a red circle and a blue square moving"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from vgen.data.shape_render import bounding_radius, paint, rasterize, render_background, shape_vertices, to_uint8
from vgen.data.shapes import (
    COLOR_NAMES,
    COLOR_RGB,
    MAX_TILT_DEG,
    SHAPE_NAMES,
    ShapeObject,
    _check_seed,
    check_resolution,
    noun_phrase,
)
from vgen.errors import UserError

MAX_FRAMES = 256
SIZE_RANGE = (0.09, 0.17)  # half-extent as a fraction of the resolution
SPEED_RANGE = (0.02, 0.06)  # pixels per frame as a fraction of the resolution
SUBSTEPS = 4


@dataclass
class MovingShapesSample:
    frames: np.ndarray  # (T, H, W, 3) uint8
    caption: str
    objects: list[list[ShapeObject]]  # objects[t][k]: object k in frame t (box and centre of that frame)

    @property
    def images(self) -> list[Image.Image]:
        """The frames as RGB ``PIL.Image`` s."""
        return [Image.fromarray(frame, "RGB") for frame in self.frames]


class MovingShapesWorld:
    """Procedural videos; ``sample(index)`` is a pure function of ``(seed, index)``."""

    def __init__(self, resolution: int = 64, num_frames: int = 16, seed: int = 0):
        self.resolution = check_resolution(resolution)
        if not isinstance(num_frames, (int, np.integer)) or not 1 <= num_frames <= MAX_FRAMES:
            raise UserError(f"num_frames must be an integer from 1 to {MAX_FRAMES}, got {num_frames!r}")
        self.num_frames = int(num_frames)
        self.seed = _check_seed(seed)

    def _tracks(self, rng: np.random.Generator, shapes: list[str]) -> list[tuple]:
        """Per object ``(shape, size, angle, xs, ys)`` with ``xs``/``ys`` of shape (T,): the centre in each frame.

        Objects start apart and move at constant velocity, bouncing elastically (equal masses) off the walls and off
        each other's bounding circles (plus a small gap), simulated in ``SUBSTEPS`` steps per frame.
        """
        res, n = self.resolution, len(shapes)
        gap = max(2.0, 0.04 * res)
        sizes = rng.uniform(*SIZE_RANGE, size=n) * res
        angles = [0.0 if s == "circle" else rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG) for s in shapes]
        radii = np.array([bounding_radius(s, size) for s, size in zip(shapes, sizes)])
        low, high = radii[:, None] + 1, res - radii[:, None] - 1  # (n, 1) bounds for the centres
        position = np.empty((n, 2))
        for k in range(n):
            for _ in range(200):
                position[k] = rng.uniform(low[k, 0], high[k, 0], size=2)
                if all(np.hypot(*(position[k] - position[j])) >= radii[k] + radii[j] + gap for j in range(k)):
                    break
        headings = rng.uniform(0, 2 * math.pi, size=n)
        velocity = rng.uniform(*SPEED_RANGE, size=n)[:, None] * res * np.stack([np.cos(headings), np.sin(headings)], 1)

        path = np.empty((self.num_frames, n, 2))
        for t in range(self.num_frames):
            path[t] = position
            for _ in range(SUBSTEPS):
                position += velocity / SUBSTEPS
                below, above = position < low, position > high
                position = np.where(below, 2 * low - position, np.where(above, 2 * high - position, position))
                velocity = np.where(below | above, -velocity, velocity)
                for a in range(n):
                    for b in range(a + 1, n):
                        offset = position[a] - position[b]
                        distance = float(np.hypot(*offset))
                        closing = float((velocity[a] - velocity[b]) @ offset)
                        if distance < radii[a] + radii[b] + gap and closing < 0 and distance > 0:
                            normal = offset / distance
                            exchange = ((velocity[a] - velocity[b]) @ normal) * normal
                            velocity[a] -= exchange
                            velocity[b] += exchange
        return [(s, sizes[k], angles[k], path[:, k, 0], path[:, k, 1]) for k, s in enumerate(shapes)]

    def sample(self, index: int) -> MovingShapesSample:
        rng = np.random.default_rng([self.seed, 7, _check_seed(index, "index")])
        res = self.resolution
        count = int(rng.integers(1, 4))
        shapes = [SHAPE_NAMES[i] for i in rng.choice(len(SHAPE_NAMES), size=count, replace=False)]
        colors = [COLOR_NAMES[i] for i in rng.integers(len(COLOR_NAMES), size=count)]
        tracks = self._tracks(rng, shapes)
        background = render_background(rng, res, res)

        frames = np.empty((self.num_frames, res, res, 3), np.uint8)
        objects: list[list[ShapeObject]] = []
        for t in range(self.num_frames):
            canvas = background.copy()
            frame_objects = []
            for (shape, size, angle, xs, ys), color in zip(tracks, colors):
                coverage = rasterize(shape_vertices(shape, (xs[t], ys[t]), size, angle), res, res)
                paint(canvas, coverage, COLOR_RGB[color])
                box = coverage.box()
                frame_objects.append(ShapeObject(shape, color, box, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)))
            frames[t] = to_uint8(canvas)
            objects.append(frame_objects)
        caption = " and ".join(noun_phrase(s, c) for s, c in zip(shapes, colors)) + " moving"
        return MovingShapesSample(frames, caption, objects)


class MovingShapesDataset(torch.utils.data.Dataset):
    """``length`` Moving Shapes videos. Item: ``{"video": (T, 3, H, W) float in [-1, 1], "caption": str,
    "index": int}``."""

    def __init__(self, resolution: int = 64, num_frames: int = 16, length: int = 10_000, seed: int = 0):
        if length < 1:
            raise UserError(f"dataset length must be >= 1, got {length}")
        self.world = MovingShapesWorld(resolution, num_frames, seed)
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        sample = self.world.sample(index)
        video = rearrange(torch.from_numpy(sample.frames), "t h w c -> t c h w").float() / 127.5 - 1.0
        return {"video": video, "caption": sample.caption, "index": index}
