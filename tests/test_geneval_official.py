"""vgen's GenEval scoring gives the official numbers: compared, case by case, with a port of the official scoring
code (djghosh13/geneval ``evaluation/evaluate_images.py``: the detection filter of ``evaluate_image``,
``compute_iou``, ``relative_position`` and ``evaluate``), which works, as the original does, on the detector's
float32 ``[x0, y0, x1, y1, score]`` rows per class. The port is written out here independently of vgen's code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from vgen.eval.geneval import (
    COLORS,
    TASKS,
    Detection,
    GenEvalConfig,
    check_metadata,
    group_detections,
    relative_position,
)

from vgen.data.shapes_language import geneval_relation_components

# ------------------------------------------------------------------------------------ the official code, ported


def official_iou(box_a, box_b):
    area_fn = lambda box: max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)
    i_area = area_fn([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]),
                      min(box_a[3], box_b[3])])
    u_area = area_fn(box_a) + area_fn(box_b) - i_area
    return i_area / u_area if u_area else 0


def official_relative_position(obj_a, obj_b, position_threshold):
    boxes = np.array([obj_a[0], obj_b[0]])[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised_offset = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised_offset) < 1e-3):
        return set()
    dx, dy = revised_offset / np.linalg.norm(offset)
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


def official_detected(bbox: dict[str, np.ndarray], tag: str, options: GenEvalConfig) -> dict[str, list]:
    """``evaluate_image``'s filter: class -> [(float32 row, index of the row)]."""
    confidence_threshold = options.threshold if tag != "counting" else options.counting_threshold
    detected = {}
    for classname, rows in bbox.items():
        ordering = np.argsort(rows[:, 4])[::-1]
        ordering = ordering[rows[ordering, 4] > confidence_threshold]
        ordering = ordering[: options.max_objects].tolist()
        detected[classname] = []
        while ordering:
            max_obj = ordering.pop(0)
            detected[classname].append((rows[max_obj], max_obj))
            ordering = [obj for obj in ordering if options.max_overlap == 1
                        or official_iou(rows[max_obj], rows[obj]) < options.max_overlap]
        if not detected[classname]:
            del detected[classname]
    return detected


def official_evaluate(objects, metadata, colors_of, position_threshold):
    """``evaluate``; ``colors_of(classname, found_objects)`` stands in for the CLIP colour classification."""
    correct = True
    reason = []
    matched_groups = []
    for req in metadata.get("include", []):
        classname = req["class"]
        matched = True
        found_objects = objects.get(classname, [])[: req["count"]]
        if len(found_objects) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found_objects)}")
        else:
            if "color" in req:
                colors = colors_of(classname, found_objects)
                if colors.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={req['count']}, found "
                        + f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found_objects:
                        for target_obj in matched_groups[target_group]:
                            true_rels = official_relative_position(obj, target_obj, position_threshold)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    + f"{' and '.join(true_rels)} target"
                                )
                                break
                        if not matched:
                            break
        if matched:
            matched_groups.append(found_objects)
        else:
            matched_groups.append(None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
    return correct, "\n".join(reason)


# ----------------------------------------------------------------------------------- the two sides of one case


def official_verdict(detections: list[Detection], metadata: dict, options: GenEvalConfig):
    """The official result for vgen ``Detection`` objects: per-class float32 rows in the detector's order."""
    bbox, colors = {}, {}
    for det in detections:
        bbox.setdefault(det.label, []).append([*det.box, det.score])
        colors.setdefault(det.label, []).append(det.color)
    bbox = {name: np.array(rows, dtype=np.float32) for name, rows in bbox.items()}
    objects = official_detected(bbox, metadata["tag"], options)
    kept = {name: [index for _, index in found] for name, found in objects.items()}

    def colors_of(classname, found_objects):
        return [colors[classname][index] for _, index in found_objects]

    return official_evaluate(objects, metadata, colors_of, options.position_threshold), kept


def vgen_verdict(detections: list[Detection], metadata: dict, options: GenEvalConfig):
    grouped = group_detections(detections, metadata["tag"], options)
    per_class = {}
    for det in detections:
        per_class.setdefault(det.label, []).append(det)
    kept = {name: [next(i for i, d in enumerate(per_class[name]) if d is kept_det) for kept_det in dets]
            for name, dets in grouped.items()}
    return check_metadata(grouped, metadata, config=options), kept


# -------------------------------------------------------------------------------------------- synthetic cases

CLASSES = ("cat", "dog", "cup")
#: Scores drawn from few values, so ties and scores exactly at a threshold (in float32) are common.
SCORES = (0.2, 0.3, 0.35, 0.5, 0.5, 0.8, 0.9, 0.9, 0.95, 1.0)


def random_metadata(rng: np.random.Generator) -> dict:
    tag = TASKS[rng.integers(len(TASKS))]
    a, b = rng.choice(CLASSES, size=2, replace=False).tolist()
    color = lambda: COLORS[rng.integers(3)]  # red, orange or yellow: often right, often wrong
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": a, "count": 1}]}
    if tag == "two_object":
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}]}
    if tag == "counting":
        n = int(rng.integers(2, 5))
        return {"tag": tag, "include": [{"class": a, "count": n}], "exclude": [{"class": a, "count": n + 1}]}
    if tag == "colors":
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": color()}]}
    if tag == "position":
        relation = ("left of", "right of", "above", "below")[rng.integers(4)]
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [relation, 0]}]}
    return {"tag": tag, "include": [{"class": a, "count": 1, "color": color()},
                                    {"class": b, "count": 1, "color": color()}]}


