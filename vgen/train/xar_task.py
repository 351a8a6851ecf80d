"""``vgen train xar``: train an xAR generator (class- or text-conditional, any entity X) on the latents of a trained,
frozen KL autoencoder.

    vgen train autoencoder --config configs/shapes/kl_autoencoder.yaml --out runs/kl_shapes
    vgen train xar --config configs/shapes/xar_text.yaml --out runs/xar_shapes \
        --set task.autoencoder=runs/kl_shapes/final

Loss (official Noisy Context Learning): one ``t ~ sigmoid(N(0, 1))`` per (image, unit), every unit noised as
``x_t = (1 - t) x0 + t eps`` and all of them denoised at once under the unit-causal mask (so each unit's context is
the noisy units before it), MSE of the velocity against ``eps - x0`` over every token. Conditions are dropped to the
null class / null prompt with probability ``label_drop_prob`` inside the model. Data, the frozen autoencoder (a
posterior sample times its ``scale_factor``, fp32), conditioning, ``init_from`` / ``trainable``, sample grids and the
export are FlowAR's task (:class:`vgen.train.flowar_task.FlowARTask`), with :class:`XARPipeline` as the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vgen.errors import UserError
from vgen.models.xar import XAR, XAR_SIZES
from vgen.train.flowar_task import FlowARTask
from vgen.train.image_generator_task import ImageGeneratorTaskConfig


@dataclass
class XARTaskConfig(ImageGeneratorTaskConfig):
    """The ``task:`` section of an xAR run config (``configs/shapes/xar_text.yaml``); conditioning, data and sample
    conditions as :class:`~vgen.train.image_generator_task.ImageGeneratorTaskConfig`."""

    #: trained KL autoencoder folder (``AutoencoderKL.save_pretrained``, e.g. runs/kl_shapes/final)
    autoencoder: str = ""
    # --- transformer: a registry size (xar-b, xar-l, xar-h) or the fields below
    size: str = ""
    embed_dim: int = 128  #: width of both stacks
    depth: int = 2  #: blocks in each of the two stacks (official "encoder" and "decoder")
    num_heads: int = 2
    mlp_ratio: float = 4.0
    #: latent pixels per token side; the token grid is latent side / patch_size
    patch_size: int = 1
    #: the prediction entity: "cell" (k x k cells, official), "token", "subsample" (dilated groups) or "image"
    entity: str = "cell"
    #: the cell side (cell) or dilation (subsample), dividing the token grid; 0 = half the grid (official 2 x 2 cells)
    entity_size: int = 0
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    drop_path_rate: float = 0.0
    # --- conditioning (the rest: ImageGeneratorTaskConfig)
    text_cross_attn: bool = True
    text_embed_dim: int = 128
    text_heads: int = 2
    # --- sampling: used for the grids during training and saved as the exported pipeline's defaults
    #: CFG weight at the last unit (xAR's ramp from 1 at the first unit; 1 = off)
    sample_guidance_scale: float = 2.7
    #: points of linspace(1, 0.04, n) per unit: n - 1 SDE steps and one deterministic step (official xAR-B: 40)
    sample_num_steps: int = 40


class XARTask(FlowARTask):
    config_class = XARTaskConfig
    model_class = XAR
    command, family_title = "xar", "xAR"

    def _grid(self) -> int:
        cfg = self.cfg
        if cfg.patch_size < 1 or self.latent_side % cfg.patch_size:
            raise UserError(f"task.patch_size {cfg.patch_size} does not divide the {self.latent_side}x"
                            f"{self.latent_side} latent of {cfg.resolution} px images")
        return self.latent_side // cfg.patch_size

    def transformer_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.size:
            if cfg.size not in XAR_SIZES:
                raise UserError(f"task.size {cfg.size!r} is not one of {', '.join(XAR_SIZES)}")
            size = dict(XAR_SIZES[cfg.size])
        else:
            size = dict(encoder_embed_dim=cfg.embed_dim, encoder_depth=cfg.depth, encoder_num_heads=cfg.num_heads,
                        decoder_embed_dim=cfg.embed_dim, decoder_depth=cfg.depth, decoder_num_heads=cfg.num_heads)
        grid = self._grid()
        if cfg.entity in ("token", "image"):
            entity_size = None
        elif cfg.entity_size:
            entity_size = cfg.entity_size
        else:
            entity_size = grid // 2 if grid % 2 == 0 else grid
        kwargs = dict(
            **size, latent_channels=self.vae.latent_channels, patch_size=cfg.patch_size, grid_size=grid,
            entity=cfg.entity, entity_size=entity_size, mlp_ratio=cfg.mlp_ratio, label_drop_prob=cfg.label_drop_prob,
            attn_dropout=cfg.attn_dropout, proj_dropout=cfg.proj_dropout, drop_path_rate=cfg.drop_path_rate,
            conditioning=cfg.conditioning,
        )
        if cfg.conditioning == "text":
            kwargs.update(text_embed_dim=cfg.text_embed_dim, text_cross_attn=cfg.text_cross_attn)
        else:
            kwargs.update(num_classes=self.num_classes())
        return kwargs

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        from vgen.train.loop import unwrap

        latents_BChw = self.encode_images(batch["image"])
        out = model(latents_BChw, **self.condition_inputs(unwrap(model), batch, latents_BChw.device))
        return out.loss, {}

    def _pipeline(self, inner):
        from vgen.pipelines.xar import XARPipeline

        cfg = self.cfg
        device = inner.transformer.device
        return XARPipeline(vae=self.vae.to(device), transformer=inner.transformer, text_encoder=inner.text_encoder,
                           default_guidance_scale=cfg.sample_guidance_scale, default_num_steps=cfg.sample_num_steps)
