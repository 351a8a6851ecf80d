"""Tensor <-> PIL conversion and labelled image/video grids (sample grids in training, ``vgen generate``,
``vgen data preview``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

GRID_BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
PADDING = 6


def tensor_to_pil(x: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)):
    """(C, H, W) -> one RGB ``PIL.Image``; (B, C, H, W) -> a list of them. C is 3 (or 1, shown as grey).

    ``value_range`` is the range the tensor's values live in: ``(-1, 1)`` for model outputs, ``(0, 1)`` for
    probabilities/images in unit range. Values outside are clipped.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if x.dim() == 4:
        return [tensor_to_pil(item, value_range) for item in x]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    low, high = value_range
    unit = ((x - low) / (high - low)).clamp(0.0, 1.0)
    pixels = (unit * 255.0 + 0.5).floor().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return Image.fromarray(rearrange(pixels, "c h w -> h w c").numpy(), "RGB")


#: Pillow modes of 16-bit (and 32-bit integer) grey images, whose values run to 65535 rather than 255.
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. Pillow's own ``convert("RGB")`` clips 16-bit grey values at 255 (a 16-bit PNG turns
    white); here they are scaled to 0..255 (``v8 = round(v16 / 257)``, exact for 8-bit values stored in 16 bits). Other
    modes convert as Pillow does (alpha is dropped, as clean-fid does)."""
    if image.mode in WIDE_GREY_MODES:
        values = np.asarray(image).astype(np.int64)
        grey = np.clip((values + 128) // 257, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """RGB ``PIL.Image`` -> float tensor (3, H, W) in ``value_range``."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    low, high = value_range
    return rearrange(pixels, "h w c -> c h w").float() / 255.0 * (high - low) + low


def load_font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (the fixed bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else len(text) * 6


def wrap_text(text: str, font, max_width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; a caption longer than ``max_lines`` ends with '...'."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if _text_width(font, candidate) <= max_width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_width(font, last + "...") > max_width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    # A single word wider than the tile is cut rather than spilling into the neighbour.
    out = []
    for line in lines:
        while len(line) > 1 and _text_width(font, line) > max_width:
            line = line[:-1]
        out.append(line)
    return out


def _upscale_factor(width: int, height: int, min_tile: int) -> int:
    """Integer factor so that the tile's longer side reaches ``min_tile`` (1 if it already does)."""
    return max(1, math.ceil(min_tile / max(width, height)))


def _line_height(font) -> int:
    bottom = font.getbbox("Ag")[3]
    return int(bottom) + 3


def make_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    caption_lines: int = 3,
    min_tile: int = 128,
    font_size: int = 13,
) -> Image.Image:
    """Tile images into a grid (``ncols`` per row, default ~square) with each caption wrapped under its tile.

    Tiles smaller than ``min_tile`` pixels are enlarged by an integer factor with NEAREST, so 64-pixel samples stay
    crisp and readable. Tiles of different sizes are centred in cells of the largest size.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    factor = _upscale_factor(max(im.width for im in images), max(im.height for im in images), min_tile)
    tiles = [im.convert("RGB").resize((im.width * factor, im.height * factor), Image.NEAREST) for im in images]
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    font = load_font(font_size)
    text_h = (_line_height(font) * caption_lines + 2) if captions is not None else 0

    grid = Image.new("RGB", (ncols * (cell_w + PADDING) + PADDING, nrows * (cell_h + text_h + PADDING) + PADDING))
    grid.paste(GRID_BACKGROUND, (0, 0, grid.width, grid.height))
    draw = ImageDraw.Draw(grid)
    for k, tile in enumerate(tiles):
        row, col = divmod(k, ncols)
        x = PADDING + col * (cell_w + PADDING)
        y = PADDING + row * (cell_h + text_h + PADDING)
        grid.paste(tile, (x + (cell_w - tile.width) // 2, y + (cell_h - tile.height) // 2))
        if captions is not None:
            for line_no, line in enumerate(wrap_text(captions[k], font, cell_w, caption_lines)):
                draw.text((x, y + cell_h + 2 + line_no * _line_height(font)), line, fill=TEXT_COLOR, font=font)
    return grid


def make_video_grid(
    videos: Sequence[Sequence[Image.Image]],
    captions: Sequence[str] | None = None,
    min_tile: int = 96,
    caption_lines: int = 1,
    font_size: int = 13,
) -> Image.Image:
    """One row of frames per video (frames left to right), its caption under the row."""
    if not videos or any(len(v) == 0 for v in videos):
        raise ValueError("make_video_grid needs at least one video, each with at least one frame")
    if captions is not None and len(captions) != len(videos):
        raise ValueError(f"got {len(videos)} videos but {len(captions)} captions")
    frames = [f for video in videos for f in video]
    factor = _upscale_factor(max(f.width for f in frames), max(f.height for f in frames), min_tile)
    cell_w = max(f.width for f in frames) * factor
    cell_h = max(f.height for f in frames) * factor
    ncols = max(len(v) for v in videos)
    font = load_font(font_size)
    text_h = (_line_height(font) * caption_lines + 2) if captions is not None else 0
    row_w = ncols * (cell_w + 2) - 2

    grid = Image.new("RGB", (row_w + 2 * PADDING, len(videos) * (cell_h + text_h + PADDING) + PADDING))
    grid.paste(GRID_BACKGROUND, (0, 0, grid.width, grid.height))
    draw = ImageDraw.Draw(grid)
    for row, video in enumerate(videos):
        y = PADDING + row * (cell_h + text_h + PADDING)
        for col, frame in enumerate(video):
            tile = frame.convert("RGB").resize((frame.width * factor, frame.height * factor), Image.NEAREST)
            grid.paste(tile, (PADDING + col * (cell_w + 2), y))
        if captions is not None:
            for line_no, line in enumerate(wrap_text(captions[row], font, row_w, caption_lines)):
                draw.text((PADDING, y + cell_h + 2 + line_no * _line_height(font)), line, fill=TEXT_COLOR, font=font)
    return grid
