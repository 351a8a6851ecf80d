"""FlowAR's per-scale flow head (official ``SimpleTransformerAdaLN``): a small transformer over the s x s tokens of
one scale that predicts the velocity ``v(x_t, t | z)`` of the flow from noise (t = 1) to the scale's latent tokens
(t = 0), conditioned per token on the AR transformer's output ``z``.

Two block types, as released:

- :class:`SpatialAdaLNBlock` (official ``Block_v1``, FlowAR-S): every token gets its own six AdaLN vectors from
  ``ada_lin(SiLU(t_emb + c))``, ``c = cond_embed(z)``.
- :class:`CrossAttnAdaLNBlock` (official ``Block_v2``, FlowAR-L/H): self-attention modulated by the time only, then
  cross-attention from the tokens to the raw condition ``z``, then the MLP modulated per token by ``c + t_emb``.

Keys (official): ``time_embed.mlp.{0,2}``, ``cond_embed``, ``input_proj``, ``res_blocks.{j}.*``,
``final_layer.{linear, adaLN_modulation.1}``. The time embedding reads the *truncated integer* ``(1000 t).long()``
as the official head does. Shapes: ``B`` rows, ``L`` tokens of the scale (a square grid in raster order), ``C``
latent channels per token, ``W`` head width, ``D`` condition (AR) width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vgen.models.ar_blocks import RoPESelfAttention, gated_mlp_hidden_dim
from vgen.models.layers import (
    GatedGELUMLP,
    RMSNorm,
    TimestepEmbedder,
    VisionRoPE2D,
    apply_eva_rope,
    attention,
    eva_rope_table,
    modulate,
    unpack_adaln6,
)

FLOW_HEAD_TYPES = ("spatial_adaln", "cross_attention")


class RoPECrossAttention(nn.Module):
    """Cross-attention of the head's tokens (queries) to the AR condition of the same tokens (keys/values), both
    rotated by the same 2-D RoPE (official ``CrossAttention`` of ``Block_v2``: ``q``, ``kv`` without bias, ``proj``,
    ``rope.freqs``)."""

    def __init__(self, embed_dim: int, context_dim: int, num_heads: int, rope_reference_side: float | None = 16):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.q = nn.Linear(embed_dim, embed_dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.rope = VisionRoPE2D(self.head_dim, rope_reference_side)

    def forward(self, x_BLW: torch.Tensor, z_BLD: torch.Tensor,
                rope_table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q_BHLc = rearrange(self.q(x_BLW), "B L (H c) -> B H L c", H=self.num_heads)
        k_BHLc, v_BHLc = rearrange(self.kv(z_BLD), "B L (two H c) -> two B H L c", two=2, H=self.num_heads)
        cos, sin = (t.to(q_BHLc.dtype) for t in rope_table)
        out = attention(apply_eva_rope(q_BHLc, cos, sin), apply_eva_rope(k_BHLc, cos, sin), v_BHLc)
        return self.proj(rearrange(out, "B H L c -> B L (H c)"))


class SpatialAdaLNBlock(nn.Module):
    """Official ``Block_v1``: per-token AdaLN (``ada_lin``: Linear(W, 6W) on ``SiLU(t_emb + c)``), RoPE
    self-attention (``qkv`` without bias), GELU-gated MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, rope_reference_side: float | None = 16):
        super().__init__()
        self.W = width
        self.norm1 = RMSNorm(width, elementwise_affine=False)
        self.attn = RoPESelfAttention(width, num_heads, qkv_bias=False, rope_reference_side=rope_reference_side)
        self.norm2 = RMSNorm(width, elementwise_affine=False)
        self.mlp = GatedGELUMLP(width, gated_mlp_hidden_dim(width, mlp_ratio))
        self.ada_lin = nn.Linear(width, 6 * width)

    def forward(self, x_BLW, t_B1W, c_BLW, z_BLD, rope_table):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = unpack_adaln6(self.ada_lin(F.silu(t_B1W + c_BLW)), self.W)
        x_BLW = x_BLW + self.attn(modulate(self.norm1(x_BLW), shift1, scale1), rope_table) * gamma1
        return x_BLW + self.mlp(modulate(self.norm2(x_BLW), shift2, scale2)) * gamma2


