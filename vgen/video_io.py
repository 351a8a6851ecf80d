"""Writing generated videos: ``.mp4`` (through the optional ``video`` extra: imageio + imageio-ffmpeg, which ships
an ffmpeg binary in its wheel), ``.gif`` (Pillow) and ``.png`` (a frame strip: one row of frames per video, its
caption under it).

Several videos go into one file side by side (a grid per frame). Frames are enlarged by an integer ``scale`` with
nearest-neighbour sampling, so 32 px frames stay crisp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vgen.errors import UserError

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")
MP4_MISSING = ("writing .mp4 needs the optional video extra (imageio and imageio-ffmpeg): pip install 'vgen[video]'; "
               "or write a .gif or a .png frame strip instead")


def tile_videos(videos: Sequence[np.ndarray], scale: int = 1, gap: int = 2) -> np.ndarray:
    """Videos (T, H, W, 3) uint8 of equal shape -> one video (T, H', W', 3): a near-square grid per frame,
    enlarged ``scale`` times."""
    shapes = {v.shape for v in videos}
    if not videos or len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"tile_videos needs videos of one (T, H, W, 3) shape, got {sorted(shapes)}")
    T, H, W, _ = videos[0].shape
    big = [v.repeat(scale, 1).repeat(scale, 2) for v in videos]
    cols = math.ceil(math.sqrt(len(videos)))
    rows = math.ceil(len(videos) / cols)
    h, w = H * scale, W * scale
    out = np.full((T, rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
    for k, video in enumerate(big):
        r, c = divmod(k, cols)
        out[:, r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = video
    return out


def _even(video: np.ndarray) -> np.ndarray:
    """Pad to even height and width (H.264 in yuv420p needs them)."""
    T, H, W, _ = video.shape
    return np.pad(video, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), constant_values=255)


def save_video(videos: Sequence[np.ndarray], path: str | Path, fps: float = 8.0, scale: int = 4,
               captions: Sequence[str] | None = None) -> Path:
    """Write ``videos`` (each (T, H, W, 3) uint8) to ``path`` by its suffix (.mp4, .gif or .png); returns the path.

    A missing mp4 writer is a :class:`UserError` saying what to install."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UserError(f"cannot write {path.name}: the output must end in {', '.join(VIDEO_SUFFIXES)}")
    if fps <= 0 or scale < 1:
        raise UserError(f"fps must be > 0 and scale >= 1, got fps={fps}, scale={scale}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        from vgen.imaging import make_video_grid

        clips = [[Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
                  for frame in video] for video in videos]
        make_video_grid(clips, list(captions) if captions is not None else None, min_tile=1).save(path)
        return path
    video = tile_videos(list(videos), scale)
    if suffix == ".gif":
        frames = [Image.fromarray(frame) for frame in video]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
        return path
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary)
    except ImportError:
        raise UserError(MP4_MISSING) from None
    # macro_block_size=1: keep the exact size (imageio would otherwise resize to multiples of 16)
    imageio.mimwrite(str(path), list(_even(video)), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                     pixelformat="yuv420p")
    return path
