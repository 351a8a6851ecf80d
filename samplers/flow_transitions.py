"""One step of a flow sampler as a Gaussian transition ``x_next | x ~ N(mean, std^2 I)``.

Every integrator step (Euler ODE: ``std = 0``; Euler-Maruyama: ``std > 0`` except its final step) is written as a
:class:`GaussianTransition`, so speculative decoding (CSpD) can score a trajectory under another model: with the
states ``x_i`` of a trajectory and a model's transitions at those states, ``log p = sum_i log N(x_{i+1}; mean_i,
std_i)`` (:func:`gaussian_log_density`). All arithmetic is float64 and follows the official samplers (FlowAR
``models/sampler.py``, xAR ``models/sampler.py``) operation for operation:

- linear path ``x_t = (1 - t) x0 + t eps``: the score from a velocity is ``((t - 1) v - x) / t``
  (``alpha = 1 - t``, ``sigma = t``);
- diffusion ``w(t) = 2 t``; reverse-SDE drift ``v - w / 2 * score``;
- stochastic step ``x + drift * dt + sqrt(w) * (eps * sqrt(|dt|))``; the final step of Euler-Maruyama is the mean
  ``x + dt * drift`` (no noise).

Tensors: ``x``, ``v``: (R, ...) float64 for R state rows; ``t_cur``, ``t_next``: float64 0-d tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class GaussianTransition:
    """``x_next = mean + diffusion_sqrt * (eps * step_sqrt)`` with ``eps ~ N(0, I)``; ``std = diffusion_sqrt *
    step_sqrt`` (0 for a deterministic step). ``mean``: (R, ...) float64; the two factors are float64 0-d tensors,
    kept apart so that sampling rounds exactly as the official code does."""

    mean: torch.Tensor
    diffusion_sqrt: torch.Tensor
    step_sqrt: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return self.diffusion_sqrt * self.step_sqrt

    @property
    def stochastic(self) -> bool:
        return bool(self.diffusion_sqrt != 0)

    def sample(self, eps: torch.Tensor | None) -> torch.Tensor:
        """The next state for standard normal ``eps`` (R, ...) (ignored, may be None, for a deterministic step)."""
        if not self.stochastic:
            return self.mean
        return self.mean + self.diffusion_sqrt * (eps * self.step_sqrt)

    def log_density(self, x_next: torch.Tensor) -> torch.Tensor:
        """``log N(x_next; mean, std^2 I)`` per row, (R,) float64 (stochastic steps only)."""
        return gaussian_log_density(x_next, self.mean, self.std)


class FlowIntegrator(Protocol):
    """One scheme (Euler ODE, Euler-Maruyama SDE): the transition of step ``step`` of ``num_steps``."""

    def is_stochastic(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` adds noise (then its transition has ``std > 0``)."""
        ...

    def transition(
        self, x: torch.Tensor, v: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor, step: int, num_steps: int
    ) -> GaussianTransition: ...


_ZERO = torch.zeros((), dtype=torch.float64)


@dataclass(frozen=True)
class EulerODE:
    """Official ``euler_sampler``: ``x_next = x + (t_next - t_cur) * v`` (deterministic)."""

    def is_stochastic(self, step: int, num_steps: int) -> bool:
        return False

    def transition(self, x, v, t_cur, t_next, step, num_steps) -> GaussianTransition:
        return GaussianTransition(mean=x + (t_next - t_cur) * v, diffusion_sqrt=_ZERO, step_sqrt=_ZERO)


