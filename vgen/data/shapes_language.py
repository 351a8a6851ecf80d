"""The Shapes world's language: vocabulary, GenEval-style captions and metadata ("specs"), and the prompt file.

A spec is GenEval's metadata format with shape names as classes::

    {"tag": "position",
     "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a circle left of a square"}

``include`` entries may carry ``"color"``; ``"position": [relation, k]`` means every object of this entry stands in
``relation`` to every object of entry ``k``; ``exclude`` entries forbid ``count`` or more objects of a class (counting
prompts exclude ``n + 1``, as in GenEval's official file).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vgen.errors import UserError

SHAPE_NAMES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SHAPE_PLURALS = {name: name + "s" for name in SHAPE_NAMES}
# GenEval's ten colour names.
COLOR_NAMES = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# Canonical palette: pairwise RGB distances >= 90 and >= 55 from every background pixel.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "orange": (250, 135, 10),
    "yellow": (245, 225, 30),
    "green": (35, 160, 55),
    "blue": (30, 80, 215),
    "purple": (125, 45, 175),
    "pink": (250, 110, 185),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
# Every word a Shapes caption can contain ("moving" ends the moving-shapes captions); text encoders build their
# vocabulary from this.
PROMPT_VOCABULARY: tuple[str, ...] = (
    ("a", "an", "photo", "of", "and", "left", "right", "above", "below", "moving")
    + SHAPE_NAMES
    + tuple(SHAPE_PLURALS.values())
    + COLOR_NAMES
    + tuple(NUMBER_WORDS.values())
)
MAX_OBJECTS = 8
NUM_CLASSES = len(SHAPE_NAMES) * len(COLOR_NAMES)

# GenEval: a relation holds when the box-centre offset, shrunk by 0.1 x (sum of the two boxes' sizes) and divided by
# the length of the raw offset, has a component beyond 0.5 in that direction.
GENEVAL_POSITION_THRESHOLD = 0.1
GENEVAL_RELATION_COMPONENT = 0.5

_PROMPTS_FILE = "shapes_geneval_prompts.jsonl"
PROMPTS_SEED = 0
# GenEval's official number of prompts per tag (553 in all).
GENEVAL_TAG_COUNTS = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}


# ----------------------------------------------------------------------------------------------------------- classes
def class_label_of(shape: str, color: str) -> int:
    """Class-conditional label: ``shape_index * len(COLOR_NAMES) + color_index`` (60 classes)."""
    return SHAPE_NAMES.index(shape) * len(COLOR_NAMES) + COLOR_NAMES.index(color)


def class_label_to_shape_color(label: int) -> tuple[str, str]:
    if not 0 <= int(label) < NUM_CLASSES:
        raise UserError(f"class label {label} is out of range: the shapes world has labels 0..{NUM_CLASSES - 1}")
    shape_index, color_index = divmod(int(label), len(COLOR_NAMES))
    return SHAPE_NAMES[shape_index], COLOR_NAMES[color_index]


def class_label_to_text(label: int) -> str:
    """``23`` -> ``"a photo of a green triangle"`` (the caption of a ``colors`` image of that class)."""
    shape, color = class_label_to_shape_color(label)
    return f"a photo of {noun_phrase(shape, color)}"


def class_label_spec(label: int) -> dict[str, Any]:
    """GenEval-format spec of one object of class ``label`` (tag ``colors``)."""
    shape, color = class_label_to_shape_color(label)
    return {
        "tag": "colors",
        "include": [{"class": shape, "count": 1, "color": color}],
        "prompt": class_label_to_text(label),
    }


# ----------------------------------------------------------------------------------------------------------- captions
def noun_phrase(shape: str, color: str | None = None) -> str:
    """``("circle", "orange")`` -> ``"an orange circle"``."""
    words = f"{color} {shape}" if color else shape
    return ("an " if words[0] in "aeiou" else "a ") + words


def spec_to_caption(spec: dict[str, Any]) -> str:
    """GenEval-style caption of a validated spec (as GenEval's own prompts phrase each tag)."""
    include = spec["include"]

    def phrase(entry: dict[str, Any]) -> str:
        count = int(entry.get("count", 1))
        if count == 1:
            return noun_phrase(entry["class"], entry.get("color"))
        number = NUMBER_WORDS.get(count, str(count))
        color = f"{entry['color']} " if entry.get("color") else ""
        return f"{number} {color}{SHAPE_PLURALS[entry['class']]}"

    parts = []
    for entry in include:
        if "position" in entry:
            relation, target = entry["position"]
            parts.append(f"{phrase(entry)} {relation} {phrase(include[target])}")
    related = {k for k, e in enumerate(include) if "position" in e} | {
        e["position"][1] for e in include if "position" in e
    }
    parts += [phrase(entry) for k, entry in enumerate(include) if k not in related]
    return "a photo of " + " and ".join(parts)


def _parse_noun_phrase(words: list[str], caption: str) -> tuple[dict[str, Any], list[str]]:
    if len(words) < 2 or words[0] not in ("a", "an"):
        raise _grammar_error(caption)
    color = None
    rest = words[1:]
    if rest[0] in COLOR_NAMES:
        color, rest = rest[0], rest[1:]
    if not rest or rest[0] not in SHAPE_NAMES:
        raise _grammar_error(caption)
    entry: dict[str, Any] = {"class": rest[0], "count": 1}
    if color:
        entry["color"] = color
    return entry, rest[1:]


def _grammar_error(caption: str) -> UserError:
    return UserError(
        f"cannot read prompt {caption!r} for the shapes world; write it like GenEval: 'a photo of a red circle', "
        "'a photo of a circle and a square', 'a photo of three stars', 'a photo of a star left of a square' "
        f"(shapes: {', '.join(SHAPE_NAMES)}; colours: {', '.join(COLOR_NAMES)}; relations: {', '.join(RELATIONS)})"
    )


def caption_to_spec(caption: str) -> dict[str, Any]:
    """Parse a GenEval-style Shapes prompt into its spec; a prompt outside the grammar is a :class:`UserError`.

    Accepted: ``a photo of NP``, ``a photo of NP and NP``, ``a photo of NP RELATION NP``, ``a photo of NUMBER
    [COLOR] PLURAL`` with ``NP = a|an [COLOR] SHAPE``.
    """
    text = " ".join(caption.lower().replace(",", " ").split()).rstrip(".").strip()
    words = text.split()
    unknown = sorted({w for w in words if w not in PROMPT_VOCABULARY})
    if unknown:
        raise UserError(
            f"prompt {caption!r} has word(s) the shapes world does not know: {', '.join(unknown)}; "
            f"known words: {' '.join(PROMPT_VOCABULARY)}"
        )
    if words[:3] != ["a", "photo", "of"] or len(words) < 4:
        raise _grammar_error(caption)
    rest = words[3:]
    numbers = {word: n for n, word in NUMBER_WORDS.items()}
    if rest[0] in numbers:
        count = numbers[rest[0]]
        color = rest[1] if len(rest) == 3 and rest[1] in COLOR_NAMES else None
        plural = rest[-1]
        shapes = {p: s for s, p in SHAPE_PLURALS.items()}
        if len(rest) != (3 if color else 2) or plural not in shapes:
            raise _grammar_error(caption)
        entry: dict[str, Any] = {"class": shapes[plural], "count": count}
        if color:
            entry["color"] = color
        return {
            "tag": "counting",
            "include": [entry],
            "exclude": [{"class": shapes[plural], "count": count + 1}],
            "prompt": text,
        }
    first, rest = _parse_noun_phrase(rest, caption)
    if not rest:
        return {"tag": "colors" if "color" in first else "single_object", "include": [first], "prompt": text}
    if rest[0] == "and":
        second, tail = _parse_noun_phrase(rest[1:], caption)
        if tail:
            raise _grammar_error(caption)
        tag = "color_attr" if ("color" in first or "color" in second) else "two_object"
        return {"tag": tag, "include": [first, second], "prompt": text}
    for relation in RELATIONS:
        relation_words = relation.split()
        if rest[: len(relation_words)] == relation_words:
            target, tail = _parse_noun_phrase(rest[len(relation_words) :], caption)
            if tail:
                raise _grammar_error(caption)
            first["position"] = [relation, 0]
            return {"tag": "position", "include": [target, first], "prompt": text}
    raise _grammar_error(caption)


parse_caption = caption_to_spec


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check a spec against the world (known classes and colours, counts, relations); return it normalised."""
    if not isinstance(spec, dict) or not isinstance(spec.get("include"), list) or not spec["include"]:
        raise UserError("a spec must be a mapping with a non-empty 'include' list (GenEval metadata format)")
    include = []
    for k, raw in enumerate(spec["include"]):
        if not isinstance(raw, dict) or "class" not in raw:
            raise UserError(f"spec include[{k}] must be a mapping with a 'class'")
        entry = dict(raw)
        if entry["class"] not in SHAPE_NAMES:
            raise UserError(
                f"class {entry['class']!r} is not in the shapes world; use one of: {', '.join(SHAPE_NAMES)}"
            )
        try:
            entry["count"] = int(entry.get("count", 1))
        except (TypeError, ValueError) as err:
            raise UserError(f"spec include[{k}] count must be an integer, got {entry.get('count')!r}") from err
        if entry["count"] < 1:
            raise UserError(f"spec include[{k}] count must be >= 1, got {entry['count']}")
        if "color" in entry and entry["color"] not in COLOR_NAMES:
            raise UserError(
                f"colour {entry['color']!r} is not in the shapes world; use one of: {', '.join(COLOR_NAMES)}"
            )
        if "position" in entry:
            position = entry["position"]
            if (
                not isinstance(position, (list, tuple))
                or len(position) != 2
                or position[0] not in RELATIONS
                or not isinstance(position[1], int)
                or not 0 <= position[1] < len(spec["include"])
                or position[1] == k
            ):
                raise UserError(
                    f"spec include[{k}] position must be [relation, index of another include entry] with relation "
                    f"one of {', '.join(RELATIONS)}; got {position!r}"
                )
            entry["position"] = [position[0], int(position[1])]
        include.append(entry)
    total = sum(e["count"] for e in include)
    if total > MAX_OBJECTS:
        raise UserError(f"a shapes image holds at most {MAX_OBJECTS} objects; this spec asks for {total}")
    exclude = [dict(e) for e in spec.get("exclude", [])]
    for entry in exclude:
        wanted = sum(e["count"] for e in include if e["class"] == entry.get("class"))
        if wanted >= int(entry.get("count", 1)):
            raise UserError(
                f"spec contradicts itself: it includes {wanted} {entry.get('class')}(s) but excludes "
                f"{entry.get('count', 1)} or more"
            )
    out = {"tag": spec.get("tag") or _infer_tag(include), "include": include}
    if exclude:
        out["exclude"] = exclude
    out["prompt"] = spec.get("prompt") or spec_to_caption(out)
    return out


def _infer_tag(include: list[dict[str, Any]]) -> str:
    if any("position" in e for e in include):
        return "position"
    if len(include) == 1:
        if include[0]["count"] > 1:
            return "counting"
        return "colors" if "color" in include[0] else "single_object"
    return "color_attr" if any("color" in e for e in include) else "two_object"


# ----------------------------------------------------------------------------------------------------------- GenEval rule
def geneval_relation_components(
    box_a, box_b, position_threshold: float = GENEVAL_POSITION_THRESHOLD, dtype=np.float64
) -> tuple[float, float]:
    """GenEval's normalised, margin-shrunk offset of box A's centre from box B's centre: ``(dx, dy)``.

    Boxes are ``(x0, y0, x1, y1)``. Per axis ``revised = max(|dc| - t * (dim_a + dim_b), 0) * sign(dc)`` with
    ``dc = centre_a - centre_b`` and ``t = position_threshold``; ``(0, 0)`` (no relation) when every component of
    ``revised`` is below 1e-3, else ``revised / ||dc||``. ``dx < -0.5`` means "A left of B", ``dx > 0.5`` "right of",
    ``dy < -0.5`` "above", ``dy > 0.5`` "below" (image y points down). The one implementation of the rule: the
    Shapes world places objects with it (float64) and ``vgen.eval.geneval`` scores with it in float32, the official
    code's arithmetic (its boxes are the detector's float32 rows), with the official code's numpy expressions.
    """
    boxes = np.array([list(box_a[:4]), list(box_b[:4])], dtype=dtype).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return 0.0, 0.0
    dx, dy = revised / np.linalg.norm(offset)
    return float(dx), float(dy)


def relation_strength(box_a, box_b, relation: str) -> float:
    """The GenEval component for ``relation`` of A relative to B (the relation holds when it exceeds 0.5)."""
    dx, dy = geneval_relation_components(box_a, box_b)
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]


def geneval_relations(box_a, box_b) -> set[str]:
    """The set of relations of A relative to B by GenEval's rule."""
    return {r for r in RELATIONS if relation_strength(box_a, box_b, r) > GENEVAL_RELATION_COMPONENT}


