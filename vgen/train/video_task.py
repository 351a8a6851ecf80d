"""``vgen train video``: the block-causal video model on Moving Shapes latents, in two stages.

    vgen train autoencoder --config configs/moving_shapes/kl_autoencoder_32.yaml --out runs/kl_moving32
    vgen train video --config configs/moving_shapes/video_df.yaml --out runs/video_df      # stage 1
    vgen train video --config configs/moving_shapes/video_sf.yaml --out runs/video_sf      # stage 2

Data: Moving Shapes videos (captions name each object's direction) encoded frame by frame by a trained, frozen KL
autoencoder (the posterior mode times its scale factor), once, at the start (``task.latent_cache`` keeps them on
disk). The text encoder trains with the transformer.

**Stage 1, diffusion forcing** (``task.stage: diffusion_forcing``): flow matching on whole clips with an
independent noise level per block (``t = shift(u)``, ``u ~ U(0, 1)``, ``shift(u) = s u / (1 + (s - 1) u)``),
``x_t = (1 - t) x0 + t eps``, loss ``|v - (eps - x0)|^2`` under the block-causal mask. With probability
``clean_context_prob`` a clip's first k blocks (k random) are kept clean, as the cache holds them at generation
time, and carry no loss. Conditions are dropped with ``cond_drop_rate`` (classifier-free guidance).

**Stage 2, self forcing** (``task.stage: self_forcing``, ``task.init_from`` = stage 1's ``final/``): the model
rolls out its own clip block by block with the few-step sampler (``sample_steps`` steps of denoise then re-noise on
the shifted grid), every block's clean pass writing its KV cache, so it trains on its own context as it will
generate. Each block stops at a random step k; the student's clean prediction there, ``x - t_k v``, is regressed
onto what the frozen stage-1 teacher reaches from the same state and the same (student-generated) context with a
``teacher_steps``-step Euler ODE under CFG ``teacher_guidance`` (Self-Forcing trains this step with distribution
matching against a score teacher; the ODE regression target is the CPU-sized stand-in used here). Gradients flow
through the stopping step only; the cache passes run without them (as in Self-Forcing). The student thus also
learns to sample in ``sample_steps`` steps without CFG.

``export`` writes a :class:`vgen.pipelines.video.VideoPipeline` folder with the sampling defaults of the stage
(stage 1: Euler ODE, ``sample_euler_steps`` steps, CFG ``sample_guidance_scale``; stage 2: the few-step sampler
without CFG).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vgen.checkpoints import state_dict_mismatch
from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.models.video_ar import VIDEO_AR_SIZES, BlockCausalVideoTransformer
from vgen.samplers.flow_grids import shift_time
from vgen.train.task import TrainTask

STAGES = ("diffusion_forcing", "self_forcing")


@dataclass
class VideoTaskConfig:
    """The ``task:`` section of a video run config (``configs/moving_shapes/video_*.yaml``)."""

    #: trained KL autoencoder folder (``vgen train autoencoder`` final/), frames of ``resolution`` px
    autoencoder: str = ""
    stage: str = "diffusion_forcing"
    #: a saved VideoPipeline folder whose transformer + text encoder start this run (stage 2: stage 1's final/)
    init_from: str = ""
    # --- model
    size: str = "video-ar-s"
    embed_dim: int = 0  #: 0 = the size's
    depth: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    patch_size: int = 2
    frames_per_block: int = 4
    cond_drop_rate: float = 0.1
    text_embed_dim: int = 128
    text_depth: int = 2
    text_heads: int = 4
    text_max_length: int = 32
    text_word_mixing: int = 3
    # --- data (Moving Shapes)
    resolution: int = 32
    num_frames: int = 16
    motion: str = "directions"
    max_objects: int = 2
    dataset_length: int = 4000
    seed: int = 0
    #: a .pt file for the encoded latents (reused when it matches the autoencoder and the data settings); "" = none
    latent_cache: str = ""
    encode_batch: int = 256
    # --- flow matching
    time_shift: float = 3.0
    clean_context_prob: float = 0.25
    # --- self forcing
    sample_steps: int = 4
    teacher_steps: int = 8
    teacher_guidance: float = 3.0
    # --- sampling: the grids during training and the exported pipeline's defaults
    sample_prompts: tuple[str, ...] = (
        "a red circle moving right",
        "a blue square moving up",
        "a green triangle moving left and a yellow star moving down",
        "a white hexagon moving down",
    )
    sample_guidance_scale: float = 3.0
    sample_euler_steps: int = 16
    sample_frames: int = 0  #: 0 = num_frames


class VideoTrainModule(nn.Module):
    """What the loop optimises: the transformer and the text encoder. ``forward(x_t, t_BF, ids_BT, mask_BT) -> v``
    (the teacher-forced block-causal pass, with condition dropout in training mode)."""

    def __init__(self, transformer: BlockCausalVideoTransformer, text_encoder: ShapesTextEncoder):
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder

    def condition(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor):
        pooled_BD, tokens_BTD = self.text_encoder(ids_BT, mask_BT)
        return self.transformer.text_condition(pooled_BD, tokens_BTD, mask_BT)

    def forward(self, x_t: torch.Tensor, t_BF: torch.Tensor, ids_BT: torch.Tensor,
                mask_BT: torch.Tensor) -> torch.Tensor:
        return self.transformer(x_t, t_BF, self.condition(ids_BT, mask_BT))


class VideoLatents(torch.utils.data.Dataset):
    """Encoded clips: item ``{"latents": (F, C, h, w) float32, "caption": str, "index": int}``."""

    def __init__(self, latents_NFChw: torch.Tensor, captions: list[str]):
        self.latents, self.captions = latents_NFChw, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index].float(), "caption": self.captions[index], "index": index}


class VideoTask(TrainTask):
    config_class = VideoTaskConfig

    def __init__(self, cfg: VideoTaskConfig):
        super().__init__(cfg)
        if cfg.stage not in STAGES:
            raise UserError(f"task.stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
        if cfg.frames_per_block < 1 or cfg.num_frames % cfg.frames_per_block:
            raise UserError(f"task.num_frames ({cfg.num_frames}) must be a multiple of task.frames_per_block "
                            f"({cfg.frames_per_block})")
        if cfg.stage == "self_forcing" and not cfg.init_from:
            raise UserError("the self_forcing stage starts from a trained model: set task.init_from to the final/ "
                            "folder of a diffusion_forcing run")
        if not 0 <= cfg.clean_context_prob <= 1 or cfg.time_shift <= 0:
            raise UserError("task.clean_context_prob must be in [0, 1] and task.time_shift > 0")
        self.autoencoder = self._load_autoencoder()
        self.latent_shape = (self.autoencoder.latent_channels, *self.autoencoder.latent_size(cfg.resolution))
        self._dataset: VideoLatents | None = None
        self._teacher: VideoTrainModule | None = None

    # -- pieces ------------------------------------------------------------------------------------------------

    def _load_autoencoder(self):
        from vgen.tokenizers.kl_autoencoder import AutoencoderKL

        path = Path(self.cfg.autoencoder) if self.cfg.autoencoder else None
        if path is None or not (path / "config.json").is_file():
            raise UserError(f"task.autoencoder must be a trained KL autoencoder folder (config.json + weights), got "
                            f"{self.cfg.autoencoder!r}; train one with 'vgen train autoencoder --set "
                            "task.world=moving_shapes' and pass its final/ folder")
        return AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False).eval().requires_grad_(False)

    def transformer_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.size not in VIDEO_AR_SIZES:
            raise UserError(f"task.size {cfg.size!r} is not one of {', '.join(VIDEO_AR_SIZES)}")
        size = dict(VIDEO_AR_SIZES[cfg.size])
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(cfg, name):
                size[name] = getattr(cfg, name)
        C, h, w = self.latent_shape
        return dict(**size, latent_channels=C, latent_height=h, latent_width=w, patch_size=cfg.patch_size,
                    frames_per_block=cfg.frames_per_block, max_frames=cfg.num_frames, mlp_ratio=cfg.mlp_ratio,
                    conditioning="text", text_embed_dim=cfg.text_embed_dim, text_cross_attn=True,
                    cond_drop_rate=cfg.cond_drop_rate)

    def _new_module(self) -> VideoTrainModule:
        from vgen.data.moving_shapes import MOTION_VOCABULARY

        cfg = self.cfg
        text_encoder = ShapesTextEncoder(vocabulary=list(MOTION_VOCABULARY), embed_dim=cfg.text_embed_dim,
                                         depth=cfg.text_depth, num_heads=cfg.text_heads,
                                         max_length=cfg.text_max_length, word_mixing=cfg.text_word_mixing)
        return VideoTrainModule(BlockCausalVideoTransformer(**self.transformer_kwargs()), text_encoder)

    def _load_weights(self, module: VideoTrainModule, folder: Path) -> None:
        from safetensors.torch import load_file

        for name in ("transformer", "text_encoder"):
            files = sorted((folder / name).glob("*.safetensors"))
            if not files:
                raise UserError(f"task.init_from: no {name} weights under {folder / name}; give the final/ folder "
                                "of a 'vgen train video' run")
            state = load_file(str(files[0]))
            part = getattr(module, name)
            mismatch = state_dict_mismatch(part.state_dict(), state, limit=3)
            if mismatch:
                raise UserError(f"task.init_from: the {name} in {folder} does not match this config's sizes "
                                f"({mismatch}); set size/embed_dim/depth/num_heads/text_* as that run had them")
            part.load_state_dict({k: v.float() for k, v in state.items()})

    # -- TrainTask -------------------------------------------------------------------------------------------

    def build_model(self) -> VideoTrainModule:
        module = self._new_module()
        if self.cfg.init_from:
            self._load_weights(module, Path(self.cfg.init_from))
        if self.cfg.stage == "self_forcing":
            self._teacher = copy.deepcopy(module).eval().requires_grad_(False)
        return module

    def build_dataset(self) -> VideoLatents:
        if self._dataset is None:
            self._dataset = self._encode_dataset()
        return self._dataset

    def _data_key(self) -> dict[str, Any]:
        from vgen.models.forcing_kv import model_fingerprint

        cfg = self.cfg
        return {"autoencoder": model_fingerprint(self.autoencoder), "resolution": cfg.resolution,
                "num_frames": cfg.num_frames, "motion": cfg.motion, "max_objects": cfg.max_objects,
                "length": cfg.dataset_length, "seed": cfg.seed}

    @torch.no_grad()
    def _encode_dataset(self) -> VideoLatents:
        from vgen.data.moving_shapes import MovingShapesWorld

        cfg, key = self.cfg, self._data_key()
        cache = Path(cfg.latent_cache) if cfg.latent_cache else None
        if cache is not None and cache.is_file():
            saved = torch.load(cache, weights_only=True)
            if saved.get("key") == key:
                return VideoLatents(saved["latents"], list(saved["captions"]))
            print(f"vgen train: {cache} holds latents of other settings; encoding again", file=sys.stderr)
        world = MovingShapesWorld(cfg.resolution, cfg.num_frames, cfg.seed, motion=cfg.motion,
                                  max_objects=cfg.max_objects)
        latents = torch.empty(cfg.dataset_length, cfg.num_frames, *self.latent_shape, dtype=torch.float16)
        captions, frames, owners = [], [], []

        def flush():
            batch = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
            z = self.autoencoder.encode_latents(batch, sample=False)
            for (video, frame), z_frame in zip(owners, z):
                latents[video, frame] = z_frame.half()
            frames.clear()
            owners.clear()

        for index in range(cfg.dataset_length):
            sample = world.sample(index)
            captions.append(sample.caption)
            for t, frame in enumerate(sample.frames):
                frames.append(frame)
                owners.append((index, t))
            if len(frames) >= cfg.encode_batch:
                flush()
        if frames:
            flush()
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "latents": latents, "captions": captions}, cache)
        return VideoLatents(latents, captions)

    def _tokens(self, module: VideoTrainModule, captions, device):
        ids_BT, mask_BT = module.text_encoder.tokenize(list(captions))
        return ids_BT.to(device), mask_BT.to(device)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.cfg.stage == "diffusion_forcing":
            return self.diffusion_forcing_loss(model, batch)
        return self.self_forcing_loss(model, batch)

    def diffusion_forcing_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        from vgen.train.loop import unwrap

        cfg = self.cfg
        x0 = batch["latents"]
        B, F_ = x0.shape[:2]
        f = cfg.frames_per_block
        num_blocks = F_ // f
        t_Bn = shift_time(torch.rand(B, num_blocks, device=x0.device), cfg.time_shift)
        weight_Bn = torch.ones_like(t_Bn)
        if cfg.clean_context_prob > 0 and num_blocks > 1:  # a clean prefix, as the cache holds it
            clean = torch.rand(B, device=x0.device) < cfg.clean_context_prob
            prefix = torch.randint(1, num_blocks, (B,), device=x0.device)
            is_context = clean[:, None] & (torch.arange(num_blocks, device=x0.device)[None] < prefix[:, None])
            t_Bn = torch.where(is_context, torch.zeros_like(t_Bn), t_Bn)
            weight_Bn = (~is_context).float()
        t_BF = t_Bn.repeat_interleave(f, 1)
        eps = torch.randn_like(x0)
        t5 = t_BF[:, :, None, None, None]
        x_t = (1 - t5) * x0 + t5 * eps
        ids_BT, mask_BT = self._tokens(unwrap(model), batch["caption"], x0.device)
        v = model(x_t, t_BF, ids_BT, mask_BT)
        err_BF = (v.float() - (eps - x0)).square().mean((2, 3, 4))
        w_BF = weight_Bn.repeat_interleave(f, 1)
        loss = (err_BF * w_BF).sum() / w_BF.sum().clamp_min(1)
        return loss, {"noisy_blocks": w_BF.mean() * num_blocks}

    def self_forcing_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Roll the student out over a whole clip (see the module doc); mean over blocks of the regression loss."""
        from vgen.models.video_cache import VideoCacheConfig
        from vgen.samplers.flow_cfg import FlowGuidance, velocity_field
        from vgen.samplers.flow_grids import shifted_time_grid
        from vgen.samplers.flow_integrate import integrate_flow
        from vgen.samplers.flow_transitions import DenoiseRenoise, EulerODE
        from vgen.train.loop import unwrap

        cfg = self.cfg
        student, teacher = unwrap(model), self._teacher
        device = batch["latents"].device
        teacher.to(device)
        B = batch["latents"].shape[0]
        num_blocks = cfg.num_frames // cfg.frames_per_block
        ids_BT, mask_BT = self._tokens(student, batch["caption"], device)
        cond = student.condition(ids_BT, mask_BT)
        with torch.no_grad():
            t_cond = teacher.condition(ids_BT, mask_BT)
            t_cond = teacher.transformer.concat_conditions(t_cond, teacher.transformer.null_condition(B))
        full = VideoCacheConfig("full")
        s_state = student.transformer.start(cond, full, cfg.num_frames)
        t_state = teacher.transformer.start(t_cond, full, cfg.num_frames)
        grid = shifted_time_grid(cfg.sample_steps, cfg.time_shift)
        renoise = DenoiseRenoise()
        losses, exits = [], []
        guidance = FlowGuidance(weight=cfg.teacher_guidance)
        for _ in range(num_blocks):
            exit_step = int(torch.randint(cfg.sample_steps, ()))
            x = torch.randn(B, *student.transformer.block_shape, device=device)
            with torch.no_grad():
                for i in range(exit_step):
                    t_cur, t_next = grid[i], grid[i + 1]
                    v = student.transformer.block_velocity(x, torch.full((B,), float(t_cur), device=device), s_state)
                    step = renoise.transition(x.double(), v.double(), t_cur, t_next, i, cfg.sample_steps)
                    x = step.sample(torch.randn_like(x).double()).float()
            t_exit = float(grid[exit_step])
            v = student.transformer.block_velocity(x, torch.full((B,), t_exit, device=device), s_state)
            x0_student = x - t_exit * v
            with torch.no_grad():
                field = velocity_field(lambda x_t, t_R: teacher.transformer.block_velocity(x_t, t_R, t_state), True,
                                       guidance)
                sub_grid = torch.linspace(t_exit, 0.0, cfg.teacher_steps + 1, dtype=torch.float64)
                x0_teacher = integrate_flow(field, x, sub_grid, EulerODE()).x.float()
            losses.append(F.mse_loss(x0_student.float(), x0_teacher))
            exits.append(exit_step)
            with torch.no_grad():
                clean = x0_student.detach()
                student.transformer.commit_block(clean, s_state)
                teacher.transformer.commit_block(torch.cat([clean, clean]), t_state)
        loss = torch.stack(losses).mean()
        return loss, {"exit_step": sum(exits) / len(exits), "last_block_loss": losses[-1].detach()}

    # -- sampling and export ---------------------------------------------------------------------------------

    def sampling_defaults(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.stage == "self_forcing":
            return {"sampler": "few_step", "num_steps": cfg.sample_steps, "guidance_scale": 1.0,
                    "time_shift": cfg.time_shift}
        return {"sampler": "euler", "num_steps": cfg.sample_euler_steps, "guidance_scale": cfg.sample_guidance_scale,
                "time_shift": cfg.time_shift}

    def pipeline(self, module: VideoTrainModule):
        from vgen.pipelines.video import VideoPipeline

        defaults = {f"default_{k}": v for k, v in self.sampling_defaults().items()}
        device = next(module.parameters()).device
        return VideoPipeline(autoencoder=self.autoencoder.to(device), transformer=module.transformer,
                             text_encoder=module.text_encoder, **defaults)

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, step: int):
        from vgen.imaging import make_grid, tensor_to_pil
        from vgen.train.loop import unwrap

        cfg = self.cfg
        pipe = self.pipeline(unwrap(model))
        pipe.set_progress_bar_config(disable=True)
        prompts = list(cfg.sample_prompts)
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        frames = pipe(prompts, num_frames=cfg.sample_frames or cfg.num_frames, generator=generators,
                      output_type="pt").frames  # (B, F, 3, H, W)
        images, captions = [], []
        for prompt, clip in zip(prompts, frames):
            for t, frame in enumerate(clip):
                images.append(frame)
                captions.append(prompt if t == 0 else f"t={t}")
        return make_grid(tensor_to_pil(torch.stack(images), value_range=(0.0, 1.0)), captions,
                         ncols=frames.shape[1])

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from vgen.train.loop import unwrap

        module = unwrap(model)
        pipe = self.pipeline(module)
        pipe.to("cpu")
        pipe.save_pretrained(str(out_dir))
