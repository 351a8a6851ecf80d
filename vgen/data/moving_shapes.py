"""The Moving Shapes world: short videos of 1-3 coloured shapes gliding at constant velocity and bouncing off the
image borders, on a static textured background (the Shapes world's renderer and palette).

An object's centre moves at constant velocity between bounces; it bounces (elastically, equal masses) off the
walls and off the other objects, so shapes stay inside the frame and do not pass over each other (in a rare crowded
pile-up they may touch; later objects are drawn on top). Boxes are always the objects' own silhouettes.

Two kinds of motion (``motion=``):

* ``"bounce"`` (default): any heading; caption ``"a red circle and a blue square moving"``.
* ``"directions"``: every object starts moving left, right, up or down (image y points down), far enough from the
  wall ahead that it travels at least :data:`DIRECTION_FRAMES` frames that way before it can bounce; the caption
  names each object's direction: ``"a red circle moving right and a blue square moving up"``. The video generators
  train on these, so a prompt says which way each shape goes (:func:`parse_motion_caption` reads them back).
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
    PROMPT_VOCABULARY,
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
MOTIONS = ("bounce", "directions")
#: unit vector (x, y) of each caption direction; image y points down
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
#: with ``motion="directions"`` an object moves this many frames in its captioned direction before it may bounce
DIRECTION_FRAMES = 4
#: every word a Moving Shapes caption can contain (the Shapes words plus the directions): a video model's text
#: encoder builds its vocabulary from this
MOTION_VOCABULARY: tuple[str, ...] = PROMPT_VOCABULARY + tuple(d for d in DIRECTIONS if d not in PROMPT_VOCABULARY)


@dataclass
class MovingShapesSample:
    frames: np.ndarray  # (T, H, W, 3) uint8
    caption: str
    objects: list[list[ShapeObject]]  # objects[t][k]: object k in frame t (box and centre of that frame)
    directions: tuple[str, ...] | None = None  # objects' captioned directions (motion="directions"), else None

    @property
    def images(self) -> list[Image.Image]:
        """The frames as RGB ``PIL.Image`` s."""
        return [Image.fromarray(frame, "RGB") for frame in self.frames]


class MovingShapesWorld:
    """Procedural videos; ``sample(index)`` is a pure function of ``(seed, index)``."""

    def __init__(self, resolution: int = 64, num_frames: int = 16, seed: int = 0, motion: str = "bounce",
                 max_objects: int = 3):
        self.resolution = check_resolution(resolution)
        if not isinstance(num_frames, (int, np.integer)) or not 1 <= num_frames <= MAX_FRAMES:
            raise UserError(f"num_frames must be an integer from 1 to {MAX_FRAMES}, got {num_frames!r}")
        if motion not in MOTIONS:
            raise UserError(f"motion must be one of {', '.join(MOTIONS)}, got {motion!r}")
        if not isinstance(max_objects, (int, np.integer)) or not 1 <= max_objects <= 3:
            raise UserError(f"max_objects must be 1, 2 or 3, got {max_objects!r}")
        self.num_frames = int(num_frames)
        self.seed = _check_seed(seed)
        self.motion = motion
        self.max_objects = int(max_objects)

    def _tracks(self, rng: np.random.Generator, shapes: list[str]) -> tuple[list[tuple], list[str] | None]:
        """Per object ``(shape, size, angle, xs, ys)`` with ``xs``/``ys`` of shape (T,): the centre in each frame,
        and the objects' directions (``motion="directions"``) or None.

        Objects start apart and move at constant velocity, bouncing elastically (equal masses) off the walls and off
        each other's bounding circles (plus a small gap), simulated in ``SUBSTEPS`` steps per frame.
        """
        res, n = self.resolution, len(shapes)
        gap = max(2.0, 0.04 * res)
        sizes = rng.uniform(*SIZE_RANGE, size=n) * res
        angles = [0.0 if s == "circle" else rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG) for s in shapes]
        radii = np.array([bounding_radius(s, size) for s, size in zip(shapes, sizes)])
        low, high = radii[:, None] + 1, res - radii[:, None] - 1  # (n, 1) bounds for the centres
        if self.motion == "bounce":
            directions = None
            position = self._place(rng, np.repeat(low, 2, 1), np.repeat(high, 2, 1), radii, gap)
            headings = rng.uniform(0, 2 * math.pi, size=n)
            velocity = rng.uniform(*SPEED_RANGE, size=n)[:, None] * res * np.stack([np.cos(headings),
                                                                                   np.sin(headings)], 1)
        else:
            directions = [list(DIRECTIONS)[i] for i in rng.integers(len(DIRECTIONS), size=n)]
            speed = rng.uniform(*SPEED_RANGE, size=n) * res
            velocity = speed[:, None] * np.array([DIRECTIONS[d] for d in directions], dtype=np.float64)
            # start where DIRECTION_FRAMES frames of travel stay inside the frame, and keep a start from which no
            # object bounces (off a wall or another object) before then; the last try stays if none qualifies
            travel = np.abs(velocity) * DIRECTION_FRAMES
            start_low = low + np.where(velocity < 0, travel, 0.0)
            start_high = np.maximum(high - np.where(velocity > 0, travel, 0.0), start_low)
            check_frames = min(DIRECTION_FRAMES + 1, self.num_frames)
            for _ in range(50):
                position = self._place(rng, start_low, start_high, radii, gap)
                if _simulate(position, velocity, low, high, radii, gap, check_frames)[1] >= check_frames - 1:
                    break
        path, _ = _simulate(position, velocity, low, high, radii, gap, self.num_frames)
        return [(s, sizes[k], angles[k], path[:, k, 0], path[:, k, 1]) for k, s in enumerate(shapes)], directions

    @staticmethod
    def _place(rng: np.random.Generator, low: np.ndarray, high: np.ndarray, radii: np.ndarray,
               gap: float) -> np.ndarray:
        """Start centres (n, 2) drawn in ``[low, high]`` (n, 2), each apart from the ones before it (200 tries)."""
        position = np.empty((len(radii), 2))
        for k in range(len(radii)):
            for _ in range(200):
                position[k] = rng.uniform(low[k], high[k])
                if all(np.hypot(*(position[k] - position[j])) >= radii[k] + radii[j] + gap for j in range(k)):
                    break
        return position


    def sample(self, index: int) -> MovingShapesSample:
        rng = np.random.default_rng([self.seed, 7, _check_seed(index, "index")])
        res = self.resolution
        count = int(rng.integers(1, self.max_objects + 1))
        shapes = [SHAPE_NAMES[i] for i in rng.choice(len(SHAPE_NAMES), size=count, replace=False)]
        colors = [COLOR_NAMES[i] for i in rng.integers(len(COLOR_NAMES), size=count)]
        tracks, directions = self._tracks(rng, shapes)
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
        if directions is None:
            caption = " and ".join(noun_phrase(s, c) for s, c in zip(shapes, colors)) + " moving"
        else:
            caption = motion_caption(list(zip(shapes, colors, directions)))
        return MovingShapesSample(frames, caption, objects, None if directions is None else tuple(directions))


def _simulate(position: np.ndarray, velocity: np.ndarray, low: np.ndarray, high: np.ndarray, radii: np.ndarray,
              gap: float, num_frames: int) -> tuple[np.ndarray, int]:
    """Centres (T, n, 2) of ``num_frames`` frames from ``position`` (n, 2) at ``velocity`` (n, 2) pixels per frame,
    and the first frame whose step changed a velocity (a bounce; ``num_frames`` when none did)."""
    position, velocity = position.copy(), velocity.copy()
    n = len(radii)
    path = np.empty((num_frames, n, 2))
    first_change = num_frames
    for t in range(num_frames):
        path[t] = position
        before = velocity.copy()
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
        if first_change == num_frames and not np.array_equal(before, velocity):
            first_change = t
    return path, first_change


def motion_caption(objects: list[tuple[str, str, str]]) -> str:
    """``[("circle", "red", "right"), ("square", "blue", "up")]`` -> ``"a red circle moving right and a blue square
    moving up"`` (the ``motion="directions"`` captions)."""
    return " and ".join(f"{noun_phrase(shape, color)} moving {direction}" for shape, color, direction in objects)


