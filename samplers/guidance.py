"""Classifier-free guidance (CFG) with a schedule over generation steps.

Every family combines conditional and unconditional predictions the same way,

    guided = uncond + w_k * (cond - uncond) = (1 + t_k) * cond - t_k * uncond,   t_k = w_k - 1,

and differs only in how the weight ``w_k`` moves over steps (scales for VAR/NFIG/FlowAR, cells for xAR, tokens for
raster AR). A schedule maps ``(guidance_scale, step, num_steps)`` to ``w_k``; ``w_k == 1`` means "no guidance" and
lets the loop skip the unconditional pass altogether. The same object works on logits and on velocities.

- :class:`LinearRampCFG` is VAR's schedule: ``t_k = guidance_scale * k / (K - 1)``, so ``w = 1`` at the first scale
  and ``1 + guidance_scale`` at the last. ``guidance_scale`` here is exactly official VAR's ``cfg`` (1.5 in its
  README), and ``guidance_scale = 0`` turns guidance off.
- :class:`ConstantCFG` is the diffusers convention: ``w_k = guidance_scale`` at every step, ``1`` turns it off.
- :class:`WeightRampCFG` is the FlowAR / xAR / MAR ramp: ``w_k = 1 + (guidance_scale - 1) * k / (K - 1)``, so the
  first unit is unguided and the last one gets ``w = guidance_scale`` (official FlowAR's and xAR's ``cfg``; ``1``
  turns it off).
- :class:`ProfileCFG` gives each step its own share of the strength: ``t_k = guidance_scale * profile[k]``. VAR's
  ramp is the profile ``k / (K - 1)``; a trained model may store another one (e.g. most guidance on the coarse
  scales, where a next-scale model places objects and gives them colours) as its pipeline's default.
- :class:`IntervalCFG` wraps a schedule and switches guidance off outside a step interval (LlamaGen's
  ``cfg_interval``). FlowAR's interval is over flow time inside one unit's integration, not over AR steps: it lives
  in :mod:`vgen.samplers.flow_cfg`.

Two combination expressions exist because official code evaluates them in different orders (equal in exact
arithmetic, not bit for bit): :func:`combine_cfg` (VAR) and :func:`combine_cfg_difference` (FlowAR, xAR, LlamaGen).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class GuidanceSchedule(Protocol):
    """Maps the user's ``guidance_scale`` to the CFG weight ``w_k`` used at step ``k`` of ``num_steps``."""

    def weight(self, guidance_scale: float, step: int, num_steps: int) -> float: ...


@dataclass(frozen=True)
class LinearRampCFG:
    """VAR / MUSE ramp: ``w_k = 1 + guidance_scale * k / (num_steps - 1)`` (``num_steps = 1`` gives ``w = 1``)."""

    def weight(self, guidance_scale: float, step: int, num_steps: int) -> float:
        ratio = step / (num_steps - 1) if num_steps > 1 else 0.0
        return 1.0 + guidance_scale * ratio


@dataclass(frozen=True)
class ConstantCFG:
    """``w_k = guidance_scale`` at every step (diffusers convention; ``1`` = off)."""

    def weight(self, guidance_scale: float, step: int, num_steps: int) -> float:
        return float(guidance_scale)


@dataclass(frozen=True)
class WeightRampCFG:
    """FlowAR / xAR / MAR ramp: ``w_k = (guidance_scale - 1) * k / (num_steps - 1) + 1``, evaluated in the order the
    official code does, so FlowAR's ``cfg=2.4`` over 5 scales gives exactly ``[1, 1.35, 1.7, 2.05, 2.4]`` and xAR's
    ``cfg=2.7`` over 4 cells ``[1, 1.5667, 2.1333, 2.7]``. ``num_steps = 1`` gives ``w = guidance_scale``."""

    def weight(self, guidance_scale: float, step: int, num_steps: int) -> float:
        if num_steps == 1:
            return float(guidance_scale)
        return (guidance_scale - 1) * step / (num_steps - 1) + 1


