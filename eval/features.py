"""Feature sources for FID, run through clean-fid's feature pipeline.

A :class:`FeatureExtractor` bundles what clean-fid needs to turn images into features: the network ``fn`` (float
images ``(B, 3, h, w)`` in [0, 255], already resized, on ``device`` -> ``(B, F)``), the clean-fid ``mode`` and the
per-image resizer ``fn_resize`` (uint8 ``(H, W, 3)`` -> array ``(h, w, 3)``). Three sources:

* ``inception``: clean-fid's TorchScript Inception (``inception-2015-12-05.pt``, the port of the TF 2015-12-05
  graph). It is used only when the file is already on disk, never downloaded: ``--inception-path`` (file or
  folder), else ``$VGEN_INCEPTION_PATH``, else clean-fid's own location (``/tmp/inception-2015-12-05.pt``; ``./`` on
  Windows). Modes: ``clean`` (PIL bicubic resize to 299 outside the net, on float32, no quantisation) and
  ``legacy_tensorflow`` (TF1 bilinear resize inside the net: matches TF FID, i.e. the ADM evaluator protocol).
* ``shapes``: the shipped :class:`~vgen.eval.shapes_features.ShapesFeatureNet` (64x64 input; images of another
  size are resized with clean-fid's ``clean`` resizer, PIL bicubic on float32). Mode ``clean`` only.
* ``module.path:callable``: any user extractor; the callable is called with no arguments and returns a module or
  function with clean-fid's contract. It may set ``input_size`` (default 299): mode ``clean`` resizes to it,
  ``legacy_tensorflow`` passes images at their own size (the extractor resizes).

Images come from folders (clean-fid's file list and order) or uint8 arrays ``(N, H, W, 3)`` (``.npz`` files in the ADM
evaluator format, rendered worlds); both paths convert images to tensors exactly as clean-fid does. Unlike clean-fid,
a folder's unreadable files are skipped with a warning each and 16-bit grey PNGs are scaled, not clipped to white.
"""

from __future__ import annotations

import importlib
import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import numpy as np
import torch
import torchvision
from cleanfid.fid import get_batch_features
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer, make_resizer
from cleanfid.utils import EXTENSIONS
from PIL import Image
from tqdm import tqdm

from vgen.devices import resolve_device
from vgen.errors import UserError
from vgen.imaging import to_rgb8

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "VGEN_INCEPTION_PATH"
MODES = ("clean", "legacy_tensorflow")


@dataclass
class FeatureExtractor:
    """A feature source ready for clean-fid: ``fn`` maps float ``(B, 3, h, w)`` in [0, 255] on ``device`` to
    ``(B, F)``; ``fn_resize`` maps one uint8 ``(H, W, 3)`` image to the array ``fn`` expects."""

    name: str  # "inception", "shapes" or "module.path:callable": recorded in statistics files
    mode: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    fn_resize: Callable[[np.ndarray], np.ndarray]
    device: torch.device
    digest: str = ""  # identifies the weights where it matters (the Shapes net); "" otherwise


def cleanfid_inception_location() -> Path:
    """Where clean-fid itself looks for (and would download) the Inception file."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file to use: ``path`` (file or folder), else ``$VGEN_INCEPTION_PATH``, else
    clean-fid's location. Raises :class:`UserError` naming the file and where to put it when it is absent."""
    given = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    candidate = Path(given).expanduser() if given is not None else cleanfid_inception_location()
    if candidate.name != INCEPTION_FILE:
        if candidate.is_file():
            raise UserError(f"the Inception weights file must be named {INCEPTION_FILE} (got {candidate})")
        candidate = candidate / INCEPTION_FILE  # a folder (existing or not) that should hold the file
    if not candidate.is_file():
        raise UserError(
            f"Inception weights not found: {candidate} is missing. FID with --features inception needs clean-fid's "
            f"TorchScript file {INCEPTION_FILE} (from {INCEPTION_URL}); vgen never downloads it. Copy it to "
            f"{candidate}, or point --inception-path / ${INCEPTION_ENV} at it "
            f"(default location: {cleanfid_inception_location()}), or use --features shapes"
        )
    return candidate


