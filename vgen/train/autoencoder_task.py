"""``vgen train autoencoder``: train a KL autoencoder (:class:`~vgen.tokenizers.kl_autoencoder.AutoencoderKL`, MAR's
layout) whose latents feed the continuous-token generators (FlowAR, xAR, the frame-wise video model).

Losses: an L1 + L2 pixel reconstruction loss on the decoded posterior sample (reparameterised) plus
``kl_weight`` x the KL divergence to N(0, I), averaged per latent element. The KL weight is small on purpose: it only
keeps the posterior a smooth, bounded Gaussian instead of a free code; reconstruction dominates, as in LDM (whose
1e-6 on summed losses is about 1e-7 per element at these sizes). LDM's perceptual (LPIPS) and adversarial losses
are left out: they need pretrained networks that cannot be downloaded here, and on the Shapes world the pixel losses
reach > 30 dB.

    vgen train autoencoder --config configs/shapes/kl_autoencoder.yaml --out runs/kl_shapes

Logged metrics: ``recon_loss``, ``kl`` (per latent element), ``psnr`` (dB), ``latent_std`` (std of the posterior
samples of the batch: ``1 / latent_std`` is the scale factor that gives unit-variance latents) and ``posterior_std``
(mean std of the posterior). At export the scale factor is measured as 1 / std of posterior samples of the first
``scale_factor_images`` training images (LDM's rule) and saved in the model config, unless ``scale_factor`` fixes
it; ``final/latent_stats.json`` records the measurement. Worlds: ``shapes``, ``moving_shapes`` (single frames; the
video generator encodes each frame) and ``folder``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgen.errors import UserError
from vgen.train.reconstruction import (
    build_image_dataset,
    check_image_world,
    first_images,
    psnr_01,
    reconstruction_grid,
    reconstruction_loss,
)
from vgen.train.task import TrainTask


@dataclass
class AutoencoderTaskConfig:
    """The ``task:`` section of a KL autoencoder run config (``configs/shapes/kl_autoencoder.yaml``)."""

    # --- model (AutoencoderKL config; the defaults: 64 px -> 16x16x4 latents, ~1M parameters)
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    z_channels: int = 4
    encoder_attn_levels: tuple[int, ...] = ()
    decoder_attn_levels: tuple[int, ...] = ()
    dropout: float = 0.0
    norm_num_groups: int = 32
    # --- data
    #: "shapes", "moving_shapes" (video frames) or "folder" (images under data_path)
    world: str = "shapes"
    data_path: str = ""
    #: image side; a multiple of the downsampling 2 ** (len(ch_mult) - 1)
    resolution: int = 64
    #: number of Shapes images / Moving Shapes frames (procedural worlds)
    dataset_length: int = 100_000
    seed: int = 0
    #: frames per Moving Shapes video
    num_frames: int = 16
    # --- losses
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    #: weight of the KL term (per latent element)
    kl_weight: float = 1e-4
    # --- scale factor for the generators
    #: > 0 fixes the saved scale_factor; 0 measures 1 / std of the training latents at export
    scale_factor: float = 0.0
    #: how many training images the export's measurement encodes
    scale_factor_images: int = 2048
    # --- sample grids
    num_sample_images: int = 8


class AutoencoderTask(TrainTask):
    """Trains :class:`AutoencoderKL` on the Shapes world, Moving Shapes frames or an image folder."""

    config_class = AutoencoderTaskConfig

    def __init__(self, cfg: AutoencoderTaskConfig):
        super().__init__(cfg)
        check_image_world(cfg.world, cfg.data_path)
        downsample = 2 ** (len(cfg.ch_mult) - 1) if cfg.ch_mult else 0
        if not downsample or cfg.resolution < downsample or cfg.resolution % downsample:
            raise UserError(
                f"task.resolution {cfg.resolution} does not fit the autoencoder: it must be a multiple of the "
                f"downsampling 2**(len(ch_mult)-1) = {downsample}; change resolution or ch_mult"
            )
        if cfg.kl_weight < 0 or cfg.scale_factor < 0 or cfg.scale_factor_images < 1:
            raise UserError("task.kl_weight and task.scale_factor must be >= 0 and task.scale_factor_images >= 1")
        self._dataset: torch.utils.data.Dataset | None = None
        self._sample_batch: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- TrainTask API
    def build_model(self) -> nn.Module:
        from vgen.tokenizers.kl_autoencoder import AutoencoderKL

        cfg = self.cfg
        return AutoencoderKL(
            z_channels=cfg.z_channels, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
            encoder_attn_levels=list(cfg.encoder_attn_levels), decoder_attn_levels=list(cfg.decoder_attn_levels),
            dropout=cfg.dropout, norm_num_groups=cfg.norm_num_groups, scale_factor=cfg.scale_factor or 1.0,
        )

    def build_dataset(self) -> torch.utils.data.Dataset:
        cfg = self.cfg
        self._dataset = build_image_dataset(
            cfg.world, cfg.data_path, cfg.resolution, cfg.dataset_length, cfg.seed, cfg.num_frames
        )
        return self._dataset

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        img_B3HW = batch["image"]
        recon_B3HW, posterior = model(img_B3HW)
        recon_loss = reconstruction_loss(recon_B3HW, img_B3HW, cfg.l1_weight, cfg.l2_weight)
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        loss = recon_loss + cfg.kl_weight * kl
        with torch.no_grad():
            z_BChw = posterior.mean + posterior.std * torch.randn_like(posterior.std)
        metrics = {
            "recon_loss": recon_loss.detach(),
            "kl": kl.detach(),
            "psnr": psnr_01(recon_B3HW, img_B3HW),
            "latent_std": z_BChw.float().std(),
            "posterior_std": posterior.std.detach().float().mean(),
        }
        return loss, metrics

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, step: int):
        """Original | reconstruction (posterior mode) pairs of the first ``num_sample_images`` training images."""
        img_B3HW = self._sample_images().to(next(model.parameters()).device)
        return reconstruction_grid(img_B3HW, model.img_to_reconstructed_img, step)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Save the autoencoder with its scale factor (measured unless ``task.scale_factor`` fixes it) and
        ``latent_stats.json``."""
        stats = self.latent_statistics(model)
        scale_factor = self.cfg.scale_factor or 1.0 / stats["latent_std"]
        model.set_scale_factor(scale_factor)
        model.save_pretrained(out_dir)
        stats.update(scale_factor=scale_factor, measured=not self.cfg.scale_factor)
        (Path(out_dir) / "latent_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        print(f"vgen train: latent std {stats['latent_std']:.4f} over {stats['images']} images; scale_factor "
              f"{scale_factor:.4f}{'' if stats['measured'] else ' (fixed by task.scale_factor)'}", file=sys.stderr)

    # ------------------------------------------------------------------------------------------- helpers
    @torch.no_grad()
    def latent_statistics(self, model: nn.Module, batch_size: int = 64) -> dict[str, float]:
        """Mean and std of (unscaled) posterior samples of the first ``scale_factor_images`` training images, drawn
        with a fixed seed; also the PSNR of their mode reconstructions."""
        dataset = self._dataset if self._dataset is not None else self.build_dataset()
        n = min(self.cfg.scale_factor_images, len(dataset))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed)
        total = total_sq = count = psnr_sum = 0.0
        for start in range(0, n, batch_size):
            img_B3HW = torch.stack([dataset[i]["image"] for i in range(start, min(n, start + batch_size))]).to(device)
            posterior = model.encode(img_B3HW)
            z = posterior.sample(generator).double()
            total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
            recon = model.decode(posterior.mode()).clamp(-1, 1)
            psnr_sum += float(psnr_01(recon, img_B3HW)) * img_B3HW.shape[0]
        model.train(was_training)
        mean = total / count
        std = max(total_sq / count - mean * mean, 0.0) ** 0.5
        if not std > 0:
            raise UserError("the autoencoder's latents have zero variance; the run did not learn an encoder")
        return {"latent_mean": mean, "latent_std": std, "images": n, "psnr": psnr_sum / n}

    def _sample_images(self) -> torch.Tensor:
        if self._sample_batch is None:
            dataset = self._dataset if self._dataset is not None else self.build_dataset()
            self._sample_batch = first_images(dataset, self.cfg.num_sample_images)
        return self._sample_batch
