"""``vgen train tokenizer``: train VAR's multi-scale residual VQ tokenizer (:class:`MultiScaleVQModel`).

VAR never released its tokenizer training code; this task trains the same model with the losses the official
``VectorQuantizer2.forward`` defines (commitment with ``beta`` + codebook/phi loss, averaged over scales, with a
straight-through estimator) plus an L1 + L2 pixel reconstruction loss, and keeps the codebook alive by restarting
dead codes (codes whose EMA hit rate fell below ``dead_code_threshold`` x the uniform rate) with residual vectors of
the current batch. Perceptual and adversarial losses are not included (they need pretrained networks that cannot be
downloaded here); on the Shapes world the pixel losses are enough.

    vgen train tokenizer --config configs/shapes/tokenizer.yaml --out runs/tokenizer_shapes

Logged metrics: ``recon_loss``, ``vq_loss``, ``psnr`` (dB, images in [0, 1]), ``usage_pct`` (codes whose EMA hit
rate is at least 8 % of the uniform rate) and ``restarted_codes`` (codes restarted at each step; the log holds the
mean over ``log_every`` steps). Sample grids show original | reconstruction pairs. ``export`` writes a
``save_pretrained`` folder that ``MultiScaleVQModel.from_pretrained`` loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vgen.errors import UserError
from vgen.tokenizers.msvq import PATCH_NUMS_256, MultiScaleVQModel
from vgen.train.task import TrainTask

WORLDS = ("shapes", "folder")


@dataclass
class TokenizerTaskConfig:
    """The ``task:`` section of a tokenizer run config (``configs/shapes/tokenizer.yaml``)."""

    # --- model (MultiScaleVQModel config; the defaults are a ~4M-parameter model for 64 px Shapes images)
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 1, 2)
    num_res_blocks: int = 2
    dropout: float = 0.0
    z_channels: int = 32
    vocab_size: int = 512
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    using_sa: bool = False
    using_mid_sa: bool = True
    norm_num_groups: int = 32
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    using_znorm: bool = False
    #: commitment loss weight inside the VQ loss (VAR: 0.25)
    beta: float = 0.25
    #: codebook init (VAR's ``eini``): < 0 uniform in +-|x|/V, > 0 truncated normal with this std, 0 N(0, 1)
    codebook_init: float = -1.0
    # --- data
    #: "shapes" (procedural Shapes world) or "folder" (images under data_path)
    world: str = "shapes"
    data_path: str = ""
    #: image side; must equal patch_nums[-1] * 2 ** (len(ch_mult) - 1)
    resolution: int = 64
    #: number of Shapes images (world "shapes")
    dataset_length: int = 50_000
    #: Shapes world seed
    seed: int = 0
    # --- loss weights
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    vq_weight: float = 1.0
    # --- codebook upkeep
    #: a code is dead when its EMA hit count per step is below this fraction of the uniform rate (tokens / V)
    dead_code_threshold: float = 0.03
    #: restart dead codes every this many optimiser steps; 0 turns restarts off
    restart_every: int = 100
    # --- sample grids
    num_sample_images: int = 8


def psnr_01(recon_B3HW: torch.Tensor, target_B3HW: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [-1, 1], measured on [0, 1] (reconstructions clamped first)."""
    diff = (recon_B3HW.detach().float().clamp(-1, 1) - target_B3HW.float()) / 2
    mse_B = diff.square().flatten(1).mean(dim=1).clamp_min(1e-10)
    return (-10 * torch.log10(mse_B)).mean()