def parse_motion_caption(caption: str) -> list[tuple[str, str | None, str | None]]:
    """The objects a Moving Shapes caption asks for: ``(shape, colour or None, direction or None)`` each.

    Reads both caption kinds: ``"a red circle moving right and a blue square moving up"`` and ``"a red circle and a
    blue square moving"``; anything else is a :class:`UserError` that shows how to write one.
    """
    words = " ".join(caption.lower().replace(",", " ").split()).rstrip(".").split()
    example = ("write it like 'a red circle moving right' or 'a red circle moving right and a blue square moving "
               f"up' (shapes: {', '.join(SHAPE_NAMES)}; colours: {', '.join(COLOR_NAMES)}; directions: "
               f"{', '.join(DIRECTIONS)})")
    objects: list[tuple[str, str | None, str | None]] = []
    i = 0
    while i < len(words):
        if words[i] not in ("a", "an") or i + 1 >= len(words):
            raise UserError(f"cannot read the video prompt {caption!r}: {example}")
        i += 1
        color = words[i] if words[i] in COLOR_NAMES else None
        i += color is not None
        if i >= len(words) or words[i] not in SHAPE_NAMES:
            raise UserError(f"cannot read the video prompt {caption!r}: {example}")
        shape, direction = words[i], None
        i += 1
        if i < len(words) and words[i] == "moving":
            i += 1
            if i < len(words) and words[i] in DIRECTIONS:
                direction, i = words[i], i + 1
            elif i < len(words):
                raise UserError(f"cannot read the video prompt {caption!r}: {example}")
        objects.append((shape, color, direction))
        if i < len(words):
            if words[i] != "and":
                raise UserError(f"cannot read the video prompt {caption!r}: {example}")
            i += 1
            if i == len(words):
                raise UserError(f"cannot read the video prompt {caption!r}: {example}")
    if not objects:
        raise UserError(f"the video prompt is empty: {example}")
    return objects


class MovingShapesDataset(torch.utils.data.Dataset):
    """``length`` Moving Shapes videos. Item: ``{"video": (T, 3, H, W) float in [-1, 1], "caption": str,
    "index": int}``."""

    def __init__(self, resolution: int = 64, num_frames: int = 16, length: int = 10_000, seed: int = 0,
                 motion: str = "bounce", max_objects: int = 3):
        if length < 1:
            raise UserError(f"dataset length must be >= 1, got {length}")
        self.world = MovingShapesWorld(resolution, num_frames, seed, motion=motion, max_objects=max_objects)
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        sample = self.world.sample(index)
        video = rearrange(torch.from_numpy(sample.frames), "t h w c -> t c h w").float() / 127.5 - 1.0
        return {"video": video, "caption": sample.caption, "index": index}
