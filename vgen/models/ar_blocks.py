"""The transformer block of the continuous-token AR families: FlowAR's AR stacks (and its flow head's attention),
reused by xAR without FlowAR's per-scale positions. Composed of the shared pieces in :mod:`vgen.models.layers`.

==========================  =================================  ================================================
block                       keys                               used by
==========================  =================================  ================================================
:class:`RoPESelfAttention`  ``qkv``, ``proj``, ``rope.freqs``  FlowAR (AR stacks: qkv bias; flow head: none), xAR
:class:`AdaLNBlock`         ``attn``, ``mlp``, ``ada_lin.1``   FlowAR's and xAR's AR blocks (6-vector AdaLN)
==========================  =================================  ================================================
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from vgen.models.layers import (
    CrossAttention,
    DropPath,
    GatedGELUMLP,
    RMSNorm,
    VisionRoPE2D,
    apply_eva_rope,
    attention,
    modulate,
    unpack_adaln6,
)


class RoPESelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection, an output ``proj`` and an optional EVA 2-D RoPE on
    queries and keys (FlowAR's AR transformer: ``qkv`` with bias; its flow head: without; xAR).

    The rotary table is the caller's: it knows where its tokens sit (FlowAR: each scale its own square grid
    normalised onto ``reference_side``; xAR: a 16 x 16 grid read cell by cell). ``self.rope`` only holds the
    persistent ``freqs`` buffer (key ``rope.freqs``, head_dim / 4 entries) and builds square-grid tables.
    """

    def __init__(self, embed_dim: int, num_heads: int, qkv_bias: bool = True, rope: bool = True,
                 rope_reference_side: float | None = 16, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"width {embed_dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.rope = VisionRoPE2D(self.head_dim, rope_reference_side) if rope else None

    def forward(
        self,
        x_BLC: torch.Tensor,
        rope_table: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache=None,
        layer: int = 0,
        store: bool = True,
    ) -> torch.Tensor:
        """``x_BLC`` (B, L, C) -> (B, L, C).

        Args:
            rope_table: ``(cos, sin)`` (L, head_dim) for the L tokens (None: no rotation).
            mask: boolean or additive mask broadcastable to (B, H, L, L) (training: FlowAR's block-causal mask).
            cache: a :class:`vgen.kv_cache.KVCache`; the step's keys/values go to layer ``layer`` and the queries
                attend to its history plus the step; a ``mask`` is then the cache's ``visible`` mask (l, history +
                l) (:meth:`vgen.kv_cache.FullKVCache.attend`).
            store: keep the step's keys/values in the cache (False: attend without storing, e.g. xAR's noisy passes).
        """
        qkv = self.qkv(x_BLC)
        q_BHLc, k_BHLc, v_BHLc = rearrange(qkv, "B L (three H c) -> three B H L c", three=3, H=self.num_heads)
        if rope_table is not None:
            cos, sin = (t.to(q_BHLc.dtype) for t in rope_table)
            q_BHLc, k_BHLc = apply_eva_rope(q_BHLc, cos, sin), apply_eva_rope(k_BHLc, cos, sin)
        if cache is not None:
            extra = {} if mask is None else {"visible": mask}
            out_BHLc = cache.attend(layer, q_BHLc, k_BHLc, v_BHLc, store=store, **extra)
        else:
            dropout_p = self.attn_drop if self.training else 0.0
            out_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, mask, dropout_p=dropout_p)
        return self.proj_drop(self.proj(rearrange(out_BHLc, "B H L c -> B L (H c)")))


def gated_mlp_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
    """timm ``SwiGLU`` hidden width as FlowAR / xAR compute it: ``int(C * mlp_ratio * 2 / 3)`` (768 -> 2048,
    1024 -> 2730)."""
    return int(embed_dim * mlp_ratio * 2 / 3.0)


