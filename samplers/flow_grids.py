"""Time grids for flow sampling, in float64 as the official samplers build them.

Convention (FlowAR, xAR, vgen): ``x_t = (1 - t) x0 + t eps``, ``v = eps - x0``; t = 1 is pure noise and sampling runs
from t = 1 down to t = 0. A grid is a float64 tensor ``t_S1`` of S + 1 strictly decreasing times in [0, 1]; an
integrator takes S steps ``t_S1[i] -> t_S1[i + 1]``.
"""

from __future__ import annotations

import torch


def uniform_time_grid(num_steps: int) -> torch.Tensor:
    """``linspace(1, 0, num_steps + 1)``: ``num_steps`` equal Euler steps (FlowAR's grid for ``num_steps=50``)."""
    _check_num_steps(num_steps, minimum=1)
    return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)


def flowar_time_grid(num_steps: int = 25) -> torch.Tensor:
    """Official FlowAR's ``euler_sampler`` grid: ``linspace(1, 0.3, n // 2) ++ linspace(0.25, 0, n // 2 + 1)``, and
    the uniform grid when ``n == 50``. ``n = 25`` (FlowAR-S/L) gives 25 points, i.e. 24 non-uniform steps."""
    _check_num_steps(num_steps, minimum=2)
    if num_steps == 50:
        return uniform_time_grid(50)
    return torch.cat(
        [
            torch.linspace(1, 0.3, num_steps // 2, dtype=torch.float64),
            torch.linspace(0.25, 0, num_steps // 2 + 1, dtype=torch.float64),
        ]
    )


def xar_time_grid(num_steps: int, t_min: float = 0.04) -> torch.Tensor:
    """Official ``euler_maruyama_sampler`` grid (xAR, FlowAR): ``linspace(1, t_min, num_steps) ++ [0]``, i.e.
    ``num_steps - 1`` stochastic steps and one final deterministic step from ``t_min`` to 0."""
    _check_num_steps(num_steps, minimum=1)
    return torch.cat([torch.linspace(1.0, t_min, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def check_time_grid(t_S1: torch.Tensor) -> torch.Tensor:
    """``t_S1`` as a float64 1-D tensor of at least 2 strictly decreasing times in [0, 1]; else ValueError."""
    t_S1 = torch.as_tensor(t_S1, dtype=torch.float64)
    if t_S1.ndim != 1 or t_S1.numel() < 2:
        raise ValueError(f"a time grid needs at least 2 times (one step), got shape {tuple(t_S1.shape)}")
    if not bool((t_S1[1:] < t_S1[:-1]).all()) or float(t_S1[0]) > 1.0 or float(t_S1[-1]) < 0.0:
        raise ValueError(
            f"a time grid runs from noise to data: strictly decreasing times in [0, 1], got {t_S1.tolist()}"
        )
    return t_S1


def _check_num_steps(num_steps: int, minimum: int) -> None:
    if int(num_steps) != num_steps or num_steps < minimum:
        raise ValueError(f"num_steps must be an integer >= {minimum}, got {num_steps}")
