"""The exact Shapes detector: real renders score ~1 on every GenEval task, renders of other prompts score low."""

import numpy as np
import pytest
from PIL import Image
from vgen.eval.geneval import Detector, evaluate_images, load_metadata, summarise
from vgen.eval.shapes_detector import ShapesDetector
from vgen.eval.shapes_geneval import mismatched_metadata, write_real_folder

from vgen.data.shape_render import paint, rasterize, render_background, shape_vertices, to_uint8
from vgen.data.shapes import COLOR_NAMES, COLOR_RGB, SHAPE_NAMES, ShapesWorld, render_spec

SUBSET_STEP = 6  # every 6th Shapes-GenEval prompt: 93 prompts, all six tags


@pytest.fixture(scope="module")
def detector():
    return ShapesDetector()


@pytest.fixture(scope="module")
def subset():
    return load_metadata("shapes")[::SUBSET_STEP]


def test_is_a_geneval_detector(detector):
    assert isinstance(detector, Detector)


def test_real_renders_score_at_least_098_per_task(tmp_path, detector, subset):
    write_real_folder(tmp_path, subset, images_per_prompt=1, resolution=64, seed=0, progress=False)
    summary = summarise(evaluate_images(tmp_path, detector, progress=False))
    assert set(summary["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for tag, task in summary["tasks"].items():
        assert task["accuracy"] >= 0.98, (tag, task)


def test_renders_of_other_prompts_score_low(tmp_path, detector, subset):
    subset = subset[::2]
    partners = mismatched_metadata(subset)
    assert all(a["tag"] == b["tag"] and a["prompt"] != b["prompt"] for a, b in zip(subset, partners))
    write_real_folder(tmp_path, subset, 1, 64, 0, render_metadata=partners, progress=False)
    summary = summarise(evaluate_images(tmp_path, detector, progress=False))
    assert summary["overall"] <= 0.1, summary
    for tag in ("single_object", "counting", "colors", "position"):
        assert summary["tasks"][tag]["accuracy"] == 0.0, (tag, summary["tasks"][tag])


@pytest.mark.parametrize("resolution,n", [(64, 12), (128, 4), (256, 2)])
def test_every_object_found_with_class_colour_and_box(detector, resolution, n):
    world = ShapesWorld(resolution, seed=5)
    for index in range(n):
        sample = world.sample(index)
        detections = detector.detect(sample.image)
        expected = sorted((o.shape, o.color, o.box) for o in sample.objects)
        found = sorted((d.label, d.color, tuple(int(v) for v in d.box)) for d in detections)
        assert [e[:2] for e in expected] == [f[:2] for f in found], (resolution, index)
        for (_, _, box_e), (_, _, box_f) in zip(expected, found):
            assert np.abs(np.subtract(box_e, box_f)).max() <= 1
        # confident enough for GenEval's counting threshold (0.9)
        assert min(d.score for d in detections) > 0.9


def test_each_shape_in_each_colour(detector):
    """All 60 classes, one object each on the world's background (class-conditional samples)."""
    world = ShapesWorld(64, seed=11)
    wrong = []
    for label in range(len(SHAPE_NAMES) * len(COLOR_NAMES)):
        sample = world.sample_class(label, 0)
        found = [(d.label, d.color) for d in detector.detect(sample.image)]
        if found != [(sample.objects[0].shape, sample.objects[0].color)]:
            wrong.append((label, found))
    assert wrong == []


def test_background_alone_has_no_detections(detector):
    rng = np.random.default_rng(0)
    for _ in range(5):
        image = Image.fromarray(to_uint8(render_background(rng, 64, 64)), "RGB")
        assert detector.detect(image) == []


def test_smeared_colour_noise_is_below_the_detection_threshold(detector):
    """What an untrained generator makes: blobs of mixed colours with no background between them. Outlines may fit
    some blobs, but colour purity and isolation keep every score below GenEval's 0.3."""
    scores = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        for cells in (4, 8, 16):
            coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
            scores += [d.score for d in detector.detect(Image.fromarray(coarse).resize((64, 64), Image.BICUBIC))]
    assert len(scores) > 60 and max(scores) < 0.3


def test_blob_that_is_no_shape_gets_a_low_score(detector):
    """A thin 5:1 bar in a palette colour is found, but fits no outline well: below the counting threshold."""
    rng = np.random.default_rng(1)
    canvas = render_background(rng, 64, 64)
    bar = np.array([[12.0, 28.0], [52.0, 28.0], [52.0, 36.0], [12.0, 36.0]])
    paint(canvas, rasterize(bar, 64, 64), COLOR_RGB["blue"])
    paint(canvas, rasterize(shape_vertices("hexagon", (32, 12), 6.0), 64, 64), COLOR_RGB["red"])
    detections = {d.color: d for d in detector.detect(Image.fromarray(to_uint8(canvas), "RGB"))}
    assert set(detections) == {"blue", "red"}
    assert detections["blue"].score < 0.8
    assert detections["red"].label == "hexagon" and detections["red"].score > 0.9


def test_counting_of_touching_free_objects_matches_spec(detector):
    spec = {"tag": "counting", "include": [{"class": "star", "count": 4}], "exclude": [{"class": "star", "count": 5}],
            "prompt": "a photo of four stars"}  # fmt: skip
    for seed in range(3):
        detections = detector.detect(render_spec(spec, 64, seed).image)
        assert [d.label for d in detections] == ["star"] * 4


def _as_tuples(detections):
    return [(d.label, d.color, d.box, round(d.score, 12), d.mask.tobytes()) for d in detections]


def test_colour_filter_returns_the_full_calls_detections_of_those_colours(detector):
    """``detect(image, colors=...)`` skips the fitting of other colours' objects without changing the rest; on
    multi-object renders and on a noisy, smeared image with many blobs."""
    world = ShapesWorld(64, seed=3)
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    images = [world.sample(i).image for i in range(6)] + [Image.fromarray(coarse).resize((64, 64), Image.BICUBIC)]
    checked = 0
    for image in images:
        full = detector.detect(image)
        colours = sorted({d.color for d in full})
        for keep in ([], colours[:1], colours, ["red", "blue"]):
            expected = [d for d in full if d.color in keep]
            assert _as_tuples(detector.detect(image, colors=keep)) == _as_tuples(expected)
            checked += len(expected)
    assert checked > 10
    with pytest.raises(ValueError, match="unknown colour"):
        detector.detect(images[0], colors=["teal"])
