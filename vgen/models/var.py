"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al., NeurIPS 2024).

The transformer keeps official VAR's state-dict key names (``class_emb``, ``pos_start``, ``pos_1LC``, ``lvl_embed``,
``word_embed``, ``blocks.N.attn.mat_qkv`` / ``q_bias`` / ``v_bias`` / ``scale_mul_1H11``, ``blocks.N.ffn.fc1/fc2``,
``blocks.N.ada_lin.1`` or ``shared_ada_lin.1`` + ``blocks.N.ada_gss``, ``head_nm.ada_lin.1``, ``head``), so released
``var_dXX.pth`` files load key for key with :func:`load_official_var`. The block-causal mask and level indices are
computed here (non-persistent buffers); the copies official files carry (``lvl_1L``, ``attn_bias_for_masking``,
``*.zero_k_bias``) are dropped on load.

Conditioning:

- ``conditioning="class"`` (official): ``class_emb`` has ``num_classes + 1`` rows, the last is the null class used
  for CFG and for condition dropout (``cond_drop_rate``, applied in training mode).
- ``conditioning="text"``: a text encoder's pooled embedding (B, text_embed_dim) goes through ``text_proj`` to where
  the class embedding goes (start token and every AdaLN); with ``text_cross_attn=True`` each block also
  cross-attends to the projected text tokens (``blocks.N.cross_attn``). The null prompt is a learned
  ``null_text_cond`` (and ``null_text_token`` for cross-attention). Any encoder that returns ``(pooled (B, D),
  tokens (B, T, D))`` plus a mask works (see :mod:`vgen.models.text_encoder`).

Generation loops live in :mod:`vgen.samplers`; this model implements the
:class:`~vgen.samplers.interfaces.NextScaleModel` step (``prefill`` / ``logits_for_scale`` /
``embed_scale_input``) with a :class:`VARKVCache`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from vgen.errors import UserError
from vgen.models.state_dicts import state_dict_mismatch
from vgen.torch_files import load_torch_file

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


# ----------------------------------------------------------------------------------------------------------------
# Size registry
# ----------------------------------------------------------------------------------------------------------------


def var_size(depth: int, shared_aln: bool = False, patch_nums: tuple[int, ...] = PATCH_NUMS_256) -> dict[str, Any]:
    """Official ``build_vae_var`` rule: width = 64 * depth, heads = depth (head dim 64), drop path 0.1 * depth / 24."""
    return dict(
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        drop_path_rate=0.1 * depth / 24,
        shared_aln=shared_aln,
        patch_nums=tuple(patch_nums),
    )


#: name -> VAR constructor kwargs; the released checkpoints are d16/d20/d24/d30 (256 px) and d36 (512 px, shared AdaLN).
VAR_SIZES: dict[str, dict[str, Any]] = {
    "var-d16": var_size(16),
    "var-d20": var_size(20),
    "var-d24": var_size(24),
    "var-d30": var_size(30),
    "var-d36": var_size(36, shared_aln=True, patch_nums=PATCH_NUMS_512),
}


