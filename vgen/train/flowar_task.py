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

from vgen.checkpoints import state_dict_mismatch
from vgen.errors import UserError
from vgen.models.flowar import FLOWAR_SIZES, FlowAR, check_scales
from vgen.models.text_encoder import ShapesTextEncoder, split_words
from vgen.train.task import TrainTask
from vgen.train.var_task import freeze_all_but

WORLDS = ("shapes", "folder")


@dataclass
class FlowARTaskConfig:
    """The ``task:`` section of a FlowAR run config (``configs/shapes/flowar_text.yaml``)."""

    #: trained KL autoencoder folder (``AutoencoderKL.save_pretrained``, e.g. runs/kl_shapes/final)
    autoencoder: str = ""
    #: a saved FlowAR pipeline folder whose transformer (and text encoder) weights start this run; "" = random init
    init_from: str = ""
    #: glob patterns of the parameters this run trains (names as in ``FlowARTrainModule``); empty = everything
    trainable: tuple[str, ...] = ()
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
    # --- conditioning
    #: "text" (prompts through a trainable ShapesTextEncoder) or "class" (class labels, null class = num_classes)
    conditioning: str = "text"
    num_classes: int = 0  #: 0 = the world's number of classes
    text_cross_attn: bool = True
    text_embed_dim: int = 128
    text_depth: int = 2
    text_heads: int = 2
    text_max_length: int = 32
    text_word_mixing: int = 0
    # --- data
    world: str = "shapes"
    data_path: str = ""
    resolution: int = 64
    dataset_length: int = 100_000
    seed: int = 0
    tag_weights: dict[str, float] | None = None
    # --- sampling: used for the grids during training and saved as the exported pipeline's defaults
    sample_prompts: tuple[str, ...] = (
        "a photo of a red circle",
        "a photo of a blue square",
        "a photo of a green triangle and a yellow star",
        "a photo of three purple hexagons",
        "a photo of an orange diamond left of a white circle",
        "a photo of a pink star above a black square",
    )
    sample_class_labels: tuple[int, ...] = (0, 7, 14, 21, 28, 35)
    #: CFG weight at the last scale (FlowAR's ramp from 1 at the first scale; 1 = off)
    sample_guidance_scale: float = 2.4
    #: guidance only while t <= this (official FlowAR-S/L: 0.9)
    sample_guidance_interval: float = 0.9
    #: FlowAR's grid: 25 -> 24 Euler steps (12 + 12 non-uniform), 50 -> 50 uniform ones
    sample_num_steps: int = 25


class FlowARTrainModule(nn.Module):
    """What the training loop optimises: the FlowAR transformer plus (text models) the text encoder.

    ``forward(latents_BChw, label_B=None, ids_BT=None, mask_BT=None) -> FlowAROutput``.
    """

    def __init__(self, transformer: FlowAR, text_encoder: ShapesTextEncoder | None):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder

    def forward(self, latents_BChw: torch.Tensor, label_B: torch.Tensor | None = None,
                ids_BT: torch.Tensor | None = None, mask_BT: torch.Tensor | None = None):
        transformer = self.transformer
        if self.text_encoder is None:
            cond = transformer.class_condition(label_B)
        else:
            pooled_BD, tokens_BTD = self.text_encoder(ids_BT, mask_BT)
            cond = transformer.text_condition(pooled_BD, tokens_BTD, mask_BT)
        return transformer(latents_BChw, cond=cond)


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


