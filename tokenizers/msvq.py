"""VAR's multi-scale residual VQ tokenizer (VQVAE): an image becomes K token maps of growing size.

An image ``(B, 3, H, W)`` in [-1, 1] is encoded to a latent ``f`` of ``(B, Cvae, h, w)`` (``h = H / 16`` for the
released model). The quantizer then explains ``f`` coarse to fine with **one shared codebook**: at scale ``si``
the residual ``f_rest`` is area-downsampled to ``pn x pn``, each position takes its nearest code, the code map is
bicubic-upsampled back to ``h x w``, passed through a residual conv ``phi`` and subtracted from ``f_rest``; the
sum of all scales is ``f_hat``, which the decoder turns back into an image. The token sequence of an image is
the concatenation of the K maps (``L = sum(pn**2)`` tokens; 680 for ``patch_nums=(1,2,3,4,5,6,8,10,13,16)``).

The module and buffer names reproduce FoundationVision/VAR's state-dict keys, so the released
``vae_ch160v4096z32.pth`` loads key for key (:func:`load_official_var_vae`), and the numerics follow the
official code (float32 quantizer, ``addmm`` distances, the numpy ``phi`` selection table), so token indices match
the official ones exactly. Unlike the official release, the training path (straight-through estimator,
commitment and codebook losses, EMA codebook usage, dead-code restart) is part of the model.

Names carry shapes: ``idx_Bl`` (B, pn*pn) token ids of one scale, ``f_BChw`` latents, ``h_BChw`` one scale's
contribution, ``z_NC`` flattened vectors to quantize.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from vgen.checkpoints import check_state_dict, read_state_dict, unwrap_state_dict
from vgen.errors import UserError

from .checks import check_image_batch
from .codebook import all_reduce_sum_, broadcast_from_rank0_, replace_codes_, usage_percent_from_counts, world_size
from .vq_autoencoder_blocks import Decoder, Encoder

#: patch_nums of the released 256 px model and of the 512 px model that reuses the same VAE file.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@functools.cache
def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Which of ``num_phi`` partially shared phi convs serves scale ``si`` of ``num_scales``.

    The convs sit at evenly spaced "ticks" in [0, 1] and scale ``si`` takes the nearest tick to
    ``si / (num_scales - 1)``. Computed in float64 numpy exactly as the official code does: for 10 scales and 4
    convs scale 2 is an exact tie that float64 resolves to conv 1, giving ``[0,0,1,1,1,2,2,3,3,3]``.
    """
    if num_phi == 1 or num_scales == 1:
        return 0
    k = num_phi
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return int(np.argmin(np.abs(ticks - si / (num_scales - 1))).item())


class Phi(nn.Conv2d):
    """Residual 3x3 conv applied to each upsampled code map: ``h * (1 - r) + conv(h) * r`` (``r = quant_resi``)."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _make_phi(channels: int, quant_resi: float) -> nn.Module:
    return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    """``share_quant_resi=1``: one phi for every scale (keys ``quant_resi.qresi.*``)."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__()
        self.qresi = _make_phi(channels, quant_resi)

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """``share_quant_resi=K>1``: K phis spread over the scales (keys ``quant_resi.qresi_ls.{0..K-1}.*``)."""

    def __init__(self, channels: int, quant_resi: float, num_phi: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([_make_phi(channels, quant_resi) for _ in range(num_phi)])

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index(si, num_scales, len(self.qresi_ls))]


class PhiNonShared(nn.ModuleList):
    """``share_quant_resi=0``: one phi per scale (keys ``quant_resi.{0..K-1}.*``)."""

    def __init__(self, channels: int, quant_resi: float, num_phi: int):
        super().__init__([_make_phi(channels, quant_resi) for _ in range(num_phi)])

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self[phi_index(si, num_scales, len(self))]


