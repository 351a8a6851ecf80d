"""The Shapes world: determinism, annotations that match the pixels, captions that match the annotations by
GenEval's rules, the packaged prompt file, render_spec, and the dataset."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

import vgen.data.shapes as shapes_module
from vgen.data.shapes import (
    COLOR_NAMES,
    COLOR_RGB,
    NUM_CLASSES,
    PROMPT_VOCABULARY,
    RELATIONS,
    SHAPE_NAMES,
    TAGS,
    ShapesDataset,
    ShapesWorld,
    caption_to_spec,
    class_label_spec,
    class_label_to_text,
    render_spec,
    shapes_geneval_prompts,
    write_shapes_geneval_prompts,
)
from vgen.errors import UserError


# GenEval's position rule, written out independently of vgen's implementation.
def geneval_relation_holds(box_a, box_b, relation):
    a, b = np.array(box_a, float), np.array(box_b, float)
    center_a, center_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    dim_a, dim_b = a[2:] - a[:2], b[2:] - b[:2]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return False
    dx, dy = revised / np.linalg.norm(offset)
    return {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]


def satisfies(spec, objects):
    """GenEval's scoring rules applied to exact annotations: counts (>= count, < exclude count), colours, positions."""
    groups = []
    for entry in spec["include"]:
        found = [o for o in objects if o.shape == entry["class"]]
        if len(found) < entry["count"]:
            return False
        if "color" in entry and sum(o.color == entry["color"] for o in found) < entry["count"]:
            return False
        groups.append(found)
    for k, entry in enumerate(spec["include"]):
        if "position" in entry:
            relation, target = entry["position"]
            if not all(geneval_relation_holds(o.box, t.box, relation) for o in groups[k] for t in groups[target]):
                return False
    for entry in spec.get("exclude", []):
        if sum(o.shape == entry["class"] for o in objects) >= entry["count"]:
            return False
    return True


def pixels(sample):
    return np.asarray(sample.image, dtype=np.int32)


# ----------------------------------------------------------------------------------------------------------- world
def test_same_seed_and_index_give_identical_pixels_and_annotations():
    a, b = ShapesWorld(64, seed=3), ShapesWorld(64, seed=3)
    for index in (0, 1, 17):
        sa, sb = a.sample(index), b.sample(index)
        assert np.array_equal(pixels(sa), pixels(sb))
        assert sa.caption == sb.caption and sa.objects == sb.objects and sa.spec == sb.spec
    # Order of calls does not matter (no global RNG).
    assert np.array_equal(pixels(a.sample(1)), pixels(ShapesWorld(64, seed=3).sample(1)))


def test_different_index_or_seed_gives_different_images():
    world = ShapesWorld(64, seed=0)
    images = [pixels(world.sample(i)) for i in range(8)]
    assert all(not np.array_equal(images[i], images[j]) for i in range(8) for j in range(i + 1, 8))
    assert not np.array_equal(images[0], pixels(ShapesWorld(64, seed=1).sample(0)))


@pytest.mark.parametrize("resolution", [31, 513, 0, 64.0])
def test_resolution_out_of_bounds_is_a_user_error(resolution):
    with pytest.raises(UserError, match="32 to 512"):
        ShapesWorld(resolution)


@pytest.mark.parametrize("resolution", [32, 512])
def test_resolution_bounds_render(resolution):
    sample = ShapesWorld(resolution, seed=0, tag_weights={"counting": 1}).sample(0)
    assert sample.image.size == (resolution, resolution) and sample.image.mode == "RGB"
    assert len(sample.objects) == sample.spec["include"][0]["count"]


def test_tag_weights_select_tags_and_bad_weights_are_user_errors():
    world = ShapesWorld(64, tag_weights={"position": 1.0, "counting": 0.0})
    assert {world.sample(i).tag for i in range(20)} == {"position"}
    mixed = Counter(ShapesWorld(64).sample(i).tag for i in range(300))
    assert set(mixed) == set(TAGS) and min(mixed.values()) > 25
    with pytest.raises(UserError, match="unknown shapes tag"):
        ShapesWorld(64, tag_weights={"colour": 1.0})
    with pytest.raises(UserError, match="positive sum"):
        ShapesWorld(64, tag_weights={"colors": 0.0})


