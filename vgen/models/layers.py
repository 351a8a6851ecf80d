"""Building blocks shared by the generator families: attention, norms, MLPs, rotary embeddings, time embeddings,
AdaLN helpers. A family's model file composes these; it does not define its own copy of any of them.

Shapes: ``B`` batch, ``H`` heads, ``L`` query tokens, ``T`` key tokens, ``c`` head width, ``C`` model width.
Attention tensors are head-major, ``(B, H, L, c)``, as ``F.scaled_dot_product_attention`` takes them.

Key names follow the families that introduced each block, so official checkpoints load key for key:

========================  =================================  ================================================
block                     keys                               used by
========================  =================================  ================================================
:class:`GELUMLP`          ``fc1``, ``fc2``                   VAR (tanh GELU)
:class:`GatedGELUMLP`     ``fc1_g``, ``fc1_x``, ``fc2``      FlowAR, xAR (timm ``SwiGLU`` with a GELU gate)
:class:`LlamaSwiGLU`      ``w1``, ``w2``, ``w3``             LlamaGen (SiLU gate, no biases)
:class:`RMSNorm`          ``weight`` (or none)               LlamaGen (weighted), FlowAR/xAR (weightless)
:class:`VisionRoPE2D`     ``freqs`` (persistent buffer)      FlowAR, xAR (EVA interleaved 2-D RoPE)
:func:`llama_rope_2d`     (not a buffer)                     LlamaGen (2-D RoPE as complex pairs)
:class:`TimestepEmbedder` ``mlp.0``, ``mlp.2``               FlowAR's flow head, xAR (DiT's embedding)
========================  =================================  ================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

# ------------------------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------------------------

#: how :func:`attention` computes: PyTorch SDPA, or the project's segment-attention kernel (``vgen.kernels``)
ATTENTION_BACKENDS = ("sdpa", "kernels")


def attention(
    q_BHLc: torch.Tensor,
    k_BHTc: torch.Tensor,
    v_BHTc: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention, the one function every family's attention goes through.

    Args:
        q_BHLc, k_BHTc, v_BHTc: queries (B, H, L, c), keys and values (B, H, T, c).
        mask: boolean (True = may attend) or additive float mask broadcastable to (B, H, L, T), or None.
        scale: softmax scale (default 1/sqrt(c)).
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + T - L); not with ``mask``.
        dropout_p: attention dropout (training).
        backend: ``"sdpa"`` or ``"kernels"`` (:func:`vgen.kernels.segment_attention` over one segment per head; no
            ``mask`` or dropout there).
    Returns:
        (B, H, L, c) in the queries' dtype.
    """
    if mask is not None and causal:
        raise ValueError("give either a mask or causal=True, not both")
    if backend == "kernels":
        if mask is not None or dropout_p:
            raise ValueError("the kernels backend takes no mask or dropout; use backend='sdpa'")
        from vgen.kernels import segment_attention

        H, T = k_BHTc.shape[1], k_BHTc.shape[2]
        start = torch.zeros(H, 1, dtype=torch.int32, device=q_BHLc.device)
        length = torch.full((H, 1), T, dtype=torch.int32, device=q_BHLc.device)
        out = segment_attention(q_BHLc.transpose(1, 2), k_BHTc.transpose(1, 2), v_BHTc.transpose(1, 2), start,
                                length, causal=causal, sm_scale=scale)
        return out.transpose(1, 2)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    L, T = q_BHLc.shape[2], k_BHTc.shape[2]
    if causal and L != T:
        mask = torch.arange(T, device=q_BHLc.device)[None, :] <= torch.arange(L, device=q_BHLc.device)[:, None] + T - L
        causal = False
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q_BHLc.dtype)
    return F.scaled_dot_product_attention(q_BHLc, k_BHTc, v_BHTc, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal, scale=scale)


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to context tokens (keys/values), e.g. a text encoder's tokens.

    Keys ``norm``, ``mat_q``, ``mat_kv``, ``proj`` (VAR's text models).
    """

    def __init__(self, embed_dim: int, num_heads: int, norm_eps: float = 1e-6, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(context_dim or embed_dim, 2 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x_BLC: torch.Tensor, ctx_BTC: torch.Tensor, ctx_mask_BT: torch.Tensor) -> torch.Tensor:
        """``x_BLC`` (B, L, C) attends to ``ctx_BTC`` (B, T, C) where ``ctx_mask_BT`` (B, T) is True."""
        q_BHLc = rearrange(self.mat_q(self.norm(x_BLC)), "B L (H c) -> B H L c", H=self.num_heads)
        k_BHTc, v_BHTc = rearrange(self.mat_kv(ctx_BTC), "B T (two H c) -> two B H T c", two=2, H=self.num_heads)
        out_BHLc = attention(q_BHLc, k_BHTc, v_BHTc, ctx_mask_BT[:, None, None, :].bool())
        return self.proj(rearrange(out_BHLc, "B H L c -> B L (H c)"))


# ------------------------------------------------------------------------------------------------------------------
# Regularisation, norms and MLPs
# ------------------------------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class RMSNorm(nn.Module):
    """``x / rms(x)`` computed in float32 and cast back, times ``weight`` when ``elementwise_affine`` (LlamaGen's
    order: normalise in fp32, cast, then scale). Without the weight it has no state-dict keys (FlowAR, xAR)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out if self.weight is None else out * self.weight

    def extra_repr(self) -> str:
        return f"eps={self.eps}, affine={self.weight is not None}"


class GELUMLP(nn.Module):
    """``fc1 -> GELU(tanh) -> fc2`` (VAR's FFN)."""

    def __init__(self, embed_dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, embed_dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x_BLC))))


