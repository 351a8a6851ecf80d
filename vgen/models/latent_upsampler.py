"""Up-samplers of code grids for MuLo-SD (:mod:`vgen.samplers.mulo_sd`): the drafter's low-resolution codes ->
the target's grid, ``factor`` times larger on each side, on the same single-scale VQ tokenizer.

- :class:`LatentUpsampler` (learned): the low-resolution codes' embeddings (B, D, h, w) through row-causal
  convolutions and a pixel shuffle to a latent (B, D, r h, r w), added to the nearest-neighbour up-sampled input
  (the model starts as nearest-neighbour up-sampling) and l2-normalised like the codebook. Row-causal: output row
  ``i`` (target rows ``r i .. r i + r - 1``) sees input rows ``<= i`` only, so a round's draft does not change
  when later rows are drafted (MuLo-SD's masked row-causal convolution). Trained with a pixel loss through the frozen
  VQ decoder (``vgen train latent-upsampler``, :mod:`vgen.train.latent_upsampler_task`); codes are the nearest
  codebook entries of its output.
- ``resize`` (training-free): decode the codes, resize the image by ``factor`` (bicubic), re-encode.

:class:`CodeUpsampler` wraps either as the callable the MuLo-SD loop takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from vgen.errors import UserError


class RowCausalConv2d(nn.Conv2d):
    """A ``k x k`` convolution whose output row i sees input rows ``i - k + 1 .. i`` (zero padding above, none
    below) and columns ``j - k // 2 .. j + k // 2``; spatial size is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        if kernel_size % 2 == 0:
            raise UserError(f"row-causal convolutions need an odd kernel size, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        return super().forward(F.pad(x_BChw, (k // 2, k // 2, k - 1, 0)))


class LatentUpsampler(ModelMixin, ConfigMixin):
    """Low-resolution code embeddings (B, D, h, w) -> target-grid latents (B, D, factor h, factor w)."""

    @register_to_config
    def __init__(self, codebook_dim: int = 8, factor: int = 2, width: int = 64, depth: int = 3,
                 kernel_size: int = 3, l2_normalize: bool = True):
        super().__init__()
        if factor < 2 or depth < 1 or width < 1:
            raise UserError(f"need factor >= 2, depth >= 1 and width >= 1, got {factor}, {depth}, {width}")
        self.factor = factor
        layers: list[nn.Module] = [RowCausalConv2d(codebook_dim, width, kernel_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), RowCausalConv2d(width, width, kernel_size)]
        layers += [nn.GELU(), nn.Conv2d(width, codebook_dim * factor * factor, 1)]
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(self.body[-1].weight)  # start as nearest-neighbour up-sampling of the input
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, latent_BDhw: torch.Tensor) -> torch.Tensor:
        r = self.factor
        residual = rearrange(self.body(latent_BDhw), "b (d r1 r2) h w -> b d (h r1) (w r2)", r1=r, r2=r)
        out = latent_BDhw.repeat_interleave(r, 2).repeat_interleave(r, 3) + residual
        return F.normalize(out, dim=1) if self.config.l2_normalize else out


class CodeUpsampler:
    """``(B, rows, g)`` low-resolution code ids -> ``(B, factor rows, factor g)`` ids of the same tokenizer.

    Args:
        vqvae: the shared single-scale VQ tokenizer (``quantize.lookup`` / ``nearest_code``, ``decode_code``,
            ``encode``).
        model: a trained :class:`LatentUpsampler`, or None for the training-free ``resize`` path.
        factor: side ratio r of the target's grid to the drafter's (the model's own when given).
    """

    def __init__(self, vqvae, model: LatentUpsampler | None = None, factor: int = 2):
        self.vqvae, self.model = vqvae, model
        self.factor = int(model.config.factor) if model is not None else int(factor)
        if model is not None and int(model.config.codebook_dim) != int(vqvae.codebook_dim):
            raise UserError(f"the up-sampler works on {model.config.codebook_dim}-dim codes but the tokenizer's are "
                            f"{vqvae.codebook_dim}-dim; train it on this tokenizer")

    @torch.no_grad()
    def decode(self, ids_BHW: torch.Tensor) -> torch.Tensor:
        """Code ids (B, H, W) -> images (B, 3, H f, W f) in [-1, 1] (for pictures of what an up-sampler made)."""
        B, H, W = ids_BHW.shape
        return self.vqvae.decode_code(ids_BHW.reshape(B, H * W), (H, W))

    @torch.no_grad()
    def __call__(self, low_Bhg: torch.Tensor) -> torch.Tensor:
        B, h, g = low_Bhg.shape
        r = self.factor
        if self.model is None:
            images = self.vqvae.decode_code(low_Bhg.reshape(B, h * g), (h, g))
            images = F.interpolate(images.float(), scale_factor=r, mode="bicubic", align_corners=False).clamp(-1, 1)
            return self.vqvae.encode(images.to(next(self.vqvae.parameters()).dtype)).idx.view(B, r * h, r * g)
        latent = self.vqvae.quantize.lookup(low_Bhg.reshape(B, h * g), (h, g))
        model_dtype = next(self.model.parameters()).dtype
        up_BDHW = self.model(latent.to(model_dtype)).float()
        ids = self.vqvae.quantize.nearest_code(rearrange(up_BDHW, "b d h w -> (b h w) d"),
                                               self.vqvae.quantize.codebook().float())
        return ids.view(B, r * h, r * g)