class AdaLNBlock(nn.Module):
    """FlowAR's / xAR's AR block: weightless-RMSNorm, 6-vector-AdaLN-modulated RoPE self-attention and GELU-gated MLP::

        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_lin(cond)          # SiLU -> Linear(D, 6C)
        x = x + gamma1 * attn(norm1(x) * (1 + scale1) + shift1)
        [x = x + cross_attn(x, text tokens)]                                    # vgen's text models only
        x = x + gamma2 * mlp(norm2(x) * (1 + scale2) + shift2)

    Keys ``attn.qkv``, ``attn.proj``, ``attn.rope.freqs``, ``mlp.fc1_g/fc1_x/fc2``, ``ada_lin.1`` (and
    ``cross_attn.*`` with ``cross_attn=True``). ``cond`` is (B, D) (FlowAR: one class/text embedding per image) or
    per token group (xAR: class + time of each cell, see ``cond_index``); ``cond_dim`` defaults to the block width.
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None,
                 qkv_bias: bool = True, rope: bool = True, rope_reference_side: float | None = 16,
                 norm_eps: float = 1e-6, attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 cross_attn: bool = False, context_dim: int | None = None):
        super().__init__()
        self.C = embed_dim
        self.norm1 = RMSNorm(embed_dim, norm_eps, elementwise_affine=False)
        self.attn = RoPESelfAttention(embed_dim, num_heads, qkv_bias=qkv_bias, rope=rope,
                                      rope_reference_side=rope_reference_side, attn_drop=attn_drop,
                                      proj_drop=proj_drop)
        self.cross_attn = CrossAttention(embed_dim, num_heads, norm_eps, context_dim) if cross_attn else None
        self.norm2 = RMSNorm(embed_dim, norm_eps, elementwise_affine=False)
        self.mlp = GatedGELUMLP(embed_dim, gated_mlp_hidden_dim(embed_dim, mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or embed_dim, 6 * embed_dim))

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond: torch.Tensor,
        rope_table: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache=None,
        layer: int = 0,
        context_BTC: torch.Tensor | None = None,
        context_mask_BT: torch.Tensor | None = None,
        cond_index: torch.Tensor | None = None,
        store: bool = True,
    ) -> torch.Tensor:
        """``x_BLC`` (B, L, C), ``cond`` (B, D), (B, 1, D) or (B, L, D) -> (B, L, C); ``rope_table``, ``mask``,
        ``cache``, ``layer``, ``store`` as in :meth:`RoPESelfAttention.forward`; ``context_*`` for the optional
        cross-attention. ``cond_index`` (L,) int64: ``cond`` is (B, U, D), one condition per group of tokens (xAR:
        per cell), and token l uses group ``cond_index[l]`` (the modulation is computed once per group, as official
        xAR does, then gathered)."""
        ada = self.ada_lin(cond)
        if cond_index is not None:
            ada = ada[:, cond_index]
        gamma1, gamma2, scale1, scale2, shift1, shift2 = unpack_adaln6(ada, self.C)
        h = self.attn(modulate(self.norm1(x_BLC), shift1, scale1), rope_table, mask, cache, layer, store)
        x_BLC = x_BLC + self.drop_path(h * gamma1)
        if self.cross_attn is not None:
            if context_BTC is None:
                raise ValueError("this block cross-attends to text tokens: pass context_BTC and context_mask_BT")
            x_BLC = x_BLC + self.cross_attn(x_BLC, context_BTC, context_mask_BT)
        h = self.mlp(modulate(self.norm2(x_BLC), shift2, scale2))
        return x_BLC + self.drop_path(h * gamma2)


def init_encoder_decoder_stacks(module: nn.Module, *, token_channels: int, seq_len: int, encoder_embed_dim: int,
                                encoder_num_heads: int, encoder_depth: int, decoder_embed_dim: int,
                                decoder_num_heads: int, decoder_depth: int, mlp_ratio: float,
                                rope_reference_side: float | None, norm_eps: float, attn_dropout: float,
                                proj_dropout: float, drop_path_rate: float, cross_attn: bool) -> None:
    """Give ``module`` the MAE-style AR stacks FlowAR and xAR share, under their official keys: ``z_proj``,
    ``z_proj_ln``, ``encoder_pos_embed_learned`` (1, L, De), ``encoder_blocks``, ``encoder_norm``, ``decoder_embed``,
    ``decoder_pos_embed_learned`` (1, L, Dd), ``decoder_blocks``, ``decoder_norm``; blocks are :class:`AdaLNBlock`
    conditioned on width De, with drop-path rising linearly over encoder then decoder blocks. Modules are created in
    this order, so a seeded construction draws the same initial weights as before."""
    De, Dd = encoder_embed_dim, decoder_embed_dim
    module.z_proj = nn.Linear(token_channels, De)
    module.z_proj_ln = RMSNorm(De, norm_eps)
    module.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, De))
    dpr = torch.linspace(0, drop_path_rate, encoder_depth + decoder_depth, device="cpu").tolist()

    def stack(width: int, heads: int, depth: int, first: int) -> nn.ModuleList:
        return nn.ModuleList([
            AdaLNBlock(width, heads, mlp_ratio, cond_dim=De, qkv_bias=True, rope_reference_side=rope_reference_side,
                       norm_eps=norm_eps, attn_drop=attn_dropout, proj_drop=proj_dropout,
                       drop_path=dpr[first + i], cross_attn=cross_attn, context_dim=De)
            for i in range(depth)
        ])

    module.encoder_blocks = stack(De, encoder_num_heads, encoder_depth, 0)
    module.encoder_norm = RMSNorm(De, norm_eps)
    module.decoder_embed = nn.Linear(De, Dd)
    module.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, Dd))
    module.decoder_blocks = stack(Dd, decoder_num_heads, decoder_depth, encoder_depth)
    module.decoder_norm = RMSNorm(Dd, norm_eps)
