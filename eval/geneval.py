"""GenEval scoring: the official six-task rules over a pluggable detector.

GenEval (Ghosh et al., 2023; github.com/djghosh13/geneval) checks each generated image against a structured
prompt (``tag``, ``include`` clauses with class / count / colour / position, optional ``exclude`` clauses). This
module re-implements the official rules (``evaluation/evaluate_images.py`` and ``summary_scores.py``):

* detections above ``threshold`` (0.3; 0.9 for the ``counting`` tag) are kept, sorted by score, at most
  ``max_objects`` (16) per class; optional per-class NMS at ``max_overlap`` (1.0 = off);
* an ``include`` clause takes the ``count`` most confident detections of its class and fails if there are fewer;
  a colour requirement needs ``count`` of them classified as that colour; a position requirement (checked only if
  the clause matched so far) needs every found object to stand in the relation to every object of the target
  clause (:func:`relative_position`);
* an ``exclude`` clause fails when the class has ``>= count`` detections, so counting is exact;
* a task score is the mean correctness over the images of that tag; the overall score is the unweighted mean of the
  task scores. The share of correct images and of prompts with at least one correct image are reported too.

Detectors plug in through :class:`Detector` (``detect(image) -> list[Detection]``). A detector may fill in
``Detection.color`` itself (the exact Shapes detector does); otherwise a :class:`ColorClassifier` is applied to
the detections an include clause looks at, as the official code applies CLIP to masked crops.

Plugging in the official Mask2Former + CLIP pair (needs mmdet 2.x, mmcv-full 1.7, open_clip and their weights; they
cannot be downloaded by vgen). Write a module with a factory and pass ``--detector mymodule:make_detector``::

    # mymodule.py
    import numpy as np
    from mmdet.apis import inference_detector, init_detector
    from vgen.eval.geneval import Detection, OFFICIAL_CLASS_NAMES

    class Mask2FormerDetector:
        def __init__(self, config, checkpoint):
            self.model = init_detector(config, checkpoint, device="cuda")

        def detect(self, image):
            bbox, segm = inference_detector(self.model, np.asarray(image)[..., ::-1])  # mmdet wants BGR
            return [
                Detection(box=tuple(row[:4]), label=name, score=float(row[4]), mask=np.asarray(segm[c][i]))
                for c, name in enumerate(OFFICIAL_CLASS_NAMES) for i, row in enumerate(bbox[c])
            ]

    def make_detector():
        return Mask2FormerDetector("mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py",
                                   "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth")

and a colour classifier (``--color-classifier mymodule:make_clip``) whose ``classify(image, detections, class_name)``
composites each detection's mask over a ``#999`` grey image, crops the box, and returns the argmax over
:data:`COLORS` of open_clip ViT-L-14 zero-shot scores with the templates ``"a photo of a {c} {cls}"``,
``"a photo of a {c}-colored {cls}"`` and ``"a photo of a {c} object"``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps

from vgen.data.shapes_language import geneval_relation_components
from vgen.errors import UserError, excerpt

# The ten colour names of GenEval, in the official order (ties in a classifier's argmax resolve to the first).
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

OFFICIAL_METADATA_PATH = Path(__file__).with_name("geneval_official_metadata.jsonl")
# The 80 class names of the official detector (COCO's, with "computer mouse", "tv remote", "computer keyboard").
OFFICIAL_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


@dataclass
class Detection:
    """One detected object.

    box: (x0, y0, x1, y1) in pixels, image y pointing down. label: class name. score: confidence in [0, 1].
    mask: optional bool array [H, W] of the instance. color: one of :data:`COLORS` when the detector knows it.
    """

    box: tuple[float, float, float, float]
    label: str
    score: float
    mask: np.ndarray | None = None
    color: str | None = None


@runtime_checkable
class Detector(Protocol):
    """Finds objects in an RGB image: ``detect(image) -> list[Detection]`` (any order, any score)."""

    def detect(self, image: Image.Image) -> list[Detection]: ...


@runtime_checkable
class ColorClassifier(Protocol):
    """Names the colour of detections: ``classify(image, detections, class_name) -> list[str]`` (one of COLORS each)."""

    def classify(self, image: Image.Image, detections: Sequence[Detection], class_name: str) -> list[str]: ...


@dataclass(frozen=True)
class GenEvalConfig:
    """The official evaluator's ``--options`` with their defaults (``vgen eval geneval --threshold`` ...)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # per-class NMS IoU; 1.0 keeps every box
    position_threshold: float = 0.1

    def __post_init__(self):
        for name in ("threshold", "counting_threshold", "max_overlap"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
                raise UserError(f"{name} must be a number from 0 to 1, got {value!r}")
        if not (isinstance(self.max_objects, int) and self.max_objects >= 1):
            raise UserError(f"max_objects must be an integer >= 1, got {self.max_objects!r}")
        if not (isinstance(self.position_threshold, (int, float)) and math.isfinite(self.position_threshold)
                and self.position_threshold >= 0):
            raise UserError(f"position_threshold must be a finite number >= 0, got {self.position_threshold!r}")


# ----------------------------------------------------------------------------------------------- detection filtering


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with the official inclusive-pixel convention (width = x1 - x0 + 1), in the boxes' own arithmetic (float32
    when they are the detector's float32 rows, as in the official code)."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])))
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def group_detections(
    detections: Iterable[Detection], tag: str, config: GenEvalConfig = GenEvalConfig()
) -> dict[str, list[Detection]]:
    """The official detection filter, step for step: per class, order the detections by ``np.argsort`` of their
    float32 scores reversed (so tied scores come in the official order, not the detector's), keep those with score >
    threshold (``counting_threshold`` for tag "counting"; compared in float32, so a float32 0.3 is dropped at 0.3),
    at most ``max_objects``, then greedy NMS in float32 if ``max_overlap < 1``. Returns {class name: [Detection,
    ...]}, most confident first; classes with no surviving detection are absent."""
    threshold = config.counting_threshold if tag == "counting" else config.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    grouped = {}
    for name, dets in by_class.items():
        scores = np.array([det.score for det in dets], dtype=np.float32)
        boxes = np.array([list(det.box[:4]) for det in dets], dtype=np.float32)
        ordering = np.argsort(scores)[::-1]
        ordering = ordering[scores[ordering] > threshold][: config.max_objects].tolist()
        kept: list[Detection] = []
        while ordering:
            best = ordering.pop(0)
            kept.append(dets[best])
            ordering = [i for i in ordering
                        if config.max_overlap == 1 or box_iou(boxes[best], boxes[i]) < config.max_overlap]
        if kept:
            grouped[name] = kept
    return grouped


# ------------------------------------------------------------------------------------------------------ the rules


def relative_position(box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = 0.1) -> set[str]:
    """Relations of A relative to B from box centres, discounting ``position_threshold`` of the summed box sizes
    (GenEval's rule, :func:`vgen.data.shapes_language.geneval_relation_components`, in float32 as the official code
    computes it): "left of" if dx < -0.5, "right of" if dx > 0.5, "above" if dy < -0.5, "below" if dy > 0.5; empty
    when the boxes are too close."""
    dx, dy = geneval_relation_components(box_a, box_b, position_threshold, dtype=np.float32)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _colors_of(
    found: list[Detection], image: Image.Image | None, class_name: str, color_classifier: ColorClassifier | None
) -> list[str]:
    if all(det.color is not None for det in found):
        return [det.color for det in found]
    if color_classifier is None:
        raise UserError(
            "this prompt needs object colours but the detector gives none: pass a colour classifier "
            "(--color-classifier module:factory) or use a detector that fills Detection.color"
        )
    return list(color_classifier.classify(image, found, class_name))


def check_metadata(
    grouped: dict[str, list[Detection]],
    metadata: dict,
    image: Image.Image | None = None,
    color_classifier: ColorClassifier | None = None,
    config: GenEvalConfig = GenEvalConfig(),
) -> tuple[bool, str]:
    """Apply the official rules for one image. ``grouped`` comes from :func:`group_detections`.

    Include clauses combine with AND, exclude clauses with OR; colour and position look only at the ``count`` most
    confident detections of a class. Returns (correct, reason) where reason lists every failed check, one a line.
    """
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = grouped.get(name, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = _colors_of(found, image, name, color_classifier)
                if colors.count(req["color"]) < count:
                    matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and {seen}")
            if "position" in req and matched:
                relation, target = req["position"]
                targets = matched_groups[target]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for target_obj in targets:
                            rels = relative_position(obj.box, target_obj.box, config.position_threshold)
                            if relation not in rels:
                                matched = False
                                reasons.append(f"expected {name} {relation} target, found {' and '.join(rels)} target")
                                break
                        if not matched:
                            break
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], req["count"]
        if len(grouped.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(grouped[name])}")
    return correct, "\n".join(reasons)


# -------------------------------------------------------------------------------------------------------- metadata


def validate_metadata(entries: list[dict], source: str = "metadata") -> list[dict]:
    """Check the GenEval format (tag, prompt, include[class, count, color?, position?], exclude?) and return entries."""
    for line, entry in enumerate(entries, 1):
        where = f"{source} line {line}"
        if not isinstance(entry, dict) or not isinstance(entry.get("include"), list) or "tag" not in entry:
            raise UserError(f"{where}: expected a JSON object with 'tag', 'prompt' and an 'include' list")
        if entry["tag"] not in TASKS:
            raise UserError(f"{where}: unknown tag {excerpt(str(entry['tag']), 40)}; GenEval's tasks are "
                            f"{', '.join(TASKS)}")
        for k, req in enumerate(entry["include"]):
            if not isinstance(req, dict) or "class" not in req or not isinstance(req.get("count"), int):
                raise UserError(f"{where}: include clause {k} needs 'class' and an integer 'count'")
            if "color" in req and req["color"] not in COLORS:
                raise UserError(f"{where}: colour {req['color']!r} is not one of {', '.join(COLORS)}")
            if "position" in req:
                pos = req["position"]
                if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)
                        and 0 <= pos[1] < k):  # fmt: skip
                    raise UserError(f"{where}: position must be [relation, index of an earlier include clause]")
        for req in entry.get("exclude", []):
            if not isinstance(req, dict) or "class" not in req or not isinstance(req.get("count"), int):
                raise UserError(f"{where}: exclude clauses need 'class' and an integer 'count'")
    return entries


