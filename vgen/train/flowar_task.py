"""``vgen train flowar``: train a FlowAR generator (class- or text-conditional) on the latents of a trained, frozen KL
autoencoder.

    vgen train autoencoder --config configs/shapes/kl_autoencoder.yaml --out runs/kl_shapes
    vgen train flowar --config configs/shapes/flowar_text.yaml --out runs/flowar_shapes \
        --set task.autoencoder=runs/kl_shapes/final

Loss (official FlowAR recipe): per scale k, one ``t ~ U(0, 1)`` per image, ``x_t = (1 - t) x0 + t eps``, MSE of the
flow head's velocity against ``eps - x0``, scale k weighted ``s_k^2 / s_K^2`` and the scales summed. The latents come
from the frozen autoencoder on the fly: a posterior **sample** times its ``scale_factor`` (as MAR / FlowAR encode),
under ``no_grad`` in fp32. Conditions are dropped to the null class / null prompt with probability
``label_drop_prob`` inside the model (classifier-free guidance). Logged metrics: ``loss`` and ``loss_s{k}``, the
unweighted velocity MSE of each scale. Sample grids run the shared flow sampler through :class:`FlowARPipeline`;
``export`` writes a complete pipeline folder (autoencoder + transformer + text encoder) that ``vgen generate
--model`` loads, with the task's ``sample_*`` settings as its sampling defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgen.errors import UserError
from vgen.models.flowar import FLOWAR_SIZES, FlowAR, check_scales
from vgen.train.image_generator_task import ConditionedTrainModule, ImageGeneratorTask, ImageGeneratorTaskConfig


@dataclass
class FlowARTaskConfig(ImageGeneratorTaskConfig):
    """The ``task:`` section of a FlowAR run config (``configs/shapes/flowar_text.yaml``); conditioning, data and
    sample conditions as :class:`~vgen.train.image_generator_task.ImageGeneratorTaskConfig`."""

    #: trained KL autoencoder folder (``AutoencoderKL.save_pretrained``, e.g. runs/kl_shapes/final)
    autoencoder: str = ""
    # --- transformer: a registry size (flowar-s, flowar-l, flowar-h) or the fields below
    size: str = ""
    embed_dim: int = 128  #: width of both AR stacks
    depth: int = 2  #: blocks in each of the two AR stacks (official "encoder" and "decoder")
    num_heads: int = 2
    mlp_ratio: float = 4.0
    flow_depth: int = 2
    flow_width: int = 128
    flow_num_heads: int = 0  #: 0 = flow_width // 64 (official), at least 1
    #: "spatial_adaln" (FlowAR-S's Block_v1) or "cross_attention" (FlowAR-L/H's Block_v2)
    flow_head: str = "spatial_adaln"
    #: latent pixels per token side; the token grid is latent side / patch_size
    patch_size: int = 1
    #: token-grid side of every scale; empty = 1, 2, 4, ... up to the token grid (official for 16: 1, 2, 4, 8, 16)
    scales: tuple[int, ...] = ()
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    drop_path_rate: float = 0.0
    # --- conditioning (the rest: ImageGeneratorTaskConfig)
    text_cross_attn: bool = True
    text_embed_dim: int = 128
    text_heads: int = 2
    # --- sampling: used for the grids during training and saved as the exported pipeline's defaults
    #: CFG weight at the last scale (FlowAR's ramp from 1 at the first scale; 1 = off)
    sample_guidance_scale: float = 2.4
    #: guidance only while t <= this (official FlowAR-S/L: 0.9)
    sample_guidance_interval: float = 0.9
    #: FlowAR's grid: 25 -> 24 Euler steps (12 + 12 non-uniform), 50 -> 50 uniform ones
    sample_num_steps: int = 25


class FlowARTrainModule(ConditionedTrainModule):
    """The FlowAR transformer plus (text models) the text encoder.

    ``forward(latents_BChw, label_B=None, ids_BT=None, mask_BT=None) -> FlowAROutput``.
    """

    def forward(self, latents_BChw: torch.Tensor, label_B: torch.Tensor | None = None,
                ids_BT: torch.Tensor | None = None, mask_BT: torch.Tensor | None = None):
        return self.transformer(latents_BChw, cond=self.condition(label_B, ids_BT, mask_BT))


def load_autoencoder(folder: str | Path, what: str = "task.autoencoder", family: str = "FlowAR"):
    """A trained KL autoencoder folder -> frozen :class:`~vgen.tokenizers.kl_autoencoder.AutoencoderKL` (eval), or
    one :class:`UserError` line (missing folder, or a VQ tokenizer where continuous latents are needed)."""
    import json

    from vgen.tokenizers.kl_autoencoder import AutoencoderKL

    path = Path(folder) if folder else None
    if path is None or not (path / "config.json").is_file():
        raise UserError(f"{what} must be a trained KL autoencoder folder (config.json + weights), got {folder!r}; "
                        "train one with 'vgen train autoencoder' and pass its final/ folder")
    class_name = json.loads((path / "config.json").read_text()).get("_class_name", "")
    if class_name != AutoencoderKL.__name__:
        raise UserError(f"{what} {path} holds a {class_name or 'non-vgen'} model, but {family} generates continuous "
                        "latents: give a KL autoencoder (AutoencoderKL, 'vgen train autoencoder'), not a VQ tokenizer")
    return AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False).eval().requires_grad_(False)


class FlowARTask(ImageGeneratorTask):
    config_class = FlowARTaskConfig
    command = "flowar"
    #: the generator class and the family's name in messages (xAR's task, :mod:`vgen.train.xar_task`, reuses this
    #: one with its own)
    model_class: type = FlowAR
    family_title = "FlowAR"

    def __init__(self, cfg: FlowARTaskConfig):
        super().__init__(cfg)
        self.vae = load_autoencoder(cfg.autoencoder, family=self.family_title)
        self.latent_side = self.vae.latent_size(cfg.resolution)[0]
        with torch.device("meta"):  # configuration errors before the run starts (nothing allocated)
            self.model_class(**self.transformer_kwargs())

    # -- pieces ----------------------------------------------------------------------------------------------

    def _scales(self) -> tuple[int, ...]:
        cfg = self.cfg
        if cfg.patch_size < 1 or self.latent_side % cfg.patch_size:
            raise UserError(f"task.patch_size {cfg.patch_size} does not divide the {self.latent_side}x"
                            f"{self.latent_side} latent of {cfg.resolution} px images")
        grid = self.latent_side // cfg.patch_size
        if cfg.scales:
            scales = check_scales(cfg.scales)
            if scales[-1] != grid:
                raise UserError(f"task.scales {list(scales)} must end at the token grid {grid} (latent side "
                                f"{self.latent_side} / patch size {cfg.patch_size}) for {cfg.resolution} px images")
            return scales
        scales = [1]
        while scales[-1] * 2 <= grid:
            scales.append(scales[-1] * 2)
        if scales[-1] != grid:
            scales.append(grid)
        return tuple(scales)

    def transformer_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.size:
            if cfg.size not in FLOWAR_SIZES:
                raise UserError(f"task.size {cfg.size!r} is not one of {', '.join(FLOWAR_SIZES)}")
            size = dict(FLOWAR_SIZES[cfg.size])
        else:
            size = dict(encoder_embed_dim=cfg.embed_dim, encoder_depth=cfg.depth, encoder_num_heads=cfg.num_heads,
                        decoder_embed_dim=cfg.embed_dim, decoder_depth=cfg.depth, decoder_num_heads=cfg.num_heads,
                        flow_depth=cfg.flow_depth, flow_width=cfg.flow_width, flow_head=cfg.flow_head,
                        flow_num_heads=cfg.flow_num_heads or max(1, cfg.flow_width // 64))
        kwargs = dict(
            **size, latent_channels=self.vae.latent_channels, patch_size=cfg.patch_size, scales=self._scales(),
            mlp_ratio=cfg.mlp_ratio, label_drop_prob=cfg.label_drop_prob, attn_dropout=cfg.attn_dropout,
            proj_dropout=cfg.proj_dropout, drop_path_rate=cfg.drop_path_rate, conditioning=cfg.conditioning,
        )
        if cfg.conditioning == "text":
            kwargs.update(text_embed_dim=cfg.text_embed_dim, text_cross_attn=cfg.text_cross_attn)
        else:
            kwargs.update(num_classes=self.num_classes())
        return kwargs

    # -- TrainTask -------------------------------------------------------------------------------------------

    def build_model(self) -> FlowARTrainModule:
        return self.prepare_model(FlowARTrainModule(self.model_class(**self.transformer_kwargs()),
                                                    self.build_text_encoder()))

    @torch.no_grad()
    def encode_images(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Frozen autoencoder: images in [-1, 1] -> scaled latents (a posterior sample), always in fp32."""
        self.vae.to(img_B3HW.device)
        with torch.autocast(device_type=img_B3HW.device.type, enabled=False):
            return self.vae.encode_latents(img_B3HW.float(), sample=True)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        from vgen.train.loop import unwrap

        latents_BChw = self.encode_images(batch["image"])
        inner = unwrap(model)
        out = model(latents_BChw, **self.condition_inputs(inner, batch, latents_BChw.device))
        metrics = {f"loss_s{s}": loss.detach().mean() for s, loss in zip(inner.transformer.scales, out.loss_per_scale)}
        return out.loss, metrics

    def _pipeline(self, inner: FlowARTrainModule):
        from vgen.pipelines.flowar import FlowARPipeline

        cfg = self.cfg
        device = inner.transformer.device
        return FlowARPipeline(
            vae=self.vae.to(device), transformer=inner.transformer, text_encoder=inner.text_encoder,
            default_guidance_scale=cfg.sample_guidance_scale, default_guidance_interval=cfg.sample_guidance_interval,
            default_num_steps=cfg.sample_num_steps,
        )

    def sample_grid(self, model: nn.Module, step: int):
        from vgen.train.loop import unwrap

        return self.sample_grid_of(self._pipeline(unwrap(model)), step)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from vgen.train.loop import unwrap

        inner = unwrap(model)
        self.vae.cpu()
        self._pipeline(inner).save_pretrained(str(out_dir))
