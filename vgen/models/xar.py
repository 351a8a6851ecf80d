"""xAR: next-X prediction with flow matching (Ren et al., "Beyond Next-Token: Next-X Prediction", 2025), on continuous
KL latents.

The latent (B, C, H, W) (``C`` = 16 for MAR's kl16, scaled by the autoencoder's ``scale_factor``) is cut into a
``grid`` x ``grid`` token grid (``patch_size`` latent pixels per token side; official 16 x 16, p = 1) and the tokens
are regrouped into AR units by the entity X (:mod:`vgen.models.xar_entities`; official: 2 x 2 cells of 8 x 8 tokens).
There is no separate head: the whole transformer (MAE-style "encoder" and "decoder" stacks of
:class:`vgen.models.ar_blocks.AdaLNBlock`, FlowAR's block, here with one RoPE table over the grid re-ordered into
sequence order) is the velocity network, and ``pred`` maps every token to its velocity ``v = eps - x0`` of
``x_t = (1 - t) x0 + t eps`` (t = 1 is noise, as official). Each unit has its own time: its AdaLN condition is
``class_emb(y) + time_embed((1000 t_unit).long())`` through every block's ``ada_lin``, and attention is block-causal
over units (full inside a unit).

Training is Noisy Context Learning (official ``xAR.forward``): one ``t ~ sigmoid(N(0, 1))`` per (image, unit), every
unit noised and denoised at once under the unit-causal mask, so the context a unit sees is the *noisy* previous
units; MSE over every token; labels dropped to the null class with probability ``label_drop_prob``.

Key names are the official ones (``class_emb``, ``time_embed.mlp.{0,2}``, ``z_proj``, ``z_proj_ln``,
``encoder_pos_embed_learned``, ``encoder_blocks.{i}.{attn.qkv, attn.proj, attn.rope.freqs, mlp.fc1_g/fc1_x/fc2,
ada_lin.1}``, ``encoder_norm``, ``decoder_embed``, ``decoder_pos_embed_learned``, ``decoder_blocks.*``,
``decoder_norm``, ``pred``), so released xAR-B/L/H files load with :func:`vgen.models.xar_official.load_official_xar`.
The official buffers ``mask`` and ``*.rope.freqs_cos/_sin`` are recomputed (non-persistent) from the entity.

Beyond the official code: the entity is a parameter (cells of any side dividing the grid, single tokens, dilated
subsample groups, the whole image), any grid, patch size and latent channel count, CPU and GPU, class- or
text-conditional (see :mod:`vgen.models.conditioning`).

Generation implements the velocity step (:class:`vgen.samplers.interfaces.VelocityModel`) that the shared unit-wise
flow loop (:func:`vgen.samplers.flow_units.generate_flow_units`) drives::

    state, state = model.prefill(cond)              # a fresh KV cache
    for u in range(U):
        v = model.velocity(u, x_t, t, state)         # unit u at time t attends to the clean units < u (not stored)
        ...
        state = model.commit(u, x_clean_u, state)    # the clean unit (t = 0) refreshes the cache
    latents = model.units_to_latents(units)

Official xAR writes the clean unit u in the same forward pass as the first noisy step of unit u + 1 (its input is
``[clean unit u, noisy unit u + 1]`` with the mask); ``commit`` runs that clean half as its own pass over the same
cache, which attends to the same keys and gives the same keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from vgen.errors import UserError
from vgen.kv_cache import FullKVCache
from vgen.models.ar_blocks import init_encoder_decoder_stacks
from vgen.models.conditioning import Condition, ConditionedModel
from vgen.models.layers import TimestepEmbedder, eva_rope_table
from vgen.models.xar_entities import EntityLayout, entity_layout

# ----------------------------------------------------------------------------------------------------------------
# Size registry
# ----------------------------------------------------------------------------------------------------------------


def xar_size(depth: int, width: int, heads: int) -> dict[str, Any]:
    """Constructor kwargs of an official size: ``depth`` blocks in each of the two stacks."""
    return dict(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
                decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads)


#: name -> XAR constructor kwargs (official factories ``xar_base/large/huge``). Released: xAR-B/L/H.pth.
XAR_SIZES: dict[str, dict[str, Any]] = {
    "xar-b": xar_size(8, 768, 12),
    "xar-l": xar_size(16, 1024, 16),
    "xar-h": xar_size(20, 1280, 16),
}

#: official evaluation settings per size (README): CFG at the last cell, SDE steps per cell
XAR_SAMPLING: dict[str, dict[str, float]] = {
    "xar-b": dict(guidance_scale=2.7, num_steps=40),
    "xar-l": dict(guidance_scale=2.3, num_steps=50),
    "xar-h": dict(guidance_scale=2.2, num_steps=50),
}


def create_xar(name: str, **overrides: Any) -> XAR:
    """``create_xar("xar-b", num_classes=10)``: a size from :data:`XAR_SIZES` with keyword overrides."""
    if name not in XAR_SIZES:
        raise UserError(f"unknown xAR size {name!r}; choose one of {', '.join(XAR_SIZES)}")
    return XAR(**{**XAR_SIZES[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Outputs and sampling state
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class XAROutput:
    """The training pass: ``loss`` (scalar, MSE over every token), ``v`` (B, L, Ct) the velocity of every token in
    sequence order, its ``target``, and ``t`` (B, U) the time of every (image, unit)."""

    loss: torch.Tensor
    v: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor


@dataclass
class XARStepState:
    """Sampling state: the KV cache of both stacks (encoder layers first; holds the clean units so far) and the
    condition of the R rows."""

    cache: FullKVCache
    cond: Condition


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class XAR(ModelMixin, ConfigMixin, ConditionedModel):
    """xAR generator (B: batch, L: tokens = grid^2, U: units, D: width, Ct: channels per token = C p^2).

    Args:
        latent_channels: C of the autoencoder's latent (16 for kl16).
        patch_size: latent pixels per token side (official 1); the latent side is ``grid_size * patch_size``.
        grid_size: tokens per side (official 16 for 256 px).
        entity, entity_size: the prediction entity X (:func:`vgen.models.xar_entities.entity_layout`; official
            ``"cell"``, 8).
        encoder_* / decoder_*: the two stacks (official widths 768 / 1024 / 1280); both must have the same heads and
            head width (they share one KV cache).
        label_drop_prob: condition dropout in training (null class / null prompt), for CFG.
        attn_dropout, proj_dropout, drop_path_rate: regularisation (official training 0.1, 0.1, 0).
        conditioning, num_classes, text_embed_dim, text_cross_attn: see :mod:`vgen.models.conditioning`.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        patch_size: int = 1,
        grid_size: int = 16,
        entity: str = "cell",
        entity_size: int | None = 8,
        encoder_embed_dim: int = 768,
        encoder_depth: int = 8,
        encoder_num_heads: int = 12,
        decoder_embed_dim: int = 768,
        decoder_depth: int = 8,
        decoder_num_heads: int = 12,
        mlp_ratio: float = 4.0,
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
        self._check_config(latent_channels, patch_size, encoder_embed_dim, encoder_num_heads, decoder_embed_dim,
                           decoder_num_heads)
        self.layout: EntityLayout = entity_layout(entity, grid_size, entity_size)
        De, Dd = encoder_embed_dim, decoder_embed_dim
        self.token_channels = latent_channels * patch_size**2
        self.seq_len = self.layout.seq_len
        text_xattn = conditioning == "text" and text_cross_attn

        self.init_conditioning(conditioning, De, num_classes, text_embed_dim, text_cross_attn, init_std=0.02)
        self.time_embed = TimestepEmbedder(De)
        # rope_reference_side=None: integer grid positions (official pt_seq_len = grid = 16)
        init_encoder_decoder_stacks(
            self, token_channels=self.token_channels, seq_len=self.seq_len, encoder_embed_dim=De,
            encoder_num_heads=encoder_num_heads, encoder_depth=encoder_depth, decoder_embed_dim=Dd,
            decoder_num_heads=decoder_num_heads, decoder_depth=decoder_depth, mlp_ratio=mlp_ratio,
            rope_reference_side=None, norm_eps=norm_eps, attn_dropout=attn_dropout, proj_dropout=proj_dropout,
            drop_path_rate=drop_path_rate, cross_attn=text_xattn,
        )
        self.pred = nn.Linear(Dd, self.token_channels)
        self.register_layout_buffers()
        self.initialize_weights()

    @staticmethod
    def _check_config(latent_channels, patch_size, De, He, Dd, Hd) -> None:
        if latent_channels < 1 or patch_size < 1:
            raise UserError(f"latent_channels and patch_size must be >= 1, got {latent_channels}, {patch_size}")
        for what, width, heads in (("encoder", De, He), ("decoder", Dd, Hd)):
            if heads < 1 or width % heads or (width // heads) % 4:
                raise UserError(f"{what} width {width} with {heads} heads: the width must split into heads whose "
                                "width is a multiple of 4 (2-D RoPE)")
        if He != Hd or De // He != Dd // Hd:
            raise UserError(f"the encoder ({He} heads of {De // He}) and decoder ({Hd} heads of {Dd // Hd}) must have "
                            "the same number and width of heads (they share one KV cache)")

    # -- initialisation ----------------------------------------------------------------------------------------

    def register_layout_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers of the entity: ``attn_mask`` (1, 1, L, L) bool (the official
        ``mask``), ``unit_index`` (L,) the unit of every sequence position, and ``rope_cos`` / ``rope_sin``
        (L, head_dim): the grid's RoPE table re-ordered into sequence order (the official ``freqs_cos/_sin``)."""
        L = self.seq_len
        self.register_buffer("attn_mask", self.layout.block_causal_mask(device).view(1, 1, L, L), persistent=False)
        self.register_buffer("unit_index", self.layout.unit_L.to(device), persistent=False)
        blocks = [*self.encoder_blocks, *self.decoder_blocks]
        if blocks and blocks[0].attn.rope.freqs.device.type != "meta":
            freqs = blocks[0].attn.rope.freqs.float().to(device)
            cos, sin = eva_rope_table(freqs, self.layout.grid)
            order = self.layout.order_L.to(freqs.device)
            self.register_buffer("rope_cos", cos[order], persistent=False)
            self.register_buffer("rope_sin", sin[order], persistent=False)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Official recipe: class embedding and position tables N(0, 0.02), every Linear xavier-uniform, zero bias."""
        if self.z_proj.weight.device.type == "meta":
            return
        for table in (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned):
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
    def latent_side(self) -> int:
        return self.config.grid_size * self.config.patch_size

    @property
    def unit_shapes(self) -> list[tuple[int, int]]:
        """One image's tokens per unit, (n_u, Ct): the units of the flow loop."""
        return [(n, self.token_channels) for n in self.layout.unit_sizes]

    def check_latents(self, latents_BChw: torch.Tensor) -> None:
        """A :class:`UserError` line unless ``latents_BChw`` is (B, latent_channels, side, side)."""
        C, side = self.config.latent_channels, self.latent_side
        if latents_BChw.ndim != 4 or latents_BChw.shape[1] != C:
            raise UserError(f"xAR expects latents of shape (B, {C}, {side}, {side}); got {tuple(latents_BChw.shape)} "
                            f"(an autoencoder with {C} latent channels is needed)")
        if tuple(latents_BChw.shape[2:]) != (side, side):
            h, w = latents_BChw.shape[2:]
            raise UserError(f"this xAR model generates a {side}x{side} latent ({self.config.grid_size} tokens per "
                            f"side, patch {self.config.patch_size}), got {h}x{w}: use the image resolution it was "
                            "built for")

    def latents_to_sequence(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        """(B, C, side, side) -> tokens (B, L, C p^2) in sequence order (official ``clusterify``, cells joined)."""
        p = self.config.patch_size
        raster = rearrange(latents_BChw, "B C (h p) (w q) -> B (h w) (C p q)", p=p, q=p)
        return self.layout.to_sequence(raster)

    def sequence_to_latents(self, seq_BLC: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, C p^2) in sequence order -> the latent (B, C, side, side) (official ``unclusterify``)."""
        p, n = self.config.patch_size, self.config.grid_size
        raster = self.layout.to_raster(seq_BLC)
        return rearrange(raster, "B (h w) (C p q) -> B C (h p) (w q)", h=n, w=n, p=p, q=p)

    def units_to_latents(self, units: list[torch.Tensor]) -> torch.Tensor:
        """The generated units, each (B, n_u, Ct), in AR order -> the latent (B, C, side, side)."""
        return self.sequence_to_latents(torch.cat(units, dim=1))

    # -- the transformer ---------------------------------------------------------------------------------------

    def unit_condition(self, cond: Condition, t_BU: torch.Tensor) -> torch.Tensor:
        """AdaLN input per (row, unit), (B, U, D): the condition plus ``time_embed((1000 t).long())`` (official: the
        integer truncation of the float32 product)."""
        t_emb = self.time_embed((t_BU.float() * 1000).long().flatten()).view(*t_BU.shape, -1)
        return cond.cond_BD.to(t_emb.dtype).unsqueeze(1) + t_emb

    def transformer(
        self,
        x_BlC: torch.Tensor,
        cond_BuD: torch.Tensor,
        start: int,
        cond: Condition,
        cond_index: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: FullKVCache | None = None,
        store: bool = True,
    ) -> torch.Tensor:
        """Velocity (B, l, Ct) of the tokens ``x_BlC`` (B, l, Ct) at sequence positions ``start : start + l``.

        ``cond_BuD``: (B, u, D) AdaLN inputs, token j using ``cond_BuD[:, cond_index[j]]`` (or (B, 1, D) for all);
        ``cond``: the text context for cross-attention models. Training: all tokens, ``mask`` unit-causal. Sampling:
        one unit; its keys/values go to ``cache`` (``store=False``: attended, not kept).
        """
        end = start + x_BlC.shape[1]
        rope = (self.rope_cos[start:end], self.rope_sin[start:end])
        ctx = dict(context_BTC=cond.context_BTC, context_mask_BT=cond.context_mask_BT)
        cond_BuD = cond_BuD.to(self.z_proj.weight.dtype)
        x = self.z_proj(x_BlC.to(self.z_proj.weight.dtype))
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, start:end])
        for i, block in enumerate(self.encoder_blocks):
            x = block(x, cond_BuD, rope, mask, cache, i, cond_index=cond_index, store=store, **ctx)
        x = self.decoder_embed(self.encoder_norm(x)) + self.decoder_pos_embed_learned[:, start:end]
        first = len(self.encoder_blocks)
        for j, block in enumerate(self.decoder_blocks):
            x = block(x, cond_BuD, rope, mask, cache, first + j, cond_index=cond_index, store=store, **ctx)
        return self.pred(self.decoder_norm(x))

    def masked_velocity(self, x_t_BLC: torch.Tensor, t_BU: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The full masked forward: velocity (B, L, Ct) float32 of every token of the noisy sequence ``x_t_BLC``
        (sequence order), unit u at time ``t_BU[:, u]``, under the unit-causal mask (training and reference)."""
        return self.transformer(x_t_BLC, self.unit_condition(cond, t_BU), 0, cond, cond_index=self.unit_index,
                                mask=self.attn_mask).float()

    # -- training ----------------------------------------------------------------------------------------------

    def sample_unit_times(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
                          ) -> torch.Tensor:
        """Official NCL times: ``sigmoid(N(0, 1))``, one per (image, unit), (B, U) float32."""
        z = torch.randn(batch_size, self.layout.num_units, device=device, generator=generator)
        return torch.sigmoid(z)

    def forward(
        self,
        latents_BChw: torch.Tensor,
        label_B: torch.Tensor | None = None,
        cond: Condition | None = None,
        t_BU: torch.Tensor | None = None,
        noise_BLC: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> XAROutput:
        """Noisy Context Learning (official ``xAR.forward``).

        Args:
            latents_BChw: scaled autoencoder latents (B, C, side, side).
            label_B / cond: class labels (B,) or a condition (text models: :meth:`text_condition`).
            t_BU: time of every (image, unit) (default :meth:`sample_unit_times`); noise_BLC: (B, L, Ct) in sequence
                order (default ``N(0, 1)``), both from ``generator`` or the global RNG.
        In training mode rows are replaced by the null condition with probability ``label_drop_prob``.
        """
        self.check_latents(latents_BChw)
        B, device = latents_BChw.shape[0], latents_BChw.device
        if cond is None:
            if label_B is None:
                raise ValueError("pass label_B (class model) or cond")
            cond = self.class_condition(label_B)
        if self.training and self.config.label_drop_prob > 0:
            drop_B = torch.rand(B, device=device, generator=generator) < self.config.label_drop_prob
            cond = self.drop_condition(cond, drop_B)
        x0 = self.latents_to_sequence(latents_BChw.float())
        t_BU = self.sample_unit_times(B, device, generator) if t_BU is None else t_BU.to(x0)
        if noise_BLC is None:
            noise_BLC = torch.randn(x0.shape, device=device, generator=generator, dtype=x0.dtype)
        t_BL1 = t_BU[:, self.unit_index.to(device)].unsqueeze(-1)
        x_t = (1 - t_BL1) * x0 + t_BL1 * noise_BLC.to(x0)
        target = noise_BLC.to(x0) - x0
        v = self.masked_velocity(x_t, t_BU, cond)
        return XAROutput(loss=(v - target).pow(2).mean(), v=v, target=target, t=t_BU)

    # -- velocity step interface (vgen.samplers.interfaces.VelocityModel) --------------------------------------

    def prefill(self, cond: Condition) -> tuple[XARStepState, XARStepState]:
        """A fresh KV cache for ``cond``'s rows; the state is also the units' condition."""
        attn = (self.encoder_blocks[0] if len(self.encoder_blocks) else self.decoder_blocks[0]).attn
        cache = FullKVCache(num_layers=len(self.encoder_blocks) + len(self.decoder_blocks), batch=cond.batch_size,
                            heads=attn.num_heads, head_dim=attn.head_dim, capacity=self.seq_len,
                            dtype=self.z_proj.weight.dtype, device=self.z_proj.weight.device)
        state = XARStepState(cache, cond)
        return state, state

    def velocity(self, k: int, x_t_BlC: torch.Tensor, t_B: torch.Tensor, state: XARStepState) -> torch.Tensor:
        """Velocity (R, n_k, Ct) float32 of unit ``k`` at times ``t_B`` (R,), attending to the clean units < k in the
        cache; nothing is stored."""
        start = self.layout.unit_bounds[k][0]
        if state.cache.seq_len != start:
            raise ValueError(f"unit {k} needs the {k} units before it in the cache, it holds {state.cache.seq_len} "
                             "tokens: commit each unit before the next")
        cond_B1D = self.unit_condition(state.cond, t_B[:, None])
        return self.transformer(x_t_BlC, cond_B1D, start, state.cond, cache=state.cache, store=False).float()

    def velocity_window(self, ks: Sequence[int], x_t_BlC: Sequence[torch.Tensor], t_B: torch.Tensor,
                        states: Sequence[XARStepState]) -> list[torch.Tensor]:
        """Velocities (R, n_k, Ct) float32 of the consecutive units ``ks`` in one pass (CSpD's windowed
        verification): ``x_t_BlC[j]`` (R, n_k, Ct) at time ``t_B`` (R,), unit ``ks[j]`` attending to the clean units
        before it in the cache and to its own tokens only, which is what :meth:`velocity` gives it when the cache
        holds exactly the units before it. The cache must hold the units < ``ks[-1]`` (e.g. speculatively committed
        drafts); ``states``: each unit's condition (one state here); nothing is stored."""
        ks = list(ks)
        if not ks or ks != list(range(ks[0], ks[0] + len(ks))) or len(x_t_BlC) != len(ks):
            raise ValueError(f"velocity_window needs consecutive units and one input each, got units {ks} and "
                             f"{len(x_t_BlC)} inputs")
        state, bounds = states[-1], self.layout.unit_bounds
        history = state.cache.seq_len
        if history != bounds[ks[-1]][0]:
            raise ValueError(f"units {ks[0]}..{ks[-1]} need the {ks[-1]} units before the last in the cache, it holds "
                             f"{history} tokens")
        sizes = [x.shape[1] for x in x_t_BlC]
        unit_N = torch.cat([torch.full((n,), j) for j, n in enumerate(sizes)])  # each step token's unit in ks
        unit_start_N = torch.tensor([bounds[k][0] for k in ks])[unit_N]
        sees_history_NT = torch.arange(history)[None, :] < unit_start_N[:, None]
        sees_step_NN = unit_N[:, None] == unit_N[None, :]
        visible = torch.cat([sees_history_NT, sees_step_NN], dim=1)
        cond_B1D = self.unit_condition(state.cond, t_B[:, None])
        v = self.transformer(torch.cat(list(x_t_BlC), dim=1), cond_B1D, bounds[ks[0]][0], state.cond, mask=visible,
                             cache=state.cache, store=False).float()
        return list(v.split(sizes, dim=1))

    def commit(self, k: int, x_clean_BlC: torch.Tensor, state: XARStepState) -> XARStepState:
        """Unit ``k`` is finished (clean tokens (R, n_k, Ct)): its clean pass (t = 0, attending to the units before
        it) writes its keys/values to the cache, which is committed (official: the refresh at the first step of the
        next unit)."""
        start = self.layout.unit_bounds[k][0]
        t_B = torch.zeros(x_clean_BlC.shape[0], device=x_clean_BlC.device)
        self.transformer(x_clean_BlC, self.unit_condition(state.cond, t_B[:, None]), start, state.cond,
                         cache=state.cache, store=True)
        state.cache.commit()
        return state
