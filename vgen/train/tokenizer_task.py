"""``vgen train tokenizer``: train a VQ tokenizer; ``task.kind`` picks which.

- ``msvq`` (default): VAR's multi-scale residual VQ (:class:`~vgen.tokenizers.msvq.MultiScaleVQModel`), for VAR.
- ``frvae``: NFIG's frequency-band residual VQ (:class:`~vgen.tokenizers.frvae.FrequencyVQModel`), the same model
  with each scale a frequency band; same config fields plus ``band_edges``.
- ``vq``: a single-scale VQ in LlamaGen's layout (:class:`~vgen.tokenizers.single_scale_vq.SingleScaleVQModel`),
  for raster next-token generators; ``z_channels`` is the encoder width at the bottleneck, ``codebook_dim`` the code
  dimension, ``codebook_l2_norm`` LlamaGen's normalised codes; ``patch_nums``, ``quant_resi``,
  ``share_quant_resi``, ``using_znorm`` and ``codebook_init`` do not apply.

Losses (every kind): the official VQ losses of the tokenizer (VAR: commitment with ``beta`` + codebook/phi loss,
averaged over scales; LlamaGen: codebook loss + ``beta`` x commitment), with a straight-through estimator, plus an
L1 + L2 pixel reconstruction loss. Dead codes (hit rate below ``dead_code_threshold`` x the uniform rate: the EMA
hit counts for msvq/frvae, the usage window of the last 65536 ids for vq) are restarted with latent vectors of the
current batch after step 1 and every ``restart_every`` steps. Perceptual and adversarial losses are not included
(they need pretrained networks that cannot be downloaded here); on the Shapes world the pixel losses are enough.

    vgen train tokenizer --config configs/shapes/tokenizer.yaml --out runs/tokenizer_shapes
    vgen train tokenizer --config configs/shapes/vq_tokenizer.yaml --out runs/vq_shapes

Logged metrics: ``recon_loss``, ``vq_loss``, ``psnr`` (dB, images in [0, 1]), ``usage_pct`` (codes whose hit rate
is at least 8 % of the uniform rate) and ``restarted_codes`` (codes restarted at each step; the log holds the mean
over ``log_every`` steps). Sample grids show original | reconstruction pairs. ``export`` writes a
``save_pretrained`` folder that the tokenizer class's ``from_pretrained`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vgen.errors import UserError
from vgen.tokenizers.msvq import PATCH_NUMS_256
from vgen.train.reconstruction import (
    build_image_dataset,
    check_image_world,
    first_images,
    psnr_01,
    reconstruction_grid,
    reconstruction_loss,
)
from vgen.train.task import TrainTask

KINDS = ("msvq", "frvae", "vq")

__all__ = ["KINDS", "TokenizerTask", "TokenizerTaskConfig", "psnr_01"]


@dataclass
class TokenizerTaskConfig:
    """The ``task:`` section of a tokenizer run config (``configs/shapes/tokenizer.yaml``)."""

    #: which tokenizer: "msvq" (VAR), "frvae" (NFIG's frequency bands) or "vq" (single-scale, LlamaGen layout)
    kind: str = "msvq"
    # --- model (the defaults are a ~4M-parameter multi-scale model for 64 px Shapes images)
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 1, 2)
    num_res_blocks: int = 2
    dropout: float = 0.0
    #: msvq/frvae: latent = code dimension; vq: encoder channels before the 1x1 quant_conv to codebook_dim
    z_channels: int = 32
    vocab_size: int = 512
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    using_sa: bool = False
    using_mid_sa: bool = True
    norm_num_groups: int = 32
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    using_znorm: bool = False
    #: commitment loss weight inside the VQ loss (VAR and LlamaGen: 0.25)
    beta: float = 0.25
    #: msvq/frvae codebook init (VAR's ``eini``): < 0 uniform in +-|x|/V, > 0 truncated normal with this std, 0 N(0, 1)
    codebook_init: float = -1.0
    #: frvae: upper radius of each band in the normalised spectrum (one per scale, ending at 1); None = NFIG's rule
    band_edges: tuple[float, ...] | None = None
    #: vq: code dimension (LlamaGen: 8) and l2-normalised codes
    codebook_dim: int = 8
    codebook_l2_norm: bool = True
    # --- data
    #: "shapes" (procedural Shapes world), "moving_shapes" (video frames) or "folder" (images under data_path)
    world: str = "shapes"
    data_path: str = ""
    #: image side; msvq/frvae: must equal patch_nums[-1] * 2 ** (len(ch_mult) - 1); vq: a multiple of the latter
    resolution: int = 64
    #: number of Shapes images / Moving Shapes frames (procedural worlds)
    dataset_length: int = 50_000
    #: world seed
    seed: int = 0
    #: frames per Moving Shapes video
    num_frames: int = 16
    # --- loss weights
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    vq_weight: float = 1.0
    # --- codebook upkeep
    #: a code is dead when its hit rate is below this fraction of the uniform rate (tokens / V)
    dead_code_threshold: float = 0.03
    #: restart dead codes every this many optimiser steps; 0 turns restarts off
    restart_every: int = 100
    # --- sample grids
    num_sample_images: int = 8


def tokenizer_class(kind: str) -> type:
    """The model class trained by ``task.kind``."""
    if kind == "msvq":
        from vgen.tokenizers.msvq import MultiScaleVQModel

        return MultiScaleVQModel
    if kind == "frvae":
        from vgen.tokenizers.frvae import FrequencyVQModel

        return FrequencyVQModel
    if kind == "vq":
        from vgen.tokenizers.single_scale_vq import SingleScaleVQModel

        return SingleScaleVQModel
    raise UserError(f"task.kind must be one of {', '.join(KINDS)}, got {kind!r}")


class TokenizerTask(TrainTask):
    """Trains a VQ tokenizer (``task.kind``) on the Shapes world, Moving Shapes frames or an image folder."""

    config_class = TokenizerTaskConfig
    resumable_changes = ("num_sample_images",)

    def __init__(self, cfg: TokenizerTaskConfig):
        super().__init__(cfg)
        tokenizer_class(cfg.kind)  # validates the kind
        check_image_world(cfg.world, cfg.data_path)
        downsample = 2 ** (len(cfg.ch_mult) - 1) if cfg.ch_mult else None
        if cfg.kind == "vq":
            if not downsample or cfg.resolution < downsample or cfg.resolution % downsample:
                raise UserError(
                    f"task.resolution {cfg.resolution} does not fit the tokenizer: it must be a multiple of the "
                    f"downsampling 2**(len(ch_mult)-1) = {downsample}; change resolution or ch_mult"
                )
        else:
            side = cfg.patch_nums[-1] * downsample if cfg.patch_nums and downsample else None
            if cfg.resolution != side:
                raise UserError(
                    f"task.resolution {cfg.resolution} does not fit the tokenizer: the last patch_num "
                    f"({cfg.patch_nums[-1] if cfg.patch_nums else None}) x downsampling 2**(len(ch_mult)-1) = "
                    f"{side}; change resolution, patch_nums or ch_mult"
                )
        if cfg.dead_code_threshold < 0 or cfg.restart_every < 0:
            raise UserError("task.dead_code_threshold and task.restart_every must be >= 0")
        self._dataset: torch.utils.data.Dataset | None = None
        self._sample_batch: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- TrainTask API
    def build_model(self) -> nn.Module:
        cfg = self.cfg
        common = {
            "vocab_size": cfg.vocab_size, "z_channels": cfg.z_channels, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult),
            "num_res_blocks": cfg.num_res_blocks, "dropout": cfg.dropout, "using_sa": cfg.using_sa,
            "using_mid_sa": cfg.using_mid_sa, "norm_num_groups": cfg.norm_num_groups, "beta": cfg.beta,
        }
        if cfg.kind == "vq":
            return tokenizer_class("vq")(
                **common, codebook_dim=cfg.codebook_dim, codebook_l2_norm=cfg.codebook_l2_norm
            )
        extra = {"band_edges": list(cfg.band_edges) if cfg.band_edges is not None else None} if cfg.kind == "frvae" else {}
        model = tokenizer_class(cfg.kind)(
            **common, using_znorm=cfg.using_znorm, quant_resi=cfg.quant_resi, share_quant_resi=cfg.share_quant_resi,
            patch_nums=list(cfg.patch_nums), **extra,
        )
        model.quantize.eini(cfg.codebook_init)
        return model

    def build_dataset(self) -> torch.utils.data.Dataset:
        cfg = self.cfg
        self._dataset = build_image_dataset(
            cfg.world, cfg.data_path, cfg.resolution, cfg.dataset_length, cfg.seed, cfg.num_frames
        )
        return self._dataset

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        img_B3HW = batch["image"]
        recon_B3HW, vq_loss, usage_pct = model(img_B3HW)
        recon_loss = reconstruction_loss(recon_B3HW, img_B3HW, cfg.l1_weight, cfg.l2_weight)
        loss = recon_loss + cfg.vq_weight * vq_loss
        metrics = {
            "recon_loss": recon_loss.detach(),
            "vq_loss": vq_loss.detach(),
            "psnr": psnr_01(recon_B3HW, img_B3HW),
            "usage_pct": usage_pct,
        }
        return loss, metrics

    def after_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, float]:
        """Dead-code restart after step 1 (a data-dependent codebook init: unused codes take latent vectors of the
        first batch) and every ``restart_every`` steps. The metric is logged at every step so that every rank
        reports the same keys."""
        cfg = self.cfg
        if not cfg.restart_every or (step != 1 and step % cfg.restart_every):
            return {"restarted_codes": 0.0}
        from vgen.train.loop import unwrap

        restarted = unwrap(model).restart_dead_codes_from_images(batch["image"], cfg.dead_code_threshold)
        return {"restarted_codes": float(restarted)}

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, step: int):
        """Original | reconstruction pairs of the first ``num_sample_images`` training images."""
        img_B3HW = self._sample_images().to(next(model.parameters()).device)
        return reconstruction_grid(img_B3HW, model.img_to_reconstructed_img, step)

    # ------------------------------------------------------------------------------------------- helpers
    def _sample_images(self) -> torch.Tensor:
        if self._sample_batch is None:
            dataset = self._dataset if self._dataset is not None else self.build_dataset()
            self._sample_batch = first_images(dataset, self.cfg.num_sample_images)
        return self._sample_batch
