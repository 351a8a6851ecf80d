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
``embed_scale_input``) on the shared :class:`vgen.kv_cache.FullKVCache`. Shared blocks come from
:mod:`vgen.models.layers`, conditioning from :mod:`vgen.models.conditioning`, and the official-checkpoint loader
lives in :mod:`vgen.models.var_official`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from vgen.errors import UserError
from vgen.kv_cache import FullKVCache
from vgen.models.conditioning import Condition, ConditionedModel
from vgen.models.layers import AdaLNBeforeHead, CrossAttention, DropPath, GELUMLP, attention

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
        cache: FullKVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """``x_BLC`` (B, L, C). Training: ``attn_bias_11LL`` is the block-causal mask and ``cache`` None.
        Inference: ``attn_bias_11LL`` None and keys/values go to ``cache`` (this scale attends to every cached token
        of coarser scales and to its own scale; the sampling loop commits the scale)."""
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias)
        q_BHLc, k_BHLc, v_BHLc = rearrange(qkv, "B L (three H c) -> three B H L c", three=3, H=self.num_heads).unbind(0)
        if self.attn_l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q_BHLc = F.normalize(q_BHLc, dim=-1).mul(scale_mul_1H11)
            k_BHLc = F.normalize(k_BHLc, dim=-1)
        if cache is not None:
            out_BHLc = cache.attend(layer, q_BHLc, k_BHLc, v_BHLc, scale=self.scale)
        else:
            dropout_p = self.attn_drop if self.training else 0.0
            out_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, attn_bias_11LL, scale=self.scale, dropout_p=dropout_p)
        return self.proj_drop(self.proj(rearrange(out_BHLc, "B H L c -> B L (H c)")))


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
        self.ffn = GELUMLP(embed_dim, round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD_or_gss: torch.Tensor, attn_bias_11LL: torch.Tensor | None,
                cache: FullKVCache | None = None, layer: int = 0, ctx: Condition | None = None) -> torch.Tensor:
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


class SharedAdaLin(nn.Linear):
    """Shared AdaLN projection (d36): (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


#: VAR's condition is the shared :class:`vgen.models.conditioning.Condition` (name kept for readers of VAR code)
VARCondition = Condition


@dataclass
class VARStepState:
    """Sampling state between scales: the KV cache plus the per-row AdaLN inputs."""

    cache: FullKVCache
    cond: Condition
    cond_BD_or_gss: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class VAR(ModelMixin, ConfigMixin, ConditionedModel):
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
        if embed_dim % num_heads:
            raise UserError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        patch_nums = tuple(int(p) for p in patch_nums)
        self.Cvae, self.V, self.C, self.D = Cvae, vocab_size, embed_dim, embed_dim
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
        self.init_conditioning(conditioning, self.C, num_classes, text_embed_dim, text_cross_attn, init_std)
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

    # -- schedule ------------------------------------------------------------------------------------------------

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.config.patch_nums)

    # -- shared pieces -----------------------------------------------------------------------------------------

    def lvl_pos_1LC(self) -> torch.Tensor:
        """Level embedding + absolute position for every token (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def get_logits(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) in float32: the head's input and weights are taken in float32 whatever the model's
        dtype (half-precision models keep full-precision logits for sampling)."""
        h_BLC = self.head_nm(x_BLC, cond_BD)
        return F.linear(h_BLC.float(), self.head.weight.float(), self.head.bias.float())

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
        x_BLC = torch.cat((sos_BlC, self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))), dim=1)
        x_BLC = x_BLC + self.lvl_pos_1LC()[:, :L]
        x_BLC = self._run_blocks(x_BLC, cond, self.attn_bias_for_masking[:, :, :L, :L])
        return self.get_logits(x_BLC, cond.cond_BD)

    # -- next-scale step interface (vgen.samplers.interfaces.NextScaleModel) -------------------------------------

    def prefill(self, cond: VARCondition) -> tuple[VARStepState, torch.Tensor]:
        """Fresh KV cache and the start token map (B, first_l, C) = condition + pos_start + level/pos of scale 0."""
        B = cond.cond_BD.shape[0]
        attn = self.blocks[0].attn
        cache = FullKVCache(num_layers=len(self.blocks), batch=B, heads=attn.num_heads, head_dim=attn.head_dim,
                            capacity=self.L, dtype=self.pos_1LC.dtype, device=self.pos_1LC.device)
        state = VARStepState(cache, cond, self.shared_ada_lin(cond.cond_BD))
        sos_BlC = (
            cond.cond_BD.unsqueeze(1).expand(B, self.first_l, -1)
            + self.pos_start.expand(B, self.first_l, -1)
            + self.lvl_pos_1LC()[:, : self.first_l]
        )
        return state, sos_BlC

    def logits_for_scale(self, si: int, token_map_BlC: torch.Tensor, state: VARStepState) -> torch.Tensor:
        """Logits (B, pn_si^2, V) for scale ``si``; its keys/values go to ``state.cache`` tentatively (the loop
        commits them)."""
        x_BlC = token_map_BlC
        for i, block in enumerate(self.blocks):
            x_BlC = block(x_BlC, state.cond_BD_or_gss, None, cache=state.cache, layer=i, ctx=state.cond)
        return self.get_logits(x_BlC, state.cond.cond_BD)

    def embed_scale_input(self, si: int, next_input_BCvhw: torch.Tensor) -> torch.Tensor:
        """``word_embed`` of the tokenizer's (area-downsampled) f_hat for scale ``si``, plus level/position."""
        bg, ed = self.begin_ends[si]
        x_BlCv = rearrange(next_input_BCvhw, "B C h w -> B (h w) C")
        return self.word_embed(x_BlCv.to(self.word_embed.weight.dtype)) + self.lvl_pos_1LC()[:, bg:ed]
