"""``vgen train shapes-features``: the Shapes-world feature network used by FID (``--features shapes``).

The task renders a fixed cache of Shapes images once into memory (``num_images`` images at ``resolution``, world
seed ``seed``) and trains :class:`~vgen.eval.shapes_features.ShapesFeatureNet` to classify which shapes, which
colours, how many objects and which grid cells hold an object centre. ``export`` standardises the features (zero mean,
unit variance on ``eval_images`` images of a disjoint seed), then writes the model folder and ``accuracy.json``:
exact-match accuracy of every head on those images.

    vgen train shapes-features --config configs/shapes/features.yaml --out runs/shapes_features
    # then copy runs/shapes_features/final/{config.json,diffusion_pytorch_model.safetensors} to
    # vgen/assets/shapes_features/
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from vgen.eval.shapes_features import ShapesFeatureNet, calibrate_features, head_accuracies, head_losses
from vgen.train.task import TrainTask


@dataclass
class ShapesFeaturesConfig:
    """The ``task:`` section of ``configs/shapes/features.yaml``."""

    resolution: int = 64
    #: images rendered once and cycled through during training
    num_images: int = 16000
    seed: int = 1000
    #: held-out images (world seed ``seed + 1``) for the accuracy written by ``export``
    eval_images: int = 2000
    widths: tuple[int, ...] = (24, 48, 96)
    feature_dim: int = 128
    max_count: int = 8
    grid_size: int = 4


def object_targets(objects: list, resolution: int, max_count: int, grid_size: int) -> dict[str, torch.Tensor]:
    """Head targets of one image from its ``ShapeObject`` list: multi-hot ``shapes (6,)``, ``colors (10,)``,
    ``grid (grid_size**2,)`` (cells holding an object centre) and ``count ()`` (clipped to ``max_count``)."""
    from vgen.data.shapes import COLOR_NAMES, SHAPE_NAMES

    shapes = torch.zeros(len(SHAPE_NAMES))
    colors = torch.zeros(len(COLOR_NAMES))
    grid = torch.zeros(grid_size * grid_size)
    for obj in objects:
        shapes[SHAPE_NAMES.index(obj.shape)] = 1
        colors[COLOR_NAMES.index(obj.color)] = 1
        col, row = (min(int(c / resolution * grid_size), grid_size - 1) for c in obj.center)
        grid[row * grid_size + col] = 1
    return {"shapes": shapes, "colors": colors, "grid": grid, "count": torch.tensor(min(len(objects), max_count))}


class ShapesCache(torch.utils.data.Dataset):
    """Shapes images rendered once: items ``dict(image uint8 (3, H, W), shapes, colors, grid, count)``."""

    def __init__(self, n: int, resolution: int, seed: int, max_count: int, grid_size: int, progress: bool = True):
        from vgen.data.shapes import ShapesWorld

        world = ShapesWorld(resolution=resolution, seed=seed)
        images, targets = [], []
        for i in tqdm(range(n), desc=f"render shapes cache (seed {seed})", disable=not progress):
            sample = world.sample(i)
            images.append(np.asarray(sample.image.convert("RGB")))
            targets.append(object_targets(sample.objects, resolution, max_count, grid_size))
        self.images_N3HW = rearrange(torch.from_numpy(np.stack(images)), "n h w c -> n c h w").contiguous()
        self.targets = {key: torch.stack([t[key] for t in targets]) for key in targets[0]}

    def __len__(self) -> int:
        return len(self.images_N3HW)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images_N3HW[i], **{key: value[i] for key, value in self.targets.items()}}


class ShapesFeaturesTask(TrainTask):
    config_class = ShapesFeaturesConfig

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return ShapesFeatureNet(sample_size=cfg.resolution, widths=tuple(cfg.widths), feature_dim=cfg.feature_dim,
                                max_count=cfg.max_count, grid_size=cfg.grid_size)

    def build_dataset(self) -> torch.utils.data.Dataset:
        cfg = self.cfg
        return ShapesCache(cfg.num_images, cfg.resolution, cfg.seed, cfg.max_count, cfg.grid_size)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        from vgen.train.loop import unwrap

        logits = unwrap(model).heads(model(batch["image"].float()))
        losses = head_losses(logits, batch)
        metrics = {f"loss_{name}": value.item() for name, value in losses.items()}
        metrics.update({f"acc_{name}": value for name, value in head_accuracies(logits, batch).items()})
        return sum(losses.values()), metrics

    def held_out(self) -> ShapesCache:
        """``eval_images`` images of world seed ``seed + 1`` (disjoint from the training images)."""
        cfg = self.cfg
        return ShapesCache(cfg.eval_images, cfg.resolution, cfg.seed + 1, cfg.max_count, cfg.grid_size)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, held_out: ShapesCache, batch_size: int = 250) -> dict[str, float]:
        """Exact-match accuracy of each head on the ``held_out`` images."""
        model.eval()
        device = next(model.parameters()).device
        sums: dict[str, float] = {}
        for start in range(0, len(held_out), batch_size):
            batch = held_out[start : start + batch_size]
            batch = {key: value.to(device) for key, value in batch.items()}
            acc = head_accuracies(model.heads(model(batch["image"].float())), batch)
            for key, value in acc.items():
                sums[key] = sums.get(key, 0.0) + value * len(batch["image"])
        return {key: value / len(held_out) for key, value in sums.items()}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Standardise the features on the held-out images, save the model and its held-out accuracy."""
        held_out = self.held_out()
        model.eval()
        calibrate_features(model, held_out.images_N3HW)
        model.save_pretrained(out_dir)
        accuracy = {"eval_images": self.cfg.eval_images, "seed": self.cfg.seed + 1, **self.evaluate(model, held_out)}
        (Path(out_dir) / "accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")
