"""``vgen train raster-ar``: train a raster next-token generator (LlamaGen GPT, optionally on Token-Shuffle windows)
on top of a trained, frozen single-scale VQ tokenizer.

    vgen train tokenizer --config configs/shapes/raster_vq64.yaml --out runs/vq64
    vgen train raster-ar --config configs/shapes/raster_s2_64.yaml --out runs/raster_s2_64

Loss (LlamaGen's recipe): cross-entropy of the teacher-forced logits against the image's codes, every code weighted
the same; with ``shuffle_window = s`` each position predicts the ``s^2`` codes of the next window. Conditions are
dropped to the null class / null prompt with probability ``class_dropout_prob`` inside the model (classifier-free
guidance). Logged metrics: ``loss`` and ``accuracy`` (code top-1).

The codes come from the frozen tokenizer, either on the fly for every batch (``token_cache: ""``) or from a token
cache: ``token_cache: PATH`` encodes the ``dataset_length`` images of the world once, saves their codes, captions and
labels there, and later runs with the same tokenizer and world read them back (a run on 2 CPU cores then spends its
time on the generator, and runs that differ only in the generator share one cache). A cache made for another
tokenizer, world, resolution, seed or length is refused in one line.

Sample grids run the shared next-token sampler. ``export`` writes a complete
:class:`vgen.pipelines.raster_ar.RasterARPipeline` folder (tokenizer + transformer + text encoder) that
``vgen generate --model`` loads; the task's ``sample_*`` settings become the pipeline's sampling defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgen.errors import UserError
from vgen.models.raster_ar import RASTER_AR_SIZES, RasterAR
from vgen.train.image_generator_task import ConditionedTrainModule, ImageGeneratorTask, ImageGeneratorTaskConfig


@dataclass
class RasterARTaskConfig(ImageGeneratorTaskConfig):
    """The ``task:`` section of a raster AR run config (``configs/shapes/raster_*.yaml``); conditioning, data and
    sample conditions as :class:`~vgen.train.image_generator_task.ImageGeneratorTaskConfig`."""

    #: trained single-scale VQ folder (``SingleScaleVQModel.save_pretrained``, e.g. runs/vq64/final)
    tokenizer: str = ""
    # --- transformer size: a registry name (llamagen-b ...) or depth / width / heads
    size: str = ""
    depth: int = 6
    embed_dim: int = 256
    num_heads: int = 4
    ffn_hidden_dim: int = 0  #: 0 = LlamaGen's rule (8C/3 rounded up to a multiple of 256)
    #: Token-Shuffle window s (1 = plain raster order); must divide the tokenizer's grid side
    shuffle_window: int = 1
    shuffle_mlp_blocks: int = 2
    # --- regularisation (LlamaGen: 0.1 each; short runs learn faster without)
    token_dropout_p: float = 0.0
    resid_dropout_p: float = 0.0
    ffn_dropout_p: float = 0.0
    drop_path_rate: float = 0.0
    # --- conditioning (the rest: ImageGeneratorTaskConfig)
    class_dropout_prob: float = 0.1
    #: text models: the prompt's tokens join the prefix (False: the pooled prompt alone)
    text_tokens: bool = True
    #: .pt file holding the dataset's codes (made on first use, see the module docstring); "" = encode every batch
    token_cache: str = ""
    # --- sampling: used for the grids during training and saved as the exported pipeline's defaults
    sample_guidance_scale: float = 3.0
    #: "constant" (LlamaGen) or "ramp" (Token-Shuffle's: from 1 at the first step to the scale at the last)
    sample_guidance_schedule: str = "constant"
    sample_cfg_interval: int = -1
    sample_top_k: int = 0
    sample_top_p: float = 1.0
    sample_temperature: float = 1.0


class RasterARTrainModule(ConditionedTrainModule):
    """The raster transformer plus (text models) the text encoder.

    ``forward(tokens_BL, label_B=None, ids_BT=None, mask_BT=None) -> logits_BNkV``.
    """

    def forward(self, tokens_BL: torch.Tensor, label_B: torch.Tensor | None = None,
                ids_BT: torch.Tensor | None = None, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(tokens_BL, cond=self.condition(label_B, ids_BT, mask_BT))


class TokenDataset(torch.utils.data.Dataset):
    """Pre-encoded images: item ``{"tokens": (L,) int64, "caption": str, "class_label": int, "index": int}``."""

    def __init__(self, tokens_DL: torch.Tensor, captions: list[str], class_labels: torch.Tensor):
        self.tokens_DL, self.captions, self.class_labels = tokens_DL, captions, class_labels

    def __len__(self) -> int:
        return self.tokens_DL.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": self.tokens_DL[index].long(), "caption": self.captions[index],
                "class_label": int(self.class_labels[index]), "index": index}


class RasterARTask(ImageGeneratorTask):
    config_class = RasterARTaskConfig
    command = "raster-ar"

    def __init__(self, cfg: RasterARTaskConfig):
        super().__init__(cfg)
        if cfg.sample_guidance_schedule not in ("constant", "ramp"):
            raise UserError(
                f"task.sample_guidance_schedule must be 'constant' or 'ramp', got {cfg.sample_guidance_schedule!r}"
            )
        self.vqvae = self._load_tokenizer()
        self.grid_hw = self.vqvae.grid_size(cfg.resolution)
        if self.grid_hw[0] != self.grid_hw[1]:
            raise UserError(f"raster AR models need a square token grid, got {self.grid_hw} at {cfg.resolution} px")
        if self.grid_hw[0] % cfg.shuffle_window:
            raise UserError(
                f"task.shuffle_window {cfg.shuffle_window} does not tile the tokenizer's {self.grid_hw[0]}x"
                f"{self.grid_hw[1]} token grid at {cfg.resolution} px; use a window that divides {self.grid_hw[0]}"
            )
        self._dataset = None

    # -- pieces ----------------------------------------------------------------------------------------------

    def _load_tokenizer(self):
        from vgen.tokenizers.single_scale_vq import SingleScaleVQModel

        path = Path(self.cfg.tokenizer) if self.cfg.tokenizer else None
        if path is None or not (path / "config.json").is_file():
            raise UserError(
                f"task.tokenizer must be a trained single-scale VQ folder (config.json + weights), got "
                f"{self.cfg.tokenizer!r}; train one with 'vgen train tokenizer --set task.kind=vq' and pass its final/ "
                "folder"
            )
        try:
            vqvae = SingleScaleVQModel.from_pretrained(str(path), low_cpu_mem_usage=False)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"task.tokenizer {path} is not a single-scale VQ folder ({err})".splitlines()[0]) from None
        return vqvae.eval().requires_grad_(False)

    def transformer_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.size:
            if cfg.size not in RASTER_AR_SIZES:
                raise UserError(f"task.size {cfg.size!r} is not one of {', '.join(RASTER_AR_SIZES)}")
            size = dict(RASTER_AR_SIZES[cfg.size])
        else:
            size = dict(depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads)
        kwargs = dict(
            **size, vocab_size=self.vqvae.vocab_size, grid_size=self.grid_hw[0],
            ffn_hidden_dim=cfg.ffn_hidden_dim or None, token_dropout_p=cfg.token_dropout_p,
            resid_dropout_p=cfg.resid_dropout_p, ffn_dropout_p=cfg.ffn_dropout_p, drop_path_rate=cfg.drop_path_rate,
            class_dropout_prob=cfg.class_dropout_prob, conditioning=cfg.conditioning,
            num_classes=self.num_classes(), shuffle_window=cfg.shuffle_window,
            shuffle_mlp_blocks=cfg.shuffle_mlp_blocks,
        )
        if cfg.conditioning == "text":
            kwargs.update(text_embed_dim=cfg.text_embed_dim, text_cross_attn=cfg.text_tokens)
        return kwargs

    # -- data ------------------------------------------------------------------------------------------------

    def _cache_key(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"tokenizer": str(Path(cfg.tokenizer).resolve()), "world": cfg.world,
                "data_path": str(Path(cfg.data_path).resolve()) if cfg.data_path else "",
                "resolution": cfg.resolution, "dataset_length": cfg.dataset_length, "seed": cfg.seed,
                "tag_weights": dict(cfg.tag_weights or {}), "class_conditional": cfg.conditioning == "class",
                "grid": list(self.grid_hw), "vocab_size": self.vqvae.vocab_size}

    def _load_or_make_token_cache(self, path: Path) -> TokenDataset:
        key = self._cache_key()
        if path.is_file():
            from vgen.checkpoints import load_torch_file

            saved = load_torch_file(path, what="token cache")
            if saved.get("key") != key:
                made_for = saved.get("key")
                raise UserError(
                    f"task.token_cache {path} was made for other data ({made_for}); delete it or set task.token_cache "
                    "to a new path"
                )
        else:
            from vgen.atomic_files import temporary_path

            saved = {"key": key, **self.encode_dataset()}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(path)
            torch.save(saved, tmp)
            os.replace(tmp, path)  # atomic: concurrent ranks write the same content
        return TokenDataset(saved["tokens"], list(saved["captions"]), saved["class_labels"])

    @torch.no_grad()
    def encode_dataset(self, batch_size: int = 64) -> dict[str, Any]:
        """Codes (D, L) int16/int32, captions and class labels of every image of the world."""
        images = self.image_dataset()
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False)
        dtype = torch.int16 if self.vqvae.vocab_size <= 2**15 else torch.int32
        # one table filled in place: keeping each batch's small code tensor between the encoder's large temporary
        # buffers fragments the heap (measured: resident memory grew 15 MB per batch of 64 at 64 px, 11 GB for the
        # 50 000-image Shapes cache; filled in place it stays flat)
        tokens = torch.empty(len(images), self.grid_hw[0] * self.grid_hw[1], dtype=dtype)
        labels = torch.empty(len(images), dtype=torch.long)
        captions, done = [], 0
        for batch in loader:
            n = len(batch["caption"])
            tokens[done : done + n] = self.encode_images(batch["image"]).to(dtype)
            labels[done : done + n] = torch.as_tensor(batch["class_label"])
            captions += list(batch["caption"])
            done += n
        return {"tokens": tokens, "captions": captions, "class_labels": labels}

    @torch.no_grad()
    def encode_images(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Frozen tokenizer, always in fp32 (also inside a mixed-precision step): codes (B, L) in raster order."""
        self.vqvae.to(img_B3HW.device)
        with torch.autocast(device_type=img_B3HW.device.type, enabled=False):
            return self.vqvae.encode(img_B3HW.float()).idx

    # -- TrainTask -------------------------------------------------------------------------------------------

    def build_model(self) -> RasterARTrainModule:
        return self.prepare_model(RasterARTrainModule(RasterAR(**self.transformer_kwargs()), self.build_text_encoder()))

    def build_dataset(self) -> torch.utils.data.Dataset:
        if self._dataset is None:
            if self.cfg.token_cache:
                self._dataset = self._load_or_make_token_cache(Path(self.cfg.token_cache))
            else:
                self._dataset = self.image_dataset()
        return self._dataset

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        from vgen.train.loop import unwrap

        tokens_BL = batch["tokens"] if "tokens" in batch else self.encode_images(batch["image"])
        inner = unwrap(model)
        logits_BNkV = model(tokens_BL, **self.condition_inputs(inner, batch, tokens_BL.device))
        target_BNk = inner.transformer.to_units(tokens_BL)
        loss = F.cross_entropy(logits_BNkV.flatten(0, 2).float(), target_BNk.flatten())
        accuracy = (logits_BNkV.detach().argmax(-1) == target_BNk).float().mean()
        return loss, {"accuracy": accuracy}

    def pipeline(self, model: nn.Module):
        """A :class:`RasterARPipeline` around the model being trained, with this run's sampling defaults."""
        from vgen.pipelines.raster_ar import RasterARPipeline
        from vgen.train.loop import unwrap

        inner = unwrap(model)
        cfg = self.cfg
        device = next(inner.transformer.parameters()).device
        return RasterARPipeline(
            vqvae=self.vqvae.to(device), transformer=inner.transformer, text_encoder=inner.text_encoder,
            default_guidance_scale=cfg.sample_guidance_scale, default_guidance_schedule=cfg.sample_guidance_schedule,
            default_cfg_interval=cfg.sample_cfg_interval, default_top_k=cfg.sample_top_k,
            default_top_p=cfg.sample_top_p, default_temperature=cfg.sample_temperature,
        )

    def sample_grid(self, model: nn.Module, step: int):
        return self.sample_grid_of(self.pipeline(model), step)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        pipe = self.pipeline(model)
        pipe.vqvae.cpu()
        pipe.save_pretrained(str(out_dir))
