"""FR-VAE: NFIG's frequency-band residual VQ tokenizer, on VAR's schedule and with VAR's key layout.

The encoder (VAR's) gives a latent ``f`` (B, Cvae, H, W). Scale ``si`` of the schedule ``patch_nums`` is frequency
band ``si`` (:mod:`vgen.tokenizers.frequency_bands`; NFIG's token-share edges by default), quantized residually
with one shared codebook, coarse to fine:

1. ``r_0 = f``. At band ``si`` the target is ``P_si(r_si)``, the residual low-passed to the band's upper edge: the
   band's own frequencies plus whatever the lower bands left unexplained (band 0 is quantized directly).
2. The target is represented on the band's ``pn x pn`` grid (area resampling, as VAR does), each position takes its
   nearest code, and the code map comes back to ``H x W`` (bicubic + VAR's residual conv ``phi``) and is low-passed
   again, so band ``si`` adds nothing above its edge: ``h_si = P_si(phi(up(codes)))``.
3. ``r_{si+1} = r_si - h_si``; the composer sums the bands, ``f_hat = sum_si h_si``, for VAR's decoder.

The last band's low-pass is the identity (its edge is 1), so with a codebook that contains the exact targets (and
``quant_resi=0``) ``f_hat == f``.

:class:`FrequencyResidualQuantizer` subclasses VAR's :class:`~vgen.tokenizers.msvq.MultiScaleResidualQuantizer`,
changing only what a scale sees and what it adds; everything else is shared: the codebook lookup, the losses and
straight-through estimator, usage statistics and dead-code restart, ``idxBl_to_var_input`` and
``get_next_autoregressive_input`` (so :func:`vgen.samplers.next_scale.generate_next_scale` drives it unchanged, the
next scale's input being ``f_hat`` area-downsampled, as in VAR). :class:`FrequencyVQModel` is VAR's
:class:`~vgen.tokenizers.msvq.MultiScaleVQModel` with this quantizer: same state-dict keys, same API
(``img_to_idxBl``, ``idxBl_to_img``, ``fhat_to_img``, ``img_to_reconstructed_img``, ``quantize.idxBl_to_var_input``).
NFIG released no code; this layout is vgen's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ModelMixin  # noqa: F401 - see below
from diffusers.configuration_utils import register_to_config
from torch import nn

from vgen.errors import UserError

from .frequency_bands import (
    apply_spectral_mask,
    band_components,
    check_band_edges,
    lowpass_masks,
    token_share_band_edges,
)
from .msvq import PATCH_NUMS_256, MultiScaleResidualQuantizer, MultiScaleVQModel

# diffusers' pipeline loader finds how to load a saved component by looking its base classes up by name in the
# component's own module (``getattr(vgen.tokenizers.frvae, "ModelMixin")``): without the import above, a pipeline
# folder holding this tokenizer would not load.


class FrequencyResidualQuantizer(MultiScaleResidualQuantizer):
    """Residual quantization of frequency bands (see the module docstring); implements the same
    :class:`~vgen.samplers.interfaces.ResidualQuantizer` interface as VAR's quantizer.

    Args:
        band_edges: upper radius of each band in [0, 1] (normalised spectrum radius), one per scale, increasing and
            ending at >= 1; None for NFIG's token-share edges (:func:`token_share_band_edges`).
        Other arguments as :class:`MultiScaleResidualQuantizer`.
    """

    def __init__(self, vocab_size: int, Cvae: int, patch_nums: Sequence[int],
                 band_edges: Sequence[float] | None = None, **kwargs):
        super().__init__(vocab_size, Cvae, patch_nums, **kwargs)
        edges = token_share_band_edges(self.patch_nums) if band_edges is None else band_edges
        self.band_edges = check_band_edges(edges, len(self.patch_nums))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", band_edges={tuple(round(e, 4) for e in self.band_edges)}"

    def _lowpass(self, x_BChw: torch.Tensor, si: int) -> torch.Tensor:
        """``P_si(x)``: keep the frequencies up to band ``si``'s upper edge (the last band keeps everything)."""
        if si == self.num_scales - 1:
            return x_BChw
        H, W = x_BChw.shape[-2:]
        return apply_spectral_mask(x_BChw, lowpass_masks(self.band_edges, H, W, x_BChw.device)[si])

    def _check_schedule(self, num_scales: int) -> None:
        if num_scales != self.num_scales:
            raise UserError(
                f"this frequency tokenizer has {self.num_scales} bands (patch_nums {list(self.patch_nums)}); its "
                "bands are fixed by that schedule, so other patch_nums cannot be used"
            )

    def _residual_at(self, f_rest_BChw: torch.Tensor, si: int, pn: int, num_scales: int) -> torch.Tensor:
        """What band ``si`` quantizes: ``P_si(residual)`` area-resampled to ``pn x pn``, flattened to (B*pn*pn, C)."""
        self._check_schedule(num_scales)
        return super()._residual_at(self._lowpass(f_rest_BChw, si), si, pn, num_scales)

    def _scale_contribution(self, si: int, num_scales: int, h_BChw: torch.Tensor, HW: int) -> torch.Tensor:
        """What band ``si`` adds to ``f_hat``: ``P_si(phi(bicubic_up(codes)))``, (B, C, pn, pn) -> (B, C, HW, HW)."""
        self._check_schedule(num_scales)
        return self._lowpass(super()._scale_contribution(si, num_scales, h_BChw, HW), si)

    def embed_to_fhat(self, ms_h_BChw: Sequence[torch.Tensor], all_to_max_scale: bool = True,
                      last_one: bool = False):
        if not all_to_max_scale:
            raise UserError("the frequency tokenizer sums its bands at the full latent size; use same_shape=True")
        return super().embed_to_fhat(ms_h_BChw, all_to_max_scale=True, last_one=last_one)

    def band_components(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """The decomposer without quantization: latent (B, C, H, W) -> one (B, C, H, W) component per band, summing
        to ``f``."""
        return band_components(f_BChw, self.band_edges)


class FrequencyVQModel(MultiScaleVQModel):
    """FR-VAE: VAR's VQVAE (encoder, decoder, ``quant_conv``/``post_quant_conv``, codebook, ``phi`` convs, same
    state-dict keys) with a :class:`FrequencyResidualQuantizer`. ``band_edges`` (saved in the config) as in the
    quantizer; every other argument and method as :class:`MultiScaleVQModel`."""

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
        band_edges: Sequence[float] | None = None,
    ):
        super().__init__(
            vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            dropout=dropout, in_channels=in_channels, using_sa=using_sa, using_mid_sa=using_mid_sa,
            norm_num_groups=norm_num_groups, beta=beta, using_znorm=using_znorm, quant_conv_ks=quant_conv_ks,
            quant_resi=quant_resi, share_quant_resi=share_quant_resi, patch_nums=patch_nums,
        )

    def _build_quantizer(self, vocab_size: int, Cvae: int, patch_nums: Sequence[int], **kwargs) -> nn.Module:
        # runs inside MultiScaleVQModel.__init__; this class's config (band_edges) is registered before that
        return FrequencyResidualQuantizer(vocab_size, Cvae, patch_nums, band_edges=self.config.band_edges, **kwargs)

    def band_components(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) -> the latent's band components before quantization, one (B, Cvae, h, w) per band."""
        self._check_image(img_B3HW, self.patch_nums)
        return self.quantize.band_components(self.img_to_f(img_B3HW))