class GatedGELUMLP(nn.Module):
    """timm's ``SwiGLU`` with a GELU gate: ``fc2(GELU(fc1_g x) * fc1_x x)`` (FlowAR, xAR; hidden int(8C/3))."""

    def __init__(self, embed_dim: int, hidden_dim: int, drop: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1_g = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.fc1_x = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, embed_dim, bias=bias)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.fc1_g(x_BLC)) * self.fc1_x(x_BLC))
        return self.drop(self.fc2(h))


def llama_ffn_hidden_dim(embed_dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's hidden width: int(2 * 4C / 3), optionally scaled, rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * 4 * embed_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return hidden if hidden % multiple_of == 0 else hidden + multiple_of - hidden % multiple_of


class LlamaSwiGLU(nn.Module):
    """Llama's feed-forward ``w2(SiLU(w1 x) * w3 x)`` without biases (LlamaGen)."""

    def __init__(self, embed_dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(embed_dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(embed_dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, embed_dim, bias=False)
        self.ffn_dropout = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x_BLC)) * self.w3(x_BLC)))


# ------------------------------------------------------------------------------------------------------------------
# AdaLN
# ------------------------------------------------------------------------------------------------------------------


def modulate(x_BLC: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` (shift/scale broadcast over tokens: (B, 1, C) or per token (B, L, C))."""
    return x_BLC * (1 + scale) + shift


def unpack_adaln6(ada: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """Six AdaLN vectors from ``ada`` (B, 6C) or (B, L, 6C) in VAR/FlowAR/xAR order: ``gamma1, gamma2, scale1,
    scale2, shift1, shift2`` (not DiT's shift/scale/gate order); each (B, 1, C) or (B, L, C)."""
    if ada.ndim == 2:
        ada = ada[:, None]
    return rearrange(ada, "B L (six C) -> six B L C", six=6, C=width).unbind(0)


class AdaLNBeforeHead(nn.Module):
    """Weightless LayerNorm modulated by ``ada_lin(cond_BD)`` unbound as (scale, shift), before the output head
    (VAR's ``head_nm``: keys ``ada_lin.1``)."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float):
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


# ------------------------------------------------------------------------------------------------------------------
# Time embedding (DiT)
# ------------------------------------------------------------------------------------------------------------------


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal embedding (B, dim) of (possibly fractional) timesteps ``t_B``: ``[cos, sin]`` of
    ``t * exp(-log(max_period) * i / half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args = t_B[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: sinusoid (``frequency_dim`` = 256) -> Linear -> SiLU -> Linear (keys ``mlp.0``,
    ``mlp.2``). FlowAR and xAR feed it ``(1000 t).long()``; that truncation is the caller's."""

    def __init__(self, hidden_dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t_B, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


# ------------------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ------------------------------------------------------------------------------------------------------------------


def rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """EVA's ``rotate_half`` on interleaved pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x1, x2 = rearrange(x, "... (d r) -> ... d r", r=2).unbind(-1)
    return rearrange(torch.stack((-x2, x1), dim=-1), "... d r -> ... (d r)")


def eva_rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The ``head_dim / 4`` frequencies of an EVA 2-D RoPE over ``head_dim`` channels (half per axis):
    ``1 / theta ** (arange(0, d, 2) / d)`` with ``d = head_dim / 2``."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
    d = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))


def eva_rope_table(freqs: torch.Tensor, height: int, width: int | None = None,
                   reference_side: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (height * width, head_dim) in raster order for an EVA 2-D RoPE.

    Row and column positions are ``arange(n) / n * reference_side`` (FlowAR: every scale normalised onto the
    16-token grid; ``reference_side=None`` uses plain integer positions). The first half of the channels rotate
    with the row, the second half with the column, each frequency repeated for an interleaved pair.
    """
    width = height if width is None else width

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=freqs.device, dtype=freqs.dtype)
        if reference_side is not None:
            pos = pos / n * reference_side
        return repeat(torch.einsum("n,f->nf", pos, freqs), "n f -> n (f r)", r=2)

    rows, cols = axis(height), axis(width)
    angles = torch.cat(
        (rows[:, None, :].expand(height, width, -1), cols[None, :, :].expand(height, width, -1)), dim=-1
    )
    angles = rearrange(angles, "h w d -> (h w) d")
    return angles.cos(), angles.sin()


def apply_eva_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``; ``x`` (..., L, head_dim), tables (L, head_dim)."""
    return x * cos + rotate_half_interleaved(x) * sin


class VisionRoPE2D(nn.Module):
    """EVA's interleaved 2-D RoPE (``VisionRotaryEmbeddingFast``), with its persistent ``freqs`` buffer
    (head_dim / 4 entries) so that official checkpoints load strictly.

    ``forward(x)`` rotates ``x`` (B, H, L, head_dim) whose L tokens are a square ``n x n`` grid in raster order,
    with positions normalised onto a ``reference_side`` grid (FlowAR: 16).
    """

    def __init__(self, head_dim: int, reference_side: float | None = 16, theta: float = 10000.0):
        super().__init__()
        self.reference_side = reference_side
        self.register_buffer("freqs", eva_rope_frequencies(head_dim, theta))

    def table(self, height: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return eva_rope_table(self.freqs, height, width, self.reference_side)

    def forward(self, x_BHLc: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x_BHLc.shape[-2])
        if side * side != x_BHLc.shape[-2]:
            raise ValueError(f"VisionRoPE2D needs a square grid of tokens, got {x_BHLc.shape[-2]}")
        cos, sin = self.table(side)
        return apply_eva_rope(x_BHLc, cos.to(x_BHLc.dtype), sin.to(x_BHLc.dtype))


def llama_rope_2d(grid_size: int, head_dim: int, base: float = 10000.0, prefix_tokens: int = 1) -> torch.Tensor:
    """LlamaGen's 2-D RoPE table (prefix_tokens + grid_size^2, head_dim / 2, 2) of (cos, sin) pairs.

    The first ``prefix_tokens`` rows (class/text tokens) are zeros, so those tokens' queries and keys become zero
    vectors, exactly as with the official table; then a raster grid whose first half of the pairs rotates with the
    row and the second half with the column."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid_size, dtype=torch.float32)
    f = torch.outer(t, freqs)  # (grid, head_dim / 4)
    grid = torch.cat((f[:, None, :].expand(-1, grid_size, -1), f[None, :, :].expand(grid_size, -1, -1)), dim=-1)
    table = torch.stack((grid.cos(), grid.sin()), dim=-1).flatten(0, 1)
    return torch.cat((torch.zeros(prefix_tokens, head_dim // 2, 2), table))


def apply_llama_rope(x_BHLc: torch.Tensor, table_Lp2: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` (B, H, L, c) by a (L, c / 2, 2) cos/sin table (in float32, cast
    back), or by a per-row table (B, L, c / 2, 2) when positions differ across rows."""
    xs = x_BHLc.float().reshape(*x_BHLc.shape[:-1], -1, 2)
    t = table_Lp2[None] if table_Lp2.ndim == 3 else table_Lp2
    t = t[:, None].to(xs.device)  # (B or 1, 1, L, c/2, 2)
    cos, sin = t[..., 0], t[..., 1]
    out = torch.stack((xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin), dim=-1)
    return out.flatten(-2).type_as(x_BHLc)
