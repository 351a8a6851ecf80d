"""Replay the sampling records of the FlowAR and xAR parity fixtures through vgen's flow integrators.

For the engineers of those generators: give the helper your model's velocity for one unit, compare what it
returns with the fixture (``from flow_parity import replay_flowar_scale``; tests/ is on sys.path as for conftest).

- :func:`replay_flowar_scale`: scale ``k`` of ``flowar_tiny_io.pt['sample']``: Euler ODE on FlowAR's 25-point grid
  from the recorded 4-row noise, CFG ``cfg_per_scale[k]`` for ``t <= guidance``, the unconditional half on its own x
  (the official sampler); compare ``out`` with ``sample['scale_out'][k]`` (4, s^2, 16) and ``times[i]`` with
  ``sample['flow_t'][k, i]``.
- :func:`replay_xar_cell`: cell ``c`` of ``xar_tiny_io.pt['sample']``: Euler-Maruyama on ``linspace(1, 0.04, 6) ++
  [0]`` from the recorded noise with the recorded eps, CFG ``cell_cfg[c]``; compare ``out`` with
  ``sample['cell_out'][c]`` (2, 64, 16).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from vgen.samplers.flow_cfg import FlowGuidance, velocity_field
from vgen.samplers.flow_grids import flowar_time_grid, xar_time_grid
from vgen.samplers.flow_integrate import integrate_flow
from vgen.samplers.flow_transitions import EulerMaruyamaSDE, EulerODE


@dataclass
class Replay:
    """``out``: the unit as the official sampler returns it (``.float()``); ``times``: the (R,) float32 time the
    velocity received at each step."""

    out: torch.Tensor
    times: list[torch.Tensor]


def replay_flowar_scale(
    flow_head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], sample: dict, k: int
) -> Replay:
    """``flow_head(x_t (4, s^2, 16), t (4,), cond (4, s^2, D)) -> v``: FlowAR's ``flownet``; the condition passed is
    the recorded ``sample['ar_cond'][k]``. Returns all 4 rows (conditional, then unconditional)."""
    times: list[torch.Tensor] = []

    def velocity(x_t: torch.Tensor, t_R: torch.Tensor) -> torch.Tensor:
        times.append(t_R)
        return flow_head(x_t, t_R, sample["ar_cond"][k])

    guidance = FlowGuidance(weight=sample["cfg_per_scale"][k], t_high=sample["guidance"], uncond_own_x=True)
    result = integrate_flow(
        velocity_field(velocity, cfg_doubled=True, guidance=guidance),
        sample["noise"][k],
        flowar_time_grid(sample["num_steps"]),
        EulerODE(),
    )
    return Replay(out=result.x.float(), times=times)


def replay_xar_cell(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sample: dict, c: int) -> Replay:
    """``velocity(x_t (4, 64, 16), t (4,)) -> v (4, 64, 16)`` for cell ``c`` of the CFG-doubled batch (labels, then
    the null class), attending to the clean cells before ``c`` (``sample['cell_out'][:c]``, repeated for both halves).
    Returns the 2 conditional rows."""
    times: list[torch.Tensor] = []

    def recorded_velocity(x_t: torch.Tensor, t_R: torch.Tensor) -> torch.Tensor:
        times.append(t_R)
        return velocity(x_t, t_R)

    result = integrate_flow(
        velocity_field(recorded_velocity, cfg_doubled=True, guidance=FlowGuidance(weight=sample["cell_cfg"][c])),
        sample["noise"][c],
        xar_time_grid(sample["num_steps"]),
        EulerMaruyamaSDE(),
        step_noise=list(sample["eps"][c]),
    )
    return Replay(out=result.x.float(), times=times)


# ------------------------------------------------------------------------------------------------ restatements
# The two official per-unit samplers restated in plain torch from their definitions (test oracles for vgen's
# integrators and loop, written step by step and independently of them): ``velocity(x (R, ...) float32, t (R,)
# float32) -> v`` on a CFG-doubled model batch, conditional rows first.


def official_flowar_euler_unit(velocity, noise_2B: torch.Tensor, cfg: float, guidance: float, num_steps: int):
    """FlowAR ``euler_sampler``: the state holds all 2B rows; a step is guided iff ``cfg > 1`` and ``t <= guidance``:
    then the model sees the conditional x twice and both halves move by ``v_u + cfg (v_c - v_u)``. Returns the 2B
    rows, float32."""
    grid = flowar_time_grid(num_steps)
    x = noise_2B.double()
    B = x.shape[0] // 2
    for t, t_next in itertools.pairwise(grid):
        guided = cfg > 1.0 and float(t) <= guidance
        model_x = torch.cat([x[:B], x[:B]]) if guided else x
        v = velocity(model_x.float(), torch.full((x.shape[0],), float(t), dtype=torch.float64).float()).double()
        if guided:
            v_c, v_u = v[:B], v[B:]
            v = (v_u + cfg * (v_c - v_u)).repeat(2, *([1] * (x.ndim - 1)))
        x = x + (t_next - t) * v
    return x.float()


def official_xar_euler_maruyama_unit(velocity, noise_B: torch.Tensor, cfg: float, num_steps: int, eps=None):
    """xAR ``euler_maruyama_sampler`` (``guidance_high = 1``): the state holds the B conditional rows, the model always
    sees them twice; drift ``v - t * score`` per half with ``score = ((t - 1) v - x) / t``, halves combined as
    ``d_u + cfg (d_c - d_u)`` when ``cfg > 1``; noise ``sqrt(2t) * eps * sqrt(|dt|)`` (``eps[i]``, or
    ``torch.randn_like`` in float64 before the model call); the last step is the drift mean. Returns B rows,
    float32."""
    grid = xar_time_grid(num_steps)
    x = noise_B.double()
    steps = grid.numel() - 1
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        dt = t_next - t
        last = i == steps - 1
        noise = None
        if not last:
            noise = torch.randn_like(x) if eps is None else eps[i].double()
        model_x = torch.cat([x, x])
        v = velocity(model_x.float(), torch.full((model_x.shape[0],), float(t), dtype=torch.float64).float()).double()
        drift = v - t * (((t - 1) * v - model_x) / t)
        d_c, d_u = drift.chunk(2)
        d = d_u + cfg * (d_c - d_u) if cfg > 1.0 else d_c
        x = x + dt * d if last else x + d * dt + torch.sqrt(2 * t) * noise * torch.sqrt(-dt)
    return x.float()
