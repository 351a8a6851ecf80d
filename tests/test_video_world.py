"""Moving Shapes with captioned directions (the video generators' training world) and its caption parser."""

import numpy as np
import pytest

from vgen.data.moving_shapes import (
    DIRECTION_FRAMES,
    DIRECTIONS,
    MOTION_VOCABULARY,
    SPEED_RANGE,
    MovingShapesDataset,
    MovingShapesWorld,
    motion_caption,
    parse_motion_caption,
)
from vgen.errors import UserError


def test_direction_captions_name_each_object_and_its_first_moves():
    world = MovingShapesWorld(32, num_frames=12, seed=0, motion="directions", max_objects=2)
    seen = set()
    for index in range(40):
        sample = world.sample(index)
        objects = parse_motion_caption(sample.caption)
        assert 1 <= len(objects) <= 2 and set(sample.caption.split()) <= set(MOTION_VOCABULARY)
        assert [(o.shape, o.color) for o in sample.objects[0]] == [(s, c) for s, c, _ in objects]
        assert sample.directions == tuple(d for _, _, d in objects)
        assert sample.caption == motion_caption(objects)
        for k, (_, _, direction) in enumerate(objects):
            seen.add(direction)
            centres = np.array([frame[k].center for frame in sample.objects[: DIRECTION_FRAMES + 1]])
            step = np.diff(centres, axis=0) @ np.array(DIRECTIONS[direction], dtype=float)
            # box centres move in half-pixel steps: never backwards, and at least the slowest speed overall
            assert step.min() >= 0 and step.sum() >= SPEED_RANGE[0] * 32 * DIRECTION_FRAMES - 1
            across = (centres - centres[0]) @ np.array(DIRECTIONS[direction][::-1], dtype=float)
            assert np.abs(across).max() <= 1.0  # no sideways drift (tilted outlines jitter the box by a pixel)
    assert seen == set(DIRECTIONS)


def test_bounce_world_is_unchanged_by_the_new_options():
    a = MovingShapesWorld(32, num_frames=6, seed=4)
    b = MovingShapesWorld(32, num_frames=6, seed=4, motion="bounce", max_objects=3)
    for index in range(5):
        assert np.array_equal(a.sample(index).frames, b.sample(index).frames)
        assert a.sample(index).caption.endswith(" moving") and a.sample(index).directions is None


def test_dataset_passes_motion_and_max_objects():
    dataset = MovingShapesDataset(resolution=32, num_frames=4, length=6, motion="directions", max_objects=1)
    captions = [dataset[i]["caption"] for i in range(6)]
    assert all(len(parse_motion_caption(c)) == 1 and c.split()[-1] in DIRECTIONS for c in captions)
    with pytest.raises(UserError, match="motion must be one of bounce, directions"):
        MovingShapesWorld(32, motion="spin")
    with pytest.raises(UserError, match="max_objects must be 1, 2 or 3"):
        MovingShapesWorld(32, max_objects=4)


@pytest.mark.parametrize(
    "prompt, objects",
    [
        ("a red circle moving right", [("circle", "red", "right")]),
        ("A red circle moving right and an orange square moving up.",
         [("circle", "red", "right"), ("square", "orange", "up")]),
        ("a red circle and a blue square moving", [("circle", "red", None), ("square", "blue", None)]),
        ("a star moving down", [("star", None, "down")]),
    ],
)
def test_parse_motion_caption(prompt, objects):
    assert parse_motion_caption(prompt) == objects


@pytest.mark.parametrize("prompt", ["", "red circle moving right", "a red circle moving sideways",
                                    "a red circle moving right and", "a circle or a square", "two circles moving"])
def test_unreadable_video_prompts_are_one_line_errors(prompt):
    with pytest.raises(UserError) as err:
        parse_motion_caption(prompt)
    assert "\n" not in str(err.value) and "moving right" in str(err.value)