# ----------------------------------------------------------------------------------------------------------- prompt file
def _balanced(rng: np.random.Generator, items: list, n: int) -> list:
    """``n`` items drawn as whole shuffled passes over ``items`` (each appears floor or ceil of n / len times)."""
    out: list = []
    while len(out) < n:
        out += [items[i] for i in rng.permutation(len(items))]
    return out[:n]


def generate_shapes_geneval_prompts(seed: int = PROMPTS_SEED) -> list[dict[str, Any]]:
    """Shapes-GenEval prompts in GenEval's metadata format and tag proportions (553 prompts)."""
    rng = np.random.default_rng([seed, 553])
    pairs = [(a, b) for a in SHAPE_NAMES for b in SHAPE_NAMES if a != b]
    prompts: list[dict[str, Any]] = []
    for shape in _balanced(rng, list(SHAPE_NAMES), GENEVAL_TAG_COUNTS["single_object"]):
        prompts.append({"tag": "single_object", "include": [{"class": shape, "count": 1}]})
    for a, b in _balanced(rng, pairs, GENEVAL_TAG_COUNTS["two_object"]):
        prompts.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}]})
    counting = [(shape, n) for shape in SHAPE_NAMES for n in NUMBER_WORDS]
    for shape, n in _balanced(rng, counting, GENEVAL_TAG_COUNTS["counting"]):
        prompts.append(
            {
                "tag": "counting",
                "include": [{"class": shape, "count": n}],
                "exclude": [{"class": shape, "count": n + 1}],
            }
        )
    classes = [(shape, color) for shape in SHAPE_NAMES for color in COLOR_NAMES]
    for shape, color in _balanced(rng, classes, GENEVAL_TAG_COUNTS["colors"]):
        prompts.append({"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}]})
    positions = [(a, b, r) for a, b in pairs for r in RELATIONS]
    for a, b, relation in _balanced(rng, positions, GENEVAL_TAG_COUNTS["position"]):
        # "a photo of an A <relation> a B": B is the reference (entry 0), A carries the relation.
        prompts.append(
            {
                "tag": "position",
                "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
            }
        )
    color_pairs = [(c, d) for c in COLOR_NAMES for d in COLOR_NAMES if c != d]
    for _ in range(GENEVAL_TAG_COUNTS["color_attr"]):
        a, b = pairs[int(rng.integers(len(pairs)))]
        c, d = color_pairs[int(rng.integers(len(color_pairs)))]
        prompts.append(
            {
                "tag": "color_attr",
                "include": [{"class": a, "count": 1, "color": c}, {"class": b, "count": 1, "color": d}],
            }
        )
    for prompt in prompts:
        prompt["prompt"] = spec_to_caption(prompt)
    return prompts


def write_shapes_geneval_prompts(path: str | Path, seed: int = PROMPTS_SEED) -> Path:
    """Write the Shapes-GenEval prompt file (JSON lines, GenEval metadata format). The packaged file is
    ``write_shapes_geneval_prompts("vgen/data/shapes_geneval_prompts.jsonl", seed=0)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(p) for p in generate_shapes_geneval_prompts(seed)]
    path.write_text("\n".join(lines) + "\n")
    return path


def shapes_geneval_prompts() -> list[dict[str, Any]]:
    """The packaged Shapes-GenEval prompts (553, GenEval's tag proportions and metadata format)."""
    text = resources.files("vgen.data").joinpath(_PROMPTS_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
