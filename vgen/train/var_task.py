"""``vgen train var``: train a VAR transformer (class- or text-conditional) on top of a trained, frozen tokenizer.

    vgen train tokenizer --config configs/shapes/tokenizer.yaml --out runs/tokenizer_shapes
    vgen train var --config configs/shapes/var_text.yaml --out runs/var_shapes_text

The tokenizer is VAR's multi-scale VQ or NFIG's frequency-band FR-VAE (``task.kind: frvae`` of ``vgen train
tokenizer``): with the latter the same transformer learns next-frequency prediction, scale si being band si, and the
export is an NFIG pipeline (a :class:`~vgen.pipelines.var.VARPipeline` whose ``vqvae`` is the FR-VAE).

Loss (official VAR recipe): cross-entropy of the teacher-forced logits against the next-scale indices, every token
weighted 1/L; the indices and the teacher-forcing input come from the frozen tokenizer on the fly
(``img_to_idxBl`` -> ``quantize.idxBl_to_var_input``, under ``no_grad``). Conditions are dropped to the null class /
null prompt with probability ``cond_drop_rate`` inside the model (classifier-free guidance). Logged metrics:
``loss`` and ``accuracy`` (token top-1), and ``loss_tail`` / ``accuracy_tail`` of the finest scale alone (official
VAR's ``Lt`` / ``Acct``; it holds the most tokens, so the means lean on it while the coarse scales decide the
layout). With ``coarse_fraction`` part of every batch trains on the first ``coarse_scales`` scales only (cheaper
rows that weigh layout and colour more); ``trainable`` freezes everything but the named parameters (e.g. only the
text path, when the text encoder gains word mixing). Sample grids run the shared next-scale sampler. ``export``
writes a complete :class:`vgen.pipelines.var.VARPipeline` folder (tokenizer + transformer + text encoder) that
``vgen generate --model`` loads; the task's ``sample_*`` settings become the pipeline's sampling defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgen.errors import UserError
from vgen.models.var import VAR, VAR_SIZES, var_size
from vgen.train.image_generator_task import ConditionedTrainModule, ImageGeneratorTask, ImageGeneratorTaskConfig


@dataclass
class VARTaskConfig(ImageGeneratorTaskConfig):
    """The ``task:`` section of a VAR run config (``configs/shapes/var_text.yaml``); conditioning, data and sample
    conditions as :class:`~vgen.train.image_generator_task.ImageGeneratorTaskConfig`."""

    #: trained next-scale tokenizer folder (``save_pretrained`` of VAR's ``MultiScaleVQModel`` or NFIG's
    #: ``FrequencyVQModel``, e.g. runs/tokenizer_shapes/final): the transformer predicts its scales / bands
    tokenizer: str = ""
    # --- transformer size: a registry name (var-d16 ...) or the official rule from ``depth`` (width 64 * depth)
    size: str = ""
    depth: int = 6
    embed_dim: int = 0  #: 0 = 64 * depth
    num_heads: int = 0  #: 0 = depth
    mlp_ratio: float = 4.0
    drop_path_rate: float = -1.0  #: < 0 = official 0.1 * depth / 24
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    text_cross_attn: bool = True
    # --- coarse rows: this share of every batch's rows is teacher-forced on the first ``coarse_scales`` scales only.
    #: Such a row costs about (tokens of those scales) / L of a full row (30 / 386 for 4 of the Shapes tokenizer's
    #: 7 scales), so a step sees more layouts for the same compute, and the coarse scales, which decide where objects
    #: go and what colour they are, weigh more in the loss. 0 = every row full.
    coarse_fraction: float = 0.0
    coarse_scales: int = 0
    # --- sampling: used for the grids during training and saved as the exported pipeline's defaults
    sample_guidance_scale: float = 1.5
    sample_top_k: int = 0
    sample_top_p: float = 0.0
    sample_temperature: float = 1.0
    #: how the CFG strength is shared over the scales: "ramp" (VAR's) or one share per scale (ProfileCFG)
    sample_guidance_profile: str | tuple[float, ...] = "ramp"


class VARTrainModule(ConditionedTrainModule):
    """What the training loop optimises: the VAR transformer plus (text models) the text encoder.

    ``forward(x_BLCv_wo_first_l, label_B=None, ids_BT=None, mask_BT=None) -> logits_BLV``.
    """

    def forward(self, x_BLCv_wo_first_l: torch.Tensor, label_B: torch.Tensor | None = None,
                ids_BT: torch.Tensor | None = None, mask_BT: torch.Tensor | None = None,
                coarse_x_BlCv: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Conditions (labels or prompts) come for ``B + Bc`` rows: the first B go with ``x_BLCv_wo_first_l``
        (B, L - first_l, Cvae), the last Bc with ``coarse_x_BlCv`` (Bc, Lk - first_l, Cvae), the inputs of the first
        k scales only. Without coarse rows: ``logits_BLV``; with them ``(logits_BLV, logits_BlV (Bc, Lk, V))``, both
        from this one call (one forward per step, as DDP expects)."""
        transformer = self.transformer
        cond = self.condition(label_B, ids_BT, mask_BT)
        if coarse_x_BlCv is None:
            return transformer(None, x_BLCv_wo_first_l, cond=cond)
        B, Bc = x_BLCv_wo_first_l.shape[0], coarse_x_BlCv.shape[0]
        return (transformer(None, x_BLCv_wo_first_l, cond=cond.rows(0, B)),
                transformer(None, coarse_x_BlCv, cond=cond.rows(B, B + Bc)))


