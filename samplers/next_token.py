"""The next-token generation loop (raster AR, Token-Shuffle windows), written once against
:class:`~vgen.samplers.interfaces.NextTokenModel`.

Per step (one unit: a code, or an ``s x s`` window of codes): CFG with the schedule -> temperature / top-k / top-p
-> per-sample sampling -> one ``decode`` pass of the sampled unit (KV-cached) -> commit.

With :class:`~vgen.samplers.guidance.ConstantCFG`, ``guidance_scale = cfg_scale`` and
:func:`~vgen.samplers.guidance.llamagen_cfg_interval` this is LlamaGen's ``generate``: ``uncond + (cond - uncond) *
cfg`` in that order (:func:`~vgen.samplers.guidance.combine_cfg_difference`) from the first token on, except that
randomness comes from one generator per image. Schedules over the steps
(:class:`~vgen.samplers.guidance.WeightRampCFG`: Token-Shuffle's ramp over tokens) plug in the same way. Once no later
step is guided, the unconditional rows are dropped from the state, so the rest of the image costs B rows, not 2B.

Speed: the cache is preallocated once by ``prefill``; each step is one forward of one unit per row and no host
synchronisation (the noise of every step is drawn from the per-image generators before the first step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from vgen.samplers.guidance import ConstantCFG, GuidanceSchedule, combine_cfg_difference
from vgen.samplers.interfaces import NextTokenModel
from vgen.samplers.logits import Generators, per_sample_uniform, sample_from_logits
from vgen.samplers.next_scale import TokenSampling, checked_replacement_tokens
from vgen.samplers.step_end import StepEnd

#: what ``units_BNk`` / ``tokens_BL`` hold for the codes of steps an interrupted loop did not make
NOT_MADE = -1


@dataclass
class NextTokenOutput:
    """``tokens_BL``: raster-order code ids (B, L) for the tokenizer; ``units_BNk``: the same codes per step
    (B, N, k); ``logits_BNkV``: the guided, unfiltered float32 logits of every step when asked for (else None).
    ``steps_made``: N, or fewer when ``on_step_end`` interrupted the loop; the codes of the steps not made are
    :data:`NOT_MADE` (-1)."""

    tokens_BL: torch.Tensor
    units_BNk: torch.Tensor
    logits_BNkV: torch.Tensor | None = None
    steps_made: int = 0


def guidance_weights(schedule: GuidanceSchedule, guidance_scale: float, num_steps: int) -> list[float]:
    """The CFG weight of every step (1.0 = no guidance at that step)."""
    return [float(schedule.weight(guidance_scale, step, num_steps)) for step in range(num_steps)]


@torch.no_grad()
def generate_next_token(
    model: NextTokenModel,
    cond,
    batch_size: int,
    guidance_scale: float = 1.0,
    guidance_schedule: GuidanceSchedule | None = None,
    sampling: TokenSampling | None = None,
    generators: Generators = None,
    forced_units_BMk: torch.Tensor | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    keep_logits: bool = False,
    on_step_end: StepEnd | None = None,
) -> NextTokenOutput:
    """Generate ``batch_size`` images' codes.

    Args:
        model: the next-token generator.
        cond: the model's condition for the B conditional rows.
        guidance_scale, guidance_schedule: CFG (default :class:`ConstantCFG`: ``w = guidance_scale`` at every step,
            diffusers / LlamaGen convention, 1 = off); the unconditional rows are skipped when every weight is 1 and
            dropped after the last guided step.
        sampling: temperature / top-k / top-p (``top_k = 0`` and ``top_p`` 0 or 1 disable a filter; ``top_k = 1`` is
            greedy). Gumbel smoothing (``more_smooth``) is VAR's and does not apply.
        generators: one ``torch.Generator`` per image (results independent of batch size), or None (global RNG).
        forced_units_BMk: units (B, M, k) to use instead of sampling for the first M steps (teacher forcing a
            prefix, e.g. inpainting the top rows or tokens drafted elsewhere).
        progress: wraps the step iterator (e.g. a pipeline's ``progress_bar``).
        keep_logits: also return the guided, unfiltered logits of every step (B, N, k, V) (tests, verifiers).
        on_step_end: called once step ``step`` is sampled as ``on_step_end(step, step, tensors)`` with ``unit_Bk``
            (B, k) int64, the step's codes (one code, or a Token-Shuffle window's s^2 codes in raster order inside
            the window), and ``logits_BkV`` (B, k, V) float32, the guided logits before filtering. A returned
            replacement of ``unit_Bk`` is used instead of the sampled codes (it is what the next steps condition
            on); the loop stops after the step when ``on_step_end.interrupted``, the codes of later steps left at
            :data:`NOT_MADE` (see :mod:`vgen.samplers.step_end`).
    """
    schedule = guidance_schedule if guidance_schedule is not None else ConstantCFG()
    sampling = sampling if sampling is not None else TokenSampling()
    if sampling.more_smooth:
        raise ValueError("more_smooth (Gumbel-smoothed embeddings) is VAR's; next-token sampling draws codes")
    N, k = model.sequence_length, model.tokens_per_step
    top_p = 0.0 if sampling.top_p >= 1.0 else sampling.top_p  # LlamaGen's "off" (1.0) and VAR's (0.0) alike
    forced = 0 if forced_units_BMk is None else forced_units_BMk.shape[1]
    if forced_units_BMk is not None and (forced_units_BMk.shape[0] != batch_size or forced_units_BMk.shape[2] != k
                                         or forced > N):
        raise ValueError(f"forced units must be (B={batch_size}, M <= {N}, k={k}), got {tuple(forced_units_BMk.shape)}")

    weights = guidance_weights(schedule, guidance_scale, N)
    guided_steps = [step for step, w in enumerate(weights) if w != 1.0]
    last_guided = guided_steps[-1] if guided_steps else -1
    if guided_steps:
        cond = model.concat_conditions(cond, model.null_condition(batch_size))
    state, logits_RkV = model.prefill(cond)
    device = logits_RkV.device
    uniform_BNk = per_sample_uniform((batch_size, N, k), generators, device)

    units_BNk = torch.full((batch_size, N, k), NOT_MADE, dtype=torch.long, device=device)
    all_logits = logits_RkV.new_empty(batch_size, N, k, logits_RkV.shape[-1]) if keep_logits else None
    rows = logits_RkV.shape[0]
    steps = progress(range(N)) if progress is not None else range(N)
    steps_made = 0
    for step in steps:
        logits_BkV = logits_RkV.float()
        if rows > batch_size:
            logits_BkV = combine_cfg_difference(logits_BkV[:batch_size], logits_BkV[batch_size:], weights[step])
        if keep_logits:
            all_logits[:, step] = logits_BkV
        if step < forced:
            unit_Bk = forced_units_BMk[:, step].to(device)
        else:
            unit_Bk, _ = sample_from_logits(logits_BkV, top_k=sampling.top_k, top_p=top_p,
                                            temperature=sampling.temperature, uniform_Bl=uniform_BNk[:, step])
        if on_step_end is not None:
            tensors = on_step_end(step, step, {"unit_Bk": unit_Bk, "logits_BkV": logits_BkV})
            if tensors["unit_Bk"] is not unit_Bk:
                unit_Bk = checked_replacement_tokens(tensors["unit_Bk"], unit_Bk, logits_BkV.shape[-1], "unit_Bk")
        units_BNk[:, step] = unit_Bk
        steps_made = step + 1
        if on_step_end is not None and on_step_end.interrupted:
            break
        if step + 1 == N:
            continue  # the last unit needs no decode pass; not breaking lets a progress bar reach its end
        if rows > batch_size and step >= last_guided:  # no later step is guided: the unconditional rows go
            state.select(torch.arange(batch_size))
            rows = batch_size
        unit_R1k = (unit_Bk if rows == batch_size else unit_Bk.repeat(2, 1))[:, None]
        logits_RkV = model.decode(unit_R1k, state)[:, 0]
        state.cache.commit()
    return NextTokenOutput(model.to_raster(units_BNk), units_BNk, all_logits, steps_made)
