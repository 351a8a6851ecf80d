"""The Shapes world: procedural images of coloured shapes with GenEval-style captions and exact annotations.

Each image holds 1-4 flat-coloured, anti-aliased shapes (:data:`SHAPE_NAMES` in the :data:`COLOR_RGB` palette) that
do not touch, on a light, low-contrast textured background. Its caption follows one of GenEval's six tasks
(:data:`TAGS`) and its ``spec`` is the GenEval metadata the image satisfies, so GenEval-style scoring is exact here:

==============  ============================================  ===============================================
tag             caption                                       image
==============  ============================================  ===============================================
single_object   a photo of a circle                           exactly one circle (any colour)
two_object      a photo of a circle and a square              one circle, one square
counting        a photo of three circles                      exactly three circles, nothing else
colors          a photo of a red circle                       one red circle
position        a photo of a circle left of a square          one circle, one square; GenEval's rule holds with
                                                              component >= 0.65 (> 0.5 needed), the other
                                                              relations' components <= 0.35
color_attr      a photo of a red circle and a blue square     one red circle, one blue square
==============  ============================================  ===============================================

Class-conditional label of an image: ``shape_index * len(COLOR_NAMES) + color_index`` of ``objects[0]`` (60 classes,
see :func:`class_label_to_text`). Everything is a pure function of ``(seed, index)``.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from vgen.data.shape_render import (
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    Coverage,
    bounding_radius,
    paint,
    rasterize,
    render_background,
    shape_vertices,
    to_uint8,
)
from vgen.data.shapes_language import (  # noqa: F401 - re-exported: the world's public vocabulary
    COLOR_NAMES,
    COLOR_RGB,
    GENEVAL_RELATION_COMPONENT,
    MAX_OBJECTS,
    NUM_CLASSES,
    NUMBER_WORDS,
    PROMPT_VOCABULARY,
    RELATIONS,
    SHAPE_NAMES,
    SHAPE_PLURALS,
    TAGS,
    caption_to_spec,
    class_label_of,
    class_label_spec,
    class_label_to_shape_color,
    class_label_to_text,
    geneval_relation_components,
    geneval_relations,
    noun_phrase,
    parse_caption,
    relation_strength,
    shapes_geneval_prompts,
    spec_to_caption,
    validate_spec,
    write_shapes_geneval_prompts,
)
from vgen.errors import UserError

# Half-extent of an object as a fraction of the resolution, by number of objects in the image.
SIZE_RANGES = {1: (0.14, 0.30), 2: (0.10, 0.20), 3: (0.09, 0.16), 4: (0.08, 0.14)}
SIZE_RANGE_MANY = (0.07, 0.11)
MAX_TILT_DEG = 15.0
# Position layouts: the asked relation's GenEval component must reach this (checked on the rendered boxes) ...
RELATION_MIN_COMPONENT = 0.65
# ... and every other relation's component stays below this, so the picture shows one relation clearly.
RELATION_MAX_OTHER = 0.35

_STREAM_SAMPLE, _STREAM_CLASS, _STREAM_SPEC = 0, 1, 2


@dataclass
class ShapeObject:
    """One rendered object. ``box`` is ``(x0, y0, x1, y1)`` in pixels (``x1``/``y1`` exclusive), tight around the
    pixels the shape covers at least half; ``center`` is the box centre ``(x, y)``."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    center: tuple[float, float]


@dataclass
class ShapesSample:
    image: Image.Image  # RGB, resolution x resolution
    caption: str
    tag: str
    objects: list[ShapeObject]  # in the order of the spec's include entries (counts expanded)
    class_label: int  # of objects[0]
    spec: dict[str, Any] = field(default_factory=dict)  # GenEval metadata the image satisfies


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, (int, np.integer)) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise UserError(
            f"shapes resolution must be an integer from {MIN_RESOLUTION} to {MAX_RESOLUTION} pixels, "
            f"got {resolution!r}"
        )
    return int(resolution)


def _check_seed(seed: int, what: str = "seed") -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"{what} must be a non-negative integer, got {seed!r}")
    return int(seed)


# ----------------------------------------------------------------------------------------------------------- layout
@dataclass
class _Placed:
    shape: str
    color: str
    center: tuple[float, float]
    size: float
    angle: float
    radius: float

    def vertices(self) -> np.ndarray:
        return shape_vertices(self.shape, self.center, self.size, self.angle)

    def extent_box(self) -> tuple[float, float, float, float]:
        v = self.vertices()
        return (float(v[:, 0].min()), float(v[:, 1].min()), float(v[:, 0].max()), float(v[:, 1].max()))


def _relations_ok(boxes: list, relations: list[tuple[int, str, int]], min_component: float, exclusive: bool) -> bool:
    """Every ``(a, relation, b)`` whose objects both have boxes reaches ``min_component``; with ``exclusive`` the
    other relations' components stay <= ``RELATION_MAX_OTHER`` (one clearly readable relation)."""
    for a, relation, b in relations:
        if a >= len(boxes) or b >= len(boxes):
            continue
        if relation_strength(boxes[a], boxes[b], relation) < min_component:
            return False
        if exclusive and any(
            relation_strength(boxes[a], boxes[b], other) > RELATION_MAX_OTHER
            for other in RELATIONS
            if other != relation
        ):
            return False
    return True