# ----------------------------------------------------------------------------------------------------------- pixels
def test_object_interiors_have_the_palette_colour_and_boxes_are_disjoint():
    world = ShapesWorld(64, seed=5)
    for index in range(150):
        sample = world.sample(index)
        image = pixels(sample)
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert obj.center == ((x0 + x1) / 2, (y0 + y1) / 2)
            centre_pixel = image[int(obj.center[1]), int(obj.center[0])]
            assert np.abs(centre_pixel - np.array(COLOR_RGB[obj.color])).max() <= 1, (index, obj)
        for i, a in enumerate(sample.objects):
            for b in sample.objects[i + 1 :]:
                overlap_x = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                overlap_y = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                # Objects keep a gap; boxes may at most touch diagonally at the corners of round shapes.
                assert overlap_x <= 0 or overlap_y <= 0 or (overlap_x <= 2 and overlap_y <= 2)


def test_boxes_are_tight_around_pixels_covered_at_least_half(monkeypatch):
    """On a flat background each pixel's coverage is exactly recoverable from its colour, so the box can be checked
    against the rendered pixels: it must be the bounding box of the pixels covered >= 0.5."""
    flat = np.array([170.0, 170.0, 170.0], dtype=np.float32)
    monkeypatch.setattr(shapes_module, "render_background", lambda rng, h, w: np.broadcast_to(flat, (h, w, 3)).copy())
    world = ShapesWorld(64, seed=11)
    checked = 0
    for index in range(120):
        sample = world.sample(index)
        image = np.asarray(sample.image, dtype=np.float64)
        for obj in sample.objects:
            same_colour = [o for o in sample.objects if o.color == obj.color]
            if len(same_colour) > 1:
                continue  # pixels of two objects of one colour cannot be told apart by colour alone
            color = np.array(COLOR_RGB[obj.color], dtype=np.float64)
            direction = color - flat
            coverage = (image - flat) @ direction / (direction @ direction)
            off_line = np.linalg.norm(image - flat - coverage[..., None] * direction, axis=-1)
            # Coverage comes in steps of 1/16 (4x4 supersampling); 0.48 allows for rounding to uint8.
            covered = (coverage >= 0.48) & (off_line < 3.0)
            rows, cols = np.nonzero(covered)
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == obj.box, (index, obj)
            checked += 1
    assert checked > 150


def test_background_stays_far_from_every_palette_colour():
    world = ShapesWorld(64, seed=2)
    palette = np.array(list(COLOR_RGB.values()), dtype=np.float64)
    nearest = np.inf
    for index in range(60):
        sample = world.sample(index)
        mask = np.ones((64, 64), bool)
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.box
            mask[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3] = False
        background = np.asarray(sample.image, dtype=np.float64)[mask]
        distances = np.linalg.norm(background[:, None, :] - palette[None], axis=-1)
        nearest = min(nearest, distances.min())
        assert background.mean() > 140  # light
    assert nearest >= 50


def test_palette_colours_are_well_separated():
    palette = np.array([COLOR_RGB[c] for c in COLOR_NAMES], dtype=np.float64)
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert distances[~np.eye(len(palette), dtype=bool)].min() >= 80