class VARTask(ImageGeneratorTask):
    config_class = VARTaskConfig
    command = "var"
    resumable_changes = ("sample_prompts", "sample_class_labels", "sample_guidance_scale", "sample_top_k",
                         "sample_top_p", "sample_temperature", "sample_guidance_profile")

    def __init__(self, cfg: VARTaskConfig):
        super().__init__(cfg)
        self.vqvae = self._load_tokenizer()
        self._check_coarse_rows()
        self._check_guidance_profile()

    # -- pieces ----------------------------------------------------------------------------------------------

    def _load_tokenizer(self):
        from vgen.pipelines.next_scale_tokenizer import NEXT_SCALE_TOKENIZERS
        from vgen.tokenizers.loading import tokenizer_class_of
        from vgen.tokenizers.msvq import MultiScaleVQModel

        path = Path(self.cfg.tokenizer) if self.cfg.tokenizer else None
        if path is None or not (path / "config.json").is_file():
            raise UserError(
                f"task.tokenizer must be a trained tokenizer folder (config.json + weights), got {self.cfg.tokenizer!r}; "
                "train one with 'vgen train tokenizer' and pass its final/ folder"
            )
        # the class saved in config.json: VAR's multi-scale VQ or NFIG's frequency-band VQ (its subclass, whose
        # band edges a MultiScaleVQModel load would silently drop)
        tokenizer_class = tokenizer_class_of(path)
        if not issubclass(tokenizer_class, MultiScaleVQModel):
            raise UserError(
                f"task.tokenizer {path} holds a {tokenizer_class.__name__}; vgen train var needs a next-scale "
                f"tokenizer, a {NEXT_SCALE_TOKENIZERS} (vgen train tokenizer with task.kind msvq or frvae)"
            )
        vqvae = tokenizer_class.from_pretrained(str(path), low_cpu_mem_usage=False).eval().requires_grad_(False)
        if vqvae.resolution != self.cfg.resolution:
            raise UserError(
                f"task.resolution is {self.cfg.resolution} but the tokenizer at {path} expects {vqvae.resolution} px "
                "images; set task.resolution to match"
            )
        return vqvae

    def _check_guidance_profile(self) -> None:
        from vgen.samplers.guidance import check_profile

        try:
            check_profile(self.cfg.sample_guidance_profile, len(self.vqvae.patch_nums))
        except ValueError as err:
            raise UserError(f"task.sample_guidance_profile: {err}") from None

    def _check_coarse_rows(self) -> None:
        cfg, num_scales = self.cfg, len(self.vqvae.patch_nums)
        if not 0 <= cfg.coarse_fraction < 1:
            raise UserError(
                f"task.coarse_fraction must be in [0, 1) (a share of each batch), got {cfg.coarse_fraction}"
            )
        if cfg.coarse_fraction > 0 and not 1 <= cfg.coarse_scales < num_scales:
            raise UserError(
                f"task.coarse_scales must be 1..{num_scales - 1} (this tokenizer has {num_scales} scales) when "
                f"task.coarse_fraction is set, got {cfg.coarse_scales}"
            )

    def transformer_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.size:
            if cfg.size not in VAR_SIZES:
                raise UserError(f"task.size {cfg.size!r} is not one of {', '.join(VAR_SIZES)}")
            size = dict(VAR_SIZES[cfg.size])
        else:
            size = var_size(cfg.depth)
            if cfg.embed_dim:
                size["embed_dim"] = cfg.embed_dim
            if cfg.num_heads:
                size["num_heads"] = cfg.num_heads
        if cfg.drop_path_rate >= 0:
            size["drop_path_rate"] = cfg.drop_path_rate
        size["patch_nums"] = tuple(self.vqvae.patch_nums)
        kwargs = dict(
            **size, vocab_size=self.vqvae.vocab_size, Cvae=self.vqvae.Cvae, mlp_ratio=cfg.mlp_ratio,
            attn_l2_norm=cfg.attn_l2_norm, cond_drop_rate=cfg.cond_drop_rate, conditioning=cfg.conditioning,
            num_classes=self.num_classes(),
        )
        if cfg.conditioning == "text":
            kwargs.update(text_embed_dim=cfg.text_embed_dim, text_cross_attn=cfg.text_cross_attn)
        return kwargs

    # -- TrainTask -------------------------------------------------------------------------------------------

    def build_model(self) -> VARTrainModule:
        return self.prepare_model(VARTrainModule(VAR(**self.transformer_kwargs()), self.build_text_encoder()))

    @torch.no_grad()
    def encode_images(self, img_B3HW: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Frozen tokenizer: ``(idx_Bl per scale, x_BLCv_wo_first_l (B, L - first_l, Cvae))``.

        Always in fp32, also inside a mixed-precision step: the nearest-code search must pick the codes that
        inference on the same image picks."""
        self.vqvae.to(img_B3HW.device)
        with torch.autocast(device_type=img_B3HW.device.type, enabled=False):
            idx_Bl = self.vqvae.img_to_idxBl(img_B3HW.float())
            return idx_Bl, self.vqvae.quantize.idxBl_to_var_input(idx_Bl)

    def coarse_rows(self, batch_size: int) -> int:
        """How many of a batch's rows are coarse rows (``coarse_fraction`` of them, always leaving one full row)."""
        if self.cfg.coarse_fraction <= 0:
            return 0
        return min(batch_size - 1, round(batch_size * self.cfg.coarse_fraction))

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Mean cross-entropy over every trained token: all L of a full row, the first Lk of a coarse row (the
        last ``coarse_rows(B)`` rows of the batch). ``accuracy`` / ``*_tail`` come from the full rows;
        ``loss_coarse`` is the coarse rows' mean."""
        from vgen.train.loop import unwrap

        idx_Bl, x_BLCv = self.encode_images(batch["image"])
        target_BL = torch.cat(idx_Bl, dim=1)
        condition = self.condition_inputs(unwrap(model), batch, x_BLCv.device)
        num_coarse = self.coarse_rows(target_BL.shape[0])
        num_full = target_BL.shape[0] - num_coarse
        if num_coarse:
            first_l = idx_Bl[0].shape[1]
            coarse_L = sum(idx.shape[1] for idx in idx_Bl[: self.cfg.coarse_scales])
            logits_BLV, coarse_logits_BlV = model(x_BLCv[:num_full], **condition,
                                                  coarse_x_BlCv=x_BLCv[num_full:, : coarse_L - first_l])
        else:
            logits_BLV = model(x_BLCv, **condition)
        full_target_BL = target_BL[:num_full]
        ce_BL = F.cross_entropy(logits_BLV.flatten(0, 1).float(), full_target_BL.flatten(), reduction="none")
        ce_BL = ce_BL.view_as(full_target_BL)
        hit_BL = (logits_BLV.detach().argmax(-1) == full_target_BL).float()
        tail = idx_Bl[-1].shape[1]  # tokens of the finest scale (official VAR's "Lt" / "Acct")
        metrics = {
            "accuracy": hit_BL.mean(),
            "loss_tail": ce_BL.detach()[:, -tail:].mean(),
            "accuracy_tail": hit_BL[:, -tail:].mean(),
        }
        if not num_coarse:
            return ce_BL.mean(), metrics
        coarse_target_Bl = target_BL[num_full:, :coarse_L]
        coarse_ce_Bl = F.cross_entropy(coarse_logits_BlV.flatten(0, 1).float(), coarse_target_Bl.flatten(),
                                       reduction="none")
        metrics["loss_coarse"] = coarse_ce_Bl.detach().mean()
        return (ce_BL.sum() + coarse_ce_Bl.sum()) / (ce_BL.numel() + coarse_ce_Bl.numel()), metrics

    def sample_grid(self, model: nn.Module, step: int):
        from vgen.pipelines.var import VARPipeline
        from vgen.train.loop import unwrap

        inner = unwrap(model)
        pipe = VARPipeline(vqvae=self.vqvae.to(inner.transformer.pos_1LC.device), transformer=inner.transformer,
                           text_encoder=inner.text_encoder)
        cfg = self.cfg
        return self.sample_grid_of(pipe, step, guidance_scale=cfg.sample_guidance_scale, top_k=cfg.sample_top_k,
                                   top_p=cfg.sample_top_p, temperature=cfg.sample_temperature,
                                   guidance_profile=cfg.sample_guidance_profile)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from vgen.pipelines.var import VARPipeline
        from vgen.train.loop import unwrap
        from vgen.train.model_card import training_card_info

        inner = unwrap(model)
        cfg = self.cfg
        pipe = VARPipeline(
            vqvae=self.vqvae.cpu(), transformer=inner.transformer, text_encoder=inner.text_encoder,
            default_guidance_scale=cfg.sample_guidance_scale, default_top_k=cfg.sample_top_k,
            default_top_p=cfg.sample_top_p, default_temperature=cfg.sample_temperature,
            default_guidance_profile=cfg.sample_guidance_profile,
        )
        pipe.model_card = training_card_info(
            "var", Path(out_dir).parent,
            title=f"VAR, {cfg.conditioning}-conditional, trained with vgen",
            license_note="the weights were trained by whoever ran this export; set pipe.model_card.license (a Hub "
            "licence identifier) before sharing them",
        )
        pipe.save_pretrained(str(out_dir))

