"""The Shapes-world feature network: the Inception stand-in that FID uses for Shapes images.

:class:`ShapesFeatureNet` is a small CNN trained on the procedural Shapes world (``vgen.data.shapes``) as a
multi-head classifier of *which shapes* (multi-hot over ``SHAPE_NAMES``), *which colours* (multi-hot over
``COLOR_NAMES``), *how many objects* (0 .. ``max_count``) and *where* (multi-hot occupancy of a ``grid_size`` x
``grid_size`` grid of object centres). Its ``feature_dim``-d embedding, the layer the heads read, plays the role of
Inception's pool3 features: FID on it is sensitive to shape, colour, count and layout errors of a generator.

The trained weights ship in ``vgen/assets/shapes_features/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``)
and are trained with ``vgen train shapes-features --config configs/shapes/features.yaml``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

import vgen

#: folder holding the shipped weights (config.json + diffusion_pytorch_model.safetensors); found through the
#: ``vgen`` package because this module is installed as ``vgen.eval`` from the top-level ``eval/`` folder.
SHAPES_FEATURES_DIR = Path(vgen.__file__).resolve().parent / "assets" / "shapes_features"


def _conv_block(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(groups, c_out), c_out),
        nn.SiLU(),
    )


class ShapesFeatureNet(ModelMixin, ConfigMixin):
    """CNN feature extractor for Shapes-world images.

    Input: float images ``(B, 3, H, W)`` with values in [0, 255] (clean-fid's extractor contract); trained at
    ``H = W = sample_size``. Output of :meth:`forward`: features ``(B, feature_dim)``.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        widths: tuple[int, ...] = (24, 48, 96),
        feature_dim: int = 128,
        pool_size: int = 4,
        num_shapes: int = 6,
        num_colors: int = 10,
        max_count: int = 8,
        grid_size: int = 4,
        norm_groups: int = 8,
    ):
        super().__init__()
        blocks = []
        c_in = 3
        for width in widths:
            # each stage halves the resolution, then refines at that resolution
            blocks += [_conv_block(c_in, width, 2, norm_groups), _conv_block(width, width, 1, norm_groups)]
            c_in = width
        self.trunk = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.embed = nn.Linear(c_in * pool_size * pool_size, feature_dim)
        self.head_act = nn.SiLU()
        self.shape_head = nn.Linear(feature_dim, num_shapes)
        self.color_head = nn.Linear(feature_dim, num_colors)
        self.count_head = nn.Linear(feature_dim, max_count + 1)
        self.grid_head = nn.Linear(feature_dim, grid_size * grid_size)
        # Fixed standardisation of the features (identity while training; set by `calibrate_features` after it), so
        # that FID / KID on them have the scale of unit-variance features.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` floats in [0, 255] -> standardised features ``(B, feature_dim)``."""
        x_B3HW = images_B3HW.float() / 127.5 - 1.0
        h_BChw = self.pool(self.trunk(x_B3HW))
        embedding_BF = self.embed(rearrange(h_BChw, "b c h w -> b (c h w)"))
        return (embedding_BF - self.feature_mean) / self.feature_std

    def heads(self, features_BF: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features ``(B, F)`` (as :meth:`forward` returns them) -> logits: ``shapes (B, num_shapes)``,
        ``colors (B, num_colors)``, ``count (B, max_count + 1)``, ``grid (B, grid_size**2)``."""
        h_BF = self.head_act(features_BF * self.feature_std + self.feature_mean)
        return {
            "shapes": self.shape_head(h_BF),
            "colors": self.color_head(h_BF),
            "count": self.count_head(h_BF),
            "grid": self.grid_head(h_BF),
        }


@torch.no_grad()
def calibrate_features(net: ShapesFeatureNet, images_N3HW: torch.Tensor, batch_size: int = 250) -> None:
    """Set ``net``'s feature standardisation so that its features on ``images_N3HW`` (uint8 or float in [0, 255])
    have zero mean and unit variance per dimension. The heads' outputs do not change."""
    net.feature_mean.zero_()
    net.feature_std.fill_(1.0)
    device = net.feature_mean.device
    feats = torch.cat([net(images_N3HW[i : i + batch_size].to(device).float())
                       for i in range(0, len(images_N3HW), batch_size)])
    net.feature_mean.copy_(feats.mean(dim=0))
    net.feature_std.copy_(feats.std(dim=0).clamp_min(1e-6))


def head_losses(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head losses: BCE for the multi-hot heads (shapes, colors, grid), cross-entropy for the count."""
    return {
        "shapes": F.binary_cross_entropy_with_logits(logits["shapes"], targets["shapes"].float()),
        "colors": F.binary_cross_entropy_with_logits(logits["colors"], targets["colors"].float()),
        "grid": F.binary_cross_entropy_with_logits(logits["grid"], targets["grid"].float()),
        "count": F.cross_entropy(logits["count"], targets["count"].long()),
    }


@torch.no_grad()
def head_accuracies(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Exact-match accuracy per head: the whole multi-hot set must be right (threshold 0), or the argmax count."""
    acc = {name: ((logits[name] > 0) == targets[name].bool()).all(dim=1).float().mean().item()
           for name in ("shapes", "colors", "grid")}
    acc["count"] = (logits["count"].argmax(dim=1) == targets["count"].long()).float().mean().item()
    return acc


def weights_digest(folder: str | Path = SHAPES_FEATURES_DIR) -> str:
    """First 12 hex digits of the SHA-256 of the weights file: recorded in FID statistics so that statistics made
    with different feature networks are never compared."""
    path = Path(folder) / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_shapes_feature_net(folder: str | Path | None = None) -> ShapesFeatureNet:
    """The shipped (or a given) trained :class:`ShapesFeatureNet`, in eval mode, on CPU."""
    from vgen.errors import UserError

    folder = Path(folder) if folder is not None else SHAPES_FEATURES_DIR
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise UserError(
            f"Shapes feature weights not found in {folder}; reinstall vgen (they ship in vgen/assets/shapes_features) "
            "or train them with: vgen train shapes-features --config configs/shapes/features.yaml"
        )
    return ShapesFeatureNet.from_pretrained(folder, low_cpu_mem_usage=False).eval()