# ----------------------------------------------------------------------------------------------------------- captions
def test_every_caption_agrees_with_the_annotations():
    world = ShapesWorld(64, seed=7)
    seen = Counter()
    for index in range(360):
        sample = world.sample(index)
        spec, objects = sample.spec, sample.objects
        seen[sample.tag] += 1
        assert sample.caption == spec["prompt"] and spec["tag"] == sample.tag
        assert set(sample.caption.split()) <= set(PROMPT_VOCABULARY)
        parsed = caption_to_spec(sample.caption)
        assert parsed["include"] == spec["include"] and parsed["tag"] == spec["tag"]
        # Only the objects named in the caption are present, in the named numbers.
        assert len(objects) == sum(e["count"] for e in spec["include"])
        assert satisfies(spec, objects), (index, sample.caption, objects)
        include = spec["include"]
        if sample.tag in ("single_object", "colors"):
            assert len(objects) == 1 and objects[0].shape == include[0]["class"]
        if sample.tag == "colors":
            assert objects[0].color == include[0]["color"]
        if sample.tag == "counting":
            count = include[0]["count"]
            assert 2 <= count <= 4 and sample.caption.split()[3] == {2: "two", 3: "three", 4: "four"}[count]
            assert [o.shape for o in objects] == [include[0]["class"]] * count
            assert spec["exclude"] == [{"class": include[0]["class"], "count": count + 1}]
        if sample.tag in ("two_object", "color_attr", "position"):
            assert len(objects) == 2 and objects[0].shape != objects[1].shape
        if sample.tag == "color_attr":
            assert [o.color for o in objects] == [e["color"] for e in include] and objects[0].color != objects[1].color
        if sample.tag == "position":
            relation = include[1]["position"][0]
            first_named, reference = objects[1], objects[0]
            assert sample.caption == f"a photo of a {first_named.shape} {relation} a {reference.shape}"
            assert geneval_relation_holds(first_named.box, reference.box, relation)
            # ... and the opposite relation does not.
            opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
            assert not geneval_relation_holds(first_named.box, reference.box, opposite)
        assert sample.class_label == SHAPE_NAMES.index(objects[0].shape) * 10 + COLOR_NAMES.index(objects[0].color)
    assert set(seen) == set(TAGS)


def test_caption_phrasing_matches_geneval():
    assert caption_to_spec("a photo of an orange star")["include"] == [
        {"class": "star", "count": 1, "color": "orange"}
    ]
    spec = caption_to_spec("A photo of a circle left of a square.")
    assert spec == {
        "tag": "position",
        "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a circle left of a square",
    }
    counting = caption_to_spec("a photo of four diamonds")
    assert counting["exclude"] == [{"class": "diamond", "count": 5}] and counting["tag"] == "counting"
    assert caption_to_spec("a photo of a red circle and a blue square")["tag"] == "color_attr"


@pytest.mark.parametrize(
    "prompt,message",
    [("a photo of a dog", "dog"), ("a photo of a circle circle", "cannot read"), ("two circles", "cannot read")],
)
def test_unreadable_prompts_are_user_errors(prompt, message):
    with pytest.raises(UserError, match=message):
        caption_to_spec(prompt)


def test_vocabulary_lists_every_caption_word():
    words = set(PROMPT_VOCABULARY)
    assert {"a", "an", "photo", "of", "and", "left", "right", "above", "below", "two", "three", "four"} <= words
    assert set(SHAPE_NAMES) | set(COLOR_NAMES) | {s + "s" for s in SHAPE_NAMES} <= words
    assert len(words) == len(PROMPT_VOCABULARY)


