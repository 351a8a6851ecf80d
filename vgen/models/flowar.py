"""FlowAR: next-scale prediction with flow matching (Ren et al., ICML 2025), on continuous KL latents.

The image's latent (B, C, H, W) (``C`` = 16 for MAR's kl16; scaled by the autoencoder's ``scale_factor``) is seen at
K scales: scale k is ``area(latent -> s_k p x s_k p)`` cut into ``s_k^2`` tokens of ``C p^2`` channels (``p`` =
``patch_size``; official: scales (1, 2, 4, 8, 16), p = 1, 341 tokens). A block-causal AR transformer (MAE-style
"encoder" and "decoder" stacks of :class:`vgen.models.layers.AdaLNBlock`, RoPE per scale) turns the coarser
scales into a per-token condition ``z`` for scale k; a small flow head (:class:`vgen.models.flow_head.FlowHead`)
predicts the velocity ``v = eps - x0`` of ``x_t = (1 - t) x0 + t eps`` (t = 1 is noise, as in the official code;
the paper writes it the other way round) for all tokens of the scale at once. The input of scale k + 1 is scale
k's latent upsampled bicubically to the full grid and area-downsampled to scale k + 1 (as official).

Key names are the official ones (``class_emb``, ``z_proj``, ``z_proj_ln``, ``encoder_pos_embed_learned``,
``encoder_blocks.{i}.{attn.qkv, attn.proj, attn.rope.freqs, mlp.fc1_g/fc1_x/fc2, ada_lin.1}``, ``encoder_norm``,
``decoder_embed``, ``decoder_pos_embed_learned``, ``decoder_blocks.*``, ``decoder_norm``,
``diffusion_pos_embed_learned``, ``flownet.*``), so released FlowAR-S/L/H files load with
:func:`vgen.models.flowar_official.load_official_flowar`. The block-causal mask is recomputed (a non-persistent
buffer); the official ``mask`` buffer is dropped on load.

Beyond the official code: any scale list and patch size (config values, not constants; the RoPE reference grid
defaults to the last scale's side, official 16), CPU and GPU, class- or text-conditional (a text encoder's pooled
embedding replaces the class embedding as start token and AdaLN input; optional cross-attention to its tokens).

Generation: this model implements the velocity step (:class:`vgen.samplers.interfaces.VelocityModel`) that the
unit-wise flow loop of :mod:`vgen.samplers` drives::

    state, z_0 = model.prefill(cond)                  # AR pass of scale 0 (the start token), KV-cached
    for k in range(K):
        v = model.velocity(k, x_t, t, z_k)            # flow head, called by the integrator for every step
        ...
        z_{k+1} = model.commit(k, x_clean_k, state)   # next scale's input from the clean scale, AR pass, cached
    latents = model.tokens_to_latents(x_clean_{K-1})
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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
from vgen.models.flow_head import FLOW_HEAD_TYPES, FlowHead
from vgen.models.ar_blocks import init_encoder_decoder_stacks
from vgen.models.layers import eva_rope_table

FLOWAR_SCALES_256 = (1, 2, 4, 8, 16)


# ----------------------------------------------------------------------------------------------------------------
# Size registry
# ----------------------------------------------------------------------------------------------------------------


def flowar_size(depth: int, width: int, heads: int, flow_depth: int, flow_width: int,
                flow_head: str) -> dict[str, Any]:
    """Constructor kwargs of an official size: ``depth`` blocks in each of the two AR stacks."""
    return dict(
        encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
        decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
        flow_depth=flow_depth, flow_width=flow_width, flow_head=flow_head,
    )


#: name -> FlowAR constructor kwargs (official factories ``flowar_small/large/huge``; flow-head sizes from the
#: official README's evaluation commands). Released weights: FlowAR-S.pth, FlowAR-L.pth, FlowAR-H.pth.
FLOWAR_SIZES: dict[str, dict[str, Any]] = {
    "flowar-s": flowar_size(6, 768, 12, 2, 1024, "spatial_adaln"),
    "flowar-l": flowar_size(8, 1024, 16, 12, 1024, "cross_attention"),
    "flowar-h": flowar_size(15, 1536, 16, 12, 1536, "cross_attention"),
}

#: official evaluation settings per size (README): CFG at the last scale, guidance interval t <= value, steps
FLOWAR_SAMPLING: dict[str, dict[str, float]] = {
    "flowar-s": dict(guidance_scale=4.3, guidance_interval=0.9, num_steps=25),
    "flowar-l": dict(guidance_scale=2.4, guidance_interval=0.9, num_steps=25),
    "flowar-h": dict(guidance_scale=2.4, guidance_interval=0.7, num_steps=50),
}


def create_flowar(name: str, **overrides: Any) -> FlowAR:
    """``create_flowar("flowar-s", num_classes=10)``: a size from :data:`FLOWAR_SIZES` with keyword overrides."""
    if name not in FLOWAR_SIZES:
        raise UserError(f"unknown FlowAR size {name!r}; choose one of {', '.join(FLOWAR_SIZES)}")
    return FlowAR(**{**FLOWAR_SIZES[name], **overrides})


def check_scales(scales: Any) -> tuple[int, ...]:
    """``scales`` as a tuple of strictly increasing positive ints, or a :class:`UserError` line."""
    try:
        out = tuple(int(s) for s in scales)
    except (TypeError, ValueError):
        raise UserError(f"scales must be a list of positive integers, got {scales!r}") from None
    if not out or any(s < 1 for s in out) or any(b <= a for a, b in zip(out, out[1:])) or \
            any(float(s) != float(r) for s, r in zip(out, scales)):
        raise UserError(f"scales must be strictly increasing positive integers (e.g. 1,2,4,8,16), got {list(scales)}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Outputs and sampling state
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FlowAROutput:
    """The training pass: ``loss`` (scalar) = sum_k mean(loss_per_scale[k]) * s_k^2 / s_K^2; per scale k (lists of
    K): ``loss_per_scale[k]`` (B,), the velocity ``v[k]`` (B, s_k^2, Ct), its target and the drawn ``t[k]`` (B,);
    ``ar_condition`` (B, L, D) the AR transformer's output for every token."""

    loss: torch.Tensor
    loss_per_scale: list[torch.Tensor]
    v: list[torch.Tensor] = field(default_factory=list)
    target: list[torch.Tensor] = field(default_factory=list)
    t: list[torch.Tensor] = field(default_factory=list)
    ar_condition: torch.Tensor | None = None