@dataclass(frozen=True)
class ProfileCFG:
    """``w_k = 1 + guidance_scale * profile[k]``: one entry per step, ``guidance_scale`` scales them all.

    With ``profile = (0, 1/(K-1), ..., 1)`` it is :class:`LinearRampCFG`; an entry of 0 switches guidance off at that
    step. ``num_steps`` must equal ``len(profile)``."""

    profile: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "profile", tuple(float(p) for p in self.profile))
        if not self.profile or not all(math.isfinite(p) and p >= 0 for p in self.profile):
            raise ValueError(f"a guidance profile needs one entry >= 0 per step, got {list(self.profile)}")

    def weight(self, guidance_scale: float, step: int, num_steps: int) -> float:
        if num_steps != len(self.profile):
            raise ValueError(
                f"the guidance profile has {len(self.profile)} entries but this model generates in {num_steps} "
                "steps; give one entry per step (scale)"
            )
        return 1.0 + guidance_scale * self.profile[step]


@dataclass(frozen=True)
class IntervalCFG:
    """Apply ``inner`` only for ``start <= step / (num_steps - 1) <= end``; elsewhere ``w = 1``."""

    inner: GuidanceSchedule
    start: float = 0.0
    end: float = 1.0

    def weight(self, guidance_scale: float, step: int, num_steps: int) -> float:
        ratio = step / (num_steps - 1) if num_steps > 1 else 0.0
        if self.start <= ratio <= self.end:
            return self.inner.weight(guidance_scale, step, num_steps)
        return 1.0


#: The profile name for VAR's linear ramp (:class:`LinearRampCFG`), as pipelines save and the CLI takes it.
RAMP = "ramp"


def schedule_from_profile(profile: str | Sequence[float]) -> GuidanceSchedule:
    """:data:`RAMP` -> :class:`LinearRampCFG`; a list of per-step shares -> :class:`ProfileCFG`."""
    if isinstance(profile, str):
        if profile != RAMP:
            raise ValueError(f"unknown guidance profile {profile!r}: use {RAMP!r} or one number per step")
        return LinearRampCFG()
    return ProfileCFG(tuple(profile))


def check_profile(profile: str | Sequence[float], num_steps: int) -> str | list[float]:
    """``profile`` as a pipeline saves it: :data:`RAMP`, or ``num_steps`` shares >= 0 as floats; else ValueError."""
    if isinstance(profile, str) and profile == RAMP:
        return RAMP
    shares = [] if isinstance(profile, str) else [float(share) for share in profile]
    if len(shares) != num_steps or not all(math.isfinite(share) and share >= 0 for share in shares):
        raise ValueError(
            f"guidance profile {profile!r} does not fit: give {num_steps} shares >= 0, one per generation step (finite "
            f"numbers), or {RAMP!r} for VAR's ramp"
        )
    return shares


def parse_guidance_profile(text: str) -> str | list[float]:
    """A command-line profile: ``ramp`` or comma-separated shares, e.g. ``0.5,0.75,1,1,1,0.75,0.75``."""
    text = text.strip()
    if text == RAMP:
        return RAMP
    try:
        shares = [float(part) for part in text.split(",")]
    except ValueError:
        shares = []
    if not shares or not all(math.isfinite(share) for share in shares):
        raise ValueError(
            f"guidance profile {text[:60]!r} is neither {RAMP!r} nor comma-separated finite numbers "
            "(e.g. 0.5,0.75,1,1,1,0.75,0.75)"
        )
    return shares


def guidance_is_off(schedule: GuidanceSchedule, guidance_scale: float, num_steps: int) -> bool:
    """True when every step's weight is 1, so the unconditional half of the batch need not be computed."""
    return all(schedule.weight(guidance_scale, k, num_steps) == 1.0 for k in range(num_steps))


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 + t) * cond - t * uncond`` with ``t = weight - 1`` (the exact expression official VAR evaluates)."""
    if weight == 1.0:
        return cond
    t = weight - 1.0
    return (1 + t) * cond - t * uncond


def combine_cfg_difference(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """``uncond + weight * (cond - uncond)`` (the expression official FlowAR, xAR and LlamaGen evaluate)."""
    if weight == 1.0:
        return cond
    return uncond + weight * (cond - uncond)


def apply_cfg(
    pred_2B: torch.Tensor, schedule: GuidanceSchedule, guidance_scale: float, step: int, num_steps: int
) -> torch.Tensor:
    """Guided prediction from a CFG-doubled batch ``pred_2B`` (conditional half first, then unconditional)."""
    B = pred_2B.shape[0] // 2
    return combine_cfg(pred_2B[:B], pred_2B[B:], schedule.weight(guidance_scale, step, num_steps))
