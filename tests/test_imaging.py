"""Tensor <-> PIL conversion and labelled grids."""

import numpy as np
import pytest
import torch
from PIL import Image

from vgen.imaging import load_font, make_grid, make_video_grid, pil_to_tensor, tensor_to_pil, wrap_text


def test_tensor_to_pil_maps_the_value_range_to_bytes():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4).expand(3, 2, 4)
    assert np.asarray(tensor_to_pil(x))[0, :, 0].tolist() == [0, 128, 255, 255]
    unit = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3).expand(3, 1, 3)
    assert np.asarray(tensor_to_pil(unit, value_range=(0, 1)))[0, :, 1].tolist() == [0, 128, 255]
    batch = tensor_to_pil(torch.zeros(2, 3, 5, 7))
    assert isinstance(batch, list) and len(batch) == 2 and batch[0].size == (7, 5)
    with pytest.raises(ValueError, match="3, H, W"):
        tensor_to_pil(torch.zeros(4, 5, 5))


def test_pil_tensor_round_trip_is_exact():
    array = np.random.default_rng(0).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    for value_range in ((-1.0, 1.0), (0.0, 1.0)):
        x = pil_to_tensor(image, value_range)
        assert x.shape == (3, 6, 9) and x.min() >= value_range[0] and x.max() <= value_range[1]
        assert np.array_equal(np.asarray(tensor_to_pil(x, value_range)), array)


def test_make_grid_enlarges_small_tiles_and_places_them_in_rows():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (64, 64), c) for c in colors]
    grid = make_grid(images, ncols=2)
    assert grid.size == (2 * (128 + 6) + 6, 2 * (128 + 6) + 6)
    pixels = np.asarray(grid)
    assert tuple(pixels[6 + 64, 6 + 64]) == colors[0]
    assert tuple(pixels[6 + 64, 6 + 134 + 64]) == colors[1]
    assert tuple(pixels[6 + 134 + 64, 6 + 64]) == colors[2]
    with_captions = make_grid(images, ["a photo of a red circle and a blue square"] * 3, ncols=3, caption_lines=3)
    assert with_captions.width == 3 * 134 + 6 and with_captions.height > 134 + 6
    caption_band = np.asarray(with_captions)[6 + 128 : -6, 6 : 6 + 128]
    assert (caption_band.min(-1) < 100).sum() > 50  # dark text drawn under the tile
    with pytest.raises(ValueError, match="captions"):
        make_grid(images, ["one"])


def test_wrap_text_respects_width_and_line_budget():
    font = load_font(13)
    lines = wrap_text("a photo of a red circle and a blue square left of a star", font, 100, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 100 for line in lines)
    assert wrap_text("short", font, 100, 3) == ["short"]


def test_make_video_grid_has_one_row_per_video():
    videos = [[Image.new("RGB", (32, 32), (k * 40, 0, 0)) for k in range(5)], [Image.new("RGB", (32, 32))] * 3]
    grid = make_video_grid(videos, ["first", "second"])
    assert grid.width == 6 * 2 + 5 * 96 + 4 * 2
    pixels = np.asarray(grid)
    assert tuple(pixels[6 + 10, 6 + 2 * 98 + 10]) == (80, 0, 0)
    assert grid.height > 2 * 96
