"""Moving Shapes videos, the image-folder loader and the world registry."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vgen.data import get_world
from vgen.data.folder import ImageFolderDataset
from vgen.data.moving_shapes import SPEED_RANGE, MovingShapesDataset, MovingShapesWorld
from vgen.data.shapes import COLOR_RGB, PROMPT_VOCABULARY, ShapesWorld, noun_phrase
from vgen.errors import UserError


# ----------------------------------------------------------------------------------------------------------- moving
def test_moving_shapes_are_deterministic_and_vary_with_index():
    a, b = MovingShapesWorld(64, num_frames=6, seed=2), MovingShapesWorld(64, num_frames=6, seed=2)
    first = a.sample(5)
    assert np.array_equal(first.frames, b.sample(5).frames) and first.objects == b.sample(5).objects
    assert not np.array_equal(first.frames, a.sample(6).frames)
    assert first.frames.shape == (6, 64, 64, 3) and first.frames.dtype == np.uint8
    assert len(first.images) == 6 and first.images[0].size == (64, 64)


def test_moving_objects_match_pixels_caption_and_move_at_bounded_speed():
    world = MovingShapesWorld(64, num_frames=12, seed=0)
    max_step = SPEED_RANGE[1] * 64 + 1.0  # box centres are rounded to half pixels
    moved = 0
    for index in range(25):
        sample = world.sample(index)
        counts = {len(frame) for frame in sample.objects}
        assert len(counts) == 1 and 1 <= counts.pop() <= 3
        names = [(o.shape, o.color) for o in sample.objects[0]]
        assert sample.caption == " and ".join(noun_phrase(s, c) for s, c in names) + " moving"
        assert set(sample.caption.split()) <= set(PROMPT_VOCABULARY)
        for t, frame in enumerate(sample.objects):
            assert [(o.shape, o.color) for o in frame] == names
            for obj in frame:
                x0, y0, x1, y1 = obj.box
                assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
                centre_pixel = sample.frames[t, int(obj.center[1]), int(obj.center[0])].astype(int)
                assert np.abs(centre_pixel - COLOR_RGB[obj.color]).max() <= 1
        for k in range(len(names)):
            centres = np.array([frame[k].center for frame in sample.objects])
            steps = np.linalg.norm(np.diff(centres, axis=0), axis=-1)
            assert steps.max() <= max_step
            moved += steps.sum() > 3
    assert moved >= 20  # objects really move


def test_moving_dataset_gives_video_tensors_and_checks_settings():
    dataset = MovingShapesDataset(resolution=32, num_frames=4, length=3, seed=1)
    item = dataset[2]
    assert item["video"].shape == (4, 3, 32, 32) and item["video"].dtype == torch.float32
    frames = torch.from_numpy(dataset.world.sample(2).frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(item["video"], frames)
    assert item["caption"].endswith(" moving") and item["index"] == 2
    with pytest.raises(UserError, match="num_frames"):
        MovingShapesWorld(64, num_frames=0)
    with pytest.raises(UserError, match="32 to 512"):
        MovingShapesWorld(16)


# ----------------------------------------------------------------------------------------------------------- folder
def _bands(width=96, height=32):
    """Red | green | blue vertical bands, each a third of the width."""
    array = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    array[:, :third, 0] = 255
    array[:, third : 2 * third, 1] = 255
    array[:, 2 * third :, 2] = 255
    return Image.fromarray(array)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    _bands().save(root / "cats" / "bands.png")
    Image.new("RGB", (40, 50), (10, 200, 30)).save(root / "cats" / "green.JPG", quality=95)
    Image.new("RGB", (32, 32), (200, 20, 20)).save(root / "dogs" / "red.webp", lossless=True)
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(root / "clear.png")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    good = root / "cats" / "bands.png"
    (root / "truncated.png").write_bytes(good.read_bytes()[:60])
    (root / "notes.txt").write_text("not an image")
    lines = [
        {"file_name": "cats/bands.png", "text": "three coloured bands"},
        {"file_name": "dogs/red.webp", "text": "a red square"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def test_folder_skips_unreadable_files_with_one_warning_each_and_a_count(image_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolderDataset(image_folder, resolution=16)
    messages = [str(w.message) for w in caught]
    assert sum("skipping unreadable image" in m for m in messages) == 2
    assert any("broken.jpg" in m for m in messages) and any("truncated.png" in m for m in messages)
    assert sum("skipped 2 unreadable of 6" in m for m in messages) == 1
    assert len(dataset) == 4 and sorted(p.name for p in dataset.skipped) == ["broken.jpg", "truncated.png"]


def test_folder_items_are_centre_cropped_tensors_with_captions_and_labels(image_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = ImageFolderDataset(image_folder, resolution=16)
    by_name = {name: dataset[k] for k, name in enumerate(dataset.relative_names)}
    assert set(by_name) == {"cats/bands.png", "cats/green.JPG", "dogs/red.webp", "clear.png"}

    bands = by_name["cats/bands.png"]
    assert bands["image"].shape == (3, 16, 16) and bands["caption"] == "three coloured bands"
    # 96x32 -> 48x16, centre 16 columns = the green band.
    assert torch.allclose(bands["image"][:, 2:-2, 2:-2].mean((1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)
    red = by_name["dogs/red.webp"]
    assert red["caption"] == "a red square"
    assert torch.allclose(red["image"].mean((1, 2)), torch.tensor([200, 20, 20]) / 127.5 - 1, atol=0.01)
    assert by_name["cats/green.JPG"]["caption"] == ""
    assert torch.all(by_name["clear.png"]["image"] == 1.0)  # transparent -> white
    assert dataset.classes == [".", "cats", "dogs"]
    assert by_name["dogs/red.webp"]["class_label"] == 2 and by_name["clear.png"]["class_label"] == 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        without = ImageFolderDataset(image_folder, resolution=16, captions=False)
    assert all(without[k]["caption"] == "" for k in range(len(without)))


def test_folder_errors_are_user_errors(tmp_path, image_folder):
    with pytest.raises(UserError, match="not found"):
        ImageFolderDataset(tmp_path / "missing", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", 32)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="could be decoded"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageFolderDataset(only_bad, 32)
    (image_folder / "metadata.jsonl").write_text('{"file_name": "clear.png", "text": "x"}\n{oops\n')
    with pytest.raises(UserError, match="line 2"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageFolderDataset(image_folder, 32)


# ----------------------------------------------------------------------------------------------------------- registry
def test_get_world_builds_worlds_by_name(image_folder):
    assert isinstance(get_world("shapes", resolution=32, seed=1), ShapesWorld)
    assert get_world("moving_shapes", num_frames=3).num_frames == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(get_world("folder", path=image_folder, resolution=16)) == 4
    with pytest.raises(UserError, match="choose one of: shapes, moving_shapes, folder"):
        get_world("mnist")
    with pytest.raises(UserError, match="needs a path"):
        get_world("folder")
    with pytest.raises(UserError, match="bad settings"):
        get_world("shapes", colour="red")