class FlowARTask(TrainTask):
    config_class = FlowARTaskConfig
    #: the generator class and the task's name (xAR's task, :mod:`vgen.train.xar_task`, reuses this one with its own)
    model_class: type = FlowAR
    family, family_title = "flowar", "FlowAR"

    def __init__(self, cfg: FlowARTaskConfig):
        super().__init__(cfg)
        if cfg.conditioning not in ("text", "class"):
            raise UserError(f"task.conditioning must be 'text' or 'class', got {cfg.conditioning!r}")
        if cfg.world not in WORLDS:
            raise UserError(f"task.world must be one of {', '.join(WORLDS)}, got {cfg.world!r}")
        self.vae = load_autoencoder(cfg.autoencoder, family=self.family_title)
        self.latent_side = self.vae.latent_size(cfg.resolution)[0]
        self._dataset = None
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

    def _vocabulary(self) -> list[str]:
        if self.cfg.world == "shapes":
            from vgen.data.shapes import PROMPT_VOCABULARY

            return list(PROMPT_VOCABULARY)
        words = sorted({w for caption in self.build_dataset().captions for w in split_words(caption)})
        if not words:
            raise UserError(f"no captions found under {self.cfg.data_path} (metadata.jsonl); use conditioning: class")
        return words

    def _num_classes(self) -> int:
        if self.cfg.num_classes > 0:
            return self.cfg.num_classes
        if self.cfg.world == "shapes":
            from vgen.data.shapes import NUM_CLASSES

            return NUM_CLASSES
        return len(self.build_dataset().classes)

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
            kwargs.update(num_classes=self._num_classes())
        return kwargs

    # -- TrainTask -------------------------------------------------------------------------------------------

    def build_model(self) -> FlowARTrainModule:
        cfg = self.cfg
        text_encoder = None
        if cfg.conditioning == "text":
            text_encoder = ShapesTextEncoder(
                vocabulary=self._vocabulary(), embed_dim=cfg.text_embed_dim, depth=cfg.text_depth,
                num_heads=cfg.text_heads, max_length=cfg.text_max_length, word_mixing=cfg.text_word_mixing,
            )
        model = FlowARTrainModule(self.model_class(**self.transformer_kwargs()), text_encoder)
        if cfg.init_from:
            self._load_initial_weights(model, Path(cfg.init_from))
        if cfg.trainable:
            freeze_all_but(model, cfg.trainable)
        return model

    def _load_initial_weights(self, model: FlowARTrainModule, folder: Path) -> None:
        from vgen.checkpoints import read_state_dict

        for name, module in {"transformer": model.transformer, "text_encoder": model.text_encoder}.items():
            if module is None:
                continue
            files = sorted((folder / name).glob("*.safetensors"))
            if not files:
                raise UserError(f"task.init_from: no {name} weights under {folder / name}; give the final/ folder of "
                                f"a 'vgen train {self.family}' run")
            state = read_state_dict(files[0], what=f"task.init_from {name} weights")
            mismatch = state_dict_mismatch(module.state_dict(), state, limit=3)
            if mismatch:
                raise UserError(f"task.init_from: the {name} in {folder} does not match this config's sizes "
                                f"({mismatch}); set the task's size fields as that run had them")
            module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})

    def build_dataset(self) -> torch.utils.data.Dataset:
        if self._dataset is None:
            cfg = self.cfg
            if cfg.world == "shapes":
                from vgen.data.shapes import ShapesDataset

                self._dataset = ShapesDataset(resolution=cfg.resolution, length=cfg.dataset_length, seed=cfg.seed,
                                              tag_weights=cfg.tag_weights,
                                              class_conditional=cfg.conditioning == "class")
            else:
                if cfg.tag_weights:
                    raise UserError("task.tag_weights applies to the shapes world only; remove it for world: folder")
                from vgen.data.folder import ImageFolderDataset

                self._dataset = ImageFolderDataset(cfg.data_path, resolution=cfg.resolution)
        return self._dataset

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
        if inner.text_encoder is not None:
            ids_BT, mask_BT = inner.text_encoder.tokenize(list(batch["caption"]))
            out = model(latents_BChw, ids_BT=ids_BT.to(latents_BChw.device), mask_BT=mask_BT.to(latents_BChw.device))
        else:
            out = model(latents_BChw, label_B=batch["class_label"].long())
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

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, step: int):
        from vgen.imaging import make_grid, tensor_to_pil
        from vgen.train.loop import unwrap

        inner = unwrap(model)
        pipe = self._pipeline(inner)
        pipe.set_progress_bar_config(disable=True)
        if inner.text_encoder is not None:
            conditions, kwargs = list(self.cfg.sample_prompts), {"prompt": list(self.cfg.sample_prompts)}
        else:
            labels = [lab % inner.transformer.config.num_classes for lab in self.cfg.sample_class_labels]
            conditions, kwargs = [f"class {lab}" for lab in labels], {"class_labels": labels}
        generators = [torch.Generator().manual_seed(i) for i in range(len(conditions))]
        images = pipe(**kwargs, generator=generators, output_type="pt").images
        return make_grid(tensor_to_pil(images, value_range=(0.0, 1.0)), [f"{c} (step {step})" for c in conditions])

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from vgen.train.loop import unwrap

        inner = unwrap(model)
        self.vae.cpu()
        self._pipeline(inner).save_pretrained(str(out_dir))