def _inception_extractor(mode: str, device: torch.device, path: str | os.PathLike | None) -> FeatureExtractor:
    weights = resolve_inception_path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.14 deprecates torch.jit.load
        # download=False: the file was found above, so clean-fid must not try the network
        model = InceptionV3W(str(weights.parent), download=False, resize_inside=mode == "legacy_tensorflow")
    model = model.to(device).eval()
    return FeatureExtractor("inception", mode, model, build_resizer(mode), device)


def _shapes_extractor(mode: str, device: torch.device) -> FeatureExtractor:
    from vgen.eval.shapes_features import SHAPES_FEATURES_DIR, load_shapes_feature_net, weights_digest

    if mode != "clean":
        raise UserError(f"--mode {mode} is an Inception protocol; Shapes features use --mode clean")
    net = load_shapes_feature_net().to(device)
    size = net.config.sample_size
    resize = make_resizer("PIL", False, "bicubic", (size, size))
    return FeatureExtractor("shapes", mode, net, resize, device, digest=weights_digest(SHAPES_FEATURES_DIR))


def _custom_extractor(spec: str, mode: str, device: torch.device) -> FeatureExtractor:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"--features {spec!r}: expected 'inception', 'shapes' or 'module.path:callable'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"--features {spec!r}: cannot import {attr} from {module_name} ({err})") from err
    fn = factory()
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device).eval()
    if not callable(fn):
        raise UserError(f"--features {spec!r}: {attr}() must return a module or function images -> features")
    size = int(getattr(fn, "input_size", 299))
    resize = make_resizer("PIL", False, "bicubic", (size, size)) if mode == "clean" else build_resizer(mode)
    return FeatureExtractor(spec, mode, fn, resize, device)


def build_extractor(
    features: str = "inception",
    mode: str = "clean",
    device: str | torch.device | None = None,
    inception_path: str | os.PathLike | None = None,
) -> FeatureExtractor:
    """``features``: ``inception`` | ``shapes`` | ``module.path:callable``; ``mode``: ``clean`` | ``legacy_tensorflow``."""
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    device = resolve_device(device)
    if features == "inception":
        return _inception_extractor(mode, device, inception_path)
    if features == "shapes":
        return _shapes_extractor(mode, device)
    return _custom_extractor(features, mode, device)


def _resized_tensor(pixels_HW3: np.ndarray, fn_resize: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    """One uint8 image -> the resized float tensor ``(3, h, w)`` in [0, 255], converted exactly as clean-fid's
    ``ResizeDataset`` does (so folder and array inputs give identical features)."""
    resized = fn_resize(np.asarray(pixels_HW3))
    if resized.dtype == np.uint8:
        return _TO_TENSOR(np.array(resized)) * 255
    return _TO_TENSOR(resized.astype(np.float32, copy=False))


_TO_TENSOR = torchvision.transforms.ToTensor()


class _ArrayImages(torch.utils.data.Dataset):
    """uint8 images ``(N, H, W, 3)`` -> resized float tensors ``(3, h, w)`` in [0, 255]."""

    def __init__(self, images_NHW3: np.ndarray, fn_resize: Callable[[np.ndarray], np.ndarray]):
        self.images = images_NHW3
        self.fn_resize = fn_resize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _resized_tensor(self.images[i], self.fn_resize)


def array_features(
    extractor: FeatureExtractor,
    images_NHW3: np.ndarray,
    batch_size: int = 64,
    description: str = "features",
    verbose: bool = True,
) -> np.ndarray:
    """Features ``(N, F)`` (float32 numpy) of uint8 images ``(N, H, W, 3)``."""
    check_image_array(images_NHW3, "images")
    loader = torch.utils.data.DataLoader(_ArrayImages(images_NHW3, extractor.fn_resize), batch_size=batch_size)
    feats = [get_batch_features(batch, extractor.fn, extractor.device)
             for batch in tqdm(loader, desc=description, disable=None if verbose else True)]
    return np.concatenate(feats).astype(np.float32, copy=False)


#: What decoding an image file can raise (a corrupt file, a dangling link, a file that is not an image).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_image_file(path: str) -> np.ndarray:
    """uint8 ``(H, W, 3)`` pixels of an image file (``.npy``: the stored array, as clean-fid reads it); 16-bit grey
    images are scaled to 8 bits instead of clipping to white (:func:`vgen.imaging.to_rgb8`)."""
    if path.endswith(".npy"):
        return np.load(path)
    with Image.open(path) as image:
        return np.array(to_rgb8(image))


class _FileImages(torch.utils.data.Dataset):
    """Image files -> ``(path, resized tensor)``, or ``(path, reason)`` for a file that cannot be read."""

    def __init__(self, files: list[str], fn_resize: Callable[[np.ndarray], np.ndarray]):
        self.files = files
        self.fn_resize = fn_resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | str]:
        path = self.files[i]
        try:
            return path, _resized_tensor(read_image_file(path), self.fn_resize)
        except DECODE_ERRORS as err:
            return path, f"{type(err).__name__}: {err}"


