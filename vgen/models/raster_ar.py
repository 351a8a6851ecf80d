"""Raster-order next-token AR: LlamaGen's GPT (Sun et al., 2024) and Token-Shuffle windows (Ma et al., 2025).

The transformer keeps LlamaGen's state-dict keys (``tok_embeddings``, ``cls_embedding.embedding_table``,
``layers.N.attention.wqkv`` / ``wo``, ``layers.N.feed_forward.w1/w2/w3``, ``layers.N.attention_norm`` /
``ffn_norm``, ``norm``, ``output``), so the released ``c2i_*.pt`` files load key for key with
:func:`vgen.models.raster_ar_official.load_official_llamagen_gpt`. The 2-D RoPE table is computed here (official
files carry none: ``freqs_cis`` is a plain attribute there).

Sequence layout: a prefix of condition tokens, then the image in raster order. RoPE rotates image token j by its
grid position (row j // g, column j % g) whatever the prefix length; prefix tokens of class models get LlamaGen's
all-zero table rows (their queries and keys become zero vectors, as in the official code).

Conditioning:

- ``conditioning="class"`` (official): one prefix token, ``cls_embedding.embedding_table`` row ``label``
  (``num_classes + 1`` rows; the last is the null class, used for CFG and for label dropout with
  ``class_dropout_prob`` in training mode).
- ``conditioning="text"``: the prefix is the projected pooled prompt (``text_proj``) followed by the projected text
  tokens (``text_token_proj``) of the project's text encoder (:class:`vgen.models.text_encoder.ShapesTextEncoder`,
  or any encoder with its ``TextEncoder`` protocol; set ``text_embed_dim`` to its width). Rows keep only their own
  prompt's tokens (``1 + words``; the KV cache holds a length per row), and prefix tokens are not rotated (identity
  RoPE rows) so that image tokens can attend to words by content. The null prompt is the learned
  ``null_text_cond`` + ``null_text_token``. With ``text_cross_attn=False`` (the conditioning mixin's name for
  "use the prompt's tokens") the prefix is the pooled prompt alone.

Token-Shuffle (``shuffle_window = s > 1``): the transformer reads one fused token per ``s x s`` window of the
token grid, windows in raster order over the ``g/s x g/s`` window grid and the ``s^2`` codes of a window in raster
order inside it (:meth:`RasterAR.to_units` / :meth:`RasterAR.to_raster`). :class:`TokenShuffle` compresses each code
embedding ``d -> d / s^2`` (``token_shuffle.compress``), concatenates the window's ``s^2`` vectors along channels and
applies residual MLP blocks; :class:`TokenUnshuffle` applies residual MLP blocks to each output state, splits it into
``s^2`` chunks and expands each back to ``d`` (``token_unshuffle.expand``); the shared ``norm`` + ``output`` head then
gives the logits of the ``s^2`` codes of the next window in one step. Sequence length and forwards per image shrink by
``s^2``. ``s = 1`` is plain LlamaGen (no extra modules, official keys only).

Generation loops live in :mod:`vgen.samplers.next_token`; this model implements the
:class:`~vgen.samplers.interfaces.NextTokenModel` step (``prefill`` / ``decode`` of n units in one pass) on the
shared :class:`vgen.kv_cache.FullKVCache`. Shapes: ``B`` rows, ``L`` image codes (``g * g``), ``N`` units (windows)
per image, ``k = s^2`` codes per unit, ``P`` prefix tokens, ``C`` width, ``V`` codebook size.
"""

from __future__ import annotations

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
from vgen.models.layers import (
    DropPath,
    LlamaSwiGLU,
    RMSNorm,
    apply_llama_rope,
    attention,
    llama_ffn_hidden_dim,
    llama_rope_2d,
)

# ----------------------------------------------------------------------------------------------------------------
# Size registry
# ----------------------------------------------------------------------------------------------------------------

#: name -> RasterAR constructor kwargs; LlamaGen's ``GPT-B`` ... ``GPT-3B`` (head width 64, 3B: 100).
RASTER_AR_SIZES: dict[str, dict[str, Any]] = {
    "llamagen-b": dict(depth=12, embed_dim=768, num_heads=12),
    "llamagen-l": dict(depth=24, embed_dim=1024, num_heads=16),
    "llamagen-xl": dict(depth=36, embed_dim=1280, num_heads=20),
    "llamagen-xxl": dict(depth=48, embed_dim=1536, num_heads=24),
    "llamagen-3b": dict(depth=24, embed_dim=3200, num_heads=32),
}