class CrossAttnAdaLNBlock(nn.Module):
    """Official ``Block_v2``: self-attention modulated by ``ada_lin_attn(SiLU(t_emb))`` (gamma, scale, shift), then
    ``crossattn(norm2_1(x), norm2_2(z))`` (weighted RMSNorms), then the MLP modulated per token by
    ``ada_lin_mlp(SiLU(c + t_emb))``."""

    def __init__(self, width: int, num_heads: int, context_dim: int, mlp_ratio: float = 4.0,
                 rope_reference_side: float | None = 16):
        super().__init__()
        self.W = width
        self.norm1 = RMSNorm(width, elementwise_affine=False)
        self.attn = RoPESelfAttention(width, num_heads, qkv_bias=False, rope_reference_side=rope_reference_side)
        self.crossattn = RoPECrossAttention(width, context_dim, num_heads, rope_reference_side)
        self.norm2_1 = RMSNorm(width)
        self.norm2_2 = RMSNorm(context_dim)
        self.norm3 = RMSNorm(width, elementwise_affine=False)
        self.mlp = GatedGELUMLP(width, gated_mlp_hidden_dim(width, mlp_ratio))
        self.ada_lin_attn = nn.Linear(width, 3 * width)
        self.ada_lin_mlp = nn.Linear(width, 3 * width)

    def forward(self, x_BLW, t_B1W, c_BLW, z_BLD, rope_table):
        gamma1, scale1, shift1 = rearrange(self.ada_lin_attn(F.silu(t_B1W)), "B L (three W) -> three B L W", three=3)
        gamma2, scale2, shift2 = rearrange(self.ada_lin_mlp(F.silu(c_BLW + t_B1W)), "B L (three W) -> three B L W",
                                           three=3)
        x_BLW = x_BLW + self.attn(modulate(self.norm1(x_BLW), shift1, scale1), rope_table) * gamma1
        x_BLW = x_BLW + self.crossattn(self.norm2_1(x_BLW), self.norm2_2(z_BLD), rope_table)
        return x_BLW + self.mlp(modulate(self.norm3(x_BLW), shift2, scale2)) * gamma2


class FlowFinalLayer(nn.Module):
    """DiT's final layer with a weightless RMSNorm: ``linear(modulate(norm_final(x), shift, scale))``, ``(shift,
    scale) = adaLN_modulation(c + t_emb)`` (keys ``linear``, ``adaLN_modulation.1``)."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(width, elementwise_affine=False)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_BLW: torch.Tensor, c_BLW: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BLW).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x_BLW), shift, scale))


class FlowHead(nn.Module):
    """The velocity network of one scale (official ``SimpleTransformerAdaLN``).

    Args:
        in_channels: channels per token (latent channels x patch_size^2; 16 for kl16).
        width: W (official ``diffloss_w``); depth: number of blocks (``diffloss_d``).
        cond_dim: width D of the AR condition.
        num_heads: attention heads (official: W // 64).
        block: ``"spatial_adaln"`` (``Block_v1``) or ``"cross_attention"`` (``Block_v2``).
        rope_reference_side: grid side every scale's positions are normalised onto (official 16).
    """

    def __init__(self, in_channels: int, width: int, depth: int, cond_dim: int, num_heads: int,
                 block: str = "spatial_adaln", mlp_ratio: float = 4.0, rope_reference_side: float | None = 16):
        super().__init__()
        if block not in FLOW_HEAD_TYPES:
            raise ValueError(f"unknown flow head block {block!r}; choose one of {', '.join(FLOW_HEAD_TYPES)}")
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        if block == "spatial_adaln":
            blocks = [SpatialAdaLNBlock(width, num_heads, mlp_ratio, rope_reference_side) for _ in range(depth)]
        else:
            blocks = [CrossAttnAdaLNBlock(width, num_heads, cond_dim, mlp_ratio, rope_reference_side)
                      for _ in range(depth)]
        self.res_blocks = nn.ModuleList(blocks)
        self.final_layer = FlowFinalLayer(width, in_channels)
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_table(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (L, head_dim) of a square grid of ``num_tokens`` tokens (memoised per grid and device)."""
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"the flow head needs the tokens of a square grid, got {num_tokens}")
        rope = self.res_blocks[0].attn.rope
        key = (side, str(device))
        if key not in self._rope_tables:  # float32 even when the model runs in half precision
            self._rope_tables[key] = eva_rope_table(rope.freqs.float(), side, None, rope.reference_side)
        return self._rope_tables[key]

    def forward(self, x_t_BLC: torch.Tensor, t_B: torch.Tensor, z_BLD: torch.Tensor) -> torch.Tensor:
        """Velocity (B, L, C) of ``x_t_BLC`` (B, L, C) at times ``t_B`` (B,) in [0, 1], given the AR condition
        ``z_BLD`` (B, L, D) of the same tokens."""
        dtype = self.input_proj.weight.dtype
        t_int_B = (t_B.float() * 1000).long()  # the official head embeds the truncated integer timestep
        t_B1W = self.time_embed(t_int_B).unsqueeze(1)
        c_BLW = self.cond_embed(z_BLD.to(dtype))
        x_BLW = self.input_proj(x_t_BLC.to(dtype))
        rope_table = self.rope_table(x_BLW.shape[1], x_BLW.device) if self.res_blocks else None
        for block in self.res_blocks:
            x_BLW = block(x_BLW, t_B1W, c_BLW, z_BLD.to(dtype), rope_table)
        return self.final_layer(x_BLW, c_BLW + t_B1W)