def create_var(name: str, **overrides: Any) -> VAR:
    """``create_var("var-d16", num_classes=10)``: a size from :data:`VAR_SIZES` with keyword overrides."""
    if name not in VAR_SIZES:
        raise UserError(f"unknown VAR size {name!r}; choose one of {', '.join(VAR_SIZES)}")
    return VAR(**{**VAR_SIZES[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class VARKVCache:
    """Per-layer keys/values (B, H, T, c) grown by concatenation along T, one entry per block.

    VAR's scale-wise decoding appends a whole scale at a time and never evicts, so plain concatenation is all it
    needs. Implements :class:`vgen.samplers.interfaces.StepKVCache` (``truncate`` rolls back speculative scales,
    ``select`` keeps/reorders batch rows).
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.k_BHTc: list[torch.Tensor | None] = [None] * num_layers
        self.v_BHTc: list[torch.Tensor | None] = [None] * num_layers

    def append(self, layer: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's keys/values for ``layer``; return all cached keys/values (B, H, T, c) to attend to."""
        if self.k_BHTc[layer] is None:
            self.k_BHTc[layer], self.v_BHTc[layer] = k_BHlc, v_BHlc
        else:
            self.k_BHTc[layer] = torch.cat((self.k_BHTc[layer], k_BHlc), dim=2)
            self.v_BHTc[layer] = torch.cat((self.v_BHTc[layer], v_BHlc), dim=2)
        return self.k_BHTc[layer], self.v_BHTc[layer]

    @property
    def seq_len(self) -> int:
        """Cached positions of the last layer (every layer holds the same number after a full step)."""
        k = self.k_BHTc[-1] if self.num_layers else None
        return 0 if k is None else k.shape[2]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        self.k_BHTc = [None if k is None else k[:, :, :length] for k in self.k_BHTc]
        self.v_BHTc = [None if v is None else v[:, :, :length] for v in self.v_BHTc]

    def select(self, index_B: torch.Tensor) -> None:
        """Keep/reorder batch rows ``index_B``."""
        self.k_BHTc = [None if k is None else k.index_select(0, index_B) for k in self.k_BHTc]
        self.v_BHTc = [None if v is None else v.index_select(0, index_B) for v in self.v_BHTc]

    def clone(self) -> VARKVCache:
        other = VARKVCache(self.num_layers)
        other.k_BHTc, other.v_BHTc = list(self.k_BHTc), list(self.v_BHTc)
        return other


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


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, embed_dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, embed_dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x_BLC))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with VAR's fused ``mat_qkv`` (no bias), separate ``q_bias`` / ``v_bias`` (no k
    bias) and, with ``attn_l2_norm``, cosine attention: q and k are l2-normalised, q is scaled by
    ``exp(min(scale_mul_1H11, log 100))`` per head and the softmax scale is 1."""

    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_l2_norm: bool = True):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(
        self,
        x_BLC: torch.Tensor,
        attn_bias_11LL: torch.Tensor | None,
        cache: VARKVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """``x_BLC`` (B, L, C). Training: ``attn_bias_11LL`` is the block-causal mask and ``cache`` None.
        Inference: ``attn_bias_11LL`` None and keys/values are appended to ``cache`` (this scale attends to every
        cached token of coarser scales and of its own scale)."""
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias)
        q_BHLc, k_BHLc, v_BHLc = rearrange(qkv, "B L (three H c) -> three B H L c", three=3, H=self.num_heads).unbind(0)
        if self.attn_l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q_BHLc = F.normalize(q_BHLc, dim=-1).mul(scale_mul_1H11)
            k_BHLc = F.normalize(k_BHLc, dim=-1)
        if cache is not None:
            k_BHLc, v_BHLc = cache.append(layer, k_BHLc, v_BHLc)
        dropout_p = self.attn_drop if self.training else 0.0
        mask = None if attn_bias_11LL is None else attn_bias_11LL.to(q_BHLc.dtype)
        out_BHLc = F.scaled_dot_product_attention(
            q_BHLc, k_BHLc, v_BHLc, attn_mask=mask, dropout_p=dropout_p, scale=self.scale
        )
        return self.proj_drop(self.proj(rearrange(out_BHLc, "B H L c -> B L (H c)")))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to text tokens (keys/values); only in text models with ``text_cross_attn``."""

    def __init__(self, embed_dim: int, num_heads: int, norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(embed_dim, 2 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x_BLC: torch.Tensor, ctx_BTC: torch.Tensor, ctx_mask_BT: torch.Tensor) -> torch.Tensor:
        q_BHLc = rearrange(self.mat_q(self.norm(x_BLC)), "B L (H c) -> B H L c", H=self.num_heads)
        k_BHTc, v_BHTc = rearrange(self.mat_kv(ctx_BTC), "B T (two H c) -> two B H T c", two=2, H=self.num_heads)
        mask_B11T = ctx_mask_BT[:, None, None, :].bool()
        out_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHTc, v_BHTc, attn_mask=mask_B11T)
        return self.proj(rearrange(out_BHLc, "B H L c -> B L (H c)"))