def create_raster_ar(name: str, **overrides: Any) -> RasterAR:
    """``create_raster_ar("llamagen-b", num_classes=10)``: a size from :data:`RASTER_AR_SIZES` with overrides."""
    if name not in RASTER_AR_SIZES:
        raise UserError(f"unknown raster AR size {name!r}; choose one of {', '.join(RASTER_AR_SIZES)}")
    return RasterAR(**{**RASTER_AR_SIZES[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Transformer blocks (LlamaGen keys)
# ----------------------------------------------------------------------------------------------------------------


class LlamaAttention(nn.Module):
    """Causal self-attention with LlamaGen's fused ``wqkv`` and ``wo`` (no biases) and 2-D RoPE on q and k."""

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_dropout_p = attn_dropout_p
        self.wqkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.wo = nn.Linear(embed_dim, embed_dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout_p) if resid_dropout_p > 0 else nn.Identity()

    def forward(self, x_BLC: torch.Tensor, rope_Lp2: torch.Tensor, mask: torch.Tensor | None = None,
                cache: FullKVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``x_BLC`` (B, L, C); ``rope_Lp2`` (L, c/2, 2) or per row (B, L, c/2, 2). Without ``cache``: causal over
        the L tokens (or ``mask`` (B, 1, L, L), True = visible). With ``cache``: the L tokens attend to the cached
        history and causally to each other; their keys/values are stored tentatively."""
        B, L, C = x_BLC.shape
        # view/permute rather than einops: this runs once per layer per decoded unit, where call overhead shows
        qkv_3BHLc = self.wqkv(x_BLC).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk_2BHLc = apply_llama_rope(qkv_3BHLc[:2], rope_Lp2)  # q and k rotated in one call (the table broadcasts)
        q_BHLc, k_BHLc, v_BHLc = qk_2BHLc[0], qk_2BHLc[1], qkv_3BHLc[2]
        if cache is not None:
            out_BHLc = cache.attend(layer, q_BHLc, k_BHLc, v_BHLc, causal=True)
        else:
            dropout_p = self.attn_dropout_p if self.training else 0.0
            out_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, mask, causal=mask is None, dropout_p=dropout_p)
        return self.resid_dropout(self.wo(out_BHLc.transpose(1, 2).reshape(B, L, C)))


class LlamaBlock(nn.Module):
    """``h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))`` (LlamaGen's TransformerBlock)."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_hidden_dim: int, norm_eps: float, attn_dropout_p: float,
                 resid_dropout_p: float, ffn_dropout_p: float, drop_path: float):
        super().__init__()
        self.attention = LlamaAttention(embed_dim, num_heads, attn_dropout_p, resid_dropout_p)
        self.feed_forward = LlamaSwiGLU(embed_dim, ffn_hidden_dim, drop=ffn_dropout_p)
        self.attention_norm = RMSNorm(embed_dim, norm_eps)
        self.ffn_norm = RMSNorm(embed_dim, norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x_BLC, rope_Lp2, mask=None, cache=None, layer=0):
        h = x_BLC + self.drop_path(self.attention(self.attention_norm(x_BLC), rope_Lp2, mask, cache, layer))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


# ----------------------------------------------------------------------------------------------------------------
# Token-Shuffle
# ----------------------------------------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """``x + w2(SiLU(w1 n) * w3 n)`` with ``n = RMSNorm(x)``; ``w2`` starts at zero, so the block starts as the
    identity."""

    def __init__(self, dim: int, hidden_dim: int, norm_eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, norm_eps)
        self.mlp = LlamaSwiGLU(dim, hidden_dim)
        nn.init.zeros_(self.mlp.w2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def _identity_init_(linear: nn.Linear) -> None:
    """``weight`` = the (out, in) identity corner: a slice (out < in) or an embedding into the first coordinates."""
    with torch.no_grad():
        linear.weight.copy_(torch.eye(*linear.weight.shape))
        if linear.bias is not None:
            linear.bias.zero_()


class TokenShuffle(nn.Module):
    """Input side of Token-Shuffle: the ``k = s^2`` code embeddings of each window (B, N, k, d) -> one fused token
    (B, N, d): ``compress`` (d -> d / k), concatenation along channels (code order = raster order in the window),
    then ``num_blocks`` :class:`ResidualMLP` blocks.

    With ``identity_init`` ``compress`` keeps the first d / k coordinates of each embedding, so at init the fused token
    is exactly those coordinates of the window's codes side by side (the residual blocks start as the identity)."""

    def __init__(self, window: int, dim: int, num_blocks: int = 2, hidden_dim: int | None = None,
                 norm_eps: float = 1e-5, identity_init: bool = True):
        super().__init__()
        self.window, self.tokens = window, window * window
        if dim % self.tokens:
            raise UserError(f"Token-Shuffle window {window} needs a width divisible by {self.tokens}, got {dim}")
        self.compress = nn.Linear(dim, dim // self.tokens, bias=False)
        self.blocks = nn.ModuleList([ResidualMLP(dim, hidden_dim or dim, norm_eps) for _ in range(num_blocks)])
        self.identity_init = identity_init
        self.reset_token_maps()

    def reset_token_maps(self) -> None:
        if self.identity_init:
            _identity_init_(self.compress)

    def forward(self, emb_BNkd: torch.Tensor) -> torch.Tensor:
        x_BNC = rearrange(self.compress(emb_BNkd), "B N k d -> B N (k d)")
        for block in self.blocks:
            x_BNC = block(x_BNC)
        return x_BNC


class TokenUnshuffle(nn.Module):
    """Output side of Token-Shuffle: each output state (B, N, d) -> ``k = s^2`` states (B, N, k, d), one per code of
    the next window (raster order in the window): ``num_blocks`` :class:`ResidualMLP` blocks, a split into k chunks of
    d / k and ``expand`` (d / k -> d) of each chunk.

    With ``identity_init`` ``expand`` places a chunk in the first d / k coordinates, so at init
    ``TokenUnshuffle(TokenShuffle(e))`` returns every embedding's first d / k coordinates (all of ``e`` for s = 1)."""

    def __init__(self, window: int, dim: int, num_blocks: int = 2, hidden_dim: int | None = None,
                 norm_eps: float = 1e-5, identity_init: bool = True):
        super().__init__()
        self.window, self.tokens = window, window * window
        if dim % self.tokens:
            raise UserError(f"Token-Shuffle window {window} needs a width divisible by {self.tokens}, got {dim}")
        self.blocks = nn.ModuleList([ResidualMLP(dim, hidden_dim or dim, norm_eps) for _ in range(num_blocks)])
        self.expand = nn.Linear(dim // self.tokens, dim, bias=False)
        self.identity_init = identity_init
        self.reset_token_maps()

    def reset_token_maps(self) -> None:
        if self.identity_init:
            _identity_init_(self.expand)

    def forward(self, h_BNC: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h_BNC = block(h_BNC)
        return self.expand(rearrange(h_BNC, "B N (k d) -> B N k d", k=self.tokens))


# ----------------------------------------------------------------------------------------------------------------
# Step state
# ----------------------------------------------------------------------------------------------------------------


class _LabelEmbedding(nn.Module):
    """Holds LlamaGen's class table under its official key ``cls_embedding.embedding_table``."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.embedding_table = table


@dataclass
class RasterARStepState:
    """Sampling state between steps: the KV cache and the prefix (condition) length of every row.

    Row b's image unit j sits at cache position ``prefix_len_B[b] + j``; ``prefix_len_B`` is int64 (B,) on the CPU,
    like the cache's lengths."""

    cache: FullKVCache
    prefix_len_B: torch.Tensor

    @property
    def units_B(self) -> torch.Tensor:
        """Image units committed per row, int64 (B,) on the CPU."""
        return self.cache.lengths_B - self.prefix_len_B

    def truncate_units(self, units_B: int | torch.Tensor) -> None:
        """Keep at most ``units_B`` committed image units per row (an int or (B,)): per-row rollback of committed
        units, e.g. rejected speculative drafts."""
        units_B = torch.as_tensor(units_B, dtype=torch.long).reshape(-1).expand(self.prefix_len_B.shape[0])
        self.cache.truncate(self.prefix_len_B + units_B)

    def clone(self) -> RasterARStepState:
        """An independent copy (cache storage included), e.g. to explore drafts from the same prefix."""
        return RasterARStepState(self.cache.clone(), self.prefix_len_B.clone())

    def select(self, index_B: torch.Tensor) -> None:
        """Keep, reorder or repeat rows (cache included), e.g. drop the unconditional half once CFG is over."""
        index_B = torch.as_tensor(index_B, dtype=torch.long).reshape(-1)
        self.cache.select(index_B)
        self.prefix_len_B = self.prefix_len_B[index_B.cpu()]


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class RasterAR(ModelMixin, ConfigMixin, ConditionedModel):
    """LlamaGen GPT over a ``grid_size x grid_size`` code grid in raster order, optionally on Token-Shuffle windows.

    ``forward(tokens_BL, label_B=None, cond=None)`` is the teacher-forced training pass (causal mask) returning
    ``logits_BNkV``; sampling goes through :func:`vgen.samplers.next_token.generate_next_token`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 16384,
        grid_size: int = 16,
        depth: int = 12,
        embed_dim: int = 768,
        num_heads: int = 12,
        ffn_hidden_dim: int | None = None,
        multiple_of: int = 256,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        token_dropout_p: float = 0.1,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.1,
        ffn_dropout_p: float = 0.1,
        drop_path_rate: float = 0.0,
        class_dropout_prob: float = 0.1,
        conditioning: str = "class",
        num_classes: int = 1000,
        text_embed_dim: int | None = None,
        text_cross_attn: bool = True,
        shuffle_window: int = 1,
        shuffle_mlp_blocks: int = 2,
        shuffle_hidden_dim: int | None = None,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise UserError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise UserError(f"2-D RoPE needs a head width divisible by 4, got {head_dim} ({embed_dim} / {num_heads})")
        if shuffle_window < 1 or grid_size % shuffle_window:
            raise UserError(
                f"Token-Shuffle window {shuffle_window} does not tile the {grid_size}x{grid_size} token grid; use a "
                f"window that divides {grid_size}"
            )
        self.V, self.C = vocab_size, embed_dim
        self.window = shuffle_window
        self.k = shuffle_window * shuffle_window
        self.units_side = grid_size // shuffle_window
        self.N = self.units_side * self.units_side

        self.tok_embeddings = nn.Embedding(vocab_size, embed_dim)
        # text_cross_attn is the conditioning mixin's switch for "use the prompt's tokens": here they join the prefix
        self.init_conditioning(conditioning, embed_dim, num_classes, text_embed_dim, text_cross_attn,
                               init_std=initializer_range)
        if conditioning == "class":
            self.cls_embedding = _LabelEmbedding(self.class_emb)  # LlamaGen's key for the same table
            del self.class_emb
        self.tok_dropout = nn.Dropout(token_dropout_p) if token_dropout_p > 0 else nn.Identity()
        hidden = ffn_hidden_dim or llama_ffn_hidden_dim(embed_dim, multiple_of)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.layers = nn.ModuleList([
            LlamaBlock(embed_dim, num_heads, hidden, norm_eps, attn_dropout_p, resid_dropout_p, ffn_dropout_p, dpr[i])
            for i in range(depth)
        ])
        if shuffle_window > 1:
            self.token_shuffle = TokenShuffle(shuffle_window, embed_dim, shuffle_mlp_blocks, shuffle_hidden_dim,
                                              norm_eps)
            self.token_unshuffle = TokenUnshuffle(shuffle_window, embed_dim, shuffle_mlp_blocks, shuffle_hidden_dim,
                                                  norm_eps)
        self.norm = RMSNorm(embed_dim, norm_eps)
        self.output = nn.Linear(embed_dim, vocab_size, bias=False)
        self.register_rope()
        self.init_weights()

    # -- initialisation ----------------------------------------------------------------------------------------

    def register_rope(self) -> None:
        """Non-persistent RoPE tables: ``unit_rope`` (N, c/2, 2) for the image units (window grid positions) and
        ``prefix_rope_row`` (1, c/2, 2) for every prefix token (zeros for class models as in LlamaGen, the identity
        rotation for text prefixes)."""
        head_dim = self.C // self.config.num_heads
        table = llama_rope_2d(self.units_side, head_dim, self.config.rope_base, prefix_tokens=0)
        self.register_buffer("unit_rope", table, persistent=False)
        prefix = torch.zeros(1, head_dim // 2, 2)
        if self.is_text_conditional:
            prefix[..., 0] = 1.0
        self.register_buffer("prefix_rope_row", prefix, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """LlamaGen's recipe: every Linear and Embedding N(0, 0.02) (biases zero), the output head zero; Token-Shuffle
        maps start as identity corners and their residual MLPs as the identity."""
        if self.tok_embeddings.weight.device.type == "meta":
            return
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        nn.init.zeros_(self.output.weight)
        for m in self.modules():
            if isinstance(m, ResidualMLP):
                nn.init.zeros_(m.mlp.w2.weight)
            if isinstance(m, (TokenShuffle, TokenUnshuffle)):
                m.reset_token_maps()

    @property
    def class_table(self) -> nn.Embedding:
        return self.cls_embedding.embedding_table

    # -- sequence layout ---------------------------------------------------------------------------------------

    @property
    def tokens_per_step(self) -> int:
        """Codes per unit (one step of the interface): ``s^2`` (1 for plain raster order)."""
        return self.k

    @property
    def sequence_length(self) -> int:
        """Units (steps) per image: ``(grid_size / s)^2``."""
        return self.N

    @property
    def vocab_size(self) -> int:
        return self.V

    def to_units(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Raster-order codes (B, g*g) -> units (B, N, k): windows in raster order, codes raster order inside."""
        s, n = self.window, self.units_side
        if tokens_BL.ndim != 2 or tokens_BL.shape[1] != self.N * self.k:
            raise UserError(
                f"expected code ids of shape (B, {self.N * self.k}) for the {n * s}x{n * s} token grid, got "
                f"{tuple(tokens_BL.shape)}"
            )
        return rearrange(tokens_BL, "B (nh sh nw sw) -> B (nh nw) (sh sw)", nh=n, sh=s, nw=n, sw=s)

    def to_raster(self, units_BNk: torch.Tensor) -> torch.Tensor:
        """Units (B, N, k) -> raster-order codes (B, g*g) (the inverse of :meth:`to_units`)."""
        s, n = self.window, self.units_side
        return rearrange(units_BNk, "B (nh nw) (sh sw) -> B (nh sh nw sw)", nh=n, sh=s, nw=n, sw=s)

    # -- shared pieces -----------------------------------------------------------------------------------------

    def embed_units(self, units_Bnk: torch.Tensor) -> torch.Tensor:
        """Code ids (B, n, k) -> transformer tokens (B, n, C) (fused windows with Token-Shuffle)."""
        if units_Bnk.ndim != 3 or units_Bnk.shape[2] != self.k:
            raise ValueError(f"expected units of shape (B, n, {self.k}), got {tuple(units_Bnk.shape)}")
        emb_BnkC = self.tok_embeddings(units_Bnk)
        if self.k == 1:
            return emb_BnkC[:, :, 0]
        return self.token_shuffle(emb_BnkC)

    def unit_logits(self, h_BnC: torch.Tensor) -> torch.Tensor:
        """Final states (B, n, C) -> float32 logits (B, n, k, V) for the codes of the next unit (the head runs in
        float32 whatever the model's dtype, so half-precision models keep full-precision logits for sampling)."""
        h_BnkC = self.norm(h_BnC[:, :, None] if self.k == 1 else self.token_unshuffle(h_BnC))
        return F.linear(h_BnkC.float(), self.output.weight.float())

    def prefix(self, cond: Condition) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Condition tokens (B, P, C) and, for text rows, the prefix mask (B, P) (True = the row's own token; the
        valid tokens of a row come first). Class models: P = 1 and no mask."""
        if cond.context_BTC is None:
            return cond.cond_BD[:, None], None
        mask_BP = torch.cat((torch.ones_like(cond.context_mask_BT[:, :1]), cond.context_mask_BT.bool()), dim=1)
        return torch.cat((cond.cond_BD[:, None], cond.context_BTC), dim=1), mask_BP

    def _run_layers(self, x_BLC, rope, mask=None, cache=None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x_BLC = layer(x_BLC, rope, mask, cache, i)
        return x_BLC

    def _condition(self, label_B: torch.Tensor | None, cond: Condition | None) -> Condition:
        if cond is None:
            if label_B is None:
                raise ValueError("pass label_B (class model) or cond")
            cond = self.class_condition(label_B)
        return cond

    # -- training ----------------------------------------------------------------------------------------------

    def forward(self, tokens_BL: torch.Tensor, label_B: torch.Tensor | None = None,
                cond: Condition | None = None) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            tokens_BL: the images' code ids (B, g*g) in raster order (the tokenizer's ``encode(...).idx``).
            label_B: class labels (B,) for class models (None when ``cond`` is given).
            cond: a :class:`Condition` (text models: from :meth:`text_condition`).
        Returns:
            ``logits_BNkV`` (B, N, k, V) float32: entry ``[:, j]`` predicts unit j (``to_units(tokens_BL)[:, j]``)
            from the prefix and units < j. In training mode rows are replaced by the null condition with probability
            ``class_dropout_prob``.
        """
        units_BNk = self.to_units(tokens_BL)
        cond = self._condition(label_B, cond)
        B = units_BNk.shape[0]
        if self.training and self.config.class_dropout_prob > 0:
            drop_B = torch.rand(B, device=cond.cond_BD.device) < self.config.class_dropout_prob
            cond = self.drop_condition(cond, drop_B)
        prefix_BPC, mask_BP = self.prefix(cond)
        P = prefix_BPC.shape[1]
        x_BLC = torch.cat((prefix_BPC.to(self.tok_embeddings.weight.dtype), self.embed_units(units_BNk[:, :-1])), 1)
        x_BLC = self.tok_dropout(x_BLC)
        L = x_BLC.shape[1]
        rope = torch.cat((self.prefix_rope_row.expand(P, -1, -1), self.unit_rope[: self.N - 1]))
        mask = None
        if mask_BP is not None:  # causal, and no row sees the padding of its prefix
            key_ok_BL = torch.cat((mask_BP, mask_BP.new_ones(B, L - P)), dim=1)
            causal_LL = torch.ones(L, L, dtype=torch.bool, device=x_BLC.device).tril()
            mask = (causal_LL[None] & key_ok_BL[:, None, :])[:, None]
        h_BLC = self._run_layers(x_BLC, rope, mask)
        if mask_BP is None:
            h_BNC = h_BLC[:, P - 1:]
        else:  # unit 0 is predicted from each row's last own prefix token
            last_B = mask_BP.sum(1) - 1
            first_B1C = h_BLC[torch.arange(B, device=h_BLC.device), last_B][:, None]
            h_BNC = torch.cat((first_B1C, h_BLC[:, P:]), dim=1)
        return self.unit_logits(h_BNC)

    # -- next-token step interface (vgen.samplers.interfaces.NextTokenModel) -------------------------------------

    def prefill(self, cond: Condition, capacity_margin: int = 16) -> tuple[RasterARStepState, torch.Tensor]:
        """Run the condition prefix through a fresh KV cache (committed here) and return the state and the float32
        logits (B, k, V) of the first unit.

        The cache holds ``P + N + capacity_margin`` tokens per row, so a verifier may decode up to
        ``capacity_margin`` drafted units past the end of the image without reallocating (their logits are
        meaningless: the image has no positions there)."""
        prefix_BPC, mask_BP = self.prefix(cond)
        B, P, _ = prefix_BPC.shape
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        attn = self.layers[0].attention
        cache = FullKVCache(num_layers=len(self.layers), batch=B, heads=attn.num_heads, head_dim=attn.head_dim,
                            capacity=P + self.N + max(0, int(capacity_margin)), dtype=dtype, device=device)
        h_BPC = self._run_layers(prefix_BPC.to(dtype), self.prefix_rope_row.expand(P, -1, -1), cache=cache)
        if mask_BP is None:
            prefix_len_B = torch.full((B,), P, dtype=torch.long)
            cache.commit()
            last_BC = h_BPC[:, -1]
        else:
            lengths = mask_BP.sum(1)
            valid_first = torch.arange(P, device=mask_BP.device)[None] < lengths[:, None]
            if not bool((valid_first == mask_BP).all()):
                raise ValueError("text prefix masks must hold each row's tokens first, then padding")
            prefix_len_B = lengths.long().cpu()
            cache.commit(prefix_len_B)  # each row keeps only its own prompt's tokens
            last_BC = h_BPC[torch.arange(B, device=device), lengths - 1]
        return RasterARStepState(cache, prefix_len_B), self.unit_logits(last_BC[:, None])[:, 0]

    def decode(self, units_Bnk: torch.Tensor, state: RasterARStepState) -> torch.Tensor:
        """Append ``units_Bnk`` (B, n, k) code ids at each row's end in one pass and return float32 logits
        (B, n, k, V): entry ``[:, j]`` predicts the unit after ``units_Bnk[:, j]``. The units are stored tentatively:
        the caller commits them (``state.cache.commit()`` or ``commit(keep_B)``) or rolls them back."""
        n = units_Bnk.shape[1]
        x_BnC = self.embed_units(units_Bnk)
        unit_pos_Bn = (state.cache.positions(n) - state.prefix_len_B[:, None]).clamp_(0, self.N - 1)
        rope_Bnp2 = self.unit_rope[unit_pos_Bn.to(self.unit_rope.device, non_blocking=True)]
        return self.unit_logits(self._run_layers(x_BnC, rope_Bnp2, cache=state.cache))
