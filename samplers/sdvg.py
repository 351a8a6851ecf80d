"""SDVG quality routing for block-causal video (Hu & Zhang, "Speculative Decoding for Autoregressive Video
Generation", 2026), written once against the block loop :class:`~vgen.samplers.block_causal.BlockCausalSampler`.

Per block::

    block 0:        x = target.denoise()                              (always the target: it anchors the scene)
    block b >= 1:   d = drafter.denoise()                             (a cheaper model, or the same one in fewer steps)
                    q = min over the block's frames of scorer(decode(d), prompt)      (worst-frame aggregation)
                    x = d  if q >= tau  else  target.denoise()                            (per video)
    commit x into the target's and the drafter's caches (once when the two share one state)

It is a quality router, not rejection sampling: the output distribution is not the target's, and ``tau`` is the
one knob between draft-only quality and speed (``tau = -inf`` accepts every drafted block after the first) and
target-only generation (``tau = +inf`` rejects every draft; the target then draws exactly the random numbers of a
target-only run, so the videos are the target-only videos for the same seeds).

The scorer is pluggable: any callable ``scorer(frames_BfHW3 uint8, prompts) -> scores (B, f)`` (higher is better,
one row per video, one score per frame); :class:`vgen.eval.video_scorers.MovingShapesFrameScorer` is the one for
Moving Shapes. ``decode`` maps a latent block (B, f, C, h, w) to its frames (B, f, H, W, 3) uint8, the frames a
viewer would see; a consumer can reuse them for an accepted block (:attr:`RoutedBlock.frames`).

    router = SDVGRouter(target, target.sibling(draft_sampling, draft_generators), decode, scorer, tau=0.3,
                        prompts=["a red circle moving right"])
    for block in router.blocks(8):          # RoutedBlock: .latents, .decision (accepted, scores), .timings
        ...
    router.stats.acceptance_rate           # accepted drafts over drafted blocks (the first block is never drafted)

Batches: every video is routed on its own (``decision.accepted_B``); the target regenerates the block when at least
one video rejects its draft, and each video takes its own choice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vgen.samplers.block_causal import BlockCausalSampler, BlockTimings, GeneratedBlock, _sync
from vgen.samplers.logits import Generators

#: ``scorer(frames (B, f, H, W, 3) uint8, prompts (B,)) -> scores (B, f)``; higher is better
FrameScorer = Callable[[np.ndarray, Sequence[str]], Any]
#: ``decode(latents (B, f, C, h, w) float32) -> frames (B, f, H, W, 3) uint8``
BlockDecoder = Callable[[torch.Tensor], np.ndarray]


@dataclass
class RoutedTimings(BlockTimings):
    """Seconds of one routed block: ``draft`` and ``target`` denoising (``denoise`` is their sum, the diffusion
    time together with ``commit``), and ``draft_decode`` / ``score``, the router's own overhead (reported apart,
    as the paper reports its reward model apart)."""

    draft: float = 0.0
    target: float = 0.0
    draft_decode: float = 0.0
    score: float = 0.0

    @property
    def routing(self) -> float:
        return self.draft_decode + self.score


@dataclass
class SDVGDecision:
    """How one block was chosen: ``drafted`` (False for the first block), per video ``accepted_B`` (the draft was
    kept) and ``score_B`` (its worst-frame score; None when nothing was drafted), ``frame_scores`` (B, f)."""

    drafted: bool
    accepted_B: list[bool]
    score_B: list[float] | None = None
    frame_scores: np.ndarray | None = None

    @property
    def all_accepted(self) -> bool:
        return self.drafted and all(self.accepted_B)


@dataclass
class RoutedBlock(GeneratedBlock):
    """A :class:`~vgen.samplers.block_causal.GeneratedBlock` with its ``decision`` and, when every video kept its
    draft, the decoded ``frames`` (B, f, H, W, 3) uint8 that were scored (else None: decode ``latents``)."""

    decision: SDVGDecision = None
    frames: np.ndarray | None = None


@dataclass
class SDVGStats:
    """Counts over the blocks routed so far (per video): ``blocks``, ``drafted`` (blocks after the first), and
    ``accepted`` drafts; ``target_blocks``: blocks the target denoised (once per block, for the whole batch)."""

    blocks: int = 0
    drafted: int = 0
    accepted: int = 0
    target_blocks: int = 0
    scores: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over drafted blocks (NaN before the second block)."""
        return self.accepted / self.drafted if self.drafted else float("nan")


def worst_frame_scores(scores_Bf: Any, batch_size: int, frames: int) -> np.ndarray:
    """The scorer's output as a float64 (B, f) array, checked; returns it (the router takes the min over f)."""
    scores = np.asarray(scores_Bf, dtype=np.float64)
    if scores.shape != (batch_size, frames):
        raise ValueError(f"the SDVG scorer must return one score per frame, shape ({batch_size}, {frames}); got "
                         f"{scores.shape}")
    return scores


def derived_generators(generators: Generators) -> Generators:
    """Independent generators for a drafter, one per video, seeded from copies of ``generators`` (which are left
    untouched, so the target draws exactly what it would draw alone)."""
    if generators is None:
        return None
    out = []
    for g in generators:
        copy = torch.Generator(g.device)
        copy.set_state(g.get_state())
        seed = int(torch.randint(0, 2**62, (1,), generator=copy, device=g.device).item())
        out.append(torch.Generator(g.device).manual_seed(seed ^ 0x5D5D_5D5D))
    return out


