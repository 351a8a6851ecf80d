"""Continuous speculative decoding (CSpD; Wang et al., arXiv 2411.11925) for continuous-token AR models, written
once against :class:`~vgen.samplers.interfaces.VelocityModel` (FlowAR scales, xAR cells, ...).

A unit's flow is sampled by a stochastic integrator (:class:`~vgen.samplers.flow_transitions.EulerMaruyamaSDE`):
every stochastic step is a Gaussian transition ``x_{i+1} = mean_i + std_i eps_i``. Let ``f`` be the grid's *last
stochastic step* (:func:`final_stochastic_step`); the steps after it are deterministic (Euler-Maruyama's final drift
step to t = 0), its output ``s = x_{f+1}`` is the state speculation decides on.

The algorithm, per image (B images, 2B model rows under CFG):

1. **Pre-fill**: the target alone generates the first ``ceil(prefill_fraction * K)`` of the K units.
2. **Drafting**: the draft model generates ``gamma`` units, recording for each the noise of every step (the initial
   noise and every ``eps_i``) and every transition's mean and std.
3. **Verification**, unit by unit: the target's condition for the unit (its cache holds the units committed so far),
   then the target's velocity re-run along its *own* trajectory driven by the draft's noises (trajectory alignment):
   ``z_0 = x_0``, ``z_{i+1} = mean_p(z_i) + std_p,i eps_i`` for ``i < f``, and its final transition at ``z_f``.
   The paper's surrogate ratio, in log space per row (:func:`surrogate_log_ratio`)::

       log r = sum_{stochastic i < f} d * (log std_q,i - log std_p,i)        # the determinant factor, d = unit size
             + log N(s; mean_p,f, std_p,f) - log N(s; mean_q,f, std_q,f)

   The drafted state ``s`` is accepted when ``log u < log r`` (``u ~ U[0, 1)`` from the image's generator).
4. **Rejection**: acceptance-rejection sampling from the target's final transition against the residual: propose
   ``s' ~ N(mean_p,f, std_p,f)``, accept with ``alpha = max(0, 1 - q_f(s') / (D p_f(s')))`` (``D`` the determinant
   factor; the bound ``M = 1 / Z`` cancels the residual's normaliser), at most ``rejection_rounds`` proposals. If
   none is accepted the unit takes the last proposal, a sample of the target's own final transition (counted in
   ``stats.fallbacks``): never an unset unit (the public MAR code leaves such tokens at zero).
5. The target's deterministic steps after ``f`` map the chosen state to the clean unit (what target-only sampling
   does with its own state), which is committed to the target's cache; the next unit is verified against it.

Where this departs from the paper, and why:

- **Every drafted unit is verified, none is discarded.** After a rejection at unit j the drafted units after j were
  drawn by the draft conditioned on its own (rejected) unit j; they are still proposals with a known density (the
  draft's recorded transitions), so each is verified against the target conditioned on the *committed* prefix (the
  target's cache holds the corrected unit j). Speculative sampling needs only that the proposal's density is the one
  scored; it need not be conditioned on the accepted prefix. Keeping every row at the same unit keeps the batch in
  one call per step (FlowAR's units have a different shape per scale: rows at different units cannot share a call),
  so acceptance is per row and unit with no ragged batch. Unlike the public MAR code, the target never conditions
  on unverified units (its cache holds only committed ones), and no ``inner_temperature`` flattens the ratio.
- **The accepted state is the last stochastic step's output.** Official FlowAR / xAR end with a deterministic
  drift step (no density), so the transition the ratio scores is the last stochastic one, and the target's own
  deterministic steps finish the unit (one more target velocity call, which target-only sampling makes too). The
  determinant factor is the paper's ``prod sqrt|Sigma_q| / sqrt|Sigma_p|`` (not the public code's reciprocal).
- **Exactness.** Given the shared noises, ``z_f`` is exactly the target's own chain state, and steps 3-4 are exact
  speculative sampling of the last stochastic step when ``D = 1``. With an integrator whose std depends only on the
  time grid (Euler-Maruyama: ``std_i = sqrt(2 t_i |dt_i|)``, the same for both models) ``D = 1`` and the only
  departure from target-only sampling is the fallback; models with learned variances (MAR) get ``D != 1`` and the
  surrogate is biased, as the paper's notes say. :func:`last_step_log_ratio` drops the factor (exact given the
  alignment; not the paper's rule, so not the default). tests/test_cspd_toy.py measures both, with a draft on
  another diffusion scale (``draft_integrator``) standing in for learned variances.
- **Cost.** Verification re-runs the target's whole trajectory per unit (as in the paper). With ``verification=
  "unit"`` the interface commits and verifies one unit per call, so the target makes as many calls as target-only
  sampling; CSpD then cannot be faster with a per-unit KV-cached target (the paper's gains come from MAR re-running
  its full transformer at every AR step).

**Window verification** (``CSpDSettings(verification="window")``, targets with ``velocity_window``: xAR) is the
paper's "one target pass over the drafted units": per window of J drafted units,

a. the target finishes every drafted state (its deterministic steps after ``f``) and commits the clean units
   0..J-2 speculatively (J finishing calls, J - 1 commits), so drafted unit j is verified against the clean units the
   target itself makes from the drafted states before it; a row that accepted units < j has exactly those committed;
b. trajectory alignment of all J units at once: one ``velocity_window`` call per step up to ``f`` (each unit sees
   the cache up to its own start and its own tokens), instead of J;
c. per row, the units are accepted up to its first rejection; the batch keeps units up to its *earliest* first
   rejection j* (every row accepted the units before j*; unit j* is resampled from the residual where the row
   rejected it, kept where it accepted it; later units are discarded, counted in ``stats.discarded``). Truncating a
   row at a point set by the other rows' independent outcomes is speculative sampling with a shorter window, so the
   kept units stay exact; rows stay in lockstep (one call per step, no ragged positions);
d. the target's cache is truncated to the kept units (the resampled unit finished and committed).

The target's sequential calls per window drop from J (S + 1) to about J + (J - 1) + (f + 1) + 2 (S steps per unit),
each call carrying J units' tokens: it pays where a call's cost hardly grows with its tokens (small batches on an
accelerator), not on a compute-bound CPU. Large batches keep few units per window (the earliest rejection of many
rows); there ``"unit"`` keeps every verified unit. Window mode's random streams depend on the batch (j* does).

CFG is the same in draft and target: one guidance schedule, weight and interval, the conditional state seen by
both halves (``uncond_own_x=False``; :mod:`vgen.samplers.flow_cfg`). Caches: the target's holds exactly the
committed units; the draft's is rolled back to the window's start after verification and the committed units are
re-committed, so both stay consistent with each row's own units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from vgen.samplers.flow_cfg import FlowGuidance, guided_velocity, model_time, velocity_field
from vgen.samplers.flow_integrate import integrate_flow
from vgen.samplers.flow_transitions import EulerMaruyamaSDE, FlowIntegrator, GaussianTransition
from vgen.samplers.flow_units import _grids_per_unit
from vgen.samplers.guidance import GuidanceSchedule, WeightRampCFG, guidance_is_off
from vgen.samplers.logits import Generators
from vgen.samplers.noise import per_sample_normal
from vgen.samplers.speculative_core import SpeculativeStats, round_uniform

#: unit sources in :attr:`CSpDOutput.source_BK`
PREFILLED, ACCEPTED, RESAMPLED, FALLBACK = 0, 1, 2, 3


#: how drafted units are verified (:class:`CSpDSettings`)
VERIFICATIONS = ("unit", "window")


@dataclass(frozen=True)
class CSpDSettings:
    """``gamma`` units drafted per round; ``prefill_fraction`` (rho) of the K units generated by the target first
    (``ceil(rho K)`` units); ``rejection_rounds`` proposals at most per rejected unit; ``verification``: ``"unit"``
    (each drafted unit verified against the committed prefix, no draft discarded) or ``"window"`` (the window's
    units verified in one target pass per step, kept up to the batch's first rejection; see the module doc)."""

    gamma: int = 4
    prefill_fraction: float = 0.05
    rejection_rounds: int = 32
    verification: str = "unit"

    def __post_init__(self) -> None:
        if self.verification not in VERIFICATIONS:
            raise ValueError(f"verification must be one of {', '.join(VERIFICATIONS)}, got {self.verification!r}")
        if int(self.gamma) != self.gamma or self.gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {self.gamma}")
        if not 0.0 <= self.prefill_fraction <= 1.0:
            raise ValueError(f"prefill_fraction must be in [0, 1], got {self.prefill_fraction}")
        if int(self.rejection_rounds) != self.rejection_rounds or self.rejection_rounds < 1:
            raise ValueError(f"rejection_rounds must be an integer >= 1, got {self.rejection_rounds}")

    def prefill_units(self, num_units: int) -> int:
        return min(num_units, math.ceil(self.prefill_fraction * num_units - 1e-9))


@dataclass
class CSpDStats(SpeculativeStats):
    """:class:`~vgen.samplers.speculative_core.SpeculativeStats` (forwards count every model call an image takes
    part in: prefill, velocity calls, commits) plus, per image (B,) int64: ``resampled`` units taken from the
    residual, ``fallbacks`` units that took the target's own proposal after ``rejection_rounds`` failed ones,
    ``rejection_trials`` proposals drawn, ``discarded`` accepted units dropped because another image of the batch
    rejected an earlier unit of the window (window verification only)."""

    resampled: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    fallbacks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    rejection_trials: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    discarded: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @classmethod
    def zeros(cls, batch_size: int) -> CSpDStats:
        z = lambda: torch.zeros(batch_size, dtype=torch.long)  # noqa: E731
        return cls(z(), z(), z(), z(), z(), z(), z(), z(), z(), z())

    def summary(self) -> dict[str, float]:
        out = super().summary()
        images = max(1, self.units.numel())
        out["resampled_per_image"] = float(self.resampled.sum()) / images
        out["fallbacks_per_image"] = float(self.fallbacks.sum()) / images
        rejected = int(self.resampled.sum() + self.fallbacks.sum())
        out["trials_per_rejection"] = float(self.rejection_trials.sum()) / rejected if rejected else 0.0
        out["discarded_per_image"] = float(self.discarded.sum()) / images
        return out


@dataclass
class CSpDOutput:
    """``units``: the clean units, each (B, *unit_shapes[k]) float32; ``source_BK`` int64 (B, K): where each unit
    came from (:data:`PREFILLED`, :data:`ACCEPTED`, :data:`RESAMPLED`, :data:`FALLBACK`); ``log_ratio_BK`` float64
    (B, K): the surrogate log-ratio of each drafted unit (NaN for pre-filled ones); ``target_state`` and
    ``draft_state``: the models' states at the end (caches holding units 0..K-2)."""

    units: list[torch.Tensor]
    source_BK: torch.Tensor
    log_ratio_BK: torch.Tensor
    stats: CSpDStats
    target_state: Any = None
    draft_state: Any = None


#: ``(draft_transitions, target_transitions, state, f) -> log r`` (R,) float64: transitions of steps 0..f of the
#: draft's trajectory and of the target's aligned one, ``state`` the drafted output of step f.
LogRatio = Callable[[Sequence[GaussianTransition], Sequence[GaussianTransition], torch.Tensor, int], torch.Tensor]


def final_stochastic_step(integrator: FlowIntegrator, num_steps: int) -> int:
    """Index of the grid's last stochastic step; ValueError when the scheme is deterministic (Euler ODE)."""
    stochastic = [i for i in range(num_steps) if integrator.is_stochastic(i, num_steps)]
    if not stochastic:
        raise ValueError(f"CSpD needs a stochastic integrator (Gaussian transitions), got {type(integrator).__name__}"
                         " which is deterministic on this grid; use EulerMaruyamaSDE")
    return stochastic[-1]


def log_determinant_factor(draft: Sequence[GaussianTransition], target: Sequence[GaussianTransition],
                           state: torch.Tensor, f: int) -> torch.Tensor:
    """``sum_{stochastic i < f} d (log std_q,i - log std_p,i)`` per row (R,) float64, ``d`` the unit's size: the
    paper's ``prod_i sqrt|Sigma_q,i| / sqrt|Sigma_p,i|`` for isotropic steps (the quadratic terms cancel under
    shared noise). 0 when both models' stds are set by the grid alone."""
    rows, d = state.shape[0], state[0].numel()
    total = torch.zeros(rows, dtype=torch.float64, device=state.device)
    for q, p in zip(draft[:f], target[:f]):
        if q.stochastic and p.stochastic:
            diff = torch.log(torch.as_tensor(q.std, dtype=torch.float64)) - torch.log(
                torch.as_tensor(p.std, dtype=torch.float64))
            total = total + d * diff.to(state.device).reshape(-1).expand(rows)
    return total


def surrogate_log_ratio(draft: Sequence[GaussianTransition], target: Sequence[GaussianTransition],
                        state: torch.Tensor, f: int) -> torch.Tensor:
    """The paper's ``log r = log D + log N(s; mean_p,f, std_p,f) - log N(s; mean_q,f, std_q,f)`` per row (R,)."""
    return (log_determinant_factor(draft, target, state, f) + target[f].log_density(state)
            - draft[f].log_density(state))


def last_step_log_ratio(draft: Sequence[GaussianTransition], target: Sequence[GaussianTransition],
                        state: torch.Tensor, f: int) -> torch.Tensor:
    """``log N(s; mean_p,f, std_p,f) - log N(s; mean_q,f, std_q,f)`` per row (R,): the ratio without the
    determinant factor. Given the shared noises the target's state ``z_f`` is its own chain's, so this is exact
    speculative sampling of the last stochastic step whatever the two models' stds (not the paper's choice; with
    stds set by the grid alone both ratios are the same)."""
    return target[f].log_density(state) - draft[f].log_density(state)


@torch.no_grad()
def generate_cspd(
    target: Any,
    draft: Any,
    target_cond: Any,
    draft_cond: Any,
    batch_size: int,
    time_grid: torch.Tensor | Sequence[torch.Tensor],
    integrator: FlowIntegrator | None = None,
    settings: CSpDSettings | None = None,
    guidance_scale: float = 1.0,
    guidance_schedule: GuidanceSchedule | None = None,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    generators: Generators = None,
    log_ratio: LogRatio = surrogate_log_ratio,
    draft_integrator: FlowIntegrator | None = None,
) -> CSpDOutput:
    """Generate ``batch_size`` images unit by unit with CSpD (see the module doc).

    Args:
        target, draft: velocity models with the same ``unit_shapes`` (e.g. a large and a small FlowAR on one
            autoencoder).
        target_cond, draft_cond: each model's condition for the B conditional rows (same labels / prompts).
        time_grid: one float64 grid ``1 -> 0`` for every unit, or one per unit (both models use the same).
        integrator: a stochastic scheme (default :class:`EulerMaruyamaSDE`, with e.g.
            :func:`~vgen.samplers.flow_grids.xar_time_grid`).
        guidance_scale, guidance_schedule, guidance_interval: CFG as in
            :func:`~vgen.samplers.flow_units.generate_flow_units` (the same for both models).
        generators: one ``torch.Generator`` per image, or None (global RNG).
        log_ratio: the acceptance log-ratio (default the paper's surrogate; :func:`last_step_log_ratio` drops
            the determinant factor; tests pass broken ones).
        draft_integrator: the draft's scheme (default the target's), with the same stochastic steps, e.g. another
            ``EulerMaruyamaSDE(diffusion_scale=...)`` (transition stds that differ between the models).
    """
    settings = settings if settings is not None else CSpDSettings()
    integrator = integrator if integrator is not None else EulerMaruyamaSDE()
    draft_integrator = draft_integrator if draft_integrator is not None else integrator
    unit_shapes = [tuple(shape) for shape in target.unit_shapes]
    if [tuple(s) for s in draft.unit_shapes] != unit_shapes:
        raise ValueError(f"the draft's units {list(draft.unit_shapes)} differ from the target's {unit_shapes}")
    K, B = len(unit_shapes), batch_size
    grids = _grids_per_unit(time_grid, K)
    for grid in grids:
        n = grid.numel() - 1
        if [integrator.is_stochastic(i, n) for i in range(n)] != [draft_integrator.is_stochastic(i, n)
                                                                  for i in range(n)]:
            raise ValueError("the draft's and the target's integrators must have the same stochastic steps")
        final_stochastic_step(integrator, n)
    if settings.verification == "window" and not hasattr(target, "velocity_window"):
        raise ValueError(f"window verification needs a target with velocity_window (several units in one pass); "
                         f"{type(target).__name__} has none: use verification='unit'")
    schedule = guidance_schedule if guidance_schedule is not None else WeightRampCFG()
    use_cfg = not guidance_is_off(schedule, guidance_scale, K)
    t_low, t_high = guidance_interval
    device = target.device
    images_B = torch.arange(B)

    def doubled(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if use_cfg else x

    if use_cfg:
        target_cond = target.concat_conditions(target_cond, target.null_condition(B))
        draft_cond = draft.concat_conditions(draft_cond, draft.null_condition(B))
    t_state, t_unit_cond = target.prefill(target_cond)
    d_state, d_unit_cond = draft.prefill(draft_cond)
    stats = CSpDStats.zeros(B)
    stats.target_forwards += 1
    stats.drafter_forwards += 1
    stats.units += K

    def unit_guidance(k: int) -> FlowGuidance:
        return FlowGuidance(weight=schedule.weight(guidance_scale, k, K) if use_cfg else 1.0, t_low=t_low,
                            t_high=t_high)

    def field_of(model, k: int, unit_cond: Any, counter: torch.Tensor):
        def velocity(x_t, t_R):
            counter.add_(1)
            return model.velocity(k, x_t, t_R, unit_cond)

        return velocity_field(velocity, use_cfg, unit_guidance(k))

    units: list[torch.Tensor] = []
    source_BK = torch.full((B, K), PREFILLED, dtype=torch.long)
    log_ratio_BK = torch.full((B, K), float("nan"), dtype=torch.float64)

    def commit_both(k: int, x_clean: torch.Tensor, commit_draft: bool) -> None:
        nonlocal t_unit_cond, d_unit_cond
        if k + 1 >= K:
            return
        t_unit_cond = target.commit(k, doubled(x_clean), t_state)
        stats.target_forwards += 1
        if commit_draft:
            d_unit_cond = draft.commit(k, doubled(x_clean), d_state)
            stats.drafter_forwards += 1

    def record(k: int, x_clean: torch.Tensor, source_B: torch.Tensor, ratio_B: torch.Tensor) -> None:
        units.append(x_clean)
        source_BK[:, k], log_ratio_BK[:, k] = source_B, ratio_B.cpu()

    def verify_units(window: range, drafts: list) -> list[torch.Tensor]:
        """Each drafted unit against the committed prefix, one after another; every unit is kept."""
        finals = []
        for k, (initial, trajectory) in zip(window, drafts):
            x_clean, source_B, ratio_B = _verify_unit(
                field_of(target, k, t_unit_cond, stats.target_forwards), initial, trajectory, grids[k], integrator,
                settings.rejection_rounds, generators, images_B, stats, log_ratio)
            record(k, x_clean, source_B, ratio_B)
            finals.append(x_clean)
            stats.drafted += 1
            stats.accepted += (source_B == ACCEPTED).long()
            commit_both(k, x_clean, commit_draft=False)
        return finals

    def verify_window(window: range, drafts: list) -> list[torch.Tensor]:
        """The window's units verified together (one target pass per step); kept up to the batch's first
        rejection, whose unit is resampled. Returns the kept units."""
        ks, J = list(window), len(window)
        grid = grids[ks[0]]
        if any(not torch.equal(grids[k], grid) for k in ks):
            raise ValueError("window verification needs one time grid for every unit of a window")
        S = grid.numel() - 1
        f = final_stochastic_step(integrator, S)
        drafted = [trajectory.x[f + 1] for _, trajectory in drafts]
        # the target finishes each drafted state and commits it speculatively, so unit j is verified against the
        # clean units the target itself makes from the drafted states before it
        conds, marks, cleans = [t_unit_cond], [], []
        for j, k in enumerate(ks):
            cleans.append(_finish(field_of(target, k, conds[j], stats.target_forwards), drafted[j], grid,
                                  integrator, f))
            if j + 1 < J:
                marks.append(_cache_mark(t_state.cache))
                conds.append(target.commit(k, doubled(cleans[j]), t_state))
                stats.target_forwards += 1
        # trajectory alignment of all J units: one target pass per step
        guidances = [unit_guidance(k) for k in ks]
        noises = [_noise_of_step(trajectory, integrator, S) for _, trajectory in drafts]
        z = [initial.to(torch.float64) for initial, _ in drafts]
        target_transitions: list[list[GaussianTransition]] = [[] for _ in ks]
        for i in range(f + 1):
            t_R = model_time(grid[i], doubled(z[0]).shape[0], device)
            v_list = target.velocity_window(ks, [doubled(z_j).to(torch.float32) for z_j in z], t_R, conds)
            stats.target_forwards += 1
            for j in range(J):
                v = v_list[j].to(torch.float64)
                v = guided_velocity(v, guidances[j], grid[i]) if use_cfg else v
                transition = integrator.transition(z[j], v, grid[i], grid[i + 1], i, S)
                target_transitions[j].append(transition)
                if i < f:
                    z[j] = transition.sample(noises[j].get(i))
        ratio_BJ = torch.stack([log_ratio(trajectory.transitions[: f + 1], target_transitions[j], drafted[j], f)
                                for j, (_, trajectory) in enumerate(drafts)], dim=1).cpu()
        log_u_BJ = torch.log(round_uniform((J,), generators, images_B, device).to(torch.float64)).cpu()
        accept_BJ = log_u_BJ < ratio_BJ
        first_reject_B = torch.where(accept_BJ.all(1), J, (~accept_BJ).long().argmax(1))
        j_star = int(first_reject_B.min())
        kept = min(j_star + 1, J)
        stats.drafted += torch.clamp(first_reject_B + 1, max=J)  # each image's tests up to its first rejection
        stats.accepted += first_reject_B
        stats.discarded += first_reject_B - torch.clamp(first_reject_B, max=kept)
        accepted_B = torch.full((B,), ACCEPTED, dtype=torch.long)
        for j in range(j_star):
            record(ks[j], cleans[j], accepted_B, ratio_BJ[:, j])
        if j_star == J:  # every image accepted every unit
            commit_both(ks[-1], cleans[-1], commit_draft=False)
            return cleans
        k = ks[j_star]
        if j_star < len(marks):
            _cache_restore(t_state, marks[j_star])  # drop the speculative units from k on
        rejected_B = first_reject_B == j_star
        state, source_B = _resample_rejected(rejected_B, drafts[j_star][1].transitions, target_transitions[j_star],
                                             drafted[j_star], f, settings.rejection_rounds, generators, images_B, stats)
        finished = _finish(field_of(target, k, conds[j_star], stats.target_forwards), state, grid, integrator, f)
        rows = rejected_B.to(finished.device).view(-1, *[1] * (finished.dim() - 1))
        clean = torch.where(rows, finished, cleans[j_star])
        record(k, clean, source_B, ratio_BJ[:, j_star])
        commit_both(k, clean, commit_draft=False)
        return cleans[:j_star] + [clean]

    # 1. pre-fill: the target alone, the draft's cache follows
    n_pre = settings.prefill_units(K)
    for k in range(n_pre):
        initial = per_sample_normal((B, *unit_shapes[k]), generators, device, dtype=torch.float32)
        result = integrate_flow(field_of(target, k, t_unit_cond, stats.target_forwards), initial, grids[k],
                                integrator, generators=generators)
        x_clean = result.x.float()
        units.append(x_clean)
        commit_both(k, x_clean, commit_draft=True)

    k0 = n_pre
    while k0 < K:
        window = range(k0, min(K, k0 + settings.gamma))
        stats.rounds += 1
        # 2. drafting: record every unit's noise and transitions
        saved = _cache_mark(d_state.cache)
        drafts = []
        for k in window:
            initial = per_sample_normal((B, *unit_shapes[k]), generators, device, dtype=torch.float32)
            result = integrate_flow(field_of(draft, k, d_unit_cond, stats.drafter_forwards), initial, grids[k],
                                    draft_integrator, generators=generators, record=True)
            drafts.append((initial, result.trajectory))
            if k + 1 < K and k + 1 < window.stop:
                d_unit_cond = draft.commit(k, doubled(result.x.float()), d_state)
                stats.drafter_forwards += 1
        # 3./4. verification and rejection
        finals = (verify_window if settings.verification == "window" else verify_units)(window, drafts)
        # the draft's cache: back to the window's start, then the committed units
        _cache_restore(d_state, saved)
        for k, x_clean in zip(window, finals):
            if k + 1 < K:
                d_unit_cond = draft.commit(k, doubled(x_clean), d_state)
                stats.drafter_forwards += 1
        k0 += len(finals)
    return CSpDOutput(units=units, source_BK=source_BK, log_ratio_BK=log_ratio_BK, stats=stats,
                      target_state=t_state, draft_state=d_state)


def _verify_unit(field_fn, initial: torch.Tensor, trajectory, t_S1: torch.Tensor, integrator: FlowIntegrator,
                 rounds: int, generators: Generators, images_B: torch.Tensor, stats: CSpDStats,
                 log_ratio: LogRatio) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One drafted unit: the target's aligned trajectory, the acceptance test per row, rejection sampling of the
    rejected rows, the target's deterministic steps. Returns the clean unit (B, ...) float32, the source (B,) and
    the log-ratio (B,)."""
    num_steps = t_S1.numel() - 1
    f = final_stochastic_step(integrator, num_steps)
    noise_of_step = _noise_of_step(trajectory, integrator, num_steps)
    # trajectory alignment: the target's own chain on the draft's noises, up to its transition of step f
    z = initial.to(torch.float64)
    target_transitions = []
    for i in range(f + 1):
        transition = integrator.transition(z, field_fn(z, t_S1[i]), t_S1[i], t_S1[i + 1], i, num_steps)
        target_transitions.append(transition)
        if i < f:
            z = transition.sample(noise_of_step.get(i))
    drafted = trajectory.x[f + 1]
    ratio_B = log_ratio(trajectory.transitions[: f + 1], target_transitions, drafted, f)
    log_u = torch.log(round_uniform((), generators, images_B, drafted.device).to(torch.float64))
    accept_B = log_u < ratio_B
    state, source_B = _resample_rejected(~accept_B, trajectory.transitions, target_transitions, drafted, f, rounds,
                                         generators, images_B, stats)
    return _finish(field_fn, state, t_S1, integrator, f), source_B, ratio_B


def _resample_rejected(rejected_B: torch.Tensor, draft: Sequence[GaussianTransition],
                       target: Sequence[GaussianTransition], drafted: torch.Tensor, f: int, rounds: int,
                       generators: Generators, images_B: torch.Tensor, stats: CSpDStats
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafted state (B, ...) with each rejected row's replaced by a residual sample (:func:`_residual_sample`),
    and the source of every row (B,): :data:`ACCEPTED`, :data:`RESAMPLED` or :data:`FALLBACK`; the rejected rows'
    counts go to ``stats``."""
    state = drafted.clone()
    source_B = torch.full((drafted.shape[0],), ACCEPTED, dtype=torch.long)
    log_d = log_determinant_factor(draft, target, drafted, f)
    for b in torch.nonzero(rejected_B).flatten().tolist():
        state[b], source_B[b], trials = _residual_sample(target[f], draft[f], b, float(log_d[b]), rounds, generators,
                                                         images_B[b : b + 1], drafted)
        stats.rejection_trials[b] += trials
        stats.resampled[b] += int(source_B[b] == RESAMPLED)
        stats.fallbacks[b] += int(source_B[b] == FALLBACK)
    return state, source_B


def _noise_of_step(trajectory, integrator: FlowIntegrator, num_steps: int) -> dict[int, torch.Tensor]:
    """The recorded eps of each stochastic step of ``trajectory``, by step index."""
    stochastic = [i for i in range(num_steps) if integrator.is_stochastic(i, num_steps)]
    return dict(zip(stochastic, trajectory.step_noise))


def _finish(field_fn, state: torch.Tensor, t_S1: torch.Tensor, integrator: FlowIntegrator, f: int) -> torch.Tensor:
    """The deterministic steps after the last stochastic one ``f``: the state (B, ...) -> the clean unit float32."""
    num_steps, x = t_S1.numel() - 1, state
    for i in range(f + 1, num_steps):
        x = integrator.transition(x, field_fn(x, t_S1[i]), t_S1[i], t_S1[i + 1], i, num_steps).sample(None)
    return x.float()


def _residual_sample(p_f: GaussianTransition, q_f: GaussianTransition, b: int, log_d: float, rounds: int,
                     generators: Generators, image: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Row ``b``'s state from the residual ``max(0, D p_f - q_f)`` by acceptance-rejection with proposals from
    ``p_f``: ``(state (...) float64, RESAMPLED or FALLBACK, proposals drawn)``. Draws come from the image's own
    generator, so its stream depends on its own outcomes only."""
    gens = None if generators is None else [generators[int(image[0])]]
    p_f = GaussianTransition(p_f.mean[b : b + 1], p_f.diffusion_sqrt, p_f.step_sqrt)  # row b's transitions
    q_f = GaussianTransition(q_f.mean[b : b + 1], q_f.diffusion_sqrt, q_f.step_sqrt)
    proposal = p_f.mean
    for trial in range(1, rounds + 1):
        eps = per_sample_normal(tuple(p_f.mean.shape), gens, like.device, dtype=torch.float64)
        proposal = p_f.sample(eps)
        gap = (q_f.log_density(proposal) - p_f.log_density(proposal) - log_d).clamp(max=0.0)
        alpha = -torch.expm1(gap)  # 1 - q / (D p), clipped at 0 from below by the clamp
        u = round_uniform((), generators, image, like.device).to(torch.float64)
        if bool(u[0] < alpha[0]):
            return proposal[0], RESAMPLED, trial
    return proposal[0], FALLBACK, rounds


def _cache_mark(cache: Any) -> Any:
    """What :func:`_cache_restore` needs to undo the commits made after this call: per-row lengths for caches
    that truncate per row (:class:`vgen.kv_cache.FullKVCache`), else a copy."""
    if hasattr(cache, "truncate") and hasattr(cache, "lengths_B"):
        return ("lengths", cache.lengths_B.clone())
    return ("copy", cache.clone())


def _cache_restore(state: Any, saved: Any) -> None:
    kind, value = saved
    if kind == "lengths":
        state.cache.truncate(value)
    else:
        state.cache = value