class AdaLNSelfAttn(nn.Module):
    """VAR block: AdaLN-modulated self-attention and FFN (optionally cross-attention between them).

    AdaLN parameters come from ``ada_lin(cond_BD)`` (or ``ada_gss + shared_ada_lin(cond_BD)`` with shared AdaLN),
    viewed as (B, 1, 6, C) and unbound as gamma1, gamma2, scale1, scale2, shift1, shift2 (official order)."""

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float,
                 shared_aln: bool, attn_l2_norm: bool, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, cross_attn: bool = False):
        super().__init__()
        self.C = embed_dim
        self.drop_path = DropPath(drop_path)
        self.attn = SelfAttention(embed_dim, num_heads, attn_drop=attn_drop, proj_drop=drop, attn_l2_norm=attn_l2_norm)
        self.cross_attn = CrossAttention(embed_dim, num_heads, norm_eps) if cross_attn else None
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD_or_gss: torch.Tensor, attn_bias_11LL: torch.Tensor | None,
                cache: VARKVCache | None = None, layer: int = 0, ctx: VARCondition | None = None) -> torch.Tensor:
        if self.shared_aln:
            ada_B16C = self.ada_gss + cond_BD_or_gss
        else:
            ada_B16C = self.ada_lin(cond_BD_or_gss).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)
        h = self.attn(self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1), attn_bias_11LL, cache, layer)
        x_BLC = x_BLC + self.drop_path(h.mul_(gamma1))
        if self.cross_attn is not None:
            x_BLC = x_BLC + self.cross_attn(x_BLC, ctx.context_BTC, ctx.context_mask_BT)
        h = self.ffn(self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2))
        return x_BLC + self.drop_path(h.mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """LayerNorm modulated by ``ada_lin(cond_BD)`` unbound as (scale, shift), before the classifier head."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float):
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """Shared AdaLN projection (d36): (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


# ----------------------------------------------------------------------------------------------------------------
# Conditions and sampling state
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VARCondition:
    """What a VAR step is conditioned on, for B rows: ``cond_BD`` (B, C) drives the start token and every AdaLN;
    ``context_BTC`` / ``context_mask_BT`` are projected text tokens for cross-attention (None otherwise)."""

    cond_BD: torch.Tensor
    context_BTC: torch.Tensor | None = None
    context_mask_BT: torch.Tensor | None = None

    def rows(self, start: int, end: int) -> VARCondition:
        """Rows ``start:end`` of every field."""
        if self.context_BTC is None:
            return VARCondition(self.cond_BD[start:end])
        return VARCondition(self.cond_BD[start:end], self.context_BTC[start:end], self.context_mask_BT[start:end])

    def cat(self, other: VARCondition) -> VARCondition:
        if self.context_BTC is None:
            return VARCondition(torch.cat((self.cond_BD, other.cond_BD)))
        T = max(self.context_BTC.shape[1], other.context_BTC.shape[1])

        def pad(x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (0, 0) * (x.ndim - 2) + (0, T - x.shape[1]))

        return VARCondition(
            torch.cat((self.cond_BD, other.cond_BD)),
            torch.cat((pad(self.context_BTC), pad(other.context_BTC))),
            torch.cat((pad(self.context_mask_BT), pad(other.context_mask_BT))),
        )


@dataclass
class VARStepState:
    """Sampling state between scales: the KV cache plus the per-row AdaLN inputs."""

    cache: VARKVCache
    cond: VARCondition
    cond_BD_or_gss: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class VAR(ModelMixin, ConfigMixin):
    """VAR transformer (B: batch, L: tokens of all scales, C: width, V: codebook size, Cvae: codebook dim).

    ``forward(label_B, x_BLCv_wo_first_l)`` is the teacher-forced training pass (block-causal mask), returning
    ``logits_BLV``; sampling goes through :func:`vgen.samplers.next_scale.generate_next_scale`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        Cvae: int = 32,
        patch_nums: tuple[int, ...] = PATCH_NUMS_256,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        cond_drop_rate: float = 0.1,
        attn_l2_norm: bool = True,
        conditioning: str = "class",
        num_classes: int = 1000,
        text_embed_dim: int | None = None,
        text_cross_attn: bool = False,
    ):
        super().__init__()
        if conditioning not in ("class", "text"):
            raise UserError(f"VAR conditioning must be 'class' or 'text', got {conditioning!r}")
        if conditioning == "text" and not text_embed_dim:
            raise UserError("a text-conditional VAR needs text_embed_dim (the text encoder's output width)")
        if embed_dim % num_heads:
            raise UserError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        patch_nums = tuple(int(p) for p in patch_nums)
        self.Cvae, self.V, self.C, self.D = Cvae, vocab_size, embed_dim, embed_dim
        self.num_classes = num_classes
        self.L = sum(pn * pn for pn in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        init_std = math.sqrt(1 / self.C / 3)

        # 1. input (word) embedding of the tokenizer's Cvae-dim features
        self.word_embed = nn.Linear(Cvae, self.C)
        # 2. condition: class embedding (num_classes + 1 rows, the last is the null class) or text projection
        if conditioning == "class":
            self.class_emb = nn.Embedding(num_classes + 1, self.C)
            nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=init_std)
        else:
            self.text_proj = nn.Linear(text_embed_dim, self.C)
            self.null_text_cond = nn.Parameter(torch.zeros(1, self.C).normal_(0, init_std))
            if text_cross_attn:
                self.text_token_proj = nn.Linear(text_embed_dim, self.C)
                self.null_text_token = nn.Parameter(torch.zeros(1, 1, self.C).normal_(0, init_std))
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start, mean=0, std=init_std)
        # 3. absolute position embedding (one block per scale) and level embedding
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        nn.init.trunc_normal_(self.pos_1LC, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0, std=init_std)
        # 4. blocks
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C)) if shared_aln else nn.Identity()
        )
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            [
                AdaLNSelfAttn(
                    self.C, self.D, num_heads, mlp_ratio, norm_eps, shared_aln, attn_l2_norm,
                    drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                    cross_attn=conditioning == "text" and text_cross_attn,
                )
                for i in range(depth)
            ]
        )
        # 5. block-causal mask for training (never loaded: official checkpoints carry copies, which
        #    load_official_var drops)
        self.register_masks()
        # 6. head
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps)
        self.head = nn.Linear(self.C, vocab_size)
        self.init_weights(init_std=init_std)

    # -- initialisation ----------------------------------------------------------------------------------------

    def register_masks(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers ``lvl_1L`` (1, L): scale index of every token, and
        ``attn_bias_for_masking`` (1, 1, L, L): 0 where a query may see a key (key scale <= query scale), -inf
        elsewhere."""
        lvl_L = torch.cat([torch.full((pn * pn,), i, device=device) for i, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", lvl_L.view(1, self.L), persistent=False)
        mask_LL = torch.where(lvl_L[:, None] >= lvl_L[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask_LL.view(1, 1, self.L, self.L), persistent=False)

    @torch.no_grad()
    def init_weights(self, init_std: float, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-3,
                     init_head: float = 0.02) -> None:
        """Official ``VAR.init_weights`` recipe: trunc-normal linears, small head and AdaLN gammas, residual
        projections divided by sqrt(2 * depth). Embeddings created above keep their trunc-normal init."""
        if self.pos_1LC.device.type == "meta":
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    m.bias.zero_()
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        depth = len(self.blocks)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if block.cross_attn is not None:
                block.cross_attn.proj.weight.zero_()
            if block.shared_aln:
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[2 * self.C :].mul_(init_adaln)
                block.ada_lin[-1].weight[: 2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()

    # -- conditions --------------------------------------------------------------------------------------------

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.config.patch_nums)

    @property
    def is_text_conditional(self) -> bool:
        return self.config.conditioning == "text"

    def class_condition(self, label_B: torch.Tensor) -> VARCondition:
        """Condition from class labels (B,) int64; label ``num_classes`` (or any negative label) is the null class."""
        if self.is_text_conditional:
            raise UserError("this VAR model is text-conditional: pass a prompt, not class labels")
        label_B = torch.where(label_B < 0, self.num_classes, label_B).to(self.class_emb.weight.device)
        return VARCondition(self.class_emb(label_B))

    def text_condition(
        self, pooled_BD: torch.Tensor, tokens_BTD: torch.Tensor | None = None, mask_BT: torch.Tensor | None = None
    ) -> VARCondition:
        """Condition from a text encoder's pooled embedding (B, Dt) and tokens (B, T, Dt) with mask (B, T)."""
        if not self.is_text_conditional:
            raise UserError(
                "this VAR model is class-conditional: pass class labels, not a prompt "
                f"(labels 0..{self.num_classes - 1})"
            )
        cond_BD = self.text_proj(pooled_BD)
        if not self.config.text_cross_attn:
            return VARCondition(cond_BD)
        if tokens_BTD is None or mask_BT is None:
            raise ValueError("this VAR model cross-attends to text tokens: pass tokens_BTD and mask_BT")
        return VARCondition(cond_BD, self.text_token_proj(tokens_BTD), mask_BT.bool())

    def null_condition(self, batch_size: int) -> VARCondition:
        """Unconditional condition: the null class, or the learned null prompt."""
        if not self.is_text_conditional:
            return VARCondition(self.class_emb.weight[self.num_classes].unsqueeze(0).expand(batch_size, -1))
        cond_BD = self.null_text_cond.expand(batch_size, -1)
        if not self.config.text_cross_attn:
            return VARCondition(cond_BD)
        ctx = self.null_text_token.expand(batch_size, -1, -1)
        return VARCondition(cond_BD, ctx, torch.ones(batch_size, 1, dtype=torch.bool, device=ctx.device))

    def concat_conditions(self, cond: VARCondition, uncond: VARCondition) -> VARCondition:
        return cond.cat(uncond)

    def drop_condition(self, cond: VARCondition, drop_B: torch.Tensor) -> VARCondition:
        """Replace rows where ``drop_B`` is True by the null condition (classifier-free guidance training)."""
        null = self.null_condition(cond.cond_BD.shape[0])
        cond_BD = torch.where(drop_B[:, None], null.cond_BD.to(cond.cond_BD.dtype), cond.cond_BD)
        if cond.context_BTC is None:
            return VARCondition(cond_BD)
        T = cond.context_BTC.shape[1]
        null_ctx = F.pad(null.context_BTC, (0, 0, 0, T - 1))
        null_mask = F.pad(null.context_mask_BT, (0, T - 1))
        return VARCondition(
            cond_BD,
            torch.where(drop_B[:, None, None], null_ctx, cond.context_BTC),
            torch.where(drop_B[:, None], null_mask, cond.context_mask_BT),
        )

    # -- shared pieces -----------------------------------------------------------------------------------------

    def lvl_pos_1LC(self) -> torch.Tensor:
        """Level embedding + absolute position for every token (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def get_logits(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(x_BLC.float(), cond_BD).float()).float()

    def _run_blocks(self, x_BLC, cond: VARCondition, attn_bias, cache=None) -> torch.Tensor:
        cond_BD_or_gss = self.shared_ada_lin(cond.cond_BD)
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, cond_BD_or_gss, attn_bias, cache=cache, layer=i, ctx=cond)
        return x_BLC

    # -- training ----------------------------------------------------------------------------------------------

    def forward(
        self,
        label_B: torch.Tensor | None,
        x_BLCv_wo_first_l: torch.Tensor,
        cond: VARCondition | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            label_B: class labels (B,) for class models (None when ``cond`` is given).
            x_BLCv_wo_first_l: (B, L - first_l, Cvae) from the tokenizer's ``idxBl_to_var_input``, or the first
                ``Lk - first_l`` of those tokens for logits of the first k scales only (``Lk`` =
                ``begin_ends[k - 1][1]``; the block-causal mask makes them exactly the full run's first Lk logits).
            cond: a :class:`VARCondition` (text models: from :meth:`text_condition`).
        Returns:
            ``logits_BLV`` (B, L or Lk, V) float32. In training mode rows are replaced by the null condition with
            probability ``cond_drop_rate``.
        """
        B = x_BLCv_wo_first_l.shape[0]
        L = self.first_l + x_BLCv_wo_first_l.shape[1]
        if L not in {ed for _, ed in self.begin_ends}:
            raise ValueError(
                f"VAR input has {L} tokens with the start token; expected the tokens of a whole number of scales "
                f"({', '.join(str(ed) for _, ed in self.begin_ends)})"
            )
        if cond is None:
            if label_B is None:
                raise ValueError("pass label_B (class model) or cond")
            cond = self.class_condition(label_B)
        if self.training and self.config.cond_drop_rate > 0:
            drop_B = torch.rand(B, device=cond.cond_BD.device) < self.config.cond_drop_rate
            cond = self.drop_condition(cond, drop_B)
        sos_BlC = cond.cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x_BLC = torch.cat((sos_BlC, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x_BLC = x_BLC + self.lvl_pos_1LC()[:, :L]
        x_BLC = self._run_blocks(x_BLC, cond, self.attn_bias_for_masking[:, :, :L, :L])
        return self.get_logits(x_BLC, cond.cond_BD)

    # -- next-scale step interface (vgen.samplers.interfaces.NextScaleModel) -------------------------------------

    def prefill(self, cond: VARCondition) -> tuple[VARStepState, torch.Tensor]:
        """Fresh KV cache and the start token map (B, first_l, C) = condition + pos_start + level/pos of scale 0."""
        B = cond.cond_BD.shape[0]
        state = VARStepState(VARKVCache(len(self.blocks)), cond, self.shared_ada_lin(cond.cond_BD))
        sos_BlC = (
            cond.cond_BD.unsqueeze(1).expand(B, self.first_l, -1)
            + self.pos_start.expand(B, self.first_l, -1)
            + self.lvl_pos_1LC()[:, : self.first_l]
        )
        return state, sos_BlC

    def logits_for_scale(self, si: int, token_map_BlC: torch.Tensor, state: VARStepState) -> torch.Tensor:
        """Logits (B, pn_si^2, V) for scale ``si``; its keys/values are appended to ``state.cache``."""
        x_BlC = token_map_BlC
        for i, block in enumerate(self.blocks):
            x_BlC = block(x_BlC, state.cond_BD_or_gss, None, cache=state.cache, layer=i, ctx=state.cond)
        return self.get_logits(x_BlC, state.cond.cond_BD)

    def embed_scale_input(self, si: int, next_input_BCvhw: torch.Tensor) -> torch.Tensor:
        """``word_embed`` of the tokenizer's (area-downsampled) f_hat for scale ``si``, plus level/position."""
        bg, ed = self.begin_ends[si]
        x_BlCv = rearrange(next_input_BCvhw, "B C h w -> B (h w) C")
        return self.word_embed(x_BlCv.to(self.word_embed.weight.dtype)) + self.lvl_pos_1LC()[:, bg:ed]


# ----------------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------------

#: Buffers official files carry that vgen recomputes (or, for zero_k_bias, never needs).
OFFICIAL_RECOMPUTED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def _is_recomputed_buffer(key: str) -> bool:
    return key in OFFICIAL_RECOMPUTED_BUFFERS or key.endswith(".attn.zero_k_bias")


def _read_state_dict(path_or_sd: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(path_or_sd, Mapping):
        sd = dict(path_or_sd)
    else:
        path = Path(path_or_sd)
        if not path.is_file():
            raise UserError(f"VAR checkpoint not found: {path} (pass the official var_dXX.pth file)")
        sd = load_torch_file(path, "VAR checkpoint")
    # training checkpoints: {'trainer': {'var_wo_ddp': ...}, ...}
    if isinstance(sd.get("trainer"), Mapping) and "var_wo_ddp" in sd["trainer"]:
        sd = dict(sd["trainer"]["var_wo_ddp"])
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError("the VAR checkpoint is not a state dict of tensors (expected official var_dXX.pth)")
    return sd


def _patch_nums_for_length(L: int, num_scales: int) -> tuple[int, ...]:
    for pns in (PATCH_NUMS_256, PATCH_NUMS_512):
        if sum(p * p for p in pns) == L and len(pns) == num_scales:
            return pns
    raise UserError(
        f"cannot infer the scale schedule of a VAR checkpoint with {L} tokens over {num_scales} scales; "
        "pass patch_nums explicitly"
    )


def official_var_config(sd: Mapping[str, torch.Tensor], patch_nums: tuple[int, ...] | None = None) -> dict[str, Any]:
    """VAR constructor kwargs inferred from an official state dict (depth, width, heads, shared AdaLN, ...)."""
    required = ("pos_1LC", "class_emb.weight", "word_embed.weight", "head.weight", "lvl_embed.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise UserError(f"not an official VAR checkpoint: missing key(s) {', '.join(missing)}")
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise UserError("not an official VAR checkpoint: no 'blocks.N.*' keys")
    C = sd["pos_1LC"].shape[-1]
    L = sd["pos_1LC"].shape[1]
    num_scales = sd["lvl_embed.weight"].shape[0]
    scale_mul = sd.get("blocks.0.attn.scale_mul_1H11")
    num_heads = scale_mul.numel() if scale_mul is not None else max(1, C // 64)
    if patch_nums is None:
        patch_nums = _patch_nums_for_length(L, num_scales)
    return dict(
        vocab_size=sd["head.weight"].shape[0],
        Cvae=sd["word_embed.weight"].shape[1],
        patch_nums=tuple(patch_nums),
        depth=depth,
        embed_dim=C,
        num_heads=num_heads,
        mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C if "blocks.0.ffn.fc1.weight" in sd else 4.0,
        shared_aln="shared_ada_lin.1.weight" in sd,
        attn_l2_norm=scale_mul is not None,
        num_classes=sd["class_emb.weight"].shape[0] - 1,
        conditioning="class",
    )


def load_official_var(
    path_or_sd: str | Path | Mapping[str, torch.Tensor],
    patch_nums: tuple[int, ...] | None = None,
    **overrides: Any,
) -> VAR:
    """Build a :class:`VAR` from an official ``var_dXX.pth`` (plain state dict or a training checkpoint).

    Depth, width, heads, vocabulary, number of classes and shared AdaLN are read from the tensors; ``overrides``
    (e.g. ``cond_drop_rate``, ``drop_path_rate``) go to the constructor. Raises :class:`UserError` listing missing
    or unexpected keys if the file does not match the official layout.
    """
    sd = _read_state_dict(path_or_sd)
    sd = {k: v for k, v in sd.items() if not _is_recomputed_buffer(k)}
    for k, v in list(sd.items()):  # some forks store scale_mul as (1, 1, H, 1)
        if k.endswith("attn.scale_mul_1H11") and v.ndim == 4 and v.shape[1] == 1:
            sd[k] = v.reshape(1, -1, 1, 1)
    config = {**official_var_config(sd, patch_nums), **overrides}
    with torch.device("meta"):
        model = VAR(**config)
    mismatch = state_dict_mismatch(model.state_dict(), sd)
    if mismatch:
        raise UserError(f"the VAR checkpoint does not match the official layout; {mismatch}")
    # Allocate without running the random init (seconds to minutes for d16..d36), then fill every tensor.
    model = model.to_empty(device="cpu")
    model.register_masks(device="cpu")
    model.load_state_dict(sd, strict=True)
    return model.eval()
