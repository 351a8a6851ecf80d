"""Classifier-free guidance of a velocity inside one AR unit's flow, as official FlowAR and xAR apply it.

The per-unit weight ``w_k`` comes from a :mod:`vgen.samplers.guidance` schedule (FlowAR / xAR:
:class:`~vgen.samplers.guidance.WeightRampCFG`); this module adds what happens inside the unit's integration:

- guidance is on at a step iff ``w_k != 1`` and ``t_low <= t_cur <= t_high`` (FlowAR's ``guidance`` = ``t_high``,
  0.9 for FlowAR-S/L, 0.7 for FlowAR-H; xAR: always on). Official code tests ``cfg > 1``: a weight below 1 (weaker
  than conditional) is applied here and ignored there.
- guided velocity ``v = v_u + w (v_c - v_u)`` (:func:`~vgen.samplers.guidance.combine_cfg_difference`), in float64.

The model is called on a CFG-doubled batch (conditional rows first, then unconditional), like every loop of
vgen.samplers. What x the unconditional rows see is the one difference between the two official samplers:

- ``uncond_own_x=False`` (xAR): the state holds the B conditional rows; the model always sees ``[x, x]``; steps
  without guidance use ``v_c``.
- ``uncond_own_x=True`` (FlowAR's ``euler_sampler``): the state holds 2B rows, the unconditional half starting from
  its own noise. On a guided step the model sees ``[x_c, x_c]`` and both halves move by the guided velocity (so the
  unconditional half moves from its own x by a velocity computed at ``x_c``); on other steps each half runs on its
  own x with its own velocity.

The unconditional rows never feed back into the conditional ones, so both modes give the same conditional result
for the same conditional noise; ``True`` reproduces the whole 2B-row official record (parity fixtures) at the cost
of drawing unconditional noise.

Under the Euler-Maruyama scheme the guided velocity goes into the drift; official xAR combines the two halves'
drifts instead, which is the same in exact arithmetic (the drift is affine in v for a fixed x and t) and differs by
float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from vgen.samplers.guidance import combine_cfg_difference

#: A model's velocity: ``velocity(x_t, t_R) -> v`` with ``x_t`` (R, ...) float32, ``t_R`` (R,) float32 (t = 1 is
#: noise), ``v`` (R, ...) in any float dtype. R is the model batch (2B when CFG doubles it).
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: What the integrators call: ``field(x, t_cur) -> v``, ``x`` (R, ...) float64, ``t_cur`` a float64 0-d tensor,
#: ``v`` (R, ...) float64.
VelocityField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowGuidance:
    """CFG inside one unit: weight ``weight`` while ``t_low <= t <= t_high``; see the module doc for
    ``uncond_own_x``. ``FlowGuidance()`` (weight 1) is no guidance."""

    weight: float = 1.0
    t_low: float = 0.0
    t_high: float = 1.0
    uncond_own_x: bool = False

    def guided_at(self, t_cur: float) -> bool:
        return self.weight != 1.0 and self.t_low <= t_cur <= self.t_high


def model_time(t_cur: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """The time the model receives, as official code builds it: ``ones(R, float64) * t_cur`` cast to float32, (R,)."""
    return (torch.ones(rows, dtype=torch.float64, device=device) * t_cur.to(device)).to(torch.float32)


def velocity_field(velocity: Velocity, cfg_doubled: bool, guidance: FlowGuidance | None = None) -> VelocityField:
    """Wrap a model's ``velocity`` into the float64 field an integrator steps with.

    ``cfg_doubled``: the model's condition holds 2B rows (conditional first); the state then holds B rows, or 2B
    with ``guidance.uncond_own_x``. Without it the state and the model batch are the same B rows (no CFG).
    ``guidance``: default ``FlowGuidance()`` (weight 1: the conditional velocity).
    """
    guidance = guidance if guidance is not None else FlowGuidance()

    def call(x_in: torch.Tensor, t_cur: torch.Tensor) -> torch.Tensor:
        t_R = model_time(t_cur, x_in.shape[0], x_in.device)
        return velocity(x_in.to(torch.float32), t_R).to(torch.float64)

    def field(x: torch.Tensor, t_cur: torch.Tensor) -> torch.Tensor:
        if not cfg_doubled:
            return call(x, t_cur)
        guided = guidance.guided_at(float(t_cur))
        if guidance.uncond_own_x:
            B = x.shape[0] // 2
            if not guided:
                return call(x, t_cur)
            v_cond, v_uncond = call(torch.cat([x[:B], x[:B]]), t_cur).chunk(2)
            v = combine_cfg_difference(v_cond, v_uncond, guidance.weight)
            return torch.cat([v, v])
        return guided_velocity(call(torch.cat([x, x]), t_cur), guidance, t_cur)

    return field


def guided_velocity(v_R: torch.Tensor, guidance: FlowGuidance, t_cur: torch.Tensor | float) -> torch.Tensor:
    """The state's velocity (B, ...) from the model's on a CFG-doubled batch ``v_R`` (2B, ...) float64 of
    ``[x, x]`` (``uncond_own_x=False``): guided at ``t_cur`` when the guidance is on there, else ``v_cond``."""
    v_cond, v_uncond = v_R.chunk(2)
    return combine_cfg_difference(v_cond, v_uncond, guidance.weight) if guidance.guided_at(float(t_cur)) else v_cond