def _readable_only(items: list[tuple[str, torch.Tensor | str]]) -> tuple[torch.Tensor | None, list[tuple[str, str]]]:
    """collate_fn of :class:`_FileImages`: the stacked readable images and ``(path, reason)`` of the others."""
    tensors = [value for _, value in items if isinstance(value, torch.Tensor)]
    failed = [(path, value) for path, value in items if isinstance(value, str)]
    if len({tuple(t.shape) for t in tensors}) > 1:
        raise _SizesDiffer
    return (torch.stack(tensors) if tensors else None), failed


class _SizesDiffer(Exception):
    """Images of one batch have different sizes after the mode's resize (legacy_tensorflow keeps their size)."""


def folder_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursive, clean-fid's extensions), sorted as clean-fid sorts them."""
    files = sorted({f for ext in EXTENSIONS for f in glob(os.path.join(str(folder), f"**/*.{ext}"), recursive=True)})
    if not files:
        raise UserError(f"no images found in {folder} (expected png/jpg/webp/... files, searched recursively)")
    return files


def folder_resolution(folder: str | os.PathLike) -> int:
    """Height in pixels of the first readable image of ``folder`` (the resolution recorded with its statistics)."""
    for path in folder_images(folder):
        try:
            return int(read_image_file(path).shape[0])
        except DECODE_ERRORS:
            continue
    raise UserError(f"none of the image files in {folder} can be read")


def folder_features(
    extractor: FeatureExtractor,
    folder: str | os.PathLike,
    batch_size: int = 64,
    num_workers: int = 0,
    limit: int | None = None,
    verbose: bool = True,
) -> np.ndarray:
    """Features ``(N, F)`` of the first ``limit`` (default all) readable images of ``folder``, in clean-fid's file
    order and with clean-fid's conversion. Unreadable files (corrupt, dangling links) are skipped with one warning
    each and a count at the end, as the folder data world does."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    files = folder_images(folder)
    loader = torch.utils.data.DataLoader(_FileImages(files, extractor.fn_resize), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_readable_only)
    feats, skipped, wanted = [], 0, limit if limit is not None else len(files)
    have = 0
    try:
        for batch, failed in tqdm(loader, desc=f"features {Path(folder).name}",
                                  disable=None if verbose else True):
            for path, reason in failed:
                warnings.warn(f"skipping unreadable image {path} ({reason})", stacklevel=2)
            skipped += len(failed)
            if batch is not None:
                feats.append(get_batch_features(batch, extractor.fn, extractor.device)[: wanted - have])
                have += len(feats[-1])
            if have >= wanted:
                break
    except _SizesDiffer:
        raise UserError(f"images in {folder} differ in size; mode {extractor.mode} needs equal sizes") from None
    if skipped:
        warnings.warn(f"skipped {skipped} unreadable of {len(files)} image files in {folder}", stacklevel=2)
    if not feats:
        raise UserError(f"none of the {len(files)} image files in {folder} can be read")
    return np.concatenate(feats).astype(np.float32, copy=False)


def check_image_array(images: np.ndarray, what: str) -> None:
    """Images must be uint8 ``(N, H, W, 3)`` (the ADM evaluator's ``arr_0`` layout)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(
            f"{what} must be uint8 images of shape (N, H, W, 3) (NHWC, as OpenAI's ADM evaluator expects), "
            f"got dtype {images.dtype} shape {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise UserError(f"{what} holds no images")
