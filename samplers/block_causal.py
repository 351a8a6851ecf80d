"""The block-causal generation loop (AR video diffusion), written once against
:class:`~vgen.samplers.interfaces.BlockCausalModel`.

Per block of ``f`` frames: draw the block's noise (one generator per video) -> integrate its flow from t = 1 to
t = 0 over a time grid (denoising passes that read the KV cache and store nothing; CFG through
:mod:`vgen.samplers.flow_cfg`) -> the clean block goes back through the model once at t = 0, the only pass that
writes the persistent cache (Self-Forcing's loop; the cache's keep policy runs then). With
:class:`~vgen.samplers.flow_transitions.DenoiseRenoise` and :func:`~vgen.samplers.flow_grids.few_step_time_grid`
this is Self-Forcing's few-step sampler; with :class:`~vgen.samplers.flow_transitions.EulerODE` and a uniform grid,
a plain flow ODE per block.

:class:`BlockCausalSampler` is an iterator over blocks, so a consumer gets each block as soon as it is done (a
streaming demo, a speculative router):

    sampler = BlockCausalSampler(model, cond, batch_size=1, sampling=BlockSampling(grid), generators=[g])
    for block in sampler.blocks(12):           # or sampler.blocks() for an endless stream
        show(block.latents)                    # (B, f, C, h, w) float32, plus block.timings
        if prompt_changed:
            sampler.set_condition(new_cond)    # later blocks follow the new prompt

``sampler.blocks(n, on_step_end=hook)`` calls a :class:`~vgen.samplers.step_end.StepEnd` hook once per block,
between its denoising and its commit, with the block's clean latents ``x_clean`` (which the hook may replace: the
replacement is what is committed, so the later blocks condition on it, and what is yielded) and its starting noise
``noise`` (read-only); the loop stops after the block when the hook is interrupted (diffusers' ``pipe._interrupt``).

The lower-level :meth:`~BlockCausalSampler.denoise` / :meth:`~BlockCausalSampler.commit` split one step in two,
so that another procedure may decide which block is committed (SDVG routing: a drafter's block or the target's).
Randomness: a video's noise comes from its own generator only, so it does not depend on the batch (except through
a Forcing-KV cache, whose dynamic choice is shared by the batch).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from vgen.samplers.flow_cfg import FlowGuidance, velocity_field
from vgen.samplers.flow_grids import check_time_grid
from vgen.samplers.flow_integrate import integrate_flow
from vgen.samplers.flow_transitions import DenoiseRenoise, FlowIntegrator
from vgen.samplers.interfaces import BlockCausalModel
from vgen.samplers.logits import Generators
from vgen.samplers.noise import per_sample_normal
from vgen.samplers.step_end import StepEnd


@dataclass
class BlockSampling:
    """How each block is integrated: a float64 ``time_grid`` from 1 to 0, the ``integrator`` (default
    Self-Forcing's :class:`~vgen.samplers.flow_transitions.DenoiseRenoise`), and velocity CFG with a constant
    weight ``guidance_scale`` (1 = off) while ``guidance_interval[0] <= t <= guidance_interval[1]``."""

    time_grid: torch.Tensor
    integrator: FlowIntegrator = field(default_factory=DenoiseRenoise)
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        self.time_grid = check_time_grid(self.time_grid)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 1.0


@dataclass
class BlockTimings:
    """Seconds of one block (CUDA synchronised): the denoising passes and the clean cache pass."""

    denoise: float = 0.0
    commit: float = 0.0

    @property
    def total(self) -> float:
        return self.denoise + self.commit


@dataclass
class GeneratedBlock:
    """Block ``index`` (frames ``first_frame ... first_frame + f - 1``): ``latents`` (B, f, C, h, w) float32."""

    index: int
    first_frame: int
    latents: torch.Tensor
    timings: BlockTimings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BlockCausalSampler:
    """Generates ``batch_size`` videos block by block (see the module doc).

    Args:
        model: a :class:`~vgen.samplers.interfaces.BlockCausalModel`.
        cond: the model's condition for the B videos.
        batch_size: B.
        sampling: the per-block integration (:class:`BlockSampling`).
        generators: one ``torch.Generator`` per video, or None (global RNG).
        cache: the model's cache choice (e.g. :class:`vgen.models.video_cache.VideoCacheConfig`); None: its default.
        max_frames: frames the cache must hold (the full cache); None: the model's default.
        state: run on this existing generation state instead of starting one (``cond``, ``cache`` and
            ``max_frames`` are then unused); see :meth:`sibling`.
    """

    def __init__(self, model: BlockCausalModel, cond: Any, batch_size: int, sampling: BlockSampling,
                 generators: Generators = None, cache: Any = None, max_frames: int | None = None,
                 state: Any = None):
        self.model, self.batch_size, self.sampling, self.generators = model, batch_size, sampling, generators
        self._use_cfg = sampling.uses_cfg
        if state is None:
            state = model.start(self._with_null(cond), cache=cache, max_frames=max_frames)
        self.state = state
        self.index = 0  # the next block
        self.guidance = FlowGuidance(weight=sampling.guidance_scale, t_low=sampling.guidance_interval[0],
                                     t_high=sampling.guidance_interval[1])

    def _with_null(self, cond: Any) -> Any:
        if not self._use_cfg:
            return cond
        return self.model.concat_conditions(cond, self.model.null_condition(self.batch_size))

    @property
    def cache(self):
        return self.state.cache

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def sibling(self, sampling: BlockSampling, generators: Generators = None) -> BlockCausalSampler:
        """Another sampling of the same model (e.g. fewer steps: an SDVG drafter) on this sampler's very state: the
        two read one KV cache and one condition, so one :meth:`commit` (through either) commits for both. Both must
        agree on CFG (the state's rows are B, or 2B with CFG)."""
        if sampling.uses_cfg != self._use_cfg:
            raise ValueError("a sibling sampler shares the state's rows, so it must use CFG exactly when this one does")
        other = BlockCausalSampler(self.model, None, self.batch_size, sampling, generators, state=self.state)
        other.index = self.index
        return other

    def set_condition(self, cond: Any) -> None:
        """Blocks from the next one on follow ``cond`` (e.g. a new prompt)."""
        self.model.switch_condition(self.state, self._with_null(cond))

    def draw_noise(self) -> torch.Tensor:
        """The next block's starting noise (B, f, C, h, w) float32, from each video's generator."""
        return per_sample_normal((self.batch_size, *self.model.block_shape), self.generators, self.device)

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate the current block from ``noise`` (default: :meth:`draw_noise`) to t = 0; returns the clean
        block (B, f, C, h, w) float32. Reads the cache, writes nothing."""
        x_start = self.draw_noise() if noise is None else noise.to(self.device)
        state = self.state

        def velocity(x_t: torch.Tensor, t_R: torch.Tensor) -> torch.Tensor:
            return self.model.block_velocity(x_t, t_R, state)

        field_fn = velocity_field(velocity, self._use_cfg, self.guidance)
        result = integrate_flow(field_fn, x_start, self.sampling.time_grid, self.sampling.integrator,
                                generators=self.generators)
        return result.x.float()

    @torch.no_grad()
    def commit(self, x_clean: torch.Tensor) -> None:
        """Write block ``x_clean`` (B, f, C, h, w) to the cache with the model's clean pass and move on."""
        x_clean = x_clean.to(self.device, torch.float32)
        self.model.commit_block(torch.cat([x_clean, x_clean]) if self._use_cfg else x_clean, self.state)
        self.index += 1

    def step(self, commit: bool = True, on_step_end: StepEnd | None = None) -> GeneratedBlock:
        """Denoise the next block and (unless ``commit=False``, e.g. the last block of a clip) commit it.

        ``on_step_end`` is called once the block is denoised, as ``on_step_end(index, index, tensors)`` with
        ``x_clean`` (B, f, C, h, w) float32, the clean block, and ``noise`` (B, f, C, h, w) float32, its starting
        noise at t = 1; a returned replacement of ``x_clean`` (same shape) is committed and returned instead, and an
        interrupted hook skips the commit (the loop stops after this block, so nothing reads it)."""
        device = self.device
        first_frame, index = self.index * self.model.frames_per_block, self.index
        _sync(device)
        start = time.perf_counter()
        noise = self.draw_noise()
        x_clean = self.denoise(noise)
        _sync(device)
        denoised = time.perf_counter()
        if on_step_end is not None:
            tensors = on_step_end(index, index, {"x_clean": x_clean, "noise": noise})
            if tensors["x_clean"] is not x_clean:
                x_clean = tensors["x_clean"].to(device, torch.float32)
            commit = commit and not on_step_end.interrupted
        committing = time.perf_counter()
        if commit:
            self.commit(x_clean)
            _sync(device)
        else:
            self.index += 1
        timings = BlockTimings(denoise=denoised - start, commit=time.perf_counter() - committing)
        return GeneratedBlock(index, first_frame, x_clean, timings)

    def blocks(self, num_blocks: int | None = None, on_step_end: StepEnd | None = None) -> Iterator[GeneratedBlock]:
        """Yield blocks as they are generated: ``num_blocks`` of them (the last one is not committed: nothing reads
        it), or without end when None (every block committed). ``on_step_end``: the end-of-block hook (see
        :meth:`step`); the blocks stop after the one at which it is interrupted."""
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        count = 0
        while num_blocks is None or count < num_blocks:
            count += 1
            yield self.step(commit=num_blocks is None or count < num_blocks, on_step_end=on_step_end)
            if on_step_end is not None and on_step_end.interrupted:
                return


def generate_blocks(model: BlockCausalModel, cond: Any, batch_size: int, num_blocks: int, sampling: BlockSampling,
                    generators: Generators = None, cache: Any = None) -> torch.Tensor:
    """All ``num_blocks`` blocks of B videos at once: latent frames (B, num_blocks * f, C, h, w) float32."""
    sampler = BlockCausalSampler(model, cond, batch_size, sampling, generators, cache,
                                 max_frames=num_blocks * model.frames_per_block)
    return torch.cat([block.latents for block in sampler.blocks(num_blocks)], dim=1)
