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
- :class:`IntervalCFG` wraps a schedule and switches guidance off outside a step interval (LlamaGen's
  ``cfg_interval``, FlowAR's t-interval).
"""

from __future__ import annotations

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


def guidance_is_off(schedule: GuidanceSchedule, guidance_scale: float, num_steps: int) -> bool:
    """True when every step's weight is 1, so the unconditional half of the batch need not be computed."""
    return all(schedule.weight(guidance_scale, k, num_steps) == 1.0 for k in range(num_steps))


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 + t) * cond - t * uncond`` with ``t = weight - 1`` (the exact expression official VAR evaluates)."""
    if weight == 1.0:
        return cond
    t = weight - 1.0
    return (1 + t) * cond - t * uncond


def apply_cfg(
    pred_2B: torch.Tensor, schedule: GuidanceSchedule, guidance_scale: float, step: int, num_steps: int
) -> torch.Tensor:
    """Guided prediction from a CFG-doubled batch ``pred_2B`` (conditional half first, then unconditional)."""
    B = pred_2B.shape[0] // 2
    return combine_cfg(pred_2B[:B], pred_2B[B:], schedule.weight(guidance_scale, step, num_steps))
