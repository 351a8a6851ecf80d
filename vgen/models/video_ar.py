"""Block-causal AR video diffusion: a small transformer over latent frames, generated a block of frames at a time.

A video is ``F`` latent frames of ``C x h x w`` (one per pixel frame: a per-frame autoencoder). Frames are cut into
``p x p`` patches, ``T = (h / p) * (w / p)`` tokens each, and grouped into blocks of ``f`` frames. Attention is full
inside a block and causal across blocks (block ``i`` sees blocks ``<= i``); every frame has its own flow time, which
modulates its tokens through AdaLN (per-frame AdaLN); positions are a 3-D RoPE over (frame, row, column)
(:func:`vgen.models.layers.video_rope_3d`) with the absolute frame index, so a cached key keeps its position.
Prompts enter through the shared text conditioning (pooled text added to the time embedding, tokens through
cross-attention).

Flow convention (vgen's, FlowAR's): ``x_t = (1 - t) x0 + t eps``, the model predicts ``v = eps - x0``.

Two ways to run the same weights:

* **training / teacher forcing**: :meth:`BlockCausalVideoTransformer.forward` over a whole clip with a per-frame
  time ``t_BF`` (diffusion forcing: one noise level per block) under the block-causal mask;
* **generation**, block by block over a KV cache (the :class:`~vgen.samplers.interfaces.BlockCausalModel` step,
  driven by :mod:`vgen.samplers.block_causal`): :meth:`start` makes the state (cache chosen by a
  :class:`~vgen.models.video_cache.VideoCacheConfig`: full, sink + rolling window, or Forcing-KV compressed),
  :meth:`block_velocity` runs one denoising pass of the current block (attends to the cache, stores nothing) and
  :meth:`commit_block` runs the clean ``t = 0`` pass, the only writer of the persistent cache, then lets the cache's
  keep policy compact it.

On the same noisy inputs the two give the same velocities (``tests/test_video_model.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange, repeat
from torch import nn

from vgen.errors import UserError
from vgen.kv_cache import KVCache
from vgen.models.conditioning import Condition, ConditionedModel
from vgen.models.layers import (
    AdaLNBeforeHead,
    CrossAttention,
    GELUMLP,
    RMSNorm,
    TimestepEmbedder,
    apply_llama_rope,
    attention,
    unpack_adaln6,
    video_rope_3d,
)

# ----------------------------------------------------------------------------------------------------------------
# Size registry
# ----------------------------------------------------------------------------------------------------------------

#: name -> transformer sizes; the rest of the config (latent shape, block size, conditioning) comes from the data.
VIDEO_AR_SIZES: dict[str, dict[str, Any]] = {
    "video-ar-tiny": dict(embed_dim=64, depth=2, num_heads=2),  # tests
    "video-ar-s": dict(embed_dim=128, depth=4, num_heads=4),  # the CPU-trained Moving Shapes model
    "video-ar-m": dict(embed_dim=256, depth=6, num_heads=4),
    "video-ar-b": dict(embed_dim=768, depth=12, num_heads=12),  # GPU scale (head width 64)
}


def create_video_ar(name: str, **overrides: Any) -> BlockCausalVideoTransformer:
    """``create_video_ar("video-ar-s", latent_channels=4, ...)``: a size from :data:`VIDEO_AR_SIZES` plus overrides."""
    if name not in VIDEO_AR_SIZES:
        raise UserError(f"unknown video model size {name!r}; choose one of {', '.join(VIDEO_AR_SIZES)}")
    return BlockCausalVideoTransformer(**{**VIDEO_AR_SIZES[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------

#: ``probe(layer, probs_BHLT)``: called with explicit attention probabilities (see ``probe_attention``)
AttentionProbe = Callable[[int, torch.Tensor], None]


class VideoSelfAttention(nn.Module):
    """Multi-head self-attention with q/k RMSNorm and 3-D RoPE; keys ``qkv``, ``q_norm``, ``k_norm``, ``proj``.

    Training passes a boolean mask (block-causal); generation passes a KV cache and a layer index instead.
    """

    def __init__(self, embed_dim: int, num_heads: int, qk_norm: bool, norm_eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x_BLC: torch.Tensor, rope_Lp2: torch.Tensor, *, mask_LL: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0, store: bool = False,
                probe: AttentionProbe | None = None) -> torch.Tensor:
        q_BHLc, k_BHLc, v_BHLc = rearrange(self.qkv(x_BLC), "B L (three H c) -> three B H L c", three=3,
                                           H=self.num_heads).unbind(0)
        q_BHLc = apply_llama_rope(self.q_norm(q_BHLc), rope_Lp2)
        k_BHLc = apply_llama_rope(self.k_norm(k_BHLc), rope_Lp2)
        if cache is not None:
            out_BHLc = cache.attend(layer, q_BHLc, k_BHLc, v_BHLc, store=store)
        else:
            out_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, mask_LL)
            if probe is not None:  # head profiling: the same attention written out as probabilities
                logits = (q_BHLc.float() @ k_BHLc.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
                if mask_LL is not None:
                    logits = logits.masked_fill(~mask_LL, float("-inf"))
                probe(layer, logits.softmax(-1))
        return self.proj(rearrange(out_BHLc, "B H L c -> B L (H c)"))


class VideoBlock(nn.Module):
    """Per-frame AdaLN block: self-attention, cross-attention to the text, FFN (keys ``attn``, ``cross_attn``,
    ``ffn``, ``ada_lin.1``). AdaLN vectors come per token (each token gets its frame's), in the shared order
    gamma1, gamma2, scale1, scale2, shift1, shift2 (:func:`vgen.models.layers.unpack_adaln6`)."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, norm_eps: float,
                 cross_attn: bool):
        super().__init__()
        self.C = embed_dim
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.attn = VideoSelfAttention(embed_dim, num_heads, qk_norm, norm_eps)
        self.cross_attn = CrossAttention(embed_dim, num_heads, norm_eps) if cross_attn else None
        self.ffn = GELUMLP(embed_dim, round(embed_dim * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, c_BFC: torch.Tensor, rope_Lp2: torch.Tensor, cond: Condition,
                **attn_kwargs) -> torch.Tensor:
        """``x_BLC`` (B, F*T, C) tokens, ``c_BFC`` (B, F, C) the AdaLN input of each frame."""
        B, L, C = x_BLC.shape
        F_ = c_BFC.shape[1]
        # each frame's six vectors broadcast over its T tokens (a (B, F, 1, C) view, never repeated per token)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (a[:, :, None] for a in unpack_adaln6(self.ada_lin(c_BFC),
                                                                                           self.C))

        def per_frame(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, F_, L // F_, C)

        h = per_frame(self.norm(x_BLC)) * (1 + scale1) + shift1
        h = self.attn(h.view(B, L, C), rope_Lp2, **attn_kwargs)
        x_BLC = x_BLC + (per_frame(h) * gamma1).view(B, L, C)
        if self.cross_attn is not None:
            x_BLC = x_BLC + self.cross_attn(x_BLC, cond.context_BTC, cond.context_mask_BT)
        h = self.ffn((per_frame(self.norm(x_BLC)) * (1 + scale2) + shift2).view(B, L, C))
        return x_BLC + (per_frame(h) * gamma2).view(B, L, C)


@dataclass
class VideoStepState:
    """Generation state of a batch of videos (R rows: B, or 2B with CFG): the KV cache, the condition, the first
    frame index of the next block and the cache's keep policy (None: the cache keeps what it keeps)."""

    cache: KVCache
    cond: Condition
    frame: int = 0
    policy: Any = None


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class BlockCausalVideoTransformer(ModelMixin, ConfigMixin, ConditionedModel):
    """Velocity model over latent frames ``x_BFChw`` (B videos, F frames, C latent channels, h x w latent grid).

    Args:
        latent_channels, latent_height, latent_width: one latent frame (the autoencoder's ``C x h x w``).
        patch_size: side of the square patches that become tokens.
        frames_per_block: f, the frames generated together (full attention inside a block).
        max_frames: the training clip length (what the full cache holds by default).
        embed_dim, depth, num_heads, mlp_ratio, qk_norm, norm_eps, rope_theta: the transformer.
        conditioning: ``"text"`` (a prompt through a text encoder, ``text_embed_dim`` wide) or ``"class"``.
        text_cross_attn: blocks also cross-attend to the text tokens.
        cond_drop_rate: probability of training with the null condition (for classifier-free guidance).
        time_scale: the flow time ``t`` in [0, 1] is embedded as ``time_scale * t`` (DiT's sinusoid).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        latent_height: int = 8,
        latent_width: int = 8,
        patch_size: int = 2,
        frames_per_block: int = 4,
        max_frames: int = 16,
        embed_dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        conditioning: str = "text",
        num_classes: int = 0,
        text_embed_dim: int | None = 128,
        text_cross_attn: bool = True,
        cond_drop_rate: float = 0.1,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise UserError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if latent_height % patch_size or latent_width % patch_size:
            raise UserError(f"the latent grid {latent_height}x{latent_width} is not a multiple of patch_size "
                            f"{patch_size}")
        if frames_per_block < 1 or max_frames % frames_per_block:
            raise UserError(f"max_frames ({max_frames}) must be a multiple of frames_per_block ({frames_per_block})")
        self.C, self.p = embed_dim, patch_size
        self.grid_h, self.grid_w = latent_height // patch_size, latent_width // patch_size
        self.patch_embed = nn.Linear(latent_channels * patch_size**2, embed_dim)
        self.time_embed = TimestepEmbedder(embed_dim)
        self.init_conditioning(conditioning, embed_dim, num_classes, text_embed_dim, text_cross_attn)
        self.blocks = nn.ModuleList(
            [VideoBlock(embed_dim, num_heads, mlp_ratio, qk_norm, norm_eps,
                        cross_attn=conditioning == "text" and text_cross_attn) for _ in range(depth)]
        )
        self.head_norm = AdaLNBeforeHead(embed_dim, embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, latent_channels * patch_size**2)
        self._probe: AttentionProbe | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier linears; AdaLN and the output head start at zero (DiT's adaLN-Zero: every block starts as the
        identity and the first velocity is 0); cross-attention outputs start at zero."""
        if self.head.weight.device.type == "meta":
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada_lin[-1].weight)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
        nn.init.zeros_(self.head_norm.ada_lin[-1].weight)
        nn.init.zeros_(self.head.weight)

    # -- shapes ------------------------------------------------------------------------------------------------

    @property
    def frames_per_block(self) -> int:
        return self.config.frames_per_block

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """One video's block ``(f, C, h, w)``."""
        cfg = self.config
        return (cfg.frames_per_block, cfg.latent_channels, cfg.latent_height, cfg.latent_width)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def head_dim(self) -> int:
        return self.config.embed_dim // self.config.num_heads

    def check_latents(self, x_BFChw: torch.Tensor, what: str = "latent frames") -> None:
        cfg = self.config
        want = (cfg.latent_channels, cfg.latent_height, cfg.latent_width)
        if x_BFChw.ndim != 5 or tuple(x_BFChw.shape[2:]) != want:
            raise UserError(f"{what} must be (B, F, {want[0]}, {want[1]}, {want[2]}), got {tuple(x_BFChw.shape)}")

    # -- shared pieces -----------------------------------------------------------------------------------------

    def patchify(self, x_BFChw: torch.Tensor) -> torch.Tensor:
        """(B, F, C, h, w) -> tokens (B, F*T, C*p*p), frame-major then raster order."""
        return rearrange(x_BFChw, "B F C (h p) (w q) -> B (F h w) (C p q)", p=self.p, q=self.p)

    def unpatchify(self, x_BLP: torch.Tensor, num_frames: int) -> torch.Tensor:
        return rearrange(x_BLP, "B (F h w) (C p q) -> B F C (h p) (w q)", F=num_frames, h=self.grid_h,
                         w=self.grid_w, p=self.p, q=self.p)

    def rope_table(self, first_frame: int, num_frames: int, device: torch.device) -> torch.Tensor:
        """RoPE table (num_frames * T, head_dim / 2, 2) for frames ``first_frame ...`` (absolute indices)."""
        frames = torch.arange(first_frame, first_frame + num_frames)
        return video_rope_3d(frames, self.grid_h, self.grid_w, self.head_dim, self.config.rope_theta).to(device)

    def frame_conditioning(self, t_BF: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Per-frame AdaLN input (B, F, C): time embedding of each frame's ``t`` plus the pooled condition."""
        B, F_ = t_BF.shape
        t_emb = self.time_embed((t_BF.reshape(-1).float() * self.config.time_scale)).view(B, F_, -1)
        return t_emb + cond.cond_BD[:, None].to(t_emb.dtype)

    def _run(self, x_BFChw: torch.Tensor, t_BF: torch.Tensor, cond: Condition, first_frame: int,
             **attn_kwargs) -> torch.Tensor:
        F_ = x_BFChw.shape[1]
        dtype = self.patch_embed.weight.dtype
        h_BLC = self.patch_embed(self.patchify(x_BFChw.to(dtype)))
        c_BFC = self.frame_conditioning(t_BF.to(h_BLC.device), cond).to(dtype)
        rope = self.rope_table(first_frame, F_, h_BLC.device)
        cond = cond.to(dtype)
        for layer, block in enumerate(self.blocks):
            h_BLC = block(h_BLC, c_BFC, rope, cond, layer=layer, **attn_kwargs)
        # the head's AdaLN per frame: frames become rows
        h_BLC = self.head_norm(rearrange(h_BLC, "B (F T) C -> (B F) T C", F=F_), rearrange(c_BFC, "B F C -> (B F) C"))
        return self.unpatchify(rearrange(self.head(h_BLC), "(B F) T P -> B (F T) P", F=F_), F_).float()

    # -- training / teacher forcing ----------------------------------------------------------------------------

    def block_causal_mask(self, num_frames: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean (L, L), L = num_frames * T: query token i may see key j iff j's block <= i's block."""
        block_L = torch.arange(num_frames, device=device).repeat_interleave(self.tokens_per_frame)
        block_L = block_L // self.frames_per_block
        return block_L[None, :] <= block_L[:, None]

    def forward(self, x_BFChw: torch.Tensor, t_BF: torch.Tensor, cond: Condition, first_frame: int = 0,
                drop_condition: bool | None = None) -> torch.Tensor:
        """Velocities (B, F, C, h, w) float32 of a whole clip under the block-causal mask.

        Args:
            x_BFChw: noisy latent frames; F a multiple of ``frames_per_block``.
            t_BF: flow time of every frame (diffusion forcing: equal inside a block).
            cond: the condition (:meth:`text_condition` / :meth:`class_condition`).
            first_frame: absolute index of the first frame (RoPE).
            drop_condition: replace rows by the null condition with probability ``cond_drop_rate``; default: in
                training mode.
        """
        self.check_latents(x_BFChw)
        F_ = x_BFChw.shape[1]
        if F_ % self.frames_per_block:
            raise UserError(f"a clip of {F_} frames is not a whole number of {self.frames_per_block}-frame blocks")
        if tuple(t_BF.shape) != tuple(x_BFChw.shape[:2]):
            raise ValueError(f"t_BF must be (B, F) = {tuple(x_BFChw.shape[:2])}, got {tuple(t_BF.shape)}")
        drop = self.training if drop_condition is None else drop_condition
        if drop and self.config.cond_drop_rate > 0:
            drop_B = torch.rand(x_BFChw.shape[0], device=cond.cond_BD.device) < self.config.cond_drop_rate
            cond = self.drop_condition(cond, drop_B)
        mask = self.block_causal_mask(F_, x_BFChw.device)
        return self._run(x_BFChw, t_BF, cond, first_frame, mask_LL=mask, probe=self._probe)

    @contextmanager
    def probe_attention(self, probe: AttentionProbe):
        """Inside the block, :meth:`forward` also hands each layer's attention probabilities (B, H, L, L) float32
        to ``probe(layer, probs)`` (offline head profiling, :mod:`vgen.models.forcing_kv`)."""
        self._probe = probe
        try:
            yield self
        finally:
            self._probe = None

    # -- block-causal step (vgen.samplers.interfaces.BlockCausalModel) -------------------------------------------

    def start(self, cond: Condition, cache: Any = None, max_frames: int | None = None) -> VideoStepState:
        """A fresh generation state for ``cond``'s rows: an empty KV cache built from ``cache`` (a
        :class:`~vgen.models.video_cache.VideoCacheConfig`; default: the full cache) for up to ``max_frames``
        frames (default: the training length; only the full cache is bounded by it)."""
        from vgen.models.video_cache import VideoCacheConfig, build_video_cache

        spec = cache if cache is not None else VideoCacheConfig()
        kv, policy = build_video_cache(spec, self, batch=cond.batch_size, max_frames=max_frames or
                                       self.config.max_frames, dtype=self.head.weight.dtype, device=self.device)
        return VideoStepState(kv, cond, 0, policy)

    def switch_condition(self, state: VideoStepState, cond: Condition) -> None:
        """Later blocks follow ``cond`` (a new prompt mid-stream); the cached past stays as it was generated."""
        if cond.batch_size != state.cond.batch_size:
            raise ValueError(f"the new condition has {cond.batch_size} rows, the stream {state.cond.batch_size}")
        state.cond = cond

    def block_velocity(self, x_t: torch.Tensor, t_R: torch.Tensor, state: VideoStepState) -> torch.Tensor:
        """Velocity (R, f, C, h, w) float32 of the current block at times ``t_R`` (R,); attends to the cache and
        the block itself, stores nothing (a denoising pass)."""
        t_Rf = t_R.reshape(-1, 1).expand(-1, self.frames_per_block)
        return self._run(x_t, t_Rf, state.cond, state.frame, cache=state.cache, store=False)

    def commit_block(self, x_clean: torch.Tensor, state: VideoStepState) -> None:
        """The clean pass: block ``x_clean`` (R, f, C, h, w) at ``t = 0`` writes its keys/values, the cache commits
        them, the keep policy compacts, and the state moves to the next block."""
        self.encode_block(x_clean, torch.zeros(x_clean.shape[0], device=x_clean.device), state)

    def encode_block(self, x: torch.Tensor, t_R: torch.Tensor, state: VideoStepState) -> torch.Tensor:
        """Store block ``x`` at times ``t_R`` in the cache and commit it (``commit_block`` is this at ``t = 0``);
        returns the pass's velocity. Teacher forcing a cache with noisy blocks is the same pass at ``t > 0``."""
        t_Rf = t_R.reshape(-1, 1).expand(-1, self.frames_per_block)
        v = self._run(x, t_Rf, state.cond, state.frame, cache=state.cache, store=True)
        state.cache.commit()
        if state.policy is not None:
            state.policy.after_commit(state.cache, state.frame, self.frames_per_block)
        state.frame += self.frames_per_block
        return v
