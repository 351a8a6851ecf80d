"""Single-scale VQ tokenizer in LlamaGen's VQ-16 layout: an image becomes one ``h x w`` map of code ids, read in
raster order by next-token generators.

An image ``(B, 3, H, W)`` in [-1, 1] is encoded to ``(B, z_channels, h, w)`` (``h = H / downsample``; 16 for the
released ``vq_ds16_c2i``), a 1x1 ``quant_conv`` maps it to the code dimension D, and each of the ``h*w`` vectors takes
its nearest codebook entry. With ``codebook_l2_norm`` (LlamaGen's default) vectors and codes are l2-normalised first,
so the nearest code is the one with the highest cosine similarity and the decoder sees unit vectors. The ids of an
image are ``idx_BL`` (B, h*w) in raster order (row by row), the order LlamaGen's GPT reads them.

The module and buffer names reproduce FoundationVision/LlamaGen's ``VQModel`` state-dict keys
(``encoder.conv_blocks.{i}.res.{j}``, ``encoder.mid.{0,1,2}``, separate ``q``/``k``/``v`` attention convs,
``quantize.embedding.weight``, the usage buffer ``quantize.codebook_used``), so the released ``vq_ds16_c2i.pt``
loads key for key (:func:`load_official_llamagen_vq`), and the lookup uses the official distance formula so ids match
the official ones. The training path (straight-through estimator, LlamaGen's codebook + commitment losses, usage
statistics, dead-code restart) is part of the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from vgen.checkpoints import check_state_dict, read_state_dict
from vgen.errors import UserError

from .checks import check_image_batch
from .codebook import broadcast_from_rank0_, is_distributed, replace_codes_, usage_percent_from_counts
from .vq_autoencoder_blocks import Decoder, Encoder

#: LlamaGen's usage buffer length: the ids of the last 65536 quantized vectors
USAGE_WINDOW = 65536


class VQEncoding(NamedTuple):
    """What :meth:`SingleScaleVQModel.encode` returns: ``idx`` (B, h*w) LongTensor of code ids in raster order and
    ``quant`` (B, D, h, w) the quantized latent (the codes the decoder sees)."""

    idx: torch.Tensor
    quant: torch.Tensor


class VectorQuantizer(nn.Module):
    """LlamaGen's ``VectorQuantizer``: one codebook (V, D); the nearest code by L2 distance, on l2-normalised vectors
    when ``l2_norm``.

    Buffer ``codebook_used`` (``usage_window``,): the ids of the most recent quantized training vectors (a ring,
    newest last; -1 marks an empty slot in a fresh model, the official files start from zeros). Usage statistics
    and dead-code restarts read it; it is saved with the model.
    """

    def __init__(self, vocab_size: int, codebook_dim: int, beta: float = 0.25, l2_norm: bool = True,
                 usage_window: int = USAGE_WINDOW):
        super().__init__()
        self.vocab_size = vocab_size
        self.codebook_dim = codebook_dim
        self.beta = beta
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(vocab_size, codebook_dim)
        with torch.no_grad():  # the official init: tiny uniform codes, normalised when l2_norm
            self.embedding.weight.uniform_(-1.0 / vocab_size, 1.0 / vocab_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        self.register_buffer("codebook_used", torch.full((usage_window,), -1.0))

    def extra_repr(self) -> str:
        return f"V={self.vocab_size}, D={self.codebook_dim}, l2_norm={self.l2_norm}, beta={self.beta}"

    def codebook(self) -> torch.Tensor:
        """(V, D) the codes as the quantizer uses them (l2-normalised when ``l2_norm``), with gradient."""
        weight_VD = self.embedding.weight
        return F.normalize(weight_VD, p=2, dim=-1) if self.l2_norm else weight_VD

    def _prepare(self, z_ND: torch.Tensor) -> torch.Tensor:
        return F.normalize(z_ND, p=2, dim=-1) if self.l2_norm else z_ND

    @torch.no_grad()
    def nearest_code(self, z_ND: torch.Tensor, codebook_VD: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) prepared (normalised) vectors -> (N,) ids of the nearest codes, computed as the official code does
        (``|z|^2 + |e|^2 - 2 z.e``) so ties resolve the same way."""
        codebook_VD = self.codebook() if codebook_VD is None else codebook_VD
        dist_NV = (
            torch.sum(z_ND**2, dim=1, keepdim=True) + torch.sum(codebook_VD**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_ND, torch.einsum("n d -> d n", codebook_VD))
        )
        return torch.argmin(dist_NV, dim=1)

    def lookup(self, idx_BL: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Code ids (B, h*w) raster order -> quantized latent (B, D, h, w)."""
        h, w = grid_hw
        return rearrange(self.codebook()[idx_BL], "b (h w) d -> b d h w", h=h, w=w)

    def forward(self, z_BDhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Quantize ``z_BDhw`` (B, D, h, w). Returns ``(quant, vq_loss, idx_BL, usage %)``: ``quant`` (B, D, h, w)
        carries the straight-through gradient to ``z``; ``vq_loss`` is LlamaGen's codebook loss
        ``mse(e, sg[z]) + beta * mse(sg[e], z)`` on the prepared vectors (a zero tensor in eval mode); in training
        mode the ids are recorded in ``codebook_used`` (gathered over ranks under torch.distributed)."""
        B, _, h, w = z_BDhw.shape
        with torch.autocast(device_type=z_BDhw.device.type, enabled=False):
            z_BhwD = self._prepare(rearrange(z_BDhw.float(), "b d h w -> b h w d"))
            codebook_VD = self.codebook()
            idx_N = self.nearest_code(z_BhwD.reshape(-1, self.codebook_dim).detach(), codebook_VD.detach())
            zq_BhwD = codebook_VD[idx_N].view(z_BhwD.shape)
            vq_loss = z_BhwD.new_zeros(())
            if self.training:
                self._record_usage(idx_N)
                vq_loss = F.mse_loss(zq_BhwD, z_BhwD.detach()) + self.beta * F.mse_loss(zq_BhwD.detach(), z_BhwD)
            quant_BhwD = z_BhwD + (zq_BhwD - z_BhwD).detach()
        return rearrange(quant_BhwD, "b h w d -> b d h w"), vq_loss, idx_N.view(B, h * w), self.usage_percent()

    # ----------------------------------------------------------------------------------------------- usage
    @torch.no_grad()
    def _record_usage(self, idx_N: torch.Tensor) -> None:
        if is_distributed():  # every rank records every rank's ids, in rank order, so the rings stay equal
            gathered = [torch.empty_like(idx_N) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, idx_N)
            idx_N = torch.cat(gathered)
        window = self.codebook_used.numel()
        idx_N = idx_N[-window:].to(self.codebook_used)
        n = idx_N.numel()
        self.codebook_used.copy_(torch.cat((self.codebook_used[n:], idx_N)))

    def usage_counts(self) -> tuple[torch.Tensor, int]:
        """``(counts (V,), tokens)``: how often each code appears in the usage window, and how many ids it holds."""
        recorded = self.codebook_used[self.codebook_used >= 0].long()
        return torch.bincount(recorded, minlength=self.vocab_size)[: self.vocab_size].float(), int(recorded.numel())

    def usage_percent(self, margin_ratio: float = 0.08) -> float:
        """Percent of codes seen at least ``margin_ratio`` times the uniform rate in the usage window (the rule
        VAR's tokenizer reports; with LlamaGen's 16384 codes and 65536 ids it means "seen at least once")."""
        counts_V, tokens = self.usage_counts()
        return usage_percent_from_counts(counts_V, tokens, margin_ratio) if tokens else 0.0

    @torch.no_grad()
    def restart_dead_codes(self, samples_ND: torch.Tensor, threshold: float,
                           generator: torch.Generator | None = None) -> int:
        """Re-initialise every code seen fewer than ``threshold`` x the uniform rate in the usage window with a random
        row of ``samples_ND`` (N, D) (prepared latent vectors). Rank 0's codebook is broadcast. Returns the number of
        codes restarted (0 while the window is empty)."""
        counts_V, tokens = self.usage_counts()
        restarted = 0
        if tokens:
            dead_V = counts_V < threshold * tokens / self.vocab_size
            restarted = replace_codes_(self.embedding.weight.data, dead_V, samples_ND, generator)
        broadcast_from_rank0_(self.embedding.weight.data)
        return restarted


class SingleScaleVQModel(ModelMixin, ConfigMixin):
    """LlamaGen's VQ tokenizer: LDM-style encoder/decoder in LlamaGen's key layout, 1x1 ``quant_conv`` /
    ``post_quant_conv`` and a :class:`VectorQuantizer`. Defaults are the released ``vq_ds16_c2i`` (16384 codes of
    dim 8, l2-normalised, downsampling 16, 71.9M parameters).

    Images are ``(B, in_channels, H, W)`` in [-1, 1] with ``H`` and ``W`` multiples of :attr:`downsample`; the token
    grid is ``grid_size(H, W)``. Main API: :meth:`encode` (ids in raster order + quantized latent),
    :meth:`decode_code` (ids -> images), :meth:`codebook_neighbours` (nearest codes of a code, for relaxed
    speculative acceptance), :attr:`vocab_size`, :attr:`codebook_dim`; :meth:`forward` is the training pass.
    """

    _skip_layerwise_casting_patterns: ClassVar[list[str]] = ["quantize"]
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 16384,
        codebook_dim: int = 8,
        codebook_l2_norm: bool = True,
        z_channels: int = 256,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        norm_num_groups: int = 32,
        beta: float = 0.25,
        usage_window: int = USAGE_WINDOW,
    ):
        super().__init__()
        _validate_config(ch, ch_mult, norm_num_groups, vocab_size, codebook_dim, usage_window)
        self.vocab_size = vocab_size
        self.codebook_dim = codebook_dim
        self.downsample = 2 ** (len(ch_mult) - 1)
        blocks = {
            "ch": ch, "ch_mult": tuple(ch_mult), "num_res_blocks": num_res_blocks, "dropout": dropout,
            "in_channels": in_channels, "z_channels": z_channels, "using_sa": using_sa, "using_mid_sa": using_mid_sa,
            "num_groups": norm_num_groups, "fused_qkv": False, "layout": "llamagen",
        }
        self.encoder = Encoder(**blocks)
        self.decoder = Decoder(**blocks)
        self.quantize = VectorQuantizer(vocab_size, codebook_dim, beta, codebook_l2_norm, usage_window)
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)

    # ----------------------------------------------------------------------------------------------- sizes
    def grid_size(self, resolution: int | tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(h, w)`` of images of side ``resolution`` (or ``(H, W)``); ``h * w`` tokens per image."""
        H, W = (resolution, resolution) if isinstance(resolution, int) else resolution
        if H % self.downsample or W % self.downsample or H < 1 or W < 1:
            raise UserError(
                f"image size {H}x{W} is not a multiple of this tokenizer's downsampling factor {self.downsample}: "
                f"use a resolution divisible by {self.downsample}"
            )
        return H // self.downsample, W // self.downsample

    def _check_image(self, img_B3HW: torch.Tensor) -> None:
        check_image_batch(img_B3HW, self.config.in_channels, self.downsample)

    def img_to_latent(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latent before quantization (B, D, h, w) (not normalised)."""
        self._check_image(img_B3HW)
        return self.quant_conv(self.encoder(img_B3HW))

    # ----------------------------------------------------------------------------------------------- training
    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Training pass: images (B, 3, H, W) -> (reconstruction (B, 3, H, W) not clamped, vq loss (scalar),
        codebook usage %). Gradients reach the encoder through the straight-through estimator."""
        quant_BDhw, vq_loss, _, usage_pct = self.quantize(self.img_to_latent(img_B3HW))
        return self.decode(quant_BDhw), vq_loss, usage_pct

    # ----------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, img_B3HW: torch.Tensor) -> VQEncoding:
        """Images (B, 3, H, W) in [-1, 1] -> :class:`VQEncoding` ``(idx (B, h*w) raster order, quant (B, D, h, w))``."""
        quant_BDhw, _, idx_BL, _ = self.quantize(self.img_to_latent(img_B3HW))
        return VQEncoding(idx_BL, quant_BDhw)

    def decode(self, quant_BDhw: torch.Tensor) -> torch.Tensor:
        """Quantized latent (B, D, h, w) -> images (B, 3, h*f, w*f), not clamped (the official ``decode``)."""
        return self.decoder(self.post_quant_conv(quant_BDhw.to(self.post_quant_conv.weight.dtype)))

    def decode_code(self, idx_BL: torch.Tensor, grid_hw: tuple[int, int], clamp: bool = True) -> torch.Tensor:
        """Code ids (B, h*w) in raster order -> images (B, 3, h*f, w*f), clamped to [-1, 1] unless ``clamp=False``."""
        h, w = (int(grid_hw[0]), int(grid_hw[1]))
        if idx_BL.ndim != 2 or idx_BL.shape[1] != h * w:
            raise UserError(
                f"decode_code expects ids of shape (B, {h * w}) for a {h}x{w} grid, got {tuple(idx_BL.shape)}"
            )
        if idx_BL.numel() and (int(idx_BL.min()) < 0 or int(idx_BL.max()) >= self.vocab_size):
            raise UserError(f"code ids must lie in 0..{self.vocab_size - 1}, got {int(idx_BL.min())}..{int(idx_BL.max())}")
        images = self.decode(self.quantize.lookup(idx_BL.long(), (h, w)))
        return images.clamp(-1, 1) if clamp else images

    @torch.no_grad()
    def img_to_reconstructed_img(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Encode and decode: images (B, 3, H, W) -> reconstructions in [-1, 1]."""
        return self.decode(self.encode(img_B3HW).quant).clamp(-1, 1)

    @torch.no_grad()
    def codebook_neighbours(self, idx: torch.Tensor, k: int, return_distances: bool = False):
        """The ``k`` nearest codebook entries of each code id in ``idx`` (any shape), nearest first, by the
        quantizer's own metric (L2 between the codes the quantizer uses, i.e. cosine distance when l2-normalised).

        Returns ids of shape ``(*idx.shape, k)``; the code itself always comes first. With ``return_distances`` also
        the squared L2 distances (same shape, float32). Used by relaxed speculative acceptance (LANTERN, MuLo-SD),
        which pools a token's probability with that of its latent neighbours.
        """
        if not 1 <= k <= self.vocab_size:
            raise UserError(f"k must be in 1..{self.vocab_size} (the codebook size), got {k}")
        codebook_VD = self.quantize.codebook().float()
        flat = idx.reshape(-1).long()
        query_ND = codebook_VD[flat]
        dist_NV = (query_ND.square().sum(1, keepdim=True) + codebook_VD.square().sum(1)
                   - 2 * query_ND @ codebook_VD.T).clamp_min_(0)
        dist_NV[torch.arange(flat.numel(), device=flat.device), flat] = -1.0  # the code itself first, even on ties
        dist_Nk, ids_Nk = torch.topk(dist_NV, k, dim=1, largest=False)
        ids = ids_Nk.view(*idx.shape, k)
        if return_distances:
            return ids, dist_Nk.clamp_min(0).view(*idx.shape, k)
        return ids

    @torch.no_grad()
    def restart_dead_codes_from_images(self, img_B3HW: torch.Tensor, threshold: float,
                                       generator: torch.Generator | None = None) -> int:
        """Restart codes seen fewer than ``threshold`` x the uniform rate in the usage window with latent vectors of
        ``img_B3HW``; returns how many were restarted."""
        z_BhwD = rearrange(self.img_to_latent(img_B3HW).float(), "b d h w -> (b h w) d")
        return self.quantize.restart_dead_codes(self.quantize._prepare(z_BhwD), threshold, generator)

    # ----------------------------------------------------------------------------------------------- official files
    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor], **config_overrides) -> SingleScaleVQModel:
        """Build the model from a LlamaGen VQ state dict (the architecture is read from the tensor shapes; pass
        ``codebook_l2_norm=False`` for a model trained without normalisation). Keys must match exactly, otherwise one
        :class:`UserError` line lists the missing and unexpected ones. Tensors are used as they are (no copy)."""
        config = {**infer_official_config(state_dict), **config_overrides}
        with torch.device("meta"):
            model = cls(**config)
        state_dict = dict(state_dict)
        if "quantize.codebook_used" not in state_dict:
            # usage statistics, not weights (files trained with codebook_show_usage=False lack them): start empty
            device = state_dict["quantize.embedding.weight"].device
            state_dict["quantize.codebook_used"] = torch.full((config["usage_window"],), -1.0, device=device)
        check_state_dict(
            model.state_dict(), state_dict, what=f"LlamaGen VQ state dict (SingleScaleVQModel({_short_config(model)}))",
            hint="Check that the file is a LlamaGen VQ tokenizer checkpoint (e.g. vq_ds16_c2i.pt)",
        )
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()