@dataclass
class FlowARStepState:
    """Sampling state between scales: the KV cache of both AR stacks (encoder layers first) and the condition."""

    cache: FullKVCache
    cond: Condition


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class FlowAR(ModelMixin, ConfigMixin, ConditionedModel):
    """FlowAR generator (B: batch, L: tokens of all scales, D: AR width, Ct: channels per token = C p^2).

    Args:
        latent_channels: C of the autoencoder's latent (16 for kl16).
        patch_size: latent pixels per token side (official 1); the latent side is ``scales[-1] * patch_size``.
        scales: token-grid side of every scale, coarse to fine (official (1, 2, 4, 8, 16)).
        encoder_* / decoder_*: the two AR stacks (official widths 768 / 1024 / 1536); both stacks must have the same
            heads and head width (they share one KV cache).
        flow_depth, flow_width, flow_num_heads, flow_head: the flow head (official ``diffloss_d``, ``diffloss_w``,
            ``diffloss_w // 64`` heads, ``"spatial_adaln"`` = Block_v1 or ``"cross_attention"`` = Block_v2).
        rope_reference_side: the grid every scale's RoPE positions are normalised onto (default: the last scale's
            side; official 16).
        label_drop_prob: condition dropout in training (null class / null prompt), for CFG.
        attn_dropout, proj_dropout, drop_path_rate: regularisation of the AR stacks (official 0.1, 0.1, 0).
        conditioning, num_classes, text_embed_dim, text_cross_attn: see :mod:`vgen.models.conditioning`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        patch_size: int = 1,
        scales: tuple[int, ...] = FLOWAR_SCALES_256,
        encoder_embed_dim: int = 768,
        encoder_depth: int = 6,
        encoder_num_heads: int = 12,
        decoder_embed_dim: int = 768,
        decoder_depth: int = 6,
        decoder_num_heads: int = 12,
        mlp_ratio: float = 4.0,
        flow_depth: int = 2,
        flow_width: int = 1024,
        flow_num_heads: int | None = None,
        flow_head: str = "spatial_adaln",
        rope_reference_side: float | None = None,
        norm_eps: float = 1e-6,
        label_drop_prob: float = 0.1,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        conditioning: str = "class",
        num_classes: int = 1000,
        text_embed_dim: int | None = None,
        text_cross_attn: bool = False,
    ):
        super().__init__()
        scales = check_scales(scales)
        self._check_config(latent_channels, patch_size, encoder_embed_dim, encoder_num_heads, decoder_embed_dim,
                           decoder_num_heads, flow_width, flow_num_heads, flow_head)
        De, Dd = encoder_embed_dim, decoder_embed_dim
        self.token_channels = latent_channels * patch_size**2
        self.seq_len = sum(s * s for s in scales)
        offsets = [0]
        for s in scales:
            offsets.append(offsets[-1] + s * s)
        self.begin_ends = list(zip(offsets[:-1], offsets[1:]))
        rope_side = float(scales[-1]) if rope_reference_side is None else float(rope_reference_side)
        text_xattn = conditioning == "text" and text_cross_attn

        # condition (class_emb: num_classes + 1 rows, the last the null class) and token input
        self.init_conditioning(conditioning, De, num_classes, text_embed_dim, text_cross_attn, init_std=0.02)
        init_encoder_decoder_stacks(
            self, token_channels=self.token_channels, seq_len=self.seq_len, encoder_embed_dim=De,
            encoder_num_heads=encoder_num_heads, encoder_depth=encoder_depth, decoder_embed_dim=Dd,
            decoder_num_heads=decoder_num_heads, decoder_depth=decoder_depth, mlp_ratio=mlp_ratio,
            rope_reference_side=rope_side, norm_eps=norm_eps, attn_dropout=attn_dropout, proj_dropout=proj_dropout,
            drop_path_rate=drop_path_rate, cross_attn=text_xattn,
        )
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, Dd))
        self.flownet = FlowHead(self.token_channels, flow_width, flow_depth, Dd,
                                flow_num_heads or flow_width // 64, flow_head, mlp_ratio, rope_side)
        self.register_masks()
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.initialize_weights()

    @staticmethod
    def _check_config(latent_channels, patch_size, De, He, Dd, Hd, flow_width, flow_num_heads, flow_head) -> None:
        if latent_channels < 1 or patch_size < 1:
            raise UserError(f"latent_channels and patch_size must be >= 1, got {latent_channels}, {patch_size}")
        if flow_head not in FLOW_HEAD_TYPES:
            raise UserError(f"unknown flow_head {flow_head!r}; choose one of {', '.join(FLOW_HEAD_TYPES)}")
        for what, width, heads in (("encoder", De, He), ("decoder", Dd, Hd),
                                   ("flow head", flow_width, flow_num_heads or flow_width // 64)):
            if heads < 1 or width % heads or (width // heads) % 4:
                raise UserError(f"{what} width {width} with {heads} heads: the width must split into heads whose "
                                "width is a multiple of 4 (2-D RoPE)")
        if He != Hd or De // He != Dd // Hd:
            raise UserError(f"the encoder ({He} heads of {De // He}) and decoder ({Hd} heads of {Dd // Hd}) must have "
                            "the same number and width of heads (they share one KV cache)")

    # -- initialisation ----------------------------------------------------------------------------------------

    def register_masks(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent block-causal mask ``attn_mask`` (1, 1, L, L), True where a query may see a
        key: every token of its own scale and of the coarser ones (the official ``mask`` buffer, as booleans)."""
        scale_L = torch.cat([torch.full((s * s,), k, device=device) for k, s in enumerate(self.config.scales)])
        mask_LL = scale_L[:, None] >= scale_L[None, :]
        self.register_buffer("attn_mask", mask_LL.view(1, 1, self.seq_len, self.seq_len), persistent=False)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Official recipe: class embedding and position tables N(0, 0.02), every Linear xavier-uniform with zero
        bias (the official model applies this after building its flow head, so the head's own zero init of the
        output layer is overwritten too)."""
        if self.z_proj.weight.device.type == "meta":
            return
        tables = (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned)
        for table in tables:
            nn.init.normal_(table, std=0.02)
        if not self.is_text_conditional:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()

    # -- shapes ------------------------------------------------------------------------------------------------

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.config.scales)

    @property
    def latent_side(self) -> int:
        """Side of the latent grid the model generates: ``scales[-1] * patch_size``."""
        return self.config.scales[-1] * self.config.patch_size

    @property
    def unit_shapes(self) -> list[tuple[int, int]]:
        """One image's tokens per scale, (s_k^2, Ct): the units of the flow loop."""
        return [(s * s, self.token_channels) for s in self.config.scales]

    def check_latents(self, latents_BChw: torch.Tensor) -> None:
        """A :class:`UserError` line unless ``latents_BChw`` is (B, latent_channels, side, side)."""
        C, side = self.config.latent_channels, self.latent_side
        if latents_BChw.ndim != 4 or latents_BChw.shape[1] != C:
            raise UserError(f"FlowAR expects latents of shape (B, {C}, {side}, {side}); got "
                            f"{tuple(latents_BChw.shape)} (an autoencoder with {C} latent channels is needed)")
        if tuple(latents_BChw.shape[2:]) != (side, side):
            raise UserError(
                f"FlowAR's scales {list(self.config.scales)} (patch size {self.config.patch_size}) end at a "
                f"{side}x{side} latent, got {latents_BChw.shape[2]}x{latents_BChw.shape[3]}: choose scales ending at "
                "the latent side / patch_size, or another image resolution"
            )

    def patchify(self, x_BChw: torch.Tensor) -> torch.Tensor:
        """(B, C, s p, s p) -> tokens (B, s^2, C p^2), channels then patch pixels (official ``patchify``)."""
        p = self.config.patch_size
        return rearrange(x_BChw, "B C (h p) (w q) -> B (h w) (C p q)", p=p, q=p)

    def unpatchify(self, x_BlC: torch.Tensor) -> torch.Tensor:
        """Tokens (B, s^2, C p^2) of a square grid -> (B, C, s p, s p)."""
        p, side = self.config.patch_size, math.isqrt(x_BlC.shape[1])
        return rearrange(x_BlC, "B (h w) (C p q) -> B C (h p) (w q)", h=side, w=side, p=p, q=p)

    def tokens_to_latents(self, tokens_BlC: torch.Tensor) -> torch.Tensor:
        """The last scale's tokens (B, s_K^2, Ct) -> the latent (B, C, side, side) for the autoencoder."""
        return self.unpatchify(tokens_BlC)

    def scale_latents(self, latents_BChw: torch.Tensor) -> list[torch.Tensor]:
        """The latent at every scale, coarse to fine: ``area(latent -> s_k p)``, the last one the latent itself."""
        p = self.config.patch_size
        coarse = [F.interpolate(latents_BChw, size=(s * p, s * p), mode="area") for s in self.config.scales[:-1]]
        return coarse + [latents_BChw]

    def next_scale_input(self, k: int, latent_k_BChw: torch.Tensor) -> torch.Tensor:
        """Input tokens (B, s_{k+1}^2, Ct) of scale k + 1 from scale k's latent (B, C, s_k p, s_k p): bicubic to the
        full latent grid, then area down to scale k + 1 (official; going up and down again follows VAR)."""
        side, nxt = self.latent_side, self.config.scales[k + 1] * self.config.patch_size
        full = F.interpolate(latent_k_BChw, size=(side, side), mode="bicubic")
        return self.patchify(F.interpolate(full, size=(nxt, nxt), mode="area"))

    def rope_table(self, ks: range, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (sum of s_k^2, head_dim) of scales ``ks``: each scale its own grid (memoised)."""
        key = (ks.start, ks.stop, str(device))
        if key not in self._rope_tables:
            rope = self.encoder_blocks[0].attn.rope if len(self.encoder_blocks) else self.decoder_blocks[0].attn.rope
            tables = [eva_rope_table(rope.freqs.float(), self.config.scales[k], None, rope.reference_side) for k in ks]
            self._rope_tables[key] = (torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables]))
        return self._rope_tables[key]

    # -- the AR transformer ------------------------------------------------------------------------------------

    def _start_tokens(self, cond: Condition) -> torch.Tensor:
        """Scale 0's input (B, s_0^2, D): the condition embedding (official: the class embedding as token 0)."""
        n = self.config.scales[0] ** 2
        return cond.cond_BD.unsqueeze(1).expand(-1, n, -1).to(self.z_proj.weight.dtype)

    def _ar_pass(self, x_BlD: torch.Tensor, cond: Condition, ks: range, mask: torch.Tensor | None = None,
                 cache: FullKVCache | None = None) -> torch.Tensor:
        """Embedded input tokens of scales ``ks`` (B, l, D) -> their AR condition z (B, l, Dd): encoder stack (after
        the position table and ``z_proj_ln``), ``decoder_embed``, decoder stack, ``decoder_norm`` + diffusion
        position table. Training: all scales, ``mask`` block-causal. Sampling: one scale, keys/values to ``cache``."""
        start, end = self.begin_ends[ks.start][0], self.begin_ends[ks.stop - 1][1]
        rope = self.rope_table(ks, x_BlD.device)
        cond_BD = cond.cond_BD.to(x_BlD.dtype)
        ctx = dict(context_BTC=cond.context_BTC, context_mask_BT=cond.context_mask_BT)
        x_BlD = self.z_proj_ln(x_BlD + self.encoder_pos_embed_learned[:, start:end])
        for i, block in enumerate(self.encoder_blocks):
            x_BlD = block(x_BlD, cond_BD, rope, mask, cache, i, **ctx)
        x_BlD = self.decoder_embed(self.encoder_norm(x_BlD)) + self.decoder_pos_embed_learned[:, start:end]
        first = len(self.encoder_blocks)
        for j, block in enumerate(self.decoder_blocks):
            x_BlD = block(x_BlD, cond_BD, rope, mask, cache, first + j, **ctx)
        return self.decoder_norm(x_BlD) + self.diffusion_pos_embed_learned[:, start:end]

    def teacher_forcing_input(self, scale_latents: list[torch.Tensor]) -> torch.Tensor:
        """Input tokens (B, L - s_0^2, Ct) of scales 1..K-1 from the ground-truth latents of scales 0..K-2."""
        return torch.cat([self.next_scale_input(k, lat) for k, lat in enumerate(scale_latents[:-1])], dim=1)

    def ar_condition(self, ar_input_BlC: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Teacher-forced AR condition z (B, L, Dd) of every token from the inputs of scales 1..K-1 (B, L - s_0^2,
        Ct) (:meth:`teacher_forcing_input`), under the block-causal mask."""
        x_BLD = torch.cat((self._start_tokens(cond), self.z_proj(ar_input_BlC.to(self.z_proj.weight.dtype))), dim=1)
        return self._ar_pass(x_BLD, cond, range(len(self.config.scales)), mask=self.attn_mask)

    def flow_velocity(self, x_t_BlC: torch.Tensor, t_B: torch.Tensor, z_BlD: torch.Tensor) -> torch.Tensor:
        """The flow head: velocity (B, s^2, Ct) of one scale's tokens ``x_t`` at times ``t_B`` (B,)."""
        return self.flownet(x_t_BlC, t_B, z_BlD)

    # -- training ----------------------------------------------------------------------------------------------

    def forward(
        self,
        latents_BChw: torch.Tensor,
        label_B: torch.Tensor | None = None,
        cond: Condition | None = None,
        t_per_scale: list[torch.Tensor] | None = None,
        noise_per_scale: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> FlowAROutput:
        """The flow-matching training pass (official ``FlowAR.forward``).

        Args:
            latents_BChw: scaled autoencoder latents (B, C, side, side).
            label_B / cond: class labels (B,) or a condition (text models: :meth:`text_condition`).
            t_per_scale, noise_per_scale: the times (B,) and noise (B, s_k^2, Ct) of every scale (default: drawn,
                per scale ``t ~ U(0, 1)`` per image, then ``eps ~ N(0, 1)``, from ``generator`` or the global RNG).
        In training mode rows are replaced by the null condition with probability ``label_drop_prob``.
        """
        self.check_latents(latents_BChw)
        B = latents_BChw.shape[0]
        if cond is None:
            if label_B is None:
                raise ValueError("pass label_B (class model) or cond")
            cond = self.class_condition(label_B)
        if self.training and self.config.label_drop_prob > 0:
            drop_B = torch.rand(B, device=latents_BChw.device, generator=generator) < self.config.label_drop_prob
            cond = self.drop_condition(cond, drop_B)
        latents_BChw = latents_BChw.float()
        scale_latents = self.scale_latents(latents_BChw)
        z_BLD = self.ar_condition(self.teacher_forcing_input(scale_latents), cond)

        scales, out = self.config.scales, FlowAROutput(loss=latents_BChw.new_zeros(()), loss_per_scale=[])
        for k, (lat, (start, end)) in enumerate(zip(scale_latents, self.begin_ends)):
            x0 = self.patchify(lat)
            if t_per_scale is not None:
                t_B = t_per_scale[k].to(x0)
            else:
                t_B = torch.rand(B, device=x0.device, generator=generator, dtype=x0.dtype)
            if noise_per_scale is not None:
                noise = noise_per_scale[k].to(x0)
            else:
                noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
            t_B11 = t_B[:, None, None]
            x_t = (1 - t_B11) * x0 + t_B11 * noise
            target = noise - x0
            v = self.flow_velocity(x_t, t_B, z_BLD[:, start:end]).float()
            loss_B = (v - target).pow(2).mean(dim=(1, 2))
            out.loss = out.loss + loss_B.mean() / scales[-1] ** 2 * scales[k] ** 2
            out.loss_per_scale.append(loss_B)
            out.v.append(v)
            out.target.append(target)
            out.t.append(t_B)
        out.ar_condition = z_BLD
        return out

    # -- velocity step interface (vgen.samplers.interfaces.VelocityModel) --------------------------------------

    def prefill(self, cond: Condition) -> tuple[FlowARStepState, torch.Tensor]:
        """A fresh KV cache and the AR condition z_0 (B, s_0^2, Dd) of scale 0 (its keys/values committed)."""
        B = cond.cond_BD.shape[0]
        attn = (self.encoder_blocks[0] if len(self.encoder_blocks) else self.decoder_blocks[0]).attn
        cache = FullKVCache(num_layers=len(self.encoder_blocks) + len(self.decoder_blocks), batch=B,
                            heads=attn.num_heads, head_dim=attn.head_dim, capacity=self.seq_len,
                            dtype=self.z_proj.weight.dtype, device=self.z_proj.weight.device)
        state = FlowARStepState(cache, cond)
        z_BlD = self._ar_pass(self._start_tokens(cond), cond, range(1), cache=cache)
        cache.commit()
        return state, z_BlD

    def velocity(self, k: int, x_t_BlC: torch.Tensor, t_B: torch.Tensor, z_BlD: torch.Tensor) -> torch.Tensor:
        """Velocity (B, s_k^2, Ct) float32 of scale ``k``'s tokens at times ``t_B`` (B,); the cache is untouched."""
        return self.flow_velocity(x_t_BlC, t_B, z_BlD).float()

    def commit(self, k: int, x_clean_BlC: torch.Tensor, state: FlowARStepState) -> torch.Tensor:
        """Scale ``k`` is finished (clean tokens (B, s_k^2, Ct)): build scale k + 1's input from it, run its AR pass
        over the cache of scales <= k, commit it and return its condition z (B, s_{k+1}^2, Dd)."""
        if k + 1 >= len(self.config.scales):
            raise ValueError(f"scale {k} is the last one; there is no scale {k + 1} to condition")
        latent_k = self.unpatchify(x_clean_BlC.to(self.z_proj.weight.dtype))
        x_BlD = self.z_proj(self.next_scale_input(k, latent_k))
        z_BlD = self._ar_pass(x_BlD, state.cond, range(k + 1, k + 2), cache=state.cache)
        state.cache.commit()
        return z_BlD