class SDVGRouter:
    """Routes each block between ``drafter`` and ``target`` (see the module doc).

    Args:
        target, drafter: block samplers over the same batch and block shape, at the same block; the drafter may be
            ``target.sibling(...)`` (same model and state: one commit serves both) or a sampler of its own model.
        decode: latent block -> uint8 frames (:data:`BlockDecoder`).
        scorer: :data:`FrameScorer`.
        tau: acceptance threshold on the worst-frame score (``-inf`` / ``+inf`` allowed).
        prompts: one per video (what the scorer compares the frames with).
    """

    def __init__(self, target: BlockCausalSampler, drafter: BlockCausalSampler, decode: BlockDecoder,
                 scorer: FrameScorer, tau: float, prompts: Sequence[str]):
        if drafter.batch_size != target.batch_size:
            raise ValueError(f"drafter and target generate {drafter.batch_size} and {target.batch_size} videos")
        if tuple(drafter.model.block_shape) != tuple(target.model.block_shape):
            raise ValueError(f"drafter blocks {tuple(drafter.model.block_shape)} differ from the target's "
                             f"{tuple(target.model.block_shape)}; SDVG needs one latent space and block size")
        if drafter.index != target.index:
            raise ValueError("drafter and target must start at the same block")
        tau = float(tau)
        if math.isnan(tau):
            raise ValueError("tau must be a number (or +-inf), got NaN")
        self.target, self.drafter, self.decode, self.scorer, self.tau = target, drafter, decode, scorer, tau
        self.shared_state = drafter.state is target.state
        self.prompts = self._check_prompts(prompts)
        self.stats = SDVGStats()

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        prompts = list(prompts)
        if len(prompts) != self.target.batch_size:
            raise ValueError(f"give one prompt per video ({self.target.batch_size}), got {len(prompts)}")
        return prompts

    @property
    def index(self) -> int:
        return self.target.index

    @property
    def cache(self):
        return self.target.cache

    def set_condition(self, cond: Any, drafter_cond: Any = None, prompts: Sequence[str] | None = None) -> None:
        """Blocks from the next one follow ``cond`` (the target's; ``drafter_cond``: the drafter's when it encodes
        prompts its own way, default ``cond``) and are scored against ``prompts``."""
        self.target.set_condition(cond)
        if not self.shared_state:
            self.drafter.set_condition(cond if drafter_cond is None else drafter_cond)
        if prompts is not None:
            self.prompts = self._check_prompts(prompts)

    def _score(self, draft: torch.Tensor, timings: RoutedTimings) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        frames = self.decode(draft)
        timings.draft_decode = time.perf_counter() - start
        start = time.perf_counter()
        scores = worst_frame_scores(self.scorer(frames, self.prompts), self.target.batch_size, draft.shape[1])
        timings.score = time.perf_counter() - start
        return frames, scores

    def _timed(self, fn, *args):
        _sync(self.target.device)
        start = time.perf_counter()
        out = fn(*args)
        _sync(self.target.device)
        return out, time.perf_counter() - start

    def step(self, commit: bool = True) -> RoutedBlock:
        """Route the next block and (unless ``commit=False``: the last block of a clip) commit the chosen one."""
        index = self.target.index
        first_frame = index * self.target.model.frames_per_block
        B = self.target.batch_size
        timings = RoutedTimings()
        frames = None
        if index == 0:  # the first block always comes from the target
            x, timings.target = self._timed(self.target.denoise)
            decision = SDVGDecision(drafted=False, accepted_B=[False] * B)
            self.stats.target_blocks += 1
        else:
            draft, timings.draft = self._timed(self.drafter.denoise)
            draft_frames, scores_Bf = self._score(draft, timings)
            score_B = scores_Bf.min(axis=1)
            accepted_B = [bool(s >= self.tau) for s in score_B]
            decision = SDVGDecision(True, accepted_B, [float(s) for s in score_B], scores_Bf)
            self.stats.drafted += B
            self.stats.accepted += sum(accepted_B)
            self.stats.scores.extend(decision.score_B)
            if all(accepted_B):
                x, frames = draft, draft_frames
            else:
                x_target, timings.target = self._timed(self.target.denoise)
                self.stats.target_blocks += 1
                keep = torch.tensor(accepted_B, device=x_target.device).view(-1, *[1] * (x_target.dim() - 1))
                x = torch.where(keep, draft.to(x_target.device), x_target)
        timings.denoise = timings.draft + timings.target
        self.stats.blocks += B
        if commit:
            _, timings.commit = self._timed(self._commit, x)
        else:
            self.target.index += 1
            self.drafter.index += 1
        return RoutedBlock(index, first_frame, x, timings, decision=decision, frames=frames)

    def _commit(self, x: torch.Tensor) -> None:
        self.target.commit(x)
        if self.shared_state:
            self.drafter.index = self.target.index
        else:
            self.drafter.commit(x)

    def blocks(self, num_blocks: int | None = None) -> Iterator[RoutedBlock]:
        """Yield routed blocks: ``num_blocks`` (the last one not committed), or without end when None."""
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        count = 0
        while num_blocks is None or count < num_blocks:
            count += 1
            yield self.step(commit=num_blocks is None or count < num_blocks)
