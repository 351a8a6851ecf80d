"""Convolutional encoder and decoder of the LDM / taming "vq-f16" design, shared by VAR's VQVAE, MAR's KL-16
autoencoder and LlamaGen's VQ tokenizer.

The attribute names reproduce each family's official state-dict keys exactly: VAR (``encoder.down.0.block.0.norm1
.weight``, ``decoder.mid.attn_1.qkv.weight``, ``decoder.up.4.upsample.conv.bias``), MAR's KL-16 (the same layout
with separate ``q``/``k``/``v`` attention convs and a doubled ``conv_out`` for mean and log-variance) and LlamaGen
(``encoder.conv_blocks.{i}.res.{j}``, ``encoder.mid.{0,1,2}``, levels of the decoder in run order). Numerics follow
the official code: GroupNorm with eps 1e-6, SiLU, single-head attention, downsampling by a (0,1,0,1) pad and a
stride-2 3x3 conv, upsampling by nearest x2 and a 3x3 conv.

Shapes: images ``(B, in_channels, H, W)``; latents ``(B, z_channels, H / 2**(len(ch_mult)-1), W / ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class Downsample2x(nn.Module):
    """``(B, C, H, W) -> (B, C, H/2, W/2)``: zero-pad right/bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, pad=(0, 1, 0, 1), mode="constant", value=0))