@dataclass(frozen=True)
class EulerMaruyamaSDE:
    """Official ``euler_maruyama_sampler``: stochastic steps with ``w(t) = 2t``, then a deterministic last step
    (the drift mean, as the official sampler returns ``mean_x``). Use it with :func:`~vgen.samplers.flow_grids.
    xar_time_grid` (the last step starts at ``t_min > 0``: the score divides by t).

    ``diffusion_scale`` multiplies ``w(t)`` (default 1: the official sampler). Any scale gives a reverse SDE with the
    same marginals (0 is the probability-flow ODE); CSpD's tests use another scale for the draft to give the two
    models different transition stds, as models with learned variances have."""

    diffusion_scale: float = 1.0

    def is_stochastic(self, step: int, num_steps: int) -> bool:
        return step < num_steps - 1

    def transition(self, x, v, t_cur, t_next, step, num_steps) -> GaussianTransition:
        dt = t_next - t_cur
        diffusion = diffusion_coefficient(t_cur)
        if self.diffusion_scale != 1.0:
            diffusion = self.diffusion_scale * diffusion
        drift = v - 0.5 * diffusion * score_from_velocity(v, x, t_cur)
        if step == num_steps - 1:
            return GaussianTransition(mean=x + dt * drift, diffusion_sqrt=_ZERO, step_sqrt=_ZERO)
        return GaussianTransition(
            mean=x + drift * dt, diffusion_sqrt=torch.sqrt(diffusion), step_sqrt=torch.sqrt(torch.abs(dt))
        )


@dataclass(frozen=True)
class DenoiseRenoise:
    """Self-Forcing's few-step sampler as a scheme: at each time ``t_cur`` predict the clean sample
    ``x0 = x - t_cur v`` and re-noise it to the next time with fresh noise, ``x_next = (1 - t_next) x0 + t_next eps``
    (a Gaussian transition with mean ``(1 - t_next) x0`` and std ``t_next``); the last step (``t_next = 0``) returns
    ``x0``. Use it with a short grid, e.g. :func:`~vgen.samplers.flow_grids.shifted_time_grid`."""

    def is_stochastic(self, step: int, num_steps: int) -> bool:
        return step < num_steps - 1

    def transition(self, x, v, t_cur, t_next, step, num_steps) -> GaussianTransition:
        x0 = x - t_cur * v
        if step == num_steps - 1 or float(t_next) == 0.0:
            return GaussianTransition(mean=(1 - t_next) * x0, diffusion_sqrt=_ZERO, step_sqrt=_ZERO)
        return GaussianTransition(mean=(1 - t_next) * x0, diffusion_sqrt=torch.as_tensor(t_next, dtype=torch.float64),
                                  step_sqrt=torch.ones((), dtype=torch.float64))


def diffusion_coefficient(t: torch.Tensor) -> torch.Tensor:
    """``w(t) = 2 t`` (official ``compute_diffusion``)."""
    return 2 * t


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``grad log p_t(x)`` from the velocity on the linear path: ``((t - 1) v - x) / t``, written as the official
    ``get_score_from_velocity`` evaluates it (``alpha / alpha' = (1 - t) / -1``, ``var = t^2 - (alpha / alpha') t``).
    ``t``: a 0-d tensor or one time per row (R,)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim == 1 else t
    reverse_alpha_ratio = (1 - t) / -1.0
    var = t**2 - reverse_alpha_ratio * t
    return (reverse_alpha_ratio * v - x) / var


_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``log N(x; mean, std^2 I)`` summed over every dimension but the first: (R, ...) -> (R,) float64.

    ``std``: a positive scalar or a tensor broadcastable to ``x`` (e.g. (R, 1, ...) per row). Computed in float64
    from ``log std`` (no ``std^2`` underflow, no ``exp``), so log-ratios of long trajectories stay exact enough to
    compare.
    """
    x64, mean64 = x.to(torch.float64), mean.to(torch.float64)
    std64 = torch.as_tensor(std, dtype=torch.float64, device=x64.device)
    if bool((std64 <= 0).any()):
        raise ValueError("gaussian_log_density needs std > 0 (a deterministic step has no density)")
    z = (x64 - mean64) / std64
    per_dim = -0.5 * z * z - torch.log(std64) - _LOG_SQRT_2PI
    return per_dim.expand_as(z).reshape(z.shape[0], -1).sum(dim=1)
