"""The unit-wise flow generation loop (FlowAR scales, xAR cells, block-causal video blocks), written once against
the velocity-model step interface.

Per AR unit ``k``: the model's condition for unit k (built from the KV cache of the clean units before it) ->
integrate the unit's flow from noise at t = 1 to t = 0 with CFG (:mod:`vgen.samplers.flow_cfg`) -> the clean unit
is committed to the model's cache, which returns the condition of unit k + 1. With
:class:`~vgen.samplers.flow_transitions.EulerODE`, :func:`~vgen.samplers.flow_grids.flowar_time_grid`,
:class:`~vgen.samplers.guidance.WeightRampCFG` and ``guidance_interval=(0, 0.9)`` this is official FlowAR's
``sample_tokens``; with :class:`~vgen.samplers.flow_transitions.EulerMaruyamaSDE` and
:func:`~vgen.samplers.flow_grids.xar_time_grid` it is official xAR's; except that randomness comes from one
generator per image.

The model (:class:`vgen.samplers.interfaces.VelocityModel`, plus ``unit_shapes`` and ``device``)::

    unit_shapes: Sequence[tuple[int, ...]]   # one image's unit k without the batch dim; len = number of units K
                                             # (FlowAR: (s_k^2, 16); xAR: (64, 16); video: (F, C, h, w))
    device: torch.device                     # where the noise goes (diffusers ModelMixin has it)
    concat_conditions(cond, uncond) -> cond_2B;   null_condition(B) -> uncond
    prefill(cond) -> (state, unit_cond_0)
    velocity(k, x_t (R, *unit_shapes[k]) float32, t (R,) float32, unit_cond) -> v (R, *unit_shapes[k])
    commit(k, x_clean (R, *unit_shapes[k]) float32, state) -> unit_cond_{k+1}     # called for k < K - 1

R is the model batch: B, or 2B when CFG is on (conditional rows first); ``commit`` then receives the conditional
result repeated for both halves (both officials do this). ``velocity`` is called once per integration step and
leaves the cache as it is (``cache.attend(..., store=False)``); ``commit`` stores the clean unit and commits it
(``state.cache.commit()``), so the loop never touches the cache. (Official xAR encodes the previous clean cell in the
same pass as the first noisy step of the next; a separate clean pass in ``commit`` attends over the same tokens.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from vgen.samplers.flow_cfg import FlowGuidance, velocity_field
from vgen.samplers.flow_grids import check_time_grid
from vgen.samplers.flow_integrate import FlowTrajectory, integrate_flow
from vgen.samplers.flow_transitions import EulerODE, FlowIntegrator
from vgen.samplers.guidance import GuidanceSchedule, WeightRampCFG, guidance_is_off
from vgen.samplers.logits import Generators
from vgen.samplers.noise import per_sample_normal
from vgen.samplers.step_end import StepEnd


@dataclass
class UnitNoise:
    """All the randomness of one unit: ``initial`` (R, *unit) float32 (the noise at t = 1) and ``step_noise``, the
    eps (R, *unit) float64 of each stochastic step. R = B, or 2B when the unconditional half keeps its own x."""

    initial: torch.Tensor
    step_noise: list[torch.Tensor] = field(default_factory=list)


@dataclass
class FlowUnitsOutput:
    """``units``: the clean units, each (B, *unit_shapes[k]) float32, in generation order. With ``record=True``:
    ``noises`` (replay them with ``noises=``) and ``trajectories`` (states and Gaussian transitions per unit)."""

    units: list[torch.Tensor]
    noises: list[UnitNoise] = field(default_factory=list)
    trajectories: list[FlowTrajectory] = field(default_factory=list)


#: Called after every integration step with ``(unit, step, t_next, x_next)``, ``x_next`` (R, *unit) float64; may
#: return a replacement state of the same shape, or None.
UnitStepCallback = Callable[[int, int, float, torch.Tensor], "torch.Tensor | None"]
#: Called with ``(unit, x_clean)``, ``x_clean`` (B, *unit) float32, before it is committed; may return replacement
#: units (inpainting, drafter/verifier schemes), or None.
UnitCallback = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@torch.no_grad()
def generate_flow_units(
    model: Any,
    cond: Any,
    batch_size: int,
    time_grid: torch.Tensor | Sequence[torch.Tensor],
    integrator: FlowIntegrator | None = None,
    guidance_scale: float = 1.0,
    guidance_schedule: GuidanceSchedule | None = None,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    uncond_own_x: bool = False,
    generators: Generators = None,
    noises: Sequence[UnitNoise] | None = None,
    record: bool = False,
    on_step: UnitStepCallback | None = None,
    on_unit: UnitCallback | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    on_step_end: StepEnd | None = None,
) -> FlowUnitsOutput:
    """Generate ``batch_size`` images (or videos) unit by unit.

    Args:
        model: the velocity model (see the module doc).
        cond: the model's condition for the B conditional rows.
        time_grid: one float64 grid ``1 -> 0`` for every unit, or one per unit (e.g. fewer steps at late units).
        integrator: :class:`~vgen.samplers.flow_transitions.EulerODE` (FlowAR, the default) or
            :class:`~vgen.samplers.flow_transitions.EulerMaruyamaSDE` (xAR).
        guidance_scale, guidance_schedule: CFG weight per unit (default :class:`WeightRampCFG`, where
            ``guidance_scale`` is the last unit's weight and 1 is off); the batch is doubled unless every weight is 1.
        guidance_interval: ``(t_low, t_high)``: guidance only at steps with ``t_low <= t <= t_high``.
        uncond_own_x: the unconditional half keeps its own state (FlowAR's official sampler; see
            :mod:`vgen.samplers.flow_cfg`); the conditional result is the same either way.
        generators: one ``torch.Generator`` per image, or None (global RNG, drawn as the official code draws).
        noises: one :class:`UnitNoise` per unit to replay instead of drawing (e.g. ``record``-ed ones).
        record: return every unit's noise and trajectory.
        on_step, on_unit: see :data:`UnitStepCallback`, :data:`UnitCallback`.
        progress: wraps the unit iterator (e.g. a pipeline's ``progress_bar``).
        on_step_end: called once unit ``k`` is integrated (after ``on_unit``) as ``on_step_end(k, k, tensors)`` with
            ``x_clean`` (B, *unit_shapes[k]) float32, the clean unit, and ``velocity`` (B, *unit_shapes[k]) float32,
            the (guided) velocity of its last integration step. A returned replacement of ``x_clean`` is kept and
            committed instead (the later units condition on it); the loop stops after the unit when
            ``on_step_end.interrupted``, returning the units made so far (see :mod:`vgen.samplers.step_end`).
    """
    unit_shapes = [tuple(shape) for shape in model.unit_shapes]
    num_units = len(unit_shapes)
    grids = _grids_per_unit(time_grid, num_units)
    if noises is not None and len(noises) != num_units:
        raise ValueError(f"got prescribed noise for {len(noises)} units, the model generates {num_units}")
    schedule = guidance_schedule if guidance_schedule is not None else WeightRampCFG()
    use_cfg = not guidance_is_off(schedule, guidance_scale, num_units)
    if use_cfg:
        cond = model.concat_conditions(cond, model.null_condition(batch_size))
    state, unit_cond = model.prefill(cond)
    rows = 2 * batch_size if use_cfg and uncond_own_x else batch_size
    t_low, t_high = guidance_interval

    out = FlowUnitsOutput(units=[])
    units = progress(range(num_units)) if progress is not None else range(num_units)
    for k in units:
        shape = (rows, *unit_shapes[k])
        initial = _initial_noise(noises[k] if noises is not None else None, shape, generators, model.device, k)
        guidance = FlowGuidance(
            weight=schedule.weight(guidance_scale, k, num_units) if use_cfg else 1.0,
            t_low=t_low,
            t_high=t_high,
            uncond_own_x=uncond_own_x,
        )
        field_fn = velocity_field(
            lambda x_t, t_R, k=k, unit_cond=unit_cond: model.velocity(k, x_t, t_R, unit_cond), use_cfg, guidance
        )
        step_cb = None if on_step is None else (lambda i, t, x, k=k: on_step(k, i, t, x))
        if on_step_end is not None:
            field_fn, last_velocity = _remembering_last(field_fn)
        result = integrate_flow(
            field_fn,
            initial,
            grids[k],
            integrator if integrator is not None else EulerODE(),
            generators=generators,
            step_noise=noises[k].step_noise if noises is not None else None,
            on_step=step_cb,
            record=record,
        )
        x_clean = result.x[:batch_size].float()
        if on_unit is not None:
            replaced = on_unit(k, x_clean)
            if replaced is not None:
                x_clean = replaced.float()
        if on_step_end is not None:
            velocity = last_velocity()[:batch_size].float()
            tensors = on_step_end(k, k, {"x_clean": x_clean, "velocity": velocity})
            if tensors["x_clean"] is not x_clean:
                x_clean = tensors["x_clean"].to(x_clean.device, torch.float32)
        out.units.append(x_clean)
        if record:
            out.noises.append(UnitNoise(initial=initial, step_noise=result.step_noise))
            out.trajectories.append(result.trajectory)
        if on_step_end is not None and on_step_end.interrupted:
            break
        if k + 1 < num_units:
            unit_cond = model.commit(k, torch.cat([x_clean, x_clean]) if use_cfg else x_clean, state)
    return out


def _remembering_last(field_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """``field_fn`` that keeps the velocity it returned last, and a function giving that velocity (R, ...)."""
    last: list[torch.Tensor] = []

    def field(x: torch.Tensor, t_cur: torch.Tensor) -> torch.Tensor:
        v = field_fn(x, t_cur)
        last[:] = [v]
        return v

    return field, lambda: last[0]


def _grids_per_unit(time_grid: torch.Tensor | Sequence[torch.Tensor], num_units: int) -> list[torch.Tensor]:
    if isinstance(time_grid, torch.Tensor):
        return [check_time_grid(time_grid)] * num_units
    grids = [check_time_grid(grid) for grid in time_grid]
    if len(grids) != num_units:
        raise ValueError(f"got {len(grids)} time grids for {num_units} units; give one grid, or one per unit")
    return grids


def _initial_noise(
    prescribed: UnitNoise | None, shape: tuple[int, ...], generators: Generators, device: torch.device, k: int
) -> torch.Tensor:
    """The unit's noise at t = 1, (R, *unit) float32 as official code draws it (``torch.randn`` in float32)."""
    if prescribed is None:
        return per_sample_normal(shape, generators, device, dtype=torch.float32)
    if tuple(prescribed.initial.shape) != shape:
        raise ValueError(
            f"prescribed initial noise of unit {k} has shape {tuple(prescribed.initial.shape)}, expected {shape}"
        )
    return prescribed.initial.to(device)
