"""Toy velocity models with exact flows, for the CSpD tests: K AR units, each one token of ``dim`` channels whose
data distribution given the previous unit is a Gaussian mixture (means shifted by ``coupling`` times the previous
unit, plus ``label_shift`` times the label). On the path ``x_t = (1 - t) x0 + t eps`` the velocity of a mixture is
exact: ``v = (x - E[x0 | x_t]) / t`` with component posteriors from ``x_t | m ~ N((1 - t) mu_m, (1 - t)^2 s_m^2 + t^2)``.

The "cache" holds each row's committed units (a stand-in for a KV cache: commit, rollback, select, clone), so the
tests can check which units a model's state holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class UnitHistory:
    """Committed units per row: a list of (R, dim) float64 tensors (no truncate: CSpD restores it by copy)."""

    def __init__(self):
        self.units: list[torch.Tensor] = []

    def attend(self, *args, **kwargs):
        raise NotImplementedError("the toy model has no attention")

    def commit(self, keep_B=None) -> None:
        pass

    def rollback(self) -> None:
        pass

    def select(self, index_B) -> None:
        self.units = [u[index_B] for u in self.units]

    def clone(self) -> UnitHistory:
        other = UnitHistory()
        other.units = [u.clone() for u in self.units]
        return other


@dataclass
class ToyState:
    cond: torch.Tensor
    cache: UnitHistory = field(default_factory=UnitHistory)


class ToyMixtureFlow:
    """A velocity model of K units of one ``dim``-channel token; condition = a label in {-1, 1} per row (0 = null)."""

    def __init__(self, num_units: int, means, stds, weights, coupling: float = 0.5, label_shift: float = 0.5):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (M, d)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)  # (M,)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)  # (M,)
        self.num_units, self.dim = num_units, self.means.shape[1]
        self.coupling, self.label_shift = coupling, label_shift
        self.velocity_calls = 0
        self.window_calls = 0

    @property
    def unit_shapes(self):
        return [(1, self.dim)] * self.num_units

    @property
    def device(self):
        return torch.device("cpu")

    def concat_conditions(self, cond, uncond):
        return torch.cat([cond, uncond])

    def null_condition(self, batch_size):
        return torch.zeros(batch_size)

    def _shift(self, previous_Rd, cond_R):
        return self.coupling * previous_Rd + self.label_shift * cond_R.to(torch.float64)[:, None]

    def prefill(self, cond):
        state = ToyState(cond=cond)
        return state, self._shift(torch.zeros(cond.shape[0], self.dim, dtype=torch.float64), cond)

    def velocity(self, k, x_t, t_R, unit_cond):
        self.velocity_calls += 1
        x = x_t.to(torch.float64)[:, 0]  # (R, d)
        t = t_R.to(torch.float64)[:, None, None]  # (R, 1, 1)
        mu = self.means[None] + unit_cond[:, None]  # (R, M, d)
        s2 = (self.stds**2)[None, :, None]
        var = (1 - t) ** 2 * s2 + t**2  # (R, M, 1)
        diff = x[:, None] - (1 - t) * mu
        log_w = torch.log(self.weights)[None] - 0.5 * ((diff**2) / var).sum(-1) - 0.5 * self.dim * torch.log(var[..., 0])
        post = torch.softmax(log_w, dim=1)[..., None]  # (R, M, 1)
        x0 = (post * (mu + (1 - t) * s2 / var * diff)).sum(1)  # (R, d)
        v = (x - x0) / t[:, 0]
        return v[:, None].float()

    def velocity_window(self, ks, x_t_list, t_R, unit_conds):
        """Several units in one call (CSpD's window verification), each with its own condition."""
        self.window_calls += 1
        return [self.velocity(k, x_t, t_R, cond) for k, x_t, cond in zip(ks, x_t_list, unit_conds)]

    def commit(self, k, x_clean, state):
        unit = x_clean.to(torch.float64)[:, 0]
        state.cache.units.append(unit)
        return self._shift(unit, state.cond)


def two_mode_target(num_units=3, dim=2) -> ToyMixtureFlow:
    means = torch.zeros(2, dim)
    means[0, 0], means[1, 0] = -1.5, 1.5
    return ToyMixtureFlow(num_units, means, [0.4, 0.4], [0.5, 0.5], coupling=0.5)


def mismatched_draft(num_units=3, dim=2) -> ToyMixtureFlow:
    """Modes moved, narrowed/widened and re-weighted, a weaker coupling: a clearly different proposal."""
    means = torch.zeros(2, dim)
    means[0, 0], means[1, 0] = -1.0, 1.8
    means[:, 1] = 0.3
    return ToyMixtureFlow(num_units, means, [0.6, 0.3], [0.7, 0.3], coupling=0.2)