def random_detections(rng: np.random.Generator) -> list[Detection]:
    detections = []
    for _ in range(rng.integers(0, 9)):
        x0, y0 = rng.uniform(0, 200, size=2)
        w, h = rng.uniform(4, 80, size=2)
        box = tuple(float(np.float32(v)) for v in (x0, y0, x0 + w, y0 + h))
        score = float(np.float32(SCORES[rng.integers(len(SCORES))]))  # as a float32 detector reports it
        detections.append(Detection(box, CLASSES[rng.integers(len(CLASSES))], score,
                                    color=COLORS[rng.integers(3)]))
    return detections


OPTIONS = [GenEvalConfig(), GenEvalConfig(max_overlap=0.4), GenEvalConfig(max_objects=2, position_threshold=0.05)]


@pytest.mark.parametrize("options", OPTIONS, ids=["defaults", "nms", "few_objects"])
def test_random_cases_agree_with_the_official_code(options):
    rng = np.random.default_rng(2024)
    disagreements = []
    for case in range(1500):
        detections, metadata = random_detections(rng), random_metadata(rng)
        official, official_kept = official_verdict(detections, metadata, options)
        ours, ours_kept = vgen_verdict(detections, metadata, options)
        if (ours, ours_kept) != (official, official_kept):
            disagreements.append((case, json.dumps(metadata), ours, official))
    assert disagreements == []


def test_a_score_equal_to_the_threshold_in_float32_is_dropped():
    at_threshold = float(np.float32(0.3))  # 0.30000001192..., above 0.3 in float64
    assert at_threshold > 0.3
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    dets = [Detection((0, 0, 10, 10), "cat", at_threshold)]
    assert official_verdict(dets, meta, GenEvalConfig())[0][0] is False
    assert group_detections(dets, "single_object") == {}
    counting = [Detection((0, 0, 10, 10), "cat", float(np.float32(0.9)))]
    assert group_detections(counting, "counting") == {}
    assert len(group_detections(counting, "single_object")["cat"]) == 1


def test_tied_scores_come_in_the_official_order():
    rows = [Detection((20.0 * i, 0, 20.0 * i + 10, 10), "cup", 0.5) for i in range(5)]
    rows.insert(2, Detection((0, 50, 10, 60), "cup", 0.9))
    kept = group_detections(rows, "single_object")["cup"]
    official_order = np.argsort(np.array([d.score for d in rows], dtype=np.float32))[::-1].tolist()
    assert [rows.index(d) for d in kept] == official_order
    assert kept[0] is rows[2]


def test_positions_at_the_margin_follow_the_official_float32_arithmetic():
    """Boxes whose centre offset is within float rounding of GenEval's 0.5 margin: vgen agrees with the official
    float32 code everywhere, and that is not what float64 arithmetic would give."""
    differs_from_float64 = 0
    for width_a in (12.0, 20.0, 31.0, 44.0):
        for offset_y in (25.0, 40.0, 57.0):
            for width_b in (18.0, 30.0, 47.0):
                c = 0.1 * (width_a + width_b)  # the margin along x; solve |dx| / |offset| = 0.5 for the x offset
                offset_x = (2 * c + np.sqrt(c * c + 0.75 * offset_y**2)) / 1.5
                x_b = np.float32(offset_x + width_a / 2 - width_b / 2)
                for ulps in range(-3, 4):
                    xb = float(x_b + np.float32(ulps) * np.spacing(x_b))
                    box_a = (0.0, 0.0, width_a, width_a)
                    box_b = tuple(float(np.float32(v)) for v in (xb, offset_y, xb + width_b, offset_y + width_a))
                    row_a, row_b = np.array([*box_a, 1], np.float32), np.array([*box_b, 1], np.float32)
                    official = official_relative_position((row_a,), (row_b,), 0.1)
                    assert relative_position(box_a, box_b) == official
                    dx, dy = geneval_relation_components(box_a, box_b, 0.1, dtype=np.float64)
                    float64 = {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                                        ("above", dy < -0.5), ("below", dy > 0.5)) if holds}
                    differs_from_float64 += float64 != official
    assert differs_from_float64 >= 1