def read_jsonl(path: Path) -> list[dict]:
    """The JSON values of a JSON Lines file, one per non-blank line; a :class:`UserError` for text that is not."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; it must hold one JSON object per line") from None
    entries = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {line_no} is not valid JSON ({err.msg}); fix or remove it") from None
    return entries


def load_metadata(name_or_path: str | Path) -> list[dict]:
    """Prompt set by name or path: "geneval" = the official 553 prompts (shipped with vgen, MIT licence), "shapes" =
    the Shapes-GenEval prompts (``vgen.data.shapes.shapes_geneval_prompts()``), or a GenEval-format JSONL file."""
    if str(name_or_path) == "geneval":
        return validate_metadata(read_jsonl(OFFICIAL_METADATA_PATH), "official GenEval metadata")
    if str(name_or_path) == "shapes":
        from vgen.data.shapes import shapes_geneval_prompts

        return validate_metadata([dict(p) for p in shapes_geneval_prompts()], "Shapes-GenEval prompts")
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"metadata {str(name_or_path)!r} is neither 'geneval', 'shapes' nor an existing JSONL file")
    entries = read_jsonl(path)
    if not entries:
        raise UserError(f"{path} holds no prompts; give one GenEval-format JSON object per line")
    return validate_metadata(entries, str(path))


# ------------------------------------------------------------------------------------------- folders and plug-ins


def prompt_folder(root: str | Path, prompt_index: int) -> Path:
    """GenEval layout: ``root/00042/`` holds ``metadata.jsonl`` (the prompt's line) and ``samples/0000.png`` ..."""
    return Path(root) / f"{prompt_index:05d}"


def sample_path(root: str | Path, prompt_index: int, sample_index: int) -> Path:
    return prompt_folder(root, prompt_index) / "samples" / f"{sample_index:04d}.png"


def write_prompt_metadata(root: str | Path, prompt_index: int, metadata: dict) -> Path:
    folder = prompt_folder(root, prompt_index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    return folder


def list_geneval_images(
    root: str | Path, max_prompts: int | None = None, max_samples: int | None = None
) -> list[tuple[dict, Path]]:
    """(metadata, image path) for every ``\\d+.png`` under the digit-named prompt folders of ``root``, sorted;
    optionally only prompt folders numbered below ``max_prompts`` and samples numbered below ``max_samples``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"image folder {root} does not exist; give a folder in GenEval layout (00000/samples/0000.png)"
        )
    items = []
    without_images = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    for folder in [f for f in folders if max_prompts is None or int(f.name) < max_prompts]:
        meta_file = folder / "metadata.jsonl"
        if not meta_file.is_file():
            raise UserError(f"{folder} has no metadata.jsonl; each prompt folder needs its prompt's GenEval line")
        entries = read_jsonl(meta_file)
        if not entries:
            raise UserError(f"{meta_file} is empty; it needs the prompt's GenEval line (tag, prompt, include)")
        metadata = validate_metadata(entries[:1], str(meta_file))[0]
        samples = folder / "samples"
        names = (
            sorted(p.name for p in samples.iterdir() if re.fullmatch(r"\d+\.png", p.name)) if samples.is_dir() else []
        )
        names = [n for n in names if max_samples is None or int(n[:-4]) < max_samples]
        if not names:
            without_images.append(folder.name)
        items.extend((metadata, samples / name) for name in names)
    if not items:
        raise UserError(f"no images found under {root}: expected 00000/metadata.jsonl and 00000/samples/0000.png ...")
    if without_images:
        shown = ", ".join(without_images[:5]) + (" ..." if len(without_images) > 5 else "")
        warnings.warn(f"{len(without_images)} prompt folder(s) of {root} have no images and are not scored: {shown}",
                      stacklevel=2)
    return items


def check_detector_classes(detector: Detector, metadata: Iterable[dict]) -> None:
    """Every class the prompts name must be one the detector finds (when it says which, as ``class_names``): a prompt
    about a class it cannot see would score 0 without a word."""
    known = getattr(detector, "class_names", None)
    if known is None:
        return
    named = {req["class"] for entry in metadata for req in [*entry.get("include", []), *entry.get("exclude", [])]}
    unknown = sorted(named - set(known))
    if unknown:
        more_unknown, more_known = " ..." if len(unknown) > 8 else "", " ..." if len(known) > 10 else ""
        raise UserError(
            f"the prompts name class(es) the detector does not know: {', '.join(map(repr, unknown[:8]))}{more_unknown}"
            f"; it finds {', '.join(known[:10])}{more_known} (pass --detector for these prompts, e.g. the official "
            "Mask2Former recipe in vgen.eval.geneval)"
        )


def load_plugin(spec: str, what: str = "detector"):
    """Build an object from ``"package.module:factory"`` (the factory is called with no arguments)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{what} {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"cannot import {module_name!r} for the {what} ({err}); check it is on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{module_name} has no callable {attr!r} to build the {what}")
    return factory()


def build_detector(spec: str) -> Detector:
    """ "shapes" = the exact Shapes-world detector; otherwise ``module:factory`` returning a :class:`Detector`."""
    if spec == "shapes":
        from vgen.eval.shapes_detector import ShapesDetector

        return ShapesDetector()
    detector = load_plugin(spec, "detector")
    if not isinstance(detector, Detector):
        raise UserError(f"{spec} built a {type(detector).__name__} without a detect(image) method")
    return detector


# ---------------------------------------------------------------------------------------------------- evaluation


@dataclass
class ImageResult:
    """The verdict on one image (the fields of the official results.jsonl)."""

    filename: str
    tag: str
    prompt: str
    correct: bool
    reason: str
    metadata: str  # the prompt's JSON line; groups images of one prompt
    details: dict[str, list[list[float]]] = field(default_factory=dict)  # class -> kept boxes

    def to_json(self) -> dict:
        return dict(self.__dict__)


def evaluate_image(
    image: Image.Image,
    metadata: dict,
    detector: Detector,
    color_classifier: ColorClassifier | None = None,
    config: GenEvalConfig = GenEvalConfig(),
    filename: str = "",
) -> ImageResult:
    """Detect, filter (:func:`group_detections`) and judge (:func:`check_metadata`) one RGB image."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    grouped = group_detections(detector.detect(image), metadata["tag"], config)
    correct, reason = check_metadata(grouped, metadata, image, color_classifier, config)
    details = {name: [[float(v) for v in det.box] for det in dets] for name, dets in grouped.items()}
    return ImageResult(filename, metadata["tag"], metadata.get("prompt", ""), correct, reason, json.dumps(metadata),
                       details)  # fmt: skip


def evaluate_images(
    folder: str | Path,
    detector: Detector,
    color_classifier: ColorClassifier | None = None,
    config: GenEvalConfig = GenEvalConfig(),
    progress: bool = True,
    max_prompts: int | None = None,
    max_samples: int | None = None,
) -> list[ImageResult]:
    """Score the images of a GenEval-layout folder (see :func:`list_geneval_images` for the limits). Returns one
    :class:`ImageResult` per image."""
    from tqdm.auto import tqdm

    items = list_geneval_images(folder, max_prompts, max_samples)
    check_detector_classes(detector, (metadata for metadata, _ in items))
    results = []
    for metadata, path in tqdm(items, desc="geneval", unit="img", disable=None if progress else True):
        with open_sample_image(path) as image:
            results.append(evaluate_image(image, metadata, detector, color_classifier, config, str(path)))
    return results


@contextlib.contextmanager
def open_sample_image(path: Path):
    """An opened, decoded sample image; a :class:`UserError` for a file that is not one."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read the sample image {path} ({type(err).__name__}: {str(err)[:100]}); delete it "
                        "and make it again (vgen eval geneval --model ... --out resumes and remakes missing images)"
                        ) from None
    with image:
        yield image


def summarise(results: Sequence[ImageResult]) -> dict:
    """Official summary. Returns {"overall", "tasks": {tag: {"accuracy", "correct", "images"}}, "images",
    "prompts", "correct_images" (fraction), "correct_prompts" (fraction of prompts with >= 1 correct image)}.
    Overall is the unweighted mean over the tags present; tags keep their first-seen order."""
    if not results:
        raise UserError("no images were scored, so there is nothing to summarise")
    tasks: dict[str, dict] = {}
    prompts: dict[str, bool] = {}
    for res in results:
        task = tasks.setdefault(res.tag, {"correct": 0, "images": 0})
        task["correct"] += int(res.correct)
        task["images"] += 1
        prompts[res.metadata] = prompts.get(res.metadata, False) or res.correct
    for task in tasks.values():
        task["accuracy"] = task["correct"] / task["images"]
    return {
        "overall": float(np.mean([t["accuracy"] for t in tasks.values()])),
        "tasks": tasks,
        "images": len(results),
        "prompts": len(prompts),
        "correct_images": sum(r.correct for r in results) / len(results),
        "correct_prompts": sum(prompts.values()) / len(prompts),
    }


def format_summary(summary: dict) -> str:
    """A plain-text table of :func:`summarise`'s output (for stderr)."""
    lines = [f"{'task':<16} {'accuracy':>9} {'correct':>8} {'images':>7}", "-" * 43]
    for tag, task in summary["tasks"].items():
        lines.append(f"{tag:<16} {task['accuracy']:>9.2%} {task['correct']:>8d} {task['images']:>7d}")
    lines.append("-" * 43)
    lines.append(f"{'overall':<16} {summary['overall']:>9.5f} (mean of {len(summary['tasks'])} task scores)")
    lines.append(f"correct images {summary['correct_images']:.2%} of {summary['images']}; "
                 f"prompts with >= 1 correct image {summary['correct_prompts']:.2%} of {summary['prompts']}")  # fmt: skip
    return "\n".join(lines)


def write_results(results: Sequence[ImageResult], path: str | Path) -> None:
    """One JSON line per image, as the official ``results.jsonl``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.writelines(json.dumps(res.to_json()) + "\n" for res in results)