class MultiScaleResidualQuantizer(nn.Module):
    """VAR's ``VectorQuantizer2``: multi-scale residual quantization with one codebook shared by all scales.

    Args:
        vocab_size: codebook size V.
        Cvae: code dimension (the latent channels).
        patch_nums: side of each scale's token map, small to large; the last one equals the latent side.
        beta: commitment loss weight.
        using_znorm: nearest code by cosine similarity instead of L2 distance.
        quant_resi: phi mixing ratio ``r`` (0 disables phi).
        share_quant_resi: 0 = one phi per scale, 1 = one phi for all, K > 1 = K partially shared phis.

    Buffer ``ema_vocab_hit_SV`` (S, V): exponential moving average of how often each code was picked at each
    scale per training step (updated by :meth:`forward` in training mode; it is part of the official files).
    """

    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        patch_nums: Sequence[int],
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.patch_nums = tuple(int(pn) for pn in patch_nums)
        self.beta = beta
        self.using_znorm = using_znorm
        self.quant_resi_ratio = quant_resi
        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared(Cvae, quant_resi, len(self.patch_nums))
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(Cvae, quant_resi)
        else:
            self.quant_resi = PhiPartiallyShared(Cvae, quant_resi, share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.record_hit = 0
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def extra_repr(self) -> str:
        return (
            f"patch_nums={self.patch_nums}, znorm={self.using_znorm}, beta={self.beta}, "
            f"quant_resi={self.quant_resi_ratio}"
        )

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @torch.no_grad()
    def eini(self, eini: float) -> None:
        """Codebook initialisation (official name): ``eini > 0`` truncated normal with std ``eini``; ``eini < 0``
        uniform in ``+-|eini| / V`` (taming's VQGAN init); 0 keeps ``nn.Embedding``'s N(0, 1)."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight, std=eini)
        elif eini < 0:
            self.embedding.weight.uniform_(-abs(eini) / self.vocab_size, abs(eini) / self.vocab_size)

    @property
    def codebook_usage_counts(self) -> torch.Tensor:
        """(V,) EMA of how many times each code is picked per training step, summed over scales (a view of the
        ``ema_vocab_hit_SV`` buffer, so it is saved with the model and restored by ``from_pretrained``)."""
        return self.ema_vocab_hit_SV.sum(dim=0)

    # ----------------------------------------------------------------------------------------------- lookup
    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """(N, Cvae) float -> (N,) LongTensor: index of the nearest codebook entry (no gradient)."""
        codebook_VC = self.embedding.weight.data.to(z_NC.dtype)
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook_VC, dim=-1).T, dim=1)
        dist_NV = z_NC.square().sum(dim=1, keepdim=True) + codebook_VC.square().sum(dim=1)
        dist_NV.addmm_(z_NC, codebook_VC.T, alpha=-2, beta=1)
        return torch.argmin(dist_NV, dim=1)

    def _code_map(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """(B, pn*pn) ids -> (B, Cvae, pn, pn) code vectors (differentiable w.r.t. the codebook)."""
        return rearrange(self.embedding(idx_Bl), "b (h w) c -> b c h w", h=pn, w=pn)

    def _scale_contribution(self, si: int, num_scales: int, h_BChw: torch.Tensor, HW: int) -> torch.Tensor:
        """phi(bicubic_up(h)) for scale ``si``: (B, Cvae, pn, pn) -> (B, Cvae, HW, HW). The last scale is not
        resampled (its map is already HW x HW)."""
        h_BChw = h_BChw.to(self.embedding.weight.dtype)
        if si != num_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")
        return self.quant_resi.for_scale(si, num_scales)(h_BChw)

    def _residual_at(self, f_rest_BChw: torch.Tensor, si: int, pn: int, num_scales: int) -> torch.Tensor:
        """The residual seen by scale ``si``, flattened: (B, C, H, W) -> (B*pn*pn, C), area-downsampled."""
        if si != num_scales - 1:
            f_rest_BChw = F.interpolate(f_rest_BChw, size=(pn, pn), mode="area")
        return rearrange(f_rest_BChw, "b c h w -> (b h w) c")

    def _check_latent(self, f_BChw: torch.Tensor, patch_nums: Sequence[int]) -> None:
        H, W = f_BChw.shape[-2:]
        if H != W or H != patch_nums[-1]:
            raise UserError(
                f"latent is {H}x{W} but the last patch_num is {patch_nums[-1]}: feed images whose side is "
                f"{patch_nums[-1]} x the VAE downsampling factor, or choose patch_nums ending at {H}"
            )

    # ----------------------------------------------------------------------------------------------- training
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Training pass. ``f_BChw`` (B, Cvae, h, w) -> (f_hat with straight-through gradient, vq loss, usage %).

        The loss is the official one, averaged over scales on the partial reconstructions ``f_hat_si``:
        ``beta * mse(sg[f_hat_si], f) + mse(f_hat_si, sg[f])`` (commitment + codebook/phi loss). In training mode
        the per-scale code hits update ``ema_vocab_hit_SV`` (all-reduced when torch.distributed is initialised).
        """
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            f_BChw = f_BChw.float()
            B, _, H, _ = f_BChw.shape
            self._check_latent(f_BChw, self.patch_nums)
            f_no_grad = f_BChw.detach()
            f_rest = f_no_grad.clone()
            f_hat = torch.zeros_like(f_rest)
            SN = self.num_scales
            vq_loss = f_BChw.new_zeros(())
            hits_SV = []
            for si, pn in enumerate(self.patch_nums):
                idx_N = self.nearest_code(self._residual_at(f_rest, si, pn, SN))
                hits_SV.append(idx_N.bincount(minlength=self.vocab_size).float())
                h_BChw = self._scale_contribution(si, SN, self._code_map(idx_N.view(B, pn * pn), pn), H)
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f_BChw).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
            vq_loss = vq_loss / SN
            f_hat_st = (f_hat.detach() - f_no_grad) + f_BChw
            if self.training:
                self._record_hits(torch.stack(hits_SV))
        tokens_per_step = B * sum(pn * pn for pn in self.patch_nums) * world_size()
        return f_hat_st, vq_loss, self.usage_percent(tokens_per_step)

    @torch.no_grad()
    def _record_hits(self, hit_SV: torch.Tensor) -> None:
        all_reduce_sum_(hit_SV)
        if self.record_hit == 0 and not bool(self.ema_vocab_hit_SV.any()):
            self.ema_vocab_hit_SV.copy_(hit_SV)
        elif self.record_hit < 100:
            self.ema_vocab_hit_SV.mul_(0.9).add_(hit_SV, alpha=0.1)
        else:
            self.ema_vocab_hit_SV.mul_(0.99).add_(hit_SV, alpha=0.01)
        self.record_hit += 1

    def usage_percent(self, tokens_per_step: int, margin_ratio: float = 0.08) -> float:
        """Percent of codes whose EMA hit rate is at least ``margin_ratio`` times the uniform rate
        ``tokens_per_step / V`` (the official usage margin is 8 % of the uniform rate)."""
        return usage_percent_from_counts(self.codebook_usage_counts, tokens_per_step, margin_ratio)

    @torch.no_grad()
    def residuals_NC(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, h, w) -> (B * L, Cvae): the vectors the codebook is asked to match at every scale (the
        area-downsampled residuals). Good samples for :meth:`restart_dead_codes`."""
        f_rest = f_BChw.detach().float().clone()
        SN = self.num_scales
        self._check_latent(f_rest, self.patch_nums)
        out = []
        for si, pn in enumerate(self.patch_nums):
            z_NC = self._residual_at(f_rest, si, pn, SN)
            out.append(z_NC)
            idx_Bl = self.nearest_code(z_NC).view(f_rest.shape[0], pn * pn)
            f_rest.sub_(self._scale_contribution(si, SN, self._code_map(idx_Bl, pn), f_rest.shape[-1]))
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def restart_dead_codes(
        self, f_samples_NC: torch.Tensor, min_usage: float, generator: torch.Generator | None = None
    ) -> int:
        """Re-initialise every code whose usage (``codebook_usage_counts``) is below ``min_usage`` with a random
        row of ``f_samples_NC`` (N, Cvae), e.g. from :meth:`residuals_NC`. Restarted codes get usage
        ``min_usage`` so they survive until the EMA shows whether they are picked. Under torch.distributed the
        result of rank 0 is broadcast. Returns the number of restarted codes."""
        dead_V = self.codebook_usage_counts < min_usage
        num_restarted = replace_codes_(self.embedding.weight.data, dead_V, f_samples_NC, generator)
        if num_restarted:
            self.ema_vocab_hit_SV[:, dead_V] = min_usage / self.num_scales
        broadcast_from_rank0_(self.embedding.weight.data, self.ema_vocab_hit_SV)
        return num_restarted

    # ----------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def f_to_idxBl_or_fhat(
        self, f_BChw: torch.Tensor, to_fhat: bool, patch_nums: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Quantize latents (B, Cvae, h, w). Returns per scale either the token ids (B, pn*pn) or, with
        ``to_fhat``, the cumulative ``f_hat`` (B, Cvae, h, w) after that scale."""
        patch_nums = tuple(patch_nums or self.patch_nums)
        f_rest = f_BChw.detach().float().clone()
        B, _, H, _ = f_rest.shape
        self._check_latent(f_rest, patch_nums)
        f_hat = torch.zeros_like(f_rest)
        SN = len(patch_nums)
        out: list[torch.Tensor] = []
        for si, pn in enumerate(patch_nums):
            idx_Bl = self.nearest_code(self._residual_at(f_rest, si, pn, SN)).view(B, pn * pn)
            h_BChw = self._scale_contribution(si, SN, self._code_map(idx_Bl, pn), H)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_Bl)
        return out

    def idxBl_to_h(self, idx_Bl: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Token ids per scale [(B, pn*pn)] -> code maps [(B, Cvae, pn, pn)]."""
        return [self._code_map(ids, round(ids.shape[1] ** 0.5)) for ids in idx_Bl]

    def embed_to_fhat(
        self, ms_h_BChw: Sequence[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Sum the scales' code maps into ``f_hat`` (float32). ``all_to_max_scale`` (the way VAR trains and
        samples): every map is upsampled to the final size before phi. Otherwise (official "experimental" path)
        ``f_hat`` grows with the scales. Returns the final ``f_hat`` if ``last_one`` else one per scale."""
        B = ms_h_BChw[0].shape[0]
        HW = self.patch_nums[-1]
        SN = self.num_scales
        outs: list[torch.Tensor] = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, HW, HW, dtype=torch.float32)
            for si, h_BChw in enumerate(ms_h_BChw):
                f_hat.add_(self._scale_contribution(si, SN, h_BChw, HW))
                outs.append(f_hat.clone())
        else:
            pn0 = ms_h_BChw[0].shape[-1]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, h_BChw in enumerate(ms_h_BChw):
                f_hat = F.interpolate(f_hat, size=h_BChw.shape[-2:], mode="bicubic")
                f_hat = f_hat + self.quant_resi.for_scale(si, SN)(h_BChw)
                outs.append(f_hat)
        return outs[-1] if last_one else outs

    def idxBl_to_var_input(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs of the VAR transformer: token ids [(B, pn*pn)] -> (B, L - pn0**2, Cvae) float32.

        After adding scales 0..si to ``f_hat``, the input tokens of scale si+1 are ``f_hat`` area-downsampled to
        ``pn_{si+1} x pn_{si+1}`` (the same maps :meth:`get_next_autoregressive_input` produces while sampling).
        """
        B = idx_Bl[0].shape[0]
        HW = self.patch_nums[-1]
        SN = self.num_scales
        f_hat = torch.zeros(B, self.Cvae, HW, HW, dtype=torch.float32, device=idx_Bl[0].device)
        next_scales = []
        for si in range(SN - 1):
            h_BChw = self._code_map(idx_Bl[si], self.patch_nums[si])
            f_hat.add_(self._scale_contribution(si, SN, h_BChw, HW))
            pn_next = self.patch_nums[si + 1]
            next_BChw = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
            next_scales.append(rearrange(next_BChw, "b c h w -> b (h w) c"))
        if not next_scales:
            return f_hat.new_zeros(B, 0, self.Cvae)
        return torch.cat(next_scales, dim=1)

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step: add scale ``si``'s code map ``h_BChw`` (B, Cvae, pn_si, pn_si) to ``f_hat``
        (B, Cvae, HW, HW) **in place** and return ``(f_hat, next_map)``; ``next_map`` is ``f_hat`` area-downsampled
        to the next scale (B, Cvae, pn_{si+1}, pn_{si+1}), or ``f_hat`` itself after the last scale."""
        HW = self.patch_nums[-1]
        f_hat.add_(self._scale_contribution(si, SN, h_BChw, HW))
        if si == SN - 1:
            return f_hat, f_hat
        pn_next = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")


class MultiScaleVQModel(ModelMixin, ConfigMixin):
    """VAR's VQVAE: LDM encoder/decoder, 3x3 ``quant_conv``/``post_quant_conv`` and a
    :class:`MultiScaleResidualQuantizer`. Defaults are the released ``vae_ch160v4096z32`` (256 px schedule).

    Images are ``(B, 3, H, W)`` in [-1, 1] with ``H = W = patch_nums[-1] * 2**(len(ch_mult)-1)``.

    Main API (official names): :meth:`img_to_idxBl` (= :meth:`encode`), :meth:`idxBl_to_img` (:meth:`decode`),
    :meth:`fhat_to_img`, ``quantize.idxBl_to_var_input``, ``quantize.get_next_autoregressive_input``;
    :meth:`forward` is the training pass.
    """

    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["quantize"]
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        norm_num_groups: int = 32,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        patch_nums: Sequence[int] = PATCH_NUMS_256,
    ):
        super().__init__()
        _validate_config(ch, ch_mult, norm_num_groups, patch_nums, share_quant_resi, vocab_size)
        self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.patch_nums = tuple(int(pn) for pn in patch_nums)
        self.downsample = 2 ** (len(ch_mult) - 1)
        blocks = {
            "ch": ch, "ch_mult": tuple(ch_mult), "num_res_blocks": num_res_blocks, "dropout": dropout,
            "in_channels": in_channels, "z_channels": z_channels, "using_sa": using_sa, "using_mid_sa": using_mid_sa,
            "num_groups": norm_num_groups,
        }
        self.encoder = Encoder(**blocks)
        self.decoder = Decoder(**blocks)
        self.quantize = self._build_quantizer(
            vocab_size, z_channels, self.patch_nums, beta=beta, using_znorm=using_znorm,
            quant_resi=quant_resi, share_quant_resi=share_quant_resi,
        )
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)

    def _build_quantizer(self, vocab_size: int, Cvae: int, patch_nums: Sequence[int], **kwargs) -> nn.Module:
        """The residual quantizer (a subclass, e.g. the frequency-band tokenizer, returns its own; its config is
        already registered when this runs)."""
        return MultiScaleResidualQuantizer(vocab_size, Cvae, patch_nums, **kwargs)

    @property
    def resolution(self) -> int:
        """Image side this tokenizer expects: ``patch_nums[-1] * downsample``."""
        return self.patch_nums[-1] * self.downsample

    @property
    def num_tokens(self) -> int:
        """L = sum(pn**2): tokens per image over all scales."""
        return sum(pn * pn for pn in self.patch_nums)

    def _check_image(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int]) -> None:
        check_image_batch(img_B3HW, self.config.in_channels)
        H, W = img_B3HW.shape[-2:]
        side = patch_nums[-1] * self.downsample
        if H != side or W != side:
            raise UserError(
                f"this tokenizer expects {side}x{side} images (last patch_num {patch_nums[-1]} x downsampling "
                f"{self.downsample}), got {H}x{W}: resize the images or pass matching patch_nums"
            )

    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latent before quantization (B, Cvae, H/f, W/f)."""
        return self.quant_conv(self.encoder(img_B3HW))

    # ----------------------------------------------------------------------------------------------- training
    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Training pass: images (B, 3, H, W) -> (reconstruction (B, 3, H, W) not clamped, vq loss (scalar),
        codebook usage %). Gradients reach the encoder through the straight-through estimator."""
        self._check_image(img_B3HW, self.patch_nums)
        f_hat, vq_loss, usage_pct = self.quantize(self.img_to_f(img_B3HW))
        return self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype))), vq_loss, usage_pct

    @torch.no_grad()
    def restart_dead_codes_from_images(self, img_B3HW: torch.Tensor, threshold: float,
                                       generator: torch.Generator | None = None) -> int:
        """Restart every code whose EMA hit rate is below ``threshold`` x the uniform rate (tokens per step / V,
        tokens counted over all ranks) with residual vectors of ``img_B3HW`` (:meth:`MultiScaleResidualQuantizer
        .residuals_NC`); returns how many were restarted."""
        samples_NC = self.quantize.residuals_NC(self.img_to_f(img_B3HW))
        tokens_per_step = img_B3HW.shape[0] * self.num_tokens * world_size()
        min_usage = threshold * tokens_per_step / self.vocab_size
        return self.quantize.restart_dead_codes(samples_NC, min_usage, generator)

    # ----------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def img_to_idxBl(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> token ids, one LongTensor (B, pn*pn) per scale."""
        patch_nums = tuple(patch_nums or self.patch_nums)
        self._check_image(img_B3HW, patch_nums)
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(img_B3HW), to_fhat=False, patch_nums=patch_nums)

    encode = img_to_idxBl

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Quantized latent (B, Cvae, h, w) -> image (B, 3, H, W) clamped to [-1, 1]."""
        f_hat_BChw = f_hat_BChw.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp_(-1, 1)

    def idxBl_to_img(
        self, idx_Bl: Sequence[torch.Tensor], same_shape: bool = True, last_one: bool = True
    ) -> torch.Tensor | list[torch.Tensor]:
        """Token ids [(B, pn*pn)] -> image (B, 3, H, W) in [-1, 1] (``last_one``, the default here; officially
        False) or a list with one image per scale prefix. ``same_shape=False`` is the official experimental path
        where ``f_hat`` grows with the scales instead of living at the final size."""
        f_hats = self.quantize.embed_to_fhat(self.quantize.idxBl_to_h(idx_Bl), all_to_max_scale=same_shape)
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def decode(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token ids [(B, pn*pn)] of all scales -> image (B, 3, H, W) in [-1, 1]."""
        return self.idxBl_to_img(idx_Bl, same_shape=True, last_one=True)

    @torch.no_grad()
    def img_to_reconstructed_img(self, img_B3HW: torch.Tensor, last_one: bool = True):
        """Encode and decode; with ``last_one=False``, one reconstruction per number of scales used."""
        self._check_image(img_B3HW, self.patch_nums)
        f_hats = self.quantize.f_to_idxBl_or_fhat(self.img_to_f(img_B3HW), to_fhat=True)
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    # ----------------------------------------------------------------------------------------------- official files
    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **config_overrides) -> MultiScaleVQModel:
        """Build the model from an official VAR VQVAE state dict (plain, or a training checkpoint holding
        ``['trainer']['vae_local']``). The architecture is read from the tensor shapes; ``patch_nums`` defaults to
        the 256 px schedule (pass ``patch_nums=PATCH_NUMS_512`` for 512 px). Keys must match exactly, otherwise
        :class:`UserError` lists the missing and unexpected ones. Tensors are used as they are (no copy)."""
        state_dict = unwrap_state_dict(state_dict, OFFICIAL_WRAPPER_KEYS, what="VAR VQVAE state dict")
        config = {**infer_official_config(state_dict), **config_overrides}
        with torch.device("meta"):
            model = cls(**config)
        state_dict = dict(state_dict)
        hits = state_dict.get("quantize.ema_vocab_hit_SV")
        expected_hits = model.quantize.ema_vocab_hit_SV
        if hits is None or hits.shape != expected_hits.shape:
            # usage statistics, not weights: absent in some re-saved files, and sized by the number of scales, so
            # another schedule than the file was trained with gets fresh ones (as the official loader does)
            device = hits.device if hits is not None else state_dict["quantize.embedding.weight"].device
            state_dict["quantize.ema_vocab_hit_SV"] = torch.zeros(expected_hits.shape, device=device)
        check_state_dict(
            model.state_dict(), state_dict, what=f"official VAR VQVAE state dict (MultiScaleVQModel({_short_config(model)}))",
            hint="Check that the file is a VAR VQVAE checkpoint and pass the matching config overrides",
        )
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()


