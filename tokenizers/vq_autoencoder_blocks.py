"""Convolutional encoder and decoder of VAR's VQVAE (the LDM / taming "vq-f16" design).

The attribute names reproduce the official state-dict keys exactly (``encoder.down.0.block.0.norm1.weight``,
``decoder.mid.attn_1.qkv.weight``, ``decoder.up.4.upsample.conv.bias``, ...), so VAR's released
``vae_ch160v4096z32.pth`` loads key for key. Numerics follow the official code: GroupNorm with eps 1e-6, SiLU,
single-head attention with one fused ``qkv`` 1x1 conv, downsampling by a (0,1,0,1) pad and a stride-2 3x3 conv,
upsampling by nearest x2 and a 3x3 conv.

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

    One fused 1x1 conv makes q, k and v (``qkv``: C -> 3C, channel order q|k|v); softmax scale is C**-0.5.
    """

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h, w = x_BChw.shape[-2:]
        qkv = rearrange(self.qkv(self.norm(x_BChw)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out_B1LC = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        out_BChw = rearrange(out_B1LC, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x_BChw + self.proj_out(out_BChw)


def _attn_or_identity(channels: int, enabled: bool, num_groups: int) -> nn.Module:
    return AttnBlock(channels, num_groups) if enabled else nn.Identity()


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> latent ``(B, z_channels, H/f, W/f)`` with ``f = 2**(len(ch_mult)-1)``.

    Level ``i`` has ``num_res_blocks`` ResnetBlocks with ``ch * ch_mult[i]`` channels; levels 0..n-2 end with a
    2x downsample; attention (``using_sa``) only at the last, lowest-resolution level; then mid (block_1, attn_1,
    block_2), GroupNorm, SiLU and ``conv_out``.
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
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            is_lowest = i_level == self.num_resolutions - 1
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if is_lowest and using_sa:
                    attn.append(AttnBlock(block_in, num_groups))
            level = nn.Module()
            level.block = block
            level.attn = attn
            if not is_lowest:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, num_groups)
        self.mid.attn_1 = _attn_or_identity(block_in, using_mid_sa, num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, num_groups)

        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, img_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.conv_in(img_BChw)
        for i_level, level in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h_BChw = level.block[i_block](h_BChw)
                if len(level.attn) > 0:
                    h_BChw = level.attn[i_block](h_BChw)
            if i_level != self.num_resolutions - 1:
                h_BChw = level.downsample(h_BChw)
        h_BChw = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h_BChw)))
        return self.conv_out(F.silu(self.norm_out(h_BChw)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> image ``(B, in_channels, h*f, w*f)`` (not clamped).

    ``conv_in``, mid, then levels n-1..0 with ``num_res_blocks + 1`` ResnetBlocks each (attention at the lowest
    resolution level only) and a 2x upsample at levels n-1..1. ``up[i]`` is resolution level ``i`` (0 = full
    resolution), as in the official ``insert(0, ...)`` construction.
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
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, num_groups)
        self.mid.attn_1 = _attn_or_identity(block_in, using_mid_sa, num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, num_groups)

        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            is_lowest = i_level == self.num_resolutions - 1
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if is_lowest and using_sa:
                    attn.append(AttnBlock(block_in, num_groups))
            level = nn.Module()
            level.block = block
            level.attn = attn
            if i_level != 0:
                level.upsample = Upsample2x(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h_BChw = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z_BChw))))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h_BChw = level.block[i_block](h_BChw)
                if len(level.attn) > 0:
                    h_BChw = level.attn[i_block](h_BChw)
            if i_level != 0:
                h_BChw = level.upsample(h_BChw)
        return self.conv_out(F.silu(self.norm_out(h_BChw)))
