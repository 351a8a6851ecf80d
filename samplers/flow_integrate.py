"""Integrate one unit's flow from t = 1 to t = 0 with a :class:`~vgen.samplers.flow_transitions.FlowIntegrator`,
recording or replaying the noise of every step.

Per step ``i`` of the grid ``t_S1``: ``v = field(x_i, t_i)``, the scheme's :class:`~vgen.samplers.flow_transitions.
GaussianTransition` at ``x_i``, then ``x_{i+1} = transition.sample(eps_i)``. The noise ``eps_i`` of a stochastic
step is drawn as official code draws it (``randn_like(x)`` in float64, once per stochastic step, before the model
call) from one generator per image (:func:`~vgen.samplers.noise.per_sample_normal`), or taken from ``step_noise``:
replaying a recorded trajectory's noise reproduces it exactly, and running another model on the same noise is
CSpD's trajectory alignment. :func:`path_log_density` scores a recorded path under another model's transitions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from vgen.samplers.flow_cfg import VelocityField
from vgen.samplers.flow_grids import check_time_grid
from vgen.samplers.flow_transitions import EulerODE, FlowIntegrator, GaussianTransition
from vgen.samplers.logits import Generators
from vgen.samplers.noise import per_sample_normal

#: Called after every step with ``(step, t_next, x_next)``, ``x_next`` (R, ...) float64; may return a replacement
#: state of the same shape (e.g. to keep known regions when inpainting), or None.
StepCallback = Callable[[int, float, torch.Tensor], "torch.Tensor | None"]


@dataclass
class FlowTrajectory:
    """What one integration did. ``t_S1`` (S+1,) float64; ``x``: the S+1 states (R, ...) float64, ``x[0]`` the
    start and ``x[-1]`` the result; ``transitions``: the S Gaussian transitions (``transitions[i]`` gives
    ``x[i+1] | x[i]``); ``step_noise``: the eps of each stochastic step, in order."""

    t_S1: torch.Tensor
    x: list[torch.Tensor] = field(default_factory=list)
    transitions: list[GaussianTransition] = field(default_factory=list)
    step_noise: list[torch.Tensor] = field(default_factory=list)

    def log_density(self) -> torch.Tensor:
        """``sum_i log N(x[i+1]; mean_i, std_i)`` over the stochastic steps, per row (R,) float64."""
        return path_log_density_of(self.x, self.transitions)


@dataclass
class FlowResult:
    """``x``: the final state (R, ...) float64; ``step_noise``: the eps of every stochastic step (what a replay
    needs); ``trajectory``: the full record when asked for."""

    x: torch.Tensor
    step_noise: list[torch.Tensor]
    trajectory: FlowTrajectory | None = None


def integrate_flow(
    field_fn: VelocityField,
    x_start: torch.Tensor,
    t_S1: torch.Tensor,
    integrator: FlowIntegrator | None = None,
    generators: Generators = None,
    step_noise: Sequence[torch.Tensor] | None = None,
    on_step: StepCallback | None = None,
    record: bool = False,
) -> FlowResult:
    """Run ``integrator`` (default :class:`~vgen.samplers.flow_transitions.EulerODE`) over the grid ``t_S1`` from
    ``x_start`` (R, ...) (cast to float64).

    Args:
        field_fn: ``field(x, t_cur) -> v`` (:func:`~vgen.samplers.flow_cfg.velocity_field` wraps a model with CFG).
        generators: one per image (R a multiple of their number, see :mod:`vgen.samplers.noise`) or None (global
            RNG); unused when ``step_noise`` is given or the scheme is deterministic.
        step_noise: eps for the stochastic steps, in order, each (R, ...): replay instead of drawing.
        on_step: see :data:`StepCallback`.
        record: also return the states and transitions (:class:`FlowTrajectory`).
    """
    integrator = integrator if integrator is not None else EulerODE()
    t_S1 = check_time_grid(t_S1)
    num_steps = t_S1.numel() - 1
    x = x_start.to(torch.float64)
    trajectory = FlowTrajectory(t_S1=t_S1, x=[x]) if record else None
    used_noise: list[torch.Tensor] = []
    for i in range(num_steps):
        t_cur, t_next = t_S1[i], t_S1[i + 1]
        eps = None
        if integrator.is_stochastic(i, num_steps):  # drawn before the model call, as official code does
            eps = _step_eps(step_noise, len(used_noise), x, generators)
            used_noise.append(eps)
        transition = integrator.transition(x, field_fn(x, t_cur), t_cur, t_next, i, num_steps)
        x = transition.sample(eps)
        if on_step is not None:
            replaced = on_step(i, float(t_next), x)
            if replaced is not None:
                x = replaced.to(torch.float64)
        if trajectory is not None:
            trajectory.x.append(x)
            trajectory.transitions.append(transition)
    if step_noise is not None and len(step_noise) != len(used_noise):
        raise ValueError(f"got {len(step_noise)} prescribed step noises for {len(used_noise)} stochastic steps")
    if trajectory is not None:
        trajectory.step_noise = used_noise
    return FlowResult(x=x, step_noise=used_noise, trajectory=trajectory)


def _step_eps(
    step_noise: Sequence[torch.Tensor] | None, index: int, x: torch.Tensor, generators: Generators
) -> torch.Tensor:
    if step_noise is None:
        return per_sample_normal(tuple(x.shape), generators, x.device, dtype=torch.float64)
    if index >= len(step_noise):
        raise ValueError(f"got {len(step_noise)} prescribed step noises, but the grid has more stochastic steps")
    eps = step_noise[index]
    if tuple(eps.shape) != tuple(x.shape):
        raise ValueError(f"prescribed noise of step {index} has shape {tuple(eps.shape)}, the state {tuple(x.shape)}")
    return eps.to(device=x.device, dtype=torch.float64)


def path_log_density_of(x: Sequence[torch.Tensor], transitions: Sequence[GaussianTransition]) -> torch.Tensor:
    """``sum_i log N(x[i+1]; transitions[i])`` over the stochastic transitions, (R,) float64."""
    total = torch.zeros(x[0].shape[0], dtype=torch.float64, device=x[0].device)
    for x_next, transition in zip(x[1:], transitions):
        if transition.stochastic:
            total = total + transition.log_density(x_next)
    return total


def path_log_density(
    field_fn: VelocityField, trajectory: FlowTrajectory, integrator: FlowIntegrator
) -> tuple[torch.Tensor, list[GaussianTransition]]:
    """Log-density (R,) float64 of a recorded path's stochastic steps under another model ``field_fn`` (its
    transitions at the path's own states), and those transitions. CSpD's target evaluation of a drafted path."""
    num_steps = trajectory.t_S1.numel() - 1
    transitions = [
        integrator.transition(
            x_i, field_fn(x_i, trajectory.t_S1[i]), trajectory.t_S1[i], trajectory.t_S1[i + 1], i, num_steps
        )
        for i, x_i in enumerate(trajectory.x[:-1])
    ]
    return path_log_density_of(trajectory.x, transitions), transitions
