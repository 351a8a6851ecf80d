"""KL autoencoder with MAR's / LDM's key names: images <-> continuous latents for FlowAR, xAR and video generators.

An image ``(B, 3, H, W)`` in [-1, 1] is encoded to a diagonal Gaussian posterior over latents ``(B, C, h, w)``
(``h = H / downsample``; C = 16 and downsampling 16 for MAR's released ``kl16.ckpt``). Generators work on
*scaled* latents: ``z = posterior.sample() * scale_factor`` (MAR, FlowAR and xAR encode with a **sample**, not the
mode, and use 0.2325 for kl16) and images come back from ``decode(z / scale_factor)``; :meth:`encode_latents` and
:meth:`decode_latents` do exactly this. ``scale_factor`` is a saved config value (``vgen train autoencoder``
measures it as 1 / std of the training latents, LDM's rule).

The module names reproduce LTH14/mar ``models/vae.py`` (byte-identical in FlowAR and xAR): ``encoder.down.{i}.
block.{j}``, ``encoder.mid.attn_1.{q,k,v,proj_out}``, ``quant_conv`` (2C -> 2C), ``post_quant_conv`` (C -> C),
``decoder.up.{i}``; :func:`load_official_kl16` loads ``kl16.ckpt`` (weights under ``"model"``) key for key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from vgen.checkpoints import check_state_dict, read_state_dict
from vgen.errors import UserError

from .checks import check_image_batch
from .vq_autoencoder_blocks import Decoder, Encoder

#: MAR's scale factor for kl16 (LTH14/mar engine_mar.py; FlowAR and xAR use the same)
KL16_SCALE_FACTOR = 0.2325


class DiagonalGaussian:
    """A diagonal Gaussian over latents (B, C, h, w), made from the encoder's moments (B, 2C, h, w): mean first, then
    log-variance, clamped to [-30, 20] as in LDM / MAR.

    Attributes ``mean``, ``logvar``, ``std``, ``var`` (B, C, h, w).
    """

    def __init__(self, moments_B2Chw: torch.Tensor):
        self.mean, logvar = torch.chunk(moments_B2Chw, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """``mean + std * eps`` with eps ~ N(0, 1) from ``generator`` (one generator, one per batch row, or the global
        RNG); a CPU generator gives the same latents on any device."""
        eps = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over (C, h, w): shape (B,)."""
        return 0.5 * torch.sum(self.mean.square() + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(ModelMixin, ConfigMixin):
    """MAR's KL autoencoder (LDM ``AutoencoderKL``): encoder with ``double_z``, 1x1 ``quant_conv`` (2C -> 2C) to the
    posterior's moments, 1x1 ``post_quant_conv`` (C -> C), decoder. Defaults are the released ``kl16``.

    Args:
        z_channels: latent channels C (MAR: ``embed_dim`` 16).
        ch, ch_mult, num_res_blocks: widths; level ``i`` works at ``H / 2**i``, downsampling ``2**(len(ch_mult)-1)``.
        encoder_attn_levels / decoder_attn_levels: levels with attention after each res block (MAR: the encoder's
            16-pixel level of a 256 px image, level 4; none in the decoder). The mid blocks always have attention.
        scale_factor: multiplies latents for generators (:meth:`encode_latents`), divides them in
            :meth:`decode_latents`.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        z_channels: int = 16,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        encoder_attn_levels: Sequence[int] = (4,),
        decoder_attn_levels: Sequence[int] = (),
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        scale_factor: float = KL16_SCALE_FACTOR,
    ):
        super().__init__()
        _validate_config(ch, ch_mult, norm_num_groups, z_channels, encoder_attn_levels, decoder_attn_levels,
                         scale_factor)
        blocks = {
            "ch": ch, "ch_mult": tuple(ch_mult), "num_res_blocks": num_res_blocks, "dropout": dropout,
            "in_channels": in_channels, "z_channels": z_channels, "using_mid_sa": True, "num_groups": norm_num_groups,
            "fused_qkv": False, "layout": "ldm",
        }
        self.encoder = Encoder(**blocks, attn_levels=tuple(encoder_attn_levels), double_z=True)
        self.decoder = Decoder(**blocks, attn_levels=tuple(decoder_attn_levels))
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def scale_factor(self) -> float:
        return float(self.config.scale_factor)

    def set_scale_factor(self, scale_factor: float) -> None:
        """Store a new ``scale_factor`` in the config (saved by ``save_pretrained``)."""
        if not scale_factor > 0:
            raise UserError(f"scale_factor must be positive, got {scale_factor}")
        self.register_to_config(scale_factor=float(scale_factor))

    def latent_size(self, resolution: int | tuple[int, int]) -> tuple[int, int]:
        """Latent grid ``(h, w)`` of images of side ``resolution`` (or ``(H, W)``)."""
        H, W = (resolution, resolution) if isinstance(resolution, int) else resolution
        if H % self.downsample or W % self.downsample or H < 1 or W < 1:
            raise UserError(
                f"image size {H}x{W} is not a multiple of this autoencoder's downsampling factor {self.downsample}: "
                f"use a resolution divisible by {self.downsample}"
            )
        return H // self.downsample, W // self.downsample

    # ----------------------------------------------------------------------------------------------- official API
    def encode(self, img_B3HW: torch.Tensor) -> DiagonalGaussian:
        """Images (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, C, H/f, W/f)."""
        check_image_batch(img_B3HW, self.config.in_channels, self.downsample)
        return DiagonalGaussian(self.quant_conv(self.encoder(img_B3HW)))

    def decode(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f), not clamped (the official ``decode``)."""
        if z_BChw.ndim != 4 or z_BChw.shape[1] != self.latent_channels:
            raise UserError(
                f"expected latents of shape (B, {self.latent_channels}, h, w), got {tuple(z_BChw.shape)}"
            )
        return self.decoder(self.post_quant_conv(z_BChw.to(self.post_quant_conv.weight.dtype)))

    def forward(self, img_B3HW: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: images -> (reconstruction (B, 3, H, W) not clamped, posterior). Decodes a posterior sample
        (reparameterised, so gradients reach the encoder's mean and log-variance)."""
        posterior = self.encode(img_B3HW)
        return self.decode(posterior.sample(generator)), posterior

    # ----------------------------------------------------------------------------------------------- generators' API
    def encode_latents(self, img_B3HW: torch.Tensor, sample: bool = True,
                       generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f): a posterior sample (or the mode with
        ``sample=False``) times ``scale_factor``."""
        posterior = self.encode(img_B3HW)
        z_BChw = posterior.sample(generator) if sample else posterior.mode()
        return z_BChw * self.scale_factor

    def decode_latents(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (``decode(z / scale_factor)``, clamped)."""
        return self.decode(z_BChw / self.scale_factor).clamp(-1, 1)

    @torch.no_grad()
    def img_to_reconstructed_img(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Encode (posterior mode) and decode: images -> reconstructions in [-1, 1]."""
        return self.decode(self.encode(img_B3HW).mode()).clamp(-1, 1)

    # ----------------------------------------------------------------------------------------------- official files
    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **config_overrides) -> AutoencoderKL:
        """Build the model from a MAR/LDM KL autoencoder state dict (architecture read from the tensor shapes,
        ``scale_factor`` 0.2325 unless overridden). Keys must match exactly (MAR's own loader is ``strict=False``
        and would ignore a wrong file), otherwise one :class:`UserError` line lists the missing and unexpected ones."""
        config = {**infer_official_config(state_dict), **config_overrides}
        with torch.device("meta"):
            model = cls(**config)
        check_state_dict(
            model.state_dict(), state_dict, what=f"KL autoencoder state dict (AutoencoderKL({_short_config(model)}))",
            hint="Check that the file is MAR's kl16.ckpt or another LDM KL autoencoder in its layout",
        )
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
        return model.eval()


def _validate_config(ch, ch_mult, norm_num_groups, z_channels, encoder_attn_levels, decoder_attn_levels,
                     scale_factor) -> None:
    if len(ch_mult) < 1 or any(int(m) < 1 for m in ch_mult):
        raise UserError(f"ch_mult must be a non-empty list of positive integers, got {list(ch_mult)}")
    if ch % norm_num_groups or any((ch * m) % norm_num_groups for m in ch_mult):
        raise UserError(
            f"ch ({ch}) and every ch * ch_mult ({[ch * m for m in ch_mult]}) must be divisible by norm_num_groups "
            f"({norm_num_groups}): change ch or norm_num_groups"
        )
    for name, levels in (("encoder_attn_levels", encoder_attn_levels), ("decoder_attn_levels", decoder_attn_levels)):
        if any(not 0 <= int(i) < len(ch_mult) for i in levels):
            raise UserError(f"{name} {list(levels)} must lie in 0..{len(ch_mult) - 1} (one level per ch_mult entry)")
    if z_channels < 1:
        raise UserError(f"z_channels must be positive, got {z_channels}")
    if not scale_factor > 0:
        raise UserError(f"scale_factor must be positive, got {scale_factor}")


def infer_official_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Architecture of a MAR/LDM KL autoencoder state dict, read from its key names and tensor shapes."""
    try:
        ch, in_channels = state_dict["encoder.conv_in.weight"].shape[:2]
        z_channels = state_dict["post_quant_conv.weight"].shape[0]
    except KeyError as err:
        raise UserError(
            f"not a KL autoencoder state dict: key {err.args[0]!r} is missing (expected MAR's kl16.ckpt layout: "
            "encoder.*, decoder.*, quant_conv.*, post_quant_conv.*)"
        ) from err
    levels = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down.")})
    if not levels:
        raise UserError("not a KL autoencoder state dict: it has no encoder.down.* keys")
    ch_mult = [int(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // int(ch) for i in levels]
    num_res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down.0.block.")})
    return {
        "in_channels": int(in_channels), "z_channels": int(z_channels), "ch": int(ch), "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "encoder_attn_levels": [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state_dict],
        "decoder_attn_levels": [i for i in levels if f"decoder.up.{i}.attn.0.q.weight" in state_dict],
        "scale_factor": KL16_SCALE_FACTOR,
    }


def _short_config(model: nn.Module) -> str:
    cfg = getattr(model, "config", {})
    keys = ("ch", "ch_mult", "z_channels", "encoder_attn_levels")
    return ", ".join(f"{k}={list(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]}" for k in keys if k in cfg)


def load_official_kl16(path_or_state_dict: str | Path | Mapping, **config_overrides) -> AutoencoderKL:
    """Load MAR's released KL-16 autoencoder (``kl16.ckpt``, weights under ``"model"``; also FlowAR's and xAR's
    ``vae``) or any checkpoint in its layout, on CPU, in eval mode, with ``scale_factor`` 0.2325."""
    if not isinstance(path_or_state_dict, Mapping) and not Path(path_or_state_dict).exists():
        raise UserError(
            f"KL autoencoder checkpoint not found: {path_or_state_dict} (download kl16.ckpt as MAR's "
            "util/download.py does and pass its path)"
        )
    state_dict = read_state_dict(path_or_state_dict, what="KL autoencoder checkpoint")
    return AutoencoderKL.from_official_state_dict(state_dict, **config_overrides)