def _validate_config(ch, ch_mult, norm_num_groups, vocab_size, codebook_dim, usage_window) -> None:
    if len(ch_mult) < 1 or any(int(m) < 1 for m in ch_mult):
        raise UserError(f"ch_mult must be a non-empty list of positive integers, got {list(ch_mult)}")
    if ch % norm_num_groups or any((ch * m) % norm_num_groups for m in ch_mult):
        raise UserError(
            f"ch ({ch}) and every ch * ch_mult ({[ch * m for m in ch_mult]}) must be divisible by norm_num_groups "
            f"({norm_num_groups}): change ch or norm_num_groups"
        )
    if vocab_size < 1 or codebook_dim < 1:
        raise UserError(f"vocab_size and codebook_dim must be positive, got {vocab_size} and {codebook_dim}")
    if usage_window < 1:
        raise UserError(f"usage_window must be positive, got {usage_window}")


def infer_official_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Architecture of a LlamaGen VQ state dict, read from its key names and tensor shapes."""
    try:
        vocab_size, codebook_dim = state_dict["quantize.embedding.weight"].shape
        ch, in_channels = state_dict["encoder.conv_in.weight"].shape[:2]
        z_channels = state_dict["encoder.conv_out.weight"].shape[0]
    except KeyError as err:
        raise UserError(
            f"not a LlamaGen VQ state dict: key {err.args[0]!r} is missing (expected the vq_ds16_c2i.pt layout: "
            "encoder.conv_blocks.*, decoder.conv_blocks.*, quantize.*, quant_conv.*, post_quant_conv.*)"
        ) from err
    levels = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.conv_blocks.")})
    if not levels:
        raise UserError("not a LlamaGen VQ state dict: it has no encoder.conv_blocks.* keys")
    ch_mult = [int(state_dict[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]) // int(ch) for i in levels]
    num_res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.conv_blocks.0.res.")})
    usage = state_dict.get("quantize.codebook_used")
    return {
        "vocab_size": int(vocab_size), "codebook_dim": int(codebook_dim), "z_channels": int(z_channels),
        "ch": int(ch), "ch_mult": ch_mult, "num_res_blocks": num_res_blocks, "in_channels": int(in_channels),
        "using_sa": any(k.startswith(f"encoder.conv_blocks.{levels[-1]}.attn.") for k in state_dict),
        "using_mid_sa": any(k.startswith("encoder.mid.1.") for k in state_dict),
        "usage_window": int(usage.numel()) if usage is not None else USAGE_WINDOW,
    }


def _short_config(model: nn.Module) -> str:
    cfg = getattr(model, "config", {})
    keys = ("ch", "ch_mult", "z_channels", "vocab_size", "codebook_dim")
    return ", ".join(f"{k}={list(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]}" for k in keys if k in cfg)


def load_official_llamagen_vq(path_or_state_dict: str | Path | Mapping, **config_overrides) -> SingleScaleVQModel:
    """Load LlamaGen's released VQ tokenizer (``vq_ds16_c2i.pt``, weights under ``"model"``) or any checkpoint in its
    layout, on CPU, in eval mode."""
    if not isinstance(path_or_state_dict, Mapping) and not Path(path_or_state_dict).exists():
        raise UserError(
            f"VQ checkpoint not found: {path_or_state_dict} (download vq_ds16_c2i.pt from the LlamaGen release and "
            "pass its path)"
        )
    state_dict = read_state_dict(path_or_state_dict, what="LlamaGen VQ checkpoint")
    return SingleScaleVQModel.from_official_state_dict(state_dict, **config_overrides)