def _validate_config(ch, ch_mult, norm_num_groups, patch_nums, share_quant_resi, vocab_size) -> None:
    if len(ch_mult) < 1 or any(int(m) < 1 for m in ch_mult):
        raise UserError(f"ch_mult must be a non-empty list of positive integers, got {list(ch_mult)}")
    for m in ch_mult:
        if (ch * m) % norm_num_groups:
            raise UserError(
                f"every ch * ch_mult ({[ch * m for m in ch_mult]}) must be divisible by norm_num_groups "
                f"({norm_num_groups}): change ch or norm_num_groups"
            )
    pns = [int(pn) for pn in patch_nums]
    if not pns or any(pn < 1 for pn in pns) or any(a >= b for a, b in itertools.pairwise(pns)):
        raise UserError(f"patch_nums must be strictly increasing positive integers, got {list(patch_nums)}")
    if share_quant_resi < 0:
        raise UserError(f"share_quant_resi must be >= 0 (0: one phi per scale), got {share_quant_resi}")
    if vocab_size < 1:
        raise UserError(f"vocab_size must be positive, got {vocab_size}")


#: where official VAR training checkpoints keep the VQVAE weights
OFFICIAL_WRAPPER_KEYS = ("trainer.vae_local",)


def infer_official_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Architecture of an official VQVAE state dict, read from its key names and tensor shapes."""
    try:
        vocab_size, z_channels = state_dict["quantize.embedding.weight"].shape
        ch = state_dict["encoder.conv_in.weight"].shape[0]
        in_channels = state_dict["encoder.conv_in.weight"].shape[1]
        quant_conv_ks = state_dict["quant_conv.weight"].shape[-1]
    except KeyError as err:
        raise UserError(
            f"not a VAR VQVAE state dict: key {err.args[0]!r} is missing (expected the official "
            f"vae_ch160v4096z32.pth layout: encoder.*, decoder.*, quantize.*, quant_conv.*, post_quant_conv.*)"
        ) from err
    levels = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down.")})
    ch_mult = [int(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in levels]
    num_res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down.0.block.")})
    using_sa = any(k.startswith(f"encoder.down.{levels[-1]}.attn.") for k in state_dict)
    using_mid_sa = any(k.startswith("encoder.mid.attn_1.") for k in state_dict)
    phi_keys = [k for k in state_dict if k.startswith("quantize.quant_resi.")]
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in phi_keys):
        share_quant_resi = len({k.split(".")[3] for k in phi_keys})
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in phi_keys):
        share_quant_resi = 1
    else:
        share_quant_resi = 0
    return {
        "vocab_size": int(vocab_size), "z_channels": int(z_channels), "ch": int(ch), "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks, "in_channels": int(in_channels), "using_sa": using_sa,
        "using_mid_sa": using_mid_sa, "quant_conv_ks": int(quant_conv_ks), "share_quant_resi": share_quant_resi,
        "quant_resi": 0.5 if phi_keys else 0.0, "patch_nums": list(PATCH_NUMS_256),
    }


def _short_config(model: nn.Module) -> str:
    cfg = getattr(model, "config", {})
    keys = ("ch", "ch_mult", "z_channels", "vocab_size", "share_quant_resi", "patch_nums")
    return ", ".join(f"{k}={list(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]}" for k in keys if k in cfg)


def load_official_var_vae(path_or_state_dict: str | Path | Mapping, **config_overrides) -> MultiScaleVQModel:
    """Load VAR's released VQVAE (``vae_ch160v4096z32.pth``) or any checkpoint in its layout, on CPU, in eval
    mode. ``config_overrides`` replace inferred settings, e.g. ``patch_nums=PATCH_NUMS_512`` for 512 px."""
    if not isinstance(path_or_state_dict, Mapping) and not Path(path_or_state_dict).exists():
        raise UserError(
            f"VQVAE checkpoint not found: {path_or_state_dict} (download vae_ch160v4096z32.pth from the VAR release "
            "and pass its path)"
        )
    state_dict = read_state_dict(path_or_state_dict, what="VQVAE checkpoint", wrapper_keys=OFFICIAL_WRAPPER_KEYS)
    return MultiScaleVQModel.from_official_state_dict(state_dict, **config_overrides)