def lay_out(
    rng: np.random.Generator,
    shapes_colors: list[tuple[str, str]],
    relations: list[tuple[int, str, int]],
    resolution: int,
) -> tuple[list[_Placed], list[Coverage]]:
    """Place objects without overlap (a gap of >= 4% of the resolution) so that every ``(a, relation, b)`` holds by
    GenEval's rule with a clear margin on the rendered boxes; return the placements and their coverages.

    A single relation is also made exclusive (the other axis' component <= ``RELATION_MAX_OTHER``), so the world's
    position images show one relation unambiguously; specs with several relations only need each to hold.
    """
    n = len(shapes_colors)
    low, high = SIZE_RANGES.get(n, SIZE_RANGE_MANY)
    gap = max(2.0, 0.04 * resolution)
    exclusive = len(relations) == 1
    for attempt in range(400):
        shrink = 0.9 ** (attempt // 100)  # crowded specs get smaller objects if they keep failing
        placed: list[_Placed] = []
        for shape, color in shapes_colors:
            size = rng.uniform(low, high) * resolution * shrink
            angle = 0.0 if shape == "circle" else rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG)
            radius = bounding_radius(shape, size)
            for _ in range(60):
                center = tuple(rng.uniform(radius + 1, resolution - radius - 1, size=2).tolist())
                if not all(math.dist(center, p.center) >= radius + p.radius + gap for p in placed):
                    continue
                candidate = _Placed(shape, color, center, size, angle, radius)
                # Relations with the objects placed so far are checked at once (on the outline's extent).
                if _relations_ok([p.extent_box() for p in [*placed, candidate]], relations, 0.75, exclusive):
                    placed.append(candidate)
                    break
            else:
                break
        if len(placed) < n:
            continue
        coverages = [rasterize(p.vertices(), resolution, resolution) for p in placed]
        boxes = [c.box() for c in coverages]
        if any(b is None for b in boxes):
            continue
        if not _relations_ok(boxes, relations, RELATION_MIN_COMPONENT, exclusive):
            continue
        return placed, coverages
    raise UserError(
        f"could not lay out {n} object(s) with {len(relations)} position relation(s) at resolution {resolution}; "
        "use fewer objects, a higher resolution or relations that do not contradict each other"
    )


def render_objects(
    rng: np.random.Generator, placed: list[_Placed], coverages: list[Coverage], resolution: int
) -> tuple[Image.Image, list[ShapeObject]]:
    """Background + objects -> RGB image and the objects' annotations."""
    canvas = render_background(rng, resolution, resolution)
    objects = []
    for p, coverage in zip(placed, coverages):
        paint(canvas, coverage, COLOR_RGB[p.color])
        box = coverage.box()
        objects.append(ShapeObject(p.shape, p.color, box, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)))
    return Image.fromarray(to_uint8(canvas), "RGB"), objects


def _render_validated(spec: dict[str, Any], rng: np.random.Generator, resolution: int) -> ShapesSample:
    shapes_colors: list[tuple[str, str]] = []
    first_of_entry = []
    for entry in spec["include"]:
        first_of_entry.append(len(shapes_colors))
        for _ in range(entry["count"]):
            color = entry.get("color") or COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            shapes_colors.append((entry["class"], color))
    relations = []
    for k, entry in enumerate(spec["include"]):
        if "position" in entry:
            relation, target = entry["position"]
            for a in range(first_of_entry[k], first_of_entry[k] + entry["count"]):
                for b in range(first_of_entry[target], first_of_entry[target] + spec["include"][target]["count"]):
                    relations.append((a, relation, b))
    placed, coverages = lay_out(rng, shapes_colors, relations, resolution)
    image, objects = render_objects(rng, placed, coverages, resolution)
    label = class_label_of(objects[0].shape, objects[0].color)
    return ShapesSample(image, spec["prompt"], spec["tag"], objects, label, spec)


def render_spec(spec: dict[str, Any], resolution: int = 64, seed: int = 0) -> ShapesSample:
    """Render an image satisfying a GenEval-format ``spec`` (shape names as classes), e.g. the "real" image for any
    prompt: ``render_spec(caption_to_spec("a photo of two red stars"))``. Deterministic in (spec, seed);
    classes or colours the world does not have, or impossible layouts, raise :class:`UserError`."""
    resolution = check_resolution(resolution)
    spec = validate_spec(spec)
    spec_key = zlib.crc32(json.dumps(spec, sort_keys=True).encode())
    rng = np.random.default_rng([_check_seed(seed), _STREAM_SPEC, spec_key])
    return _render_validated(spec, rng, resolution)


