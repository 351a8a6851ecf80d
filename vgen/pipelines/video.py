"""``VideoPipeline``: per-frame KL autoencoder + block-causal video transformer + text encoder.

    from vgen.pipelines.video import VideoPipeline
    pipe = VideoPipeline.from_pretrained("my-video-folder")
    video = pipe("a red circle moving right", num_frames=48, cache="forcing_kv",
                 generator=torch.Generator().manual_seed(0)).frames[0]       # (48, H, W, 3) floats in [0, 1]

    stream = pipe.stream("a red circle moving right")                      # block by block, without end
    for block in stream:                                                   # VideoBlock: frames as soon as done
        show(block.frames[0]); print(block.timings)
        if block.index == 5:
            stream.set_prompt("a red circle moving left")                  # later blocks follow the new prompt

    stream = pipe.stream("a red circle moving right", sdvg=SDVGOptions(tau=0.5, draft_steps=1))  # SDVG routing

The generation loop is :class:`vgen.samplers.block_causal.BlockCausalSampler`; the cache is chosen by the ``cache``
option (:mod:`vgen.models.video_cache`). A folder may carry ``head_profile.json`` (``vgen profile-heads``), which
the ``forcing_kv`` cache needs; it is checked against the transformer when used. With ``sdvg=SDVGOptions(...)`` a
stream routes every block after the first between a drafter (this model in fewer steps, or another video pipeline
on the same latent space) and this model (:class:`vgen.samplers.sdvg.SDVGRouter`); each block records the decision.

diffusers conventions (from :class:`vgen.pipelines.base.VGenPipeline`): one step per block for
``callback_on_step_end`` (``step_index`` = ``timestep`` = the block index; tensors ``x_clean``, the block's clean
latents, replaceable: the later blocks condition on the replacement, and ``noise``, its starting noise, read-only;
see :meth:`VideoPipeline.__call__`), ``pipe._interrupt = True`` (the video then holds the frames of the blocks made so
far), ``output_type="latent"`` (the latent frames (B, F, C, h, w); ``decode_latents`` turns them into the frames the
same call would have returned) and ``set_progress_bar_config`` (a bar over the blocks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import BaseOutput

# diffusers loads a saved component only from a module that is already imported
import vgen.models.text_encoder  # noqa: F401
import vgen.tokenizers.kl_autoencoder  # noqa: F401
from vgen.errors import UserError
from vgen.models.forcing_kv import PROFILE_FILE, HeadProfile, load_head_profile
from vgen.models.video_ar import BlockCausalVideoTransformer
from vgen.models.video_cache import VideoCacheConfig
from vgen.pipelines.base import VGenPipeline, options_of
from vgen.samplers.block_causal import BlockCausalSampler, BlockSampling, BlockTimings
from vgen.samplers.flow_grids import shifted_time_grid
from vgen.samplers.flow_transitions import DenoiseRenoise, EulerODE
from vgen.samplers.sdvg import FrameScorer, SDVGDecision, SDVGRouter, derived_generators

VIDEO_OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class VideoPipelineOutput(BaseOutput):
    """``frames``: per video, ``np``: (F, H, W, 3) float32 in [0, 1] (stacked: (B, F, H, W, 3)); ``pil``: a list of
    F images; ``pt``: (B, F, 3, H, W); ``latent``: (B, F, C, h, w). ``prompts``: one per video (empty from
    :meth:`VideoPipeline.decode_latents`: latents do not record their prompts)."""

    frames: object
    prompts: list[str]


@dataclass
class VideoBlock:
    """One streamed block: ``frames`` (B, f, H, W, 3) uint8 for frames ``first_frame ...``, its ``latents``
    (B, f, C, h, w), and timings: ``denoise`` / ``commit`` (the diffusion, seconds) and ``decode`` (the
    autoencoder), plus ``elapsed`` (seconds since the stream started, when the block was ready). ``sdvg``: how an
    SDVG stream chose the block (None without SDVG); its timings then also carry the drafter's and the scorer's."""

    index: int
    first_frame: int
    frames: np.ndarray
    latents: torch.Tensor
    timings: BlockTimings
    decode_seconds: float
    elapsed: float
    sdvg: SDVGDecision | None = None


@dataclass
class SDVGOptions:
    """SDVG routing for :meth:`VideoPipeline.stream`: accept a drafted block when its worst-frame score >= ``tau``.

    ``drafter``: another :class:`VideoPipeline` on the same latent space and block size (its own saved sampling),
    or None: this model with ``draft_steps`` denoising steps per block (the rest of its sampling as the target's),
    sharing the target's KV cache, so a block is committed once for both. ``scorer``: a
    :data:`vgen.samplers.sdvg.FrameScorer`; None: :class:`vgen.eval.video_scorers.MovingShapesFrameScorer`."""

    tau: float
    draft_steps: int = 1
    drafter: VideoPipeline | None = None
    scorer: FrameScorer | None = None


class VideoStream:
    """Iterator over the blocks of a generation (see :meth:`VideoPipeline.stream`); ``set_prompt`` switches the
    prompt from the next block on."""

    def __init__(self, pipe: VideoPipeline, sampler: BlockCausalSampler | SDVGRouter, num_blocks: int | None,
                 prompts: list[str], per_prompt: int, drafter_pipe: VideoPipeline | None = None):
        self.pipe, self.sampler, self.num_blocks = pipe, sampler, num_blocks
        self.prompts, self.per_prompt, self.drafter_pipe = prompts, per_prompt, drafter_pipe
        self._blocks = sampler.blocks(num_blocks)
        self._start = time.perf_counter()

    def set_prompt(self, prompt: str | Sequence[str]) -> None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) not in (1, len(self.prompts)):
            raise UserError(f"give one prompt or {len(self.prompts)} (one per stream), got {len(prompts)}")
        if len(prompts) == 1:
            prompts = prompts * len(self.prompts)
        cond, rows = self.pipe.encode_condition(prompts, None, self.per_prompt)
        if isinstance(self.sampler, SDVGRouter):
            drafter_cond = None
            if self.drafter_pipe is not None:
                drafter_cond, _ = self.drafter_pipe.encode_condition(prompts, None, self.per_prompt)
            self.sampler.set_condition(cond, drafter_cond, rows)
        else:
            self.sampler.set_condition(cond)
        self.prompts = prompts

    @property
    def sdvg(self) -> SDVGRouter | None:
        """The router of an SDVG stream (``.stats``: acceptance so far), else None."""
        return self.sampler if isinstance(self.sampler, SDVGRouter) else None

    def __iter__(self) -> Iterator[VideoBlock]:
        return self

    def __next__(self) -> VideoBlock:
        block = next(self._blocks)
        start = time.perf_counter()
        uint8 = getattr(block, "frames", None)  # an accepted SDVG draft was decoded (and scored) already
        if uint8 is None:
            uint8 = self.pipe.decode_uint8(block.latents)
        decode = time.perf_counter() - start
        return VideoBlock(block.index, block.first_frame, uint8, block.latents, block.timings, decode,
                          time.perf_counter() - self._start, getattr(block, "decision", None))


class VideoPipeline(VGenPipeline):
    """Components: ``autoencoder`` (:class:`vgen.tokenizers.kl_autoencoder.AutoencoderKL`, applied per frame),
    ``transformer`` (:class:`vgen.models.video_ar.BlockCausalVideoTransformer`) and ``text_encoder`` (for text
    models). Sampling options: :data:`vgen.pipelines.registry.VIDEO_OPTIONS` (saved per model)."""

    model_cpu_offload_seq = "text_encoder->transformer->autoencoder"
    _optional_components = ["text_encoder"]
    sampling_options = options_of("VideoPipeline")
    #: what the pipeline makes and the command that writes it (the image commands refuse a video model in one line)
    produces, produces_command = "videos", "generate-video"
    output_field, example_prompt = "frames", "a red circle moving right"
    _callback_tensor_inputs = ["x_clean", "noise"]
    _callback_writable_tensor_inputs = ("x_clean",)
    _default_callback_tensor_inputs = ("x_clean",)
    latent_description = (
        "the latent frames (B, F, C, h, w) float32 of the per-frame autoencoder, already multiplied by its "
        "scale_factor (an interrupted call gives the frames of the blocks it made); pipe.decode_latents(latents, "
        "output_type) decodes them into the frames of the same call."
    )

    def __init__(
        self, autoencoder, transformer: BlockCausalVideoTransformer, text_encoder=None,
        default_guidance_scale: float | None = None, default_sampler: str | None = None,
        default_num_steps: int | None = None, default_time_shift: float | None = None,
        default_cache: str | None = None, default_sink_frames: int | None = None,
        default_window_frames: int | None = None, default_recent_frames: int | None = None,
        default_segments_per_frame: int | None = None, default_dynamic_segments: int | None = None,
    ):
        super().__init__()
        self.register_modules(autoencoder=autoencoder, transformer=transformer, text_encoder=text_encoder)
        # the model's own sampling settings (model_index.json); None = the family default of the registry
        self.register_sampling_defaults(
            guidance_scale=default_guidance_scale, sampler=default_sampler, num_steps=default_num_steps,
            time_shift=default_time_shift, cache=default_cache, sink_frames=default_sink_frames,
            window_frames=default_window_frames, recent_frames=default_recent_frames,
            segments_per_frame=default_segments_per_frame, dynamic_segments=default_dynamic_segments,
        )
        self.head_profile: HeadProfile | None = None

    # -- folders: the head profile travels with the pipeline ------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        profile = Path(pretrained_model_name_or_path) / PROFILE_FILE
        pipe.head_profile = load_head_profile(profile) if profile.is_file() else None
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        if self.head_profile is not None:
            self.head_profile.save(Path(save_directory) / PROFILE_FILE)

    # -- pieces ---------------------------------------------------------------------------------------------------

    @property
    def frames_per_block(self) -> int:
        return self.transformer.frames_per_block

    def block_sampling(self, sampling: dict) -> BlockSampling:
        """The per-block integration the resolved options describe."""
        grid = shifted_time_grid(sampling["num_steps"], sampling["time_shift"])
        integrator = DenoiseRenoise() if sampling["sampler"] == "few_step" else EulerODE()
        return BlockSampling(grid, integrator, guidance_scale=sampling["guidance_scale"])

    def cache_config(self, sampling: dict) -> VideoCacheConfig:
        """The KV cache the resolved options describe (Forcing-KV with this pipeline's head profile)."""
        return VideoCacheConfig(
            sampling["cache"], sink_frames=sampling["sink_frames"], window_frames=sampling["window_frames"],
            recent_frames=sampling["recent_frames"], segments_per_frame=sampling["segments_per_frame"],
            dynamic_segments=sampling["dynamic_segments"], head_profile=self.head_profile,
        )

    def check_num_frames(self, num_frames: int | None) -> int:
        f = self.frames_per_block
        num_frames = self.transformer.config.max_frames if num_frames is None else int(num_frames)
        if num_frames < f or num_frames % f:
            raise UserError(f"num_frames must be a positive multiple of this model's block size ({f} frames), got "
                            f"{num_frames}")
        return num_frames

    @torch.no_grad()
    def decode_frames(self, latents_BFChw: torch.Tensor) -> torch.Tensor:
        """Latent frames (B, F, C, h, w) -> frames (B, F, 3, H, W) in [0, 1], frame by frame."""
        B, F_ = latents_BFChw.shape[:2]
        flat = latents_BFChw.flatten(0, 1).to(self.autoencoder.dtype)
        frames = self.autoencoder.decode_latents(flat).float().add(1).mul(0.5).clamp(0, 1)
        return frames.view(B, F_, *frames.shape[1:])

    def decode_uint8(self, latents_BFChw: torch.Tensor) -> np.ndarray:
        """Latent frames (B, F, C, h, w) -> frames (B, F, H, W, 3) uint8 (what a viewer sees)."""
        frames = self.decode_frames(latents_BFChw)
        return (frames.permute(0, 1, 3, 4, 2) * 255).round().to(torch.uint8).cpu().numpy()

    def frames_output(self, latents_BFChw: torch.Tensor, output_type: str, return_dict: bool, prompts: list[str]):
        """Latent frames (B, F, C, h, w) as ``output_type`` (see :class:`VideoPipelineOutput`), wrapped in it unless
        ``return_dict`` is False (then ``(frames, prompts)``)."""
        if output_type not in VIDEO_OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(VIDEO_OUTPUT_TYPES)}, got {output_type!r}")
        if output_type == "latent":
            frames = latents_BFChw.cpu()
        else:
            video = self.decode_frames(latents_BFChw)  # (B, F, 3, H, W)
            if output_type == "pt":
                frames = video.cpu()
            else:
                frames = video.permute(0, 1, 3, 4, 2).cpu().numpy().astype(np.float32)
                if output_type == "pil":
                    frames = [self.numpy_to_pil(clip) for clip in frames]
        if not return_dict:
            return (frames, prompts)
        return VideoPipelineOutput(frames=frames, prompts=prompts)

    @torch.no_grad()
    def decode_latents(self, latents, output_type: str = "np", return_dict: bool = True):
        """The frames of a call's ``output_type="latent"`` result (B, F, C, h, w), as ``output_type`` (``np``,
        ``pil`` or ``pt``), in a :class:`VideoPipelineOutput` with no prompts."""
        if output_type == "latent":
            raise UserError("decode_latents turns latents into frames: give output_type np, pil or pt")
        shape = tuple(self.transformer.block_shape[1:])
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or tuple(latents.shape[2:]) != shape \
                or not latents.is_floating_point():
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise UserError(f"latents must be latent frames (B, F, {', '.join(map(str, shape))}) float, as "
                            f"output_type='latent' gives; got {got}")
        return self.frames_output(latents, output_type, return_dict, [])

    def _sampler(self, prompt, num_videos_per_prompt, generator, num_frames, sampling_given):
        sampling = self.resolve_sampling(**sampling_given)
        cond, prompts = self.encode_condition(prompt, None, num_videos_per_prompt)
        generators = self.generators_for(generator, len(prompts))
        sampler = BlockCausalSampler(self.transformer, cond, len(prompts), self.block_sampling(sampling),
                                     generators, self.cache_config(sampling), max_frames=num_frames)
        return sampler, prompts

    # -- generation -----------------------------------------------------------------------------------------------

    def stream(self, prompt: str | list[str], num_frames: int | None = None, num_videos_per_prompt: int = 1,
               generator: torch.Generator | list[torch.Generator] | None = None, sdvg: SDVGOptions | None = None,
               **sampling) -> VideoStream:
        """Generate block by block: an iterator of :class:`VideoBlock` (``num_frames`` frames, or without end
        when None; the full cache then grows until its default capacity, the training length, is spent, so long
        streams use ``cache="sink_window"`` or ``"forcing_kv"``). ``sampling``: options as in ``__call__``.
        ``sdvg``: route blocks between a drafter and this model (:class:`SDVGOptions`)."""
        num_blocks = None if num_frames is None else self.check_num_frames(num_frames) // self.frames_per_block
        capacity = num_frames
        if num_frames is None and sampling.get("cache", self.config.get("default_cache")) == "full":
            capacity = self.transformer.config.max_frames
        sampler, prompts = self._sampler(prompt, num_videos_per_prompt, generator, capacity, sampling)
        base = [p for i, p in enumerate(prompts) if i % num_videos_per_prompt == 0]
        if sdvg is None:
            return VideoStream(self, sampler, num_blocks, base, num_videos_per_prompt)
        router = self._sdvg_router(sdvg, sampler, prompts, num_videos_per_prompt, capacity, sampling)
        return VideoStream(self, router, num_blocks, base, num_videos_per_prompt, drafter_pipe=sdvg.drafter)

    def _sdvg_router(self, sdvg: SDVGOptions, target: BlockCausalSampler, prompts: list[str], per_prompt: int,
                     capacity: int | None, sampling: dict) -> SDVGRouter:
        """The router for an SDVG stream whose target sampler is ``target`` (see :class:`SDVGOptions`)."""
        scorer = sdvg.scorer
        if scorer is None:
            from vgen.eval.video_scorers import MovingShapesFrameScorer

            scorer = MovingShapesFrameScorer()
        if not callable(scorer):
            raise UserError("the SDVG scorer must be a callable scorer(frames (B, f, H, W, 3) uint8, prompts)")
        try:
            tau = float(sdvg.tau)
        except (TypeError, ValueError):
            raise UserError(f"the SDVG threshold tau must be a number, got {sdvg.tau!r}") from None
        if tau != tau:
            raise UserError("the SDVG threshold tau must be a number or +-inf, got NaN")
        draft_generators = derived_generators(target.generators)
        if sdvg.drafter is None:
            steps = self.option("num_steps").check(sdvg.draft_steps)
            draft_sampling = self.block_sampling(self.resolve_sampling(**{**sampling, "num_steps": steps}))
            drafter = target.sibling(draft_sampling, draft_generators)
        else:
            other = sdvg.drafter
            if not isinstance(other, VideoPipeline):
                raise UserError(f"the SDVG drafter must be a VideoPipeline, got {type(other).__name__}")
            if tuple(other.transformer.block_shape) != tuple(self.transformer.block_shape):
                raise UserError(f"the SDVG drafter's blocks {tuple(other.transformer.block_shape)} differ from this "
                                f"model's {tuple(self.transformer.block_shape)}; it must share the latent space")
            draft_options = other.resolve_sampling(cache=self.resolve_sampling(**sampling)["cache"])
            cond, _ = other.encode_condition(prompts[::per_prompt], None, per_prompt)
            drafter = BlockCausalSampler(other.transformer, cond, len(prompts), other.block_sampling(draft_options),
                                         draft_generators, other.cache_config(draft_options), max_frames=capacity)
        return SDVGRouter(target, drafter, self.decode_uint8, scorer, tau, prompts)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **sampling,
    ):
        """Generate ``num_videos_per_prompt`` videos of ``num_frames`` frames per prompt.

        Args:
            prompt: text prompt(s) (Moving Shapes vocabulary for the shipped models).
            num_frames: frames per video, a multiple of the block size (default: the training length).
            num_videos_per_prompt: videos per prompt; videos are ordered prompt by prompt.
            generator: one ``torch.Generator`` per video (a video then does not depend on the batch, except with the
                shared Forcing-KV choice) or a single one (seeded ``s``: video i gets the stream of seed ``s + i``).
            output_type: ``"np"`` (B, F, H, W, 3) float32 in [0, 1], ``"pil"`` (a list of F images per video),
                ``"pt"`` (B, F, 3, H, W) or ``"latent"``: the latent frames (B, F, C, h, w) before decoding (see
                :attr:`latent_description`; ``decode_latents``).
            return_dict: return :class:`VideoPipelineOutput` (else a tuple ``(frames, prompts)``).
            callback_on_step_end: diffusers' ``callback(pipe, step_index, timestep, callback_kwargs) -> dict``, called
                after every block of ``f`` frames is denoised (``step_index`` = ``timestep`` = the block index; frames
                ``f * step_index ...``), before it is written to the KV cache. ``callback_kwargs`` holds the tensors of
                ``callback_on_step_end_tensor_inputs`` (default ``["x_clean"]``; any of ``x_clean`` (B, f, C, h, w)
                float32, the block's clean latents, and ``noise`` (same shape), the block's starting noise at t = 1).
                Returning a new ``x_clean`` replaces the block: it is the block's frames in the video and what the
                KV cache stores, so the later blocks condition on it; ``noise`` is read-only. Setting
                ``pipe._interrupt = True`` stops after the block: the video holds the frames of the blocks made so
                far (``f * (step_index + 1)`` frames in every output type).
            **sampling: any of the options (``guidance_scale``, ``sampler``, ``num_steps``, ``time_shift``,
                ``cache``, ``sink_frames``, ``window_frames``, ``recent_frames``, ``segments_per_frame``,
                ``dynamic_segments``); those left out take the model's saved values.
        """
        if output_type not in VIDEO_OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(VIDEO_OUTPUT_TYPES)}, got {output_type!r}")
        num_frames = self.check_num_frames(num_frames)
        num_blocks = num_frames // self.frames_per_block
        sampler, prompts = self._sampler(prompt, num_videos_per_prompt, generator, num_frames, sampling)
        on_step_end = self.step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, num_blocks)
        blocks = []
        with self.progress_bar(total=num_blocks) as bar:
            for block in sampler.blocks(num_blocks, on_step_end=on_step_end):
                blocks.append(block.latents)
                bar.update()
        return self.frames_output(torch.cat(blocks, 1), output_type, return_dict, prompts)


#: where the packaged default video pipeline lives once one ships (``vgen generate-video`` without ``--model``)
DEFAULT_VIDEO_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "default_video_model"


def load_video_pipeline(model: str | Path | None = None, device=None) -> tuple[VideoPipeline, Path]:
    """A saved :class:`VideoPipeline` folder (or the shipped default video model when ``model`` is None) on
    ``device``; a :class:`UserError` for anything else. Returns ``(pipeline, folder)``."""
    from vgen.pipelines import load_pipeline, pipeline_class_name

    if model is None:
        if not (DEFAULT_VIDEO_MODEL_DIR / "model_index.json").is_file():
            raise UserError("no --model given and no video model is shipped with this vgen installation; pass "
                            "--model DIR (a folder saved by 'vgen train video')")
        model = DEFAULT_VIDEO_MODEL_DIR
    model_dir = Path(model)
    class_name = pipeline_class_name(model_dir)
    if class_name != "VideoPipeline":
        raise UserError(f"{model_dir} holds a {class_name}, not a video model; give a folder saved by "
                        "'vgen train video'")
    pipe, model_dir = load_pipeline(model_dir, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model_dir