class TokenizerTask(TrainTask):
    """Trains :class:`MultiScaleVQModel` on the Shapes world or an image folder."""

    config_class = TokenizerTaskConfig
    resumable_changes = ("num_sample_images",)

    def __init__(self, cfg: TokenizerTaskConfig):
        super().__init__(cfg)
        if cfg.world not in WORLDS:
            raise UserError(f"task.world must be one of {', '.join(WORLDS)}, got {cfg.world!r}")
        if cfg.world == "folder" and not cfg.data_path:
            raise UserError("task.world is 'folder' but task.data_path is empty: set it to a folder of images")
        side = cfg.patch_nums[-1] * 2 ** (len(cfg.ch_mult) - 1) if cfg.patch_nums and cfg.ch_mult else None
        if cfg.resolution != side:
            raise UserError(
                f"task.resolution {cfg.resolution} does not fit the tokenizer: the last patch_num "
                f"({cfg.patch_nums[-1] if cfg.patch_nums else None}) x downsampling 2**(len(ch_mult)-1) = {side}; "
                "change resolution, patch_nums or ch_mult"
            )
        if cfg.dead_code_threshold < 0 or cfg.restart_every < 0:
            raise UserError("task.dead_code_threshold and task.restart_every must be >= 0")
        self._dataset: torch.utils.data.Dataset | None = None
        self._sample_batch: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- TrainTask API
    def build_model(self) -> MultiScaleVQModel:
        cfg = self.cfg
        model = MultiScaleVQModel(
            vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.ch, ch_mult=list(cfg.ch_mult),
            num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout, using_sa=cfg.using_sa,
            using_mid_sa=cfg.using_mid_sa, norm_num_groups=cfg.norm_num_groups, beta=cfg.beta,
            using_znorm=cfg.using_znorm, quant_resi=cfg.quant_resi, share_quant_resi=cfg.share_quant_resi,
            patch_nums=list(cfg.patch_nums),
        )
        model.quantize.eini(cfg.codebook_init)
        return model

    def build_dataset(self) -> torch.utils.data.Dataset:
        cfg = self.cfg
        if cfg.world == "shapes":
            from vgen.data.shapes import ShapesDataset

            self._dataset = ShapesDataset(resolution=cfg.resolution, length=cfg.dataset_length, seed=cfg.seed)
        else:
            from vgen.data.folder import ImageFolderDataset

            self._dataset = ImageFolderDataset(cfg.data_path, resolution=cfg.resolution)
        return self._dataset

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        img_B3HW = batch["image"]
        recon_B3HW, vq_loss, usage_pct = model(img_B3HW)
        diff = recon_B3HW.float() - img_B3HW.float()
        recon_loss = cfg.l1_weight * diff.abs().mean() + cfg.l2_weight * diff.square().mean()
        loss = recon_loss + cfg.vq_weight * vq_loss
        metrics = {
            "recon_loss": recon_loss.detach(),
            "vq_loss": vq_loss.detach(),
            "psnr": psnr_01(recon_B3HW, img_B3HW),
            "usage_pct": usage_pct,
        }
        return loss, metrics

    def after_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, float]:
        """Dead-code restart after step 1 (a data-dependent codebook init: unused codes take residuals of the
        first batch) and every ``restart_every`` steps. The metric is logged at every step so that every rank
        reports the same keys."""
        cfg = self.cfg
        if not cfg.restart_every or (step != 1 and step % cfg.restart_every):
            return {"restarted_codes": 0.0}
        from vgen.train.loop import unwrap

        vae: MultiScaleVQModel = unwrap(model)
        img_B3HW = batch["image"]
        with torch.no_grad():
            samples_NC = vae.quantize.residuals_NC(vae.img_to_f(img_B3HW))
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        tokens_per_step = img_B3HW.shape[0] * vae.num_tokens * world
        min_usage = cfg.dead_code_threshold * tokens_per_step / vae.vocab_size
        return {"restarted_codes": float(vae.quantize.restart_dead_codes(samples_NC, min_usage))}

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, step: int):
        """Original | reconstruction pairs of the first ``num_sample_images`` training images."""
        from vgen.imaging import make_grid, tensor_to_pil

        img_B3HW = self._sample_images().to(next(model.parameters()).device)
        recon_B3HW = model.img_to_reconstructed_img(img_B3HW).float()
        tiles, captions = [], []
        for original, recon in zip(img_B3HW, recon_B3HW):
            tiles += [tensor_to_pil(original), tensor_to_pil(recon)]
            captions += ["original", f"step {step}: {float(psnr_01(recon[None], original[None])):.1f} dB"]
        ncols = 2 * max(1, math.ceil(math.sqrt(len(img_B3HW))))
        return make_grid(tiles, captions, ncols=ncols, caption_lines=1)

    # ------------------------------------------------------------------------------------------- helpers
    def _sample_images(self) -> torch.Tensor:
        if self._sample_batch is None:
            dataset = self._dataset if self._dataset is not None else self.build_dataset()
            n = min(self.cfg.num_sample_images, len(dataset))
            self._sample_batch = torch.stack([dataset[i]["image"] for i in range(n)])
        return self._sample_batch