# ----------------------------------------------------------------------------------------------------------- world
def _pick(rng: np.random.Generator, options, k: int = 1) -> list:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def random_spec(rng: np.random.Generator, tag: str) -> dict[str, Any]:
    """A random spec of the given tag (objects named in it are the only objects in the image)."""
    if tag == "single_object":
        include = [{"class": _pick(rng, SHAPE_NAMES)[0], "count": 1}]
    elif tag == "two_object":
        a, b = _pick(rng, SHAPE_NAMES, 2)
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
    elif tag == "counting":
        shape, count = _pick(rng, SHAPE_NAMES)[0], int(rng.integers(2, 5))
        spec = {"tag": tag, "include": [{"class": shape, "count": count}]}
        spec["exclude"] = [{"class": shape, "count": count + 1}]
        spec["prompt"] = spec_to_caption(spec)
        return spec
    elif tag == "colors":
        include = [{"class": _pick(rng, SHAPE_NAMES)[0], "count": 1, "color": _pick(rng, COLOR_NAMES)[0]}]
    elif tag == "position":
        a, b = _pick(rng, SHAPE_NAMES, 2)
        relation = _pick(rng, RELATIONS)[0]
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]
    elif tag == "color_attr":
        a, b = _pick(rng, SHAPE_NAMES, 2)
        c, d = _pick(rng, COLOR_NAMES, 2)
        include = [{"class": a, "count": 1, "color": c}, {"class": b, "count": 1, "color": d}]
    else:
        raise UserError(f"unknown shapes tag {tag!r}; use one of: {', '.join(TAGS)}")
    spec = {"tag": tag, "include": include}
    spec["prompt"] = spec_to_caption(spec)
    return spec


def _tag_probabilities(tag_weights: dict[str, float] | None) -> np.ndarray:
    if tag_weights is None:
        return np.full(len(TAGS), 1.0 / len(TAGS))
    unknown = sorted(set(tag_weights) - set(TAGS))
    if unknown:
        raise UserError(f"unknown shapes tag(s) {', '.join(unknown)} in tag weights; use: {', '.join(TAGS)}")
    weights = np.array([float(tag_weights.get(t, 0.0)) for t in TAGS])
    if (weights < 0).any() or weights.sum() <= 0:
        raise UserError("shapes tag weights must be >= 0 with a positive sum, e.g. {'counting': 1.0}")
    return weights / weights.sum()


class ShapesWorld:
    """Procedural Shapes images; ``sample(index)`` is a pure function of ``(seed, index)``.

    ``tag_weights`` maps tags to relative frequencies (default: the six tags equally often).
    """

    def __init__(self, resolution: int = 64, seed: int = 0, tag_weights: dict[str, float] | None = None):
        self.resolution = check_resolution(resolution)
        self.seed = _check_seed(seed)
        self.tag_probabilities = _tag_probabilities(tag_weights)

    def sample(self, index: int) -> ShapesSample:
        rng = np.random.default_rng([self.seed, _STREAM_SAMPLE, _check_seed(index, "index")])
        tag = TAGS[int(rng.choice(len(TAGS), p=self.tag_probabilities))]
        return _render_validated(validate_spec(random_spec(rng, tag)), rng, self.resolution)

    def sample_class(self, label: int, index: int) -> ShapesSample:
        """One object of class ``label`` (a ``colors`` image), deterministic in (seed, label, index)."""
        spec = class_label_spec(label)
        rng = np.random.default_rng([self.seed, _STREAM_CLASS, int(label), _check_seed(index, "index")])
        return _render_validated(validate_spec(spec), rng, self.resolution)

    def render_spec(self, spec: dict[str, Any], index: int = 0) -> ShapesSample:
        """:func:`render_spec` at this world's resolution, seeded by (world seed, index)."""
        return render_spec(spec, self.resolution, seed=self.seed * 1_000_003 + _check_seed(index, "index"))


def pil_to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    from vgen.imaging import pil_to_tensor

    return pil_to_tensor(image, value_range=(-1.0, 1.0))


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` Shapes images as training items.

    Item: ``{"image": (3, H, W) float in [-1, 1], "caption": str, "class_label": int, "index": int}``. With
    ``class_conditional=True`` item ``i`` is ``world.sample_class(i % 60, i)``, so the 60 classes are balanced.
    """

    def __init__(
        self,
        resolution: int = 64,
        length: int = 10_000,
        seed: int = 0,
        tag_weights: dict[str, float] | None = None,
        class_conditional: bool = False,
    ):
        if length < 1:
            raise UserError(f"dataset length must be >= 1, got {length}")
        self.world = ShapesWorld(resolution, seed, tag_weights)
        self.length = int(length)
        self.class_conditional = class_conditional

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        if self.class_conditional:
            sample = self.world.sample_class(index % NUM_CLASSES, index)
        else:
            sample = self.world.sample(index)
        return {
            "image": pil_to_unit_tensor(sample.image),
            "caption": sample.caption,
            "class_label": sample.class_label,
            "index": index,
        }
