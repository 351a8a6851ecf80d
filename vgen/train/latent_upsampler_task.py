"""``vgen train latent-upsampler``: MuLo-SD's learned latent up-sampler
(:class:`vgen.models.latent_upsampler.LatentUpsampler`) on a trained, frozen single-scale VQ tokenizer.

    vgen train latent-upsampler --config configs/shapes/spec_upsampler.yaml --out runs/spec_upsampler

Data: the same Shapes scene rendered at ``low_resolution`` (what the low-resolution drafter generates) and at
``high_resolution = factor x low_resolution`` (the target's images). The low image's codes (frozen tokenizer) are
embedded with the codebook, up-sampled, and the result decoded by the frozen VQ decoder; the loss is MuLo-SD's pixel
loss through the decoder, here MSE + L1 against the high-resolution render (LPIPS and the PatchGAN term of the paper
need pretrained networks, which the Shapes world does without), plus ``latent_weight`` x MSE between the predicted
latent and the high image's own quantized latent, which keeps the output near codebook entries so that taking the
nearest code at sampling time loses little. Logged: ``pixel_loss``, ``latent_loss``, ``psnr`` (decoded prediction vs
the render) and ``code_accuracy`` (nearest codes of the prediction equal to the high image's codes).

Sample grids show, per image: the high-resolution render, its VQ reconstruction, the nearest-neighbour up-sampled
low codes, decode -> resize -> re-encode (the training-free up-sampler), and the learned up-sampler's codes, all
decoded. ``export`` writes the up-sampler's ``save_pretrained`` folder, which ``--upsampler DIR`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vgen.errors import UserError
from vgen.models.latent_upsampler import CodeUpsampler, LatentUpsampler
from vgen.train.task import TrainTask


@dataclass
class LatentUpsamplerTaskConfig:
    """The ``task:`` section of an up-sampler run config (``configs/shapes/spec_upsampler.yaml``)."""

    #: trained single-scale VQ folder shared by the drafter and the target
    tokenizer: str = ""
    world: str = "shapes"
    low_resolution: int = 64
    factor: int = 2
    dataset_length: int = 50_000
    seed: int = 0
    # --- model
    width: int = 64
    depth: int = 3
    kernel_size: int = 3
    # --- loss
    mse_weight: float = 1.0
    l1_weight: float = 1.0
    latent_weight: float = 1.0
    num_sample_images: int = 6


class PairedShapes(torch.utils.data.Dataset):
    """The same Shapes scenes at two resolutions: ``{"low": (3, h, h), "high": (3, H, H)}`` in [-1, 1]."""

    def __init__(self, low_resolution: int, high_resolution: int, length: int, seed: int):
        from vgen.data.shapes import ShapesWorld

        self.low, self.high = ShapesWorld(low_resolution, seed), ShapesWorld(high_resolution, seed)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        from vgen.data.shapes import pil_to_unit_tensor

        return {"low": pil_to_unit_tensor(self.low.sample(index).image),
                "high": pil_to_unit_tensor(self.high.sample(index).image)}


class LatentUpsamplerTask(TrainTask):
    config_class = LatentUpsamplerTaskConfig
    resumable_changes = ("num_sample_images",)

    def __init__(self, cfg: LatentUpsamplerTaskConfig):
        super().__init__(cfg)
        if cfg.world != "shapes":
            raise UserError(f"task.world must be 'shapes' (paired renders at two resolutions), got {cfg.world!r}")
        if cfg.factor < 2:
            raise UserError(f"task.factor must be >= 2, got {cfg.factor}")
        self.vqvae = self._load_tokenizer()
        for resolution in (cfg.low_resolution, cfg.low_resolution * cfg.factor):
            self.vqvae.grid_size(resolution)  # one clear error when a resolution does not fit the tokenizer

    def _load_tokenizer(self):
        from vgen.tokenizers.single_scale_vq import SingleScaleVQModel

        path = Path(self.cfg.tokenizer) if self.cfg.tokenizer else None
        if path is None or not (path / "config.json").is_file():
            raise UserError(f"task.tokenizer must be a trained single-scale VQ folder (config.json + weights), got "
                            f"{self.cfg.tokenizer!r}")
        return SingleScaleVQModel.from_pretrained(str(path), low_cpu_mem_usage=False).eval().requires_grad_(False)

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return LatentUpsampler(codebook_dim=int(self.vqvae.codebook_dim), factor=cfg.factor, width=cfg.width,
                               depth=cfg.depth, kernel_size=cfg.kernel_size,
                               l2_normalize=bool(self.vqvae.config.codebook_l2_norm))

    def build_dataset(self) -> torch.utils.data.Dataset:
        cfg = self.cfg
        return PairedShapes(cfg.low_resolution, cfg.low_resolution * cfg.factor, cfg.dataset_length, cfg.seed)

    @torch.no_grad()
    def _codes(self, images_B3HW: torch.Tensor):
        self.vqvae.to(images_B3HW.device)
        with torch.autocast(device_type=images_B3HW.device.type, enabled=False):
            return self.vqvae.encode(images_B3HW.float())

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        from vgen.train.reconstruction import psnr_01

        low, high = self._codes(batch["low"]), self._codes(batch["high"])
        pred_BDHW = model(low.quant)
        with torch.autocast(device_type=pred_BDHW.device.type, enabled=False):
            recon = self.vqvae.decode(pred_BDHW.float())
            target = batch["high"].float()
            pixel = self.cfg.mse_weight * F.mse_loss(recon, target) + self.cfg.l1_weight * F.l1_loss(recon, target)
            latent = F.mse_loss(pred_BDHW.float(), high.quant.float())
        loss = pixel + self.cfg.latent_weight * latent
        with torch.no_grad():
            ids = self.vqvae.quantize.nearest_code(rearrange(pred_BDHW.detach().float(), "b d h w -> (b h w) d"))
            accuracy = (ids.view_as(high.idx) == high.idx).float().mean()
            psnr = psnr_01(recon.detach().clamp(-1, 1), target)
        return loss, {"pixel_loss": pixel.detach(), "latent_loss": latent.detach(), "psnr": psnr,
                      "code_accuracy": accuracy}

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, step: int):
        from vgen.imaging import make_grid, tensor_to_pil
        from vgen.train.loop import unwrap

        inner = unwrap(model).eval()
        dataset = self.build_dataset()
        n = min(self.cfg.num_sample_images, len(dataset))
        items = [dataset[len(dataset) - 1 - i] for i in range(n)]
        low = torch.stack([it["low"] for it in items])
        high = torch.stack([it["high"] for it in items])
        device = next(inner.parameters()).device
        low, high = low.to(device), high.to(device)
        self.vqvae.to(device)
        h, w = self.vqvae.grid_size(low.shape[-1])
        low_ids = self._codes(low).idx.view(n, h, w)
        resize, learned = CodeUpsampler(self.vqvae, None, self.cfg.factor), CodeUpsampler(self.vqvae, inner)
        r = self.cfg.factor
        rows = {
            "render": high,
            "VQ reconstruction": self.vqvae.img_to_reconstructed_img(high),
            "nearest": resize.decode(low_ids.repeat_interleave(r, 1).repeat_interleave(r, 2)),
            "resize": resize.decode(resize(low_ids)),
            "learned": learned.decode(learned(low_ids)),
        }
        inner.train()
        images, captions = [], []
        for name, batch in rows.items():
            images += tensor_to_pil(batch.float())
            captions += [f"{name} (step {step})"] * n
        return make_grid(images, captions, ncols=n)