class Upsample2x(nn.Module):
    """``(B, C, H, W) -> (B, C, 2H, 2W)``: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode="nearest"))


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus a shortcut (1x1 conv only when the
    channel count changes; otherwise identity, which has no state-dict keys)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, num_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv1(F.silu(self.norm1(x_BChw)))
        h_BChw = self.conv2(self.dropout(F.silu(self.norm2(h_BChw))))
        return self.nin_shortcut(x_BChw) + h_BChw


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``h*w`` positions of a feature map, with a residual add.

    ``fused_qkv=True`` (VAR): one 1x1 conv makes q, k and v (``qkv``: C -> 3C, channel order q|k|v).
    ``fused_qkv=False`` (LDM, MAR's KL-16, LlamaGen): three 1x1 convs ``q``, ``k``, ``v``. Softmax scale C**-0.5.
    """

    def __init__(self, channels: int, num_groups: int = 32, fused_qkv: bool = True):
        super().__init__()
        self.fused_qkv = fused_qkv
        self.norm = group_norm(channels, num_groups)
        if fused_qkv:
            self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1, stride=1, padding=0)
        else:
            self.q = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
            self.k = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
            self.v = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h, w = x_BChw.shape[-2:]
        normed = self.norm(x_BChw)
        if self.fused_qkv:
            q, k, v = rearrange(self.qkv(normed), "b (three c) h w -> three b 1 (h w) c", three=3)
        else:
            q, k, v = (rearrange(conv(normed), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        out_B1LC = F.scaled_dot_product_attention(q, k, v)
        out_BChw = rearrange(out_B1LC, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x_BChw + self.proj_out(out_BChw)


#: attribute names per state-dict layout: (encoder levels, decoder levels, res blocks inside a level)
LAYOUTS = {"ldm": ("down", "up", "block"), "llamagen": ("conv_blocks", "conv_blocks", "res")}


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def _attention_levels(attn_levels: Sequence[int] | None, using_sa: bool, num_levels: int) -> frozenset[int]:
    """Levels with attention after each res block: ``attn_levels`` if given, else the lowest level when
    ``using_sa`` (VAR's rule)."""
    if attn_levels is None:
        return frozenset({num_levels - 1} if using_sa else ())
    levels = frozenset(int(i) for i in attn_levels)
    if any(not 0 <= i < num_levels for i in levels):
        raise ValueError(f"attention levels {sorted(levels)} must lie in 0..{num_levels - 1}")
    return levels


def _build_mid(module: nn.Module, layout: str, channels: int, dropout: float, using_mid_sa: bool,
               num_groups: int, fused_qkv: bool) -> None:
    """``module.mid``: res block, attention (or identity), res block; ``mid.block_1/attn_1/block_2`` (LDM) or
    ``mid.0/1/2`` (LlamaGen)."""
    parts = (
        ResnetBlock(channels, channels, dropout, num_groups),
        AttnBlock(channels, num_groups, fused_qkv) if using_mid_sa else nn.Identity(),
        ResnetBlock(channels, channels, dropout, num_groups),
    )
    if layout == "ldm":
        module.mid = nn.Module()
        module.mid.block_1, module.mid.attn_1, module.mid.block_2 = parts
    else:
        module.mid = nn.ModuleList(parts)


def _mid_parts(module: nn.Module, layout: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    if layout == "ldm":
        return module.mid.block_1, module.mid.attn_1, module.mid.block_2
    return module.mid[0], module.mid[1], module.mid[2]


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> latent ``(B, z_channels, H/f, W/f)`` with ``f = 2**(len(ch_mult)-1)``
    (``(B, 2 * z_channels, ...)`` with ``double_z``: mean and log-variance of a KL autoencoder).

    Level ``i`` (working at ``H / 2**i``) has ``num_res_blocks`` ResnetBlocks with ``ch * ch_mult[i]`` channels, an
    attention block after each of them at the levels in ``attn_levels`` (default: only the last level, when
    ``using_sa``), and levels 0..n-2 end with a 2x downsample; then mid (res, attention, res), GroupNorm, SiLU and
    ``conv_out``.

    ``layout`` names the modules: ``"ldm"`` (VAR, MAR's KL-16: ``down.{i}.block.{j}``, ``mid.block_1``,
    ``mid.attn_1``) or ``"llamagen"`` (``conv_blocks.{i}.res.{j}``, ``mid.{0,1,2}``).
    """

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        num_groups: int = 32,
        *,
        attn_levels: Sequence[int] | None = None,
        double_z: bool = False,
        fused_qkv: bool = True,
        layout: str = "ldm",
    ):
        super().__init__()
        _check_layout(layout)
        self.layout = layout
        levels_name, _, self._res_name = LAYOUTS[layout]
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        attn_at = _attention_levels(attn_levels, using_sa, self.num_resolutions)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1,) + tuple(ch_mult)
        levels = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if i_level in attn_at:
                    attn.append(AttnBlock(block_in, num_groups, fused_qkv))
            level = nn.Module()
            setattr(level, self._res_name, block)
            level.attn = attn
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample2x(block_in)
            levels.append(level)
        setattr(self, levels_name, levels)
        self._levels = levels_name

        _build_mid(self, layout, block_in, dropout, using_mid_sa, num_groups, fused_qkv)
        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1,
                                  padding=1)

    def forward(self, img_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv_in(img_BChw)
        for i_level, level in enumerate(getattr(self, self._levels)):
            blocks = getattr(level, self._res_name)
            for i_block in range(self.num_res_blocks):
                h_BChw = blocks[i_block](h_BChw)
                if len(level.attn) > 0:
                    h_BChw = level.attn[i_block](h_BChw)
            if i_level != self.num_resolutions - 1:
                h_BChw = level.downsample(h_BChw)
        block_1, attn_1, block_2 = _mid_parts(self, self.layout)
        h_BChw = block_2(attn_1(block_1(h_BChw)))
        return self.conv_out(F.silu(self.norm_out(h_BChw)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> image ``(B, in_channels, h*f, w*f)`` (not clamped).

    ``conv_in``, mid, then levels n-1..0 with ``num_res_blocks + 1`` ResnetBlocks each (attention after each at the
    levels in ``attn_levels``; default: the lowest-resolution level when ``using_sa``) and a 2x upsample at levels
    n-1..1. With ``layout="ldm"`` ``up[i]`` is resolution level ``i`` (0 = full resolution), as in the official
    ``insert(0, ...)`` construction; with ``"llamagen"`` ``conv_blocks[j]`` is the j-th level run (level n-1-j).
    """

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        num_groups: int = 32,
        *,
        attn_levels: Sequence[int] | None = None,
        fused_qkv: bool = True,
        layout: str = "ldm",
    ):
        super().__init__()
        _check_layout(layout)
        self.layout = layout
        _, levels_name, self._res_name = LAYOUTS[layout]
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        attn_at = _attention_levels(attn_levels, using_sa, self.num_resolutions)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        _build_mid(self, layout, block_in, dropout, using_mid_sa, num_groups, fused_qkv)

        run_order: list[nn.Module] = []  # levels n-1 .. 0, in the order the forward pass runs them
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if i_level in attn_at:
                    attn.append(AttnBlock(block_in, num_groups, fused_qkv))
            level = nn.Module()
            setattr(level, self._res_name, block)
            level.attn = attn
            if i_level != 0:
                level.upsample = Upsample2x(block_in)
            run_order.append(level)
        # LDM indexes levels by resolution (up[0] = full resolution); LlamaGen by run order
        setattr(self, levels_name, nn.ModuleList(run_order[::-1] if layout == "ldm" else run_order))
        self._levels = levels_name

        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def _level(self, i_level: int) -> nn.Module:
        levels = getattr(self, self._levels)
        return levels[i_level] if self.layout == "ldm" else levels[self.num_resolutions - 1 - i_level]

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        block_1, attn_1, block_2 = _mid_parts(self, self.layout)
        h_BChw = block_2(attn_1(block_1(self.conv_in(z_BChw))))
        for i_level in reversed(range(self.num_resolutions)):
            level = self._level(i_level)
            blocks = getattr(level, self._res_name)
            for i_block in range(self.num_res_blocks + 1):
                h_BChw = blocks[i_block](h_BChw)
                if len(level.attn) > 0:
                    h_BChw = level.attn[i_block](h_BChw)
            if i_level != 0:
                h_BChw = level.upsample(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw)))
