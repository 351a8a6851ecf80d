"""What every autoencoder-training task shares (the VQ tokenizers of ``vgen train tokenizer`` and the KL autoencoder
of ``vgen train autoencoder``): image data from a world, the pixel reconstruction loss, PSNR and the
original | reconstruction sample grid.

Worlds: ``shapes`` (procedural Shapes images), ``moving_shapes`` (single frames of Moving Shapes videos, for
autoencoders that a video generator applies frame by frame) and ``folder`` (the images under ``data_path``). Every
dataset item is ``{"image": (3, H, W) float in [-1, 1], ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from vgen.errors import UserError

IMAGE_WORLDS = ("shapes", "moving_shapes", "folder")


def check_image_world(world: str, data_path: str) -> None:
    """One :class:`UserError` line for an unknown world or a folder world without a path."""
    if world not in IMAGE_WORLDS:
        raise UserError(f"task.world must be one of {', '.join(IMAGE_WORLDS)}, got {world!r}")
    if world == "folder" and not data_path:
        raise UserError("task.world is 'folder' but task.data_path is empty: set it to a folder of images")


class MovingShapesFramesDataset(torch.utils.data.Dataset):
    """Single frames of the Moving Shapes world: item ``i`` is frame ``i % num_frames`` of video ``i // num_frames``
    of ``MovingShapesDataset(resolution, num_frames, seed=seed)``, as ``{"image": (3, H, W) in [-1, 1], "index": i}``.

    A frame ``t`` is rendered with a world of ``t + 1`` frames (a video's first frames do not depend on its length),
    so an item costs about half a video on average instead of a whole one.
    """

    def __init__(self, resolution: int = 64, num_frames: int = 16, length: int = 100_000, seed: int = 0):
        from vgen.data.moving_shapes import MovingShapesWorld

        if length < 1:
            raise UserError(f"dataset length must be >= 1, got {length}")
        self.num_frames = int(MovingShapesWorld(resolution, num_frames, seed).num_frames)
        self.worlds = [MovingShapesWorld(resolution, t + 1, seed) for t in range(self.num_frames)]
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        video, t = divmod(int(index), self.num_frames)
        frame = torch.from_numpy(self.worlds[t].sample(video).frames[t])
        return {"image": frame.permute(2, 0, 1).float() / 127.5 - 1.0, "index": int(index)}


def build_image_dataset(world: str, data_path: str, resolution: int, length: int, seed: int,
                        num_frames: int = 16) -> torch.utils.data.Dataset:
    """The training images of a world (see the module docstring); ``length`` and ``seed`` apply to the procedural
    worlds, ``num_frames`` to ``moving_shapes``."""
    check_image_world(world, data_path)
    if world == "shapes":
        from vgen.data.shapes import ShapesDataset

        return ShapesDataset(resolution=resolution, length=length, seed=seed)
    if world == "moving_shapes":
        return MovingShapesFramesDataset(resolution=resolution, num_frames=num_frames, length=length, seed=seed)
    from vgen.data.folder import ImageFolderDataset

    return ImageFolderDataset(data_path, resolution=resolution)


def first_images(dataset: torch.utils.data.Dataset, n: int) -> torch.Tensor:
    """The first ``min(n, len(dataset))`` images of ``dataset``, stacked: (n, 3, H, W)."""
    return torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))])


def psnr_01(recon_B3HW: torch.Tensor, target_B3HW: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [-1, 1], measured on [0, 1] (reconstructions clamped first)."""
    diff = (recon_B3HW.detach().float().clamp(-1, 1) - target_B3HW.float()) / 2
    mse_B = diff.square().flatten(1).mean(dim=1).clamp_min(1e-10)
    return (-10 * torch.log10(mse_B)).mean()


def reconstruction_loss(recon_B3HW: torch.Tensor, img_B3HW: torch.Tensor, l1_weight: float,
                        l2_weight: float) -> torch.Tensor:
    """``l1_weight * mean|recon - img| + l2_weight * mean (recon - img)**2`` (scalar, float32)."""
    diff = recon_B3HW.float() - img_B3HW.float()
    return l1_weight * diff.abs().mean() + l2_weight * diff.square().mean()


@torch.no_grad()
def reconstruction_grid(img_B3HW: torch.Tensor, reconstruct: Callable[[torch.Tensor], torch.Tensor], step: int):
    """A ``PIL.Image`` of original | reconstruction pairs, each reconstruction captioned with its PSNR."""
    from vgen.imaging import make_grid, tensor_to_pil

    recon_B3HW = reconstruct(img_B3HW).float()
    tiles, captions = [], []
    for original, recon in zip(img_B3HW, recon_B3HW):
        tiles += [tensor_to_pil(original), tensor_to_pil(recon)]
        captions += ["original", f"step {step}: {float(psnr_01(recon[None], original[None])):.1f} dB"]
    ncols = 2 * max(1, math.ceil(math.sqrt(len(img_B3HW))))
    return make_grid(tiles, captions, ncols=ncols, caption_lines=1)