# ----------------------------------------------------------------------------------------------------------- classes
def test_class_labels_map_to_one_object_of_that_shape_and_colour():
    world = ShapesWorld(64, seed=0)
    for label in (0, 9, 10, 23, 59):
        shape, color = SHAPE_NAMES[label // 10], COLOR_NAMES[label % 10]
        sample = world.sample_class(label, index=4)
        assert [(o.shape, o.color) for o in sample.objects] == [(shape, color)]
        assert sample.class_label == label and sample.tag == "colors"
        assert (
            class_label_to_text(label)
            == sample.caption
            == f"a photo of {'an' if color == 'orange' else 'a'} {color} {shape}"
        )
        assert class_label_spec(label)["include"] == [{"class": shape, "count": 1, "color": color}]
    assert not np.array_equal(pixels(world.sample_class(3, 0)), pixels(world.sample_class(3, 1)))
    with pytest.raises(UserError, match="0..59"):
        class_label_to_text(NUM_CLASSES)


# ----------------------------------------------------------------------------------------------------------- prompts
def test_packaged_prompt_file_parses_and_is_reproducible(tmp_path):
    prompts = shapes_geneval_prompts()
    assert len(prompts) >= 500
    tags = Counter(p["tag"] for p in prompts)
    assert set(tags) == set(TAGS) and all(n >= 75 for n in tags.values())
    for p in prompts:
        assert set(p) <= {"tag", "include", "exclude", "prompt"}
        assert all(e["class"] in SHAPE_NAMES and e.get("color", "red") in COLOR_NAMES for e in p["include"])
        parsed = caption_to_spec(p["prompt"])
        assert parsed["include"] == p["include"] and parsed.get("exclude") == p.get("exclude")
        if p["tag"] == "counting":
            assert p["exclude"] == [{"class": p["include"][0]["class"], "count": p["include"][0]["count"] + 1}]
        if p["tag"] == "position":
            assert p["include"][1]["position"][0] in RELATIONS and p["include"][1]["position"][1] == 0
    regenerated = write_shapes_geneval_prompts(tmp_path / "prompts.jsonl", seed=0)
    assert [json.loads(line) for line in regenerated.read_text().splitlines()] == prompts


def test_render_spec_satisfies_every_packaged_prompt():
    for k, spec in enumerate(shapes_geneval_prompts()):
        sample = render_spec(spec, resolution=64, seed=k)
        assert satisfies(spec, sample.objects), (spec, sample.objects)
        assert len(sample.objects) == sum(e["count"] for e in spec["include"])
        assert sample.caption == spec["prompt"]


def test_render_spec_is_deterministic_and_handles_general_specs():
    spec = {
        "include": [
            {"class": "star", "count": 2, "color": "white"},
            {"class": "circle", "count": 1, "position": ["below", 0]},
        ]
    }
    a, b = render_spec(spec, 96, seed=1), render_spec(spec, 96, seed=1)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(render_spec(spec, 96, seed=2)))
    assert satisfies(spec, a.objects) and a.tag == "position" and a.image.size == (96, 96)


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"include": [{"class": "dog", "count": 1}]}, "not in the shapes world"),
        ({"include": [{"class": "star", "count": 1, "color": "teal"}]}, "colour 'teal'"),
        ({"include": [{"class": "star", "count": 9}]}, "at most 8"),
        ({"include": [{"class": "star", "count": 2}], "exclude": [{"class": "star", "count": 2}]}, "contradicts"),
        ({"include": [{"class": "star", "count": 1, "position": ["near", 0]}]}, "position"),
        ({"prompt": "a photo of a star"}, "include"),
    ],
)
def test_render_spec_rejects_what_the_world_cannot_draw(spec, message):
    with pytest.raises(UserError, match=message):
        render_spec(spec)


# ----------------------------------------------------------------------------------------------------------- dataset
def test_dataset_items_are_unit_range_tensors_of_the_world_samples():
    dataset = ShapesDataset(resolution=32, length=10, seed=4)
    item = dataset[3]
    sample = dataset.world.sample(3)
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    expected = torch.from_numpy(np.asarray(sample.image).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(item["image"], expected, atol=1e-6)
    assert item["caption"] == sample.caption and item["class_label"] == sample.class_label and item["index"] == 3
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    with pytest.raises(IndexError):
        dataset[10]


def test_class_conditional_dataset_cycles_through_the_60_classes():
    dataset = ShapesDataset(resolution=32, length=120, class_conditional=True)
    labels = [dataset[i]["class_label"] for i in (0, 1, 59, 60, 61)]
    assert labels == [0, 1, 59, 0, 1]
    item = dataset[61]
    assert item["caption"] == class_label_to_text(1)
