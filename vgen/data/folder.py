"""A user's image folder as a dataset: ``vgen`` trains and evaluates on your own pictures.

Layout::

    my_images/
        metadata.jsonl        # optional: {"file_name": "cats/001.jpg", "text": "a photo of a cat"} per line
        cats/001.jpg          # .jpg .jpeg .png .webp, any depth
        dogs/002.png

Captions come from ``metadata.jsonl`` (Hugging Face ``imagefolder`` format, ``file_name`` relative to the folder);
images without an entry get ``""``. Class labels come from the first sub-folder name (sorted; images directly in
the folder form class ``"."``). Every file is decoded once when the dataset is built (JPEGs at reduced size, so this
is cheap); unreadable files are skipped with a warning each and a count at the end.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from vgen.errors import UserError
from vgen.imaging import pil_to_tensor, to_rgb8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
METADATA_FILE = "metadata.jsonl"
MIN_RESOLUTION, MAX_RESOLUTION = 8, 4096
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file to RGB; transparent pixels are composited onto white."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return to_rgb8(image)


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is ``resolution`` (bicubic, after box-halving very large images), then crop the
    centre ``resolution x resolution``."""
    while min(image.size) >= 2 * resolution:
        image = image.reduce(2)
    scale = resolution / min(image.size)
    width = max(resolution, round(image.width * scale))
    height = max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _decodes(path: Path, resolution: int) -> str | None:
    """None if the file decodes, else the reason. JPEGs decode at a reduced scale (``draft``), which is cheap."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (resolution, resolution))
            image.load()
    except _DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def read_metadata(folder: Path) -> dict[str, str]:
    """``metadata.jsonl`` -> {relative file name: caption}; absent file -> {}."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; write one JSON object per line, e.g. "
                        '{"file_name": "cats/001.jpg", "text": "a photo of a cat"}') from None
    captions: dict[str, str] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {line_no} is not valid JSON ({err.msg}); fix or remove that line") from err
        if not isinstance(entry, dict) or "file_name" not in entry:
            raise UserError(f"{path} line {line_no} needs a 'file_name' (and a 'text' caption)")
        captions[Path(str(entry["file_name"])).as_posix()] = str(entry.get("text", ""))
    return captions


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under ``path`` (recursive), resized (shorter side) and centre-cropped to ``resolution``.

    Item: ``{"image": (3, H, W) float in [-1, 1], "caption": str, "class_label": int, "index": int, "path": str}``.
    ``captions=False`` gives every image the empty caption. ``verify=False`` skips the decode check (faster start
    on huge folders; an unreadable file then fails when it is loaded).
    """

    def __init__(self, path: str | Path, resolution: int = 64, captions: bool = True, verify: bool = True):
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise UserError(f"image folder not found: {self.root} (pass a directory of .jpg/.jpeg/.png/.webp files)")
        if not isinstance(resolution, int) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            raise UserError(
                f"resolution must be an integer from {MIN_RESOLUTION} to {MAX_RESOLUTION}, got {resolution!r}"
            )
        self.resolution = resolution
        candidates = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not candidates:
            raise UserError(
                f"no images in {self.root}: expected files ending in {', '.join(IMAGE_EXTENSIONS)} (searched "
                "sub-folders too)"
            )
        self.files: list[Path] = []
        self.skipped: list[Path] = []
        for file in candidates if verify else []:
            reason = _decodes(file, resolution)
            if reason is None:
                self.files.append(file)
            else:
                self.skipped.append(file)
                warnings.warn(f"skipping unreadable image {file} ({reason})", stacklevel=2)
        if not verify:
            self.files = candidates
        if self.skipped:
            warnings.warn(
                f"ImageFolderDataset: skipped {len(self.skipped)} unreadable of {len(candidates)} image files in "
                f"{self.root}",
                stacklevel=2,
            )
        if not self.files:
            raise UserError(f"none of the {len(candidates)} image files in {self.root} could be decoded")
        metadata = read_metadata(self.root) if captions else {}
        self.relative_names = [f.relative_to(self.root).as_posix() for f in self.files]
        self.captions = [metadata.get(name, "") for name in self.relative_names]
        groups = [name.split("/")[0] if "/" in name else "." for name in self.relative_names]
        self.classes = sorted(set(groups))
        self.class_labels = [self.classes.index(g) for g in groups]

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, index: int) -> Image.Image:
        """The ``index``-th image, resized and centre-cropped (RGB PIL)."""
        try:
            image = open_rgb(self.files[index])
        except _DECODE_ERRORS as err:
            raise UserError(f"cannot read image {self.files[index]}: {err}; remove or replace the file") from err
        return resize_center_crop(image, self.resolution)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for a folder of {len(self.files)} images")
        return {
            "image": pil_to_tensor(self.load_image(index), value_range=(-1.0, 1.0)),
            "caption": self.captions[index],
            "class_label": self.class_labels[index],
            "index": index,
            "path": str(self.files[index]),
        }
