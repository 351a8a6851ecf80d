"""The next-scale generation loop (VAR, NFIG), written once against :class:`~vgen.samplers.interfaces.NextScaleModel`.

Per scale ``si``: model step (KV-cached) -> CFG with the schedule -> temperature / top-k / top-p -> per-sample
sampling -> codebook lookup -> tokenizer ``get_next_autoregressive_input`` -> next scale's token map.

With ``guidance_scale=1.5, top_k, top_p, more_smooth`` and :class:`~vgen.samplers.guidance.LinearRampCFG` this is
official VAR's ``autoregressive_infer_cfg``, except that randomness comes from one generator per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

from vgen.errors import UserError
from vgen.samplers.guidance import GuidanceSchedule, LinearRampCFG, combine_cfg, guidance_is_off
from vgen.samplers.interfaces import NextScaleModel, ResidualQuantizer
from vgen.samplers.logits import Generators, more_smooth_weights, sample_from_logits
from vgen.samplers.step_end import StepEnd


@dataclass
class TokenSampling:
    """How discrete tokens are drawn from (guided) logits. ``top_k=0`` / ``top_p=0`` disable a filter;
    ``top_k=1`` is greedy. ``more_smooth`` is VAR's Gumbel-smoothed embedding (visualisation only)."""

    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    more_smooth: bool = False


@dataclass
class NextScaleOutput:
    """``idx_Bl``: sampled indices per scale, each (B, pn^2); ``f_hat``: final summed features (B, Cvae, H, W)
    for the tokenizer's decoder (``fhat_to_img``)."""

    idx_Bl: list[torch.Tensor]
    f_hat: torch.Tensor
    logits_BlV: list[torch.Tensor] = field(default_factory=list)


# Called at each scale with (si, sampled idx_Bl, f_hat of the scales before si); may return replacement indices
# (B, pn^2) for this scale, which
# is how inpainting/editing (keep known tokens) and drafter/refiner schemes (CoDe, SDVAR) plug into the same loop.
ScaleCallback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]


@torch.no_grad()
def generate_next_scale(
    model: NextScaleModel,
    quantizer: ResidualQuantizer,
    cond: Any,
    batch_size: int,
    guidance_scale: float = 1.5,
    guidance_schedule: GuidanceSchedule | None = None,
    sampling: TokenSampling | None = None,
    generators: Generators = None,
    forced_idx_Bl: Sequence[torch.Tensor] = (),
    on_scale: ScaleCallback | None = None,
    progress: Callable[[Sequence[int]], Sequence[int]] | None = None,
    keep_logits: bool = False,
    on_step_end: StepEnd | None = None,
) -> NextScaleOutput:
    """Generate ``batch_size`` token pyramids.

    Args:
        model: the next-scale generator.
        quantizer: the tokenizer's residual quantizer (codebook + ``get_next_autoregressive_input``).
        cond: the model's condition for the B conditional rows (see the model's ``condition`` helpers).
        guidance_scale, guidance_schedule: CFG (default schedule: VAR's :class:`LinearRampCFG`); the
            unconditional pass is skipped when every weight is 1.
        sampling: temperature / top-k / top-p / Gumbel smoothing (default: plain sampling, no filtering).
        generators: one ``torch.Generator`` per image (results independent of batch size), or None (global RNG).
        forced_idx_Bl: indices to use instead of sampling for the first ``len(forced_idx_Bl)`` scales (teacher
            forcing a prefix, e.g. tokens drafted by another model); the model still runs to fill its cache.
        on_scale: optional callback, see :data:`ScaleCallback`.
        progress: wraps the scale iterator (e.g. a pipeline's ``progress_bar``).
        keep_logits: also return the guided, unfiltered logits of every scale (for tests and verifiers).
        on_step_end: called once scale ``si`` is complete as ``on_step_end(si, pn_si, tensors)`` with ``idx_Bl``
            (B, pn^2) int64, the scale's tokens; ``f_hat`` (B, Cvae, H, W), the features of scales <= si; and
            ``logits_BlV`` (B, pn^2, V) float32, the guided logits before filtering. A returned replacement of
            ``idx_Bl`` is applied instead of the sampled tokens (``f_hat`` is recomputed from them and the next
            scales condition on them); the loop stops after the scale when ``on_step_end.interrupted``, returning
            the scales made so far (see :mod:`vgen.samplers.step_end`).
    """
    guidance_schedule = guidance_schedule if guidance_schedule is not None else LinearRampCFG()
    sampling = sampling if sampling is not None else TokenSampling()
    patch_nums = list(model.patch_nums)
    num_scales = len(patch_nums)
    use_cfg = not guidance_is_off(guidance_schedule, guidance_scale, num_scales)
    if use_cfg:
        cond = model.concat_conditions(cond, model.null_condition(batch_size))
    state, token_map_BlC = model.prefill(cond)

    codebook_VC = quantizer.embedding.weight
    Cvae = codebook_VC.shape[1]
    f_hat = codebook_VC.new_zeros(batch_size, Cvae, patch_nums[-1], patch_nums[-1])
    all_idx, all_logits = [], []
    scales = progress(range(num_scales)) if progress is not None else range(num_scales)
    for si in scales:
        pn = patch_nums[si]
        ratio = si / (num_scales - 1) if num_scales > 1 else 0.0
        logits_BlV = model.logits_for_scale(si, token_map_BlC, state).float()
        state.cache.commit()
        if use_cfg:
            weight = guidance_schedule.weight(guidance_scale, si, num_scales)
            logits_BlV = combine_cfg(logits_BlV[:batch_size], logits_BlV[batch_size:], weight)
        if keep_logits:
            all_logits.append(logits_BlV)

        idx_Bl, filtered_BlV = sample_from_logits(
            logits_BlV, generators, top_k=sampling.top_k, top_p=sampling.top_p, temperature=sampling.temperature
        )
        forced = si < len(forced_idx_Bl)
        if forced:
            idx_Bl = forced_idx_Bl[si].to(idx_Bl.device)
        if on_scale is not None:
            replaced = on_scale(si, idx_Bl, f_hat)
            if replaced is not None:
                idx_Bl, forced = replaced, True

        if sampling.more_smooth and not forced:
            weights_BlV = more_smooth_weights(filtered_BlV, ratio, generators)
            h_BlC = weights_BlV @ codebook_VC.float().unsqueeze(0)
        else:
            h_BlC = quantizer.embedding(idx_Bl)
        h_BChw = rearrange(h_BlC, "B (h w) C -> B C h w", h=pn, w=pn).to(f_hat.dtype)
        f_before = f_hat.clone() if on_step_end is not None else None  # the update is in place
        f_hat, next_input = quantizer.get_next_autoregressive_input(si, num_scales, f_hat, h_BChw)
        if on_step_end is not None:
            tensors = on_step_end(si, pn, {"idx_Bl": idx_Bl, "f_hat": f_hat, "logits_BlV": logits_BlV})
            if tensors["idx_Bl"] is not idx_Bl:
                idx_Bl = checked_replacement_tokens(tensors["idx_Bl"], idx_Bl, codebook_VC.shape[0], "idx_Bl")
                h_BChw = rearrange(quantizer.embedding(idx_Bl), "B (h w) C -> B C h w", h=pn, w=pn).to(f_hat.dtype)
                f_hat, next_input = quantizer.get_next_autoregressive_input(si, num_scales, f_before, h_BChw)
        all_idx.append(idx_Bl)
        if on_step_end is not None and on_step_end.interrupted:
            break

        if si + 1 < num_scales:
            token_map_BlC = model.embed_scale_input(si + 1, next_input)
            if use_cfg:
                token_map_BlC = token_map_BlC.repeat(2, 1, 1)
    return NextScaleOutput(idx_Bl=all_idx, f_hat=f_hat, logits_BlV=all_logits)


def checked_replacement_tokens(replaced: torch.Tensor, sampled: torch.Tensor, vocab_size: int,
                               name: str) -> torch.Tensor:
    """A callback's replacement ``name`` for a step's sampled token ids: integers in [0, V) on their device (the
    next-scale and next-token loops both check replacements with it)."""
    if replaced.is_floating_point() or replaced.is_complex():
        raise UserError(f"a callback's replacement {name} must hold integer token ids, got {replaced.dtype}")
    replaced = replaced.to(device=sampled.device, dtype=torch.long)
    if replaced.numel() and (int(replaced.min()) < 0 or int(replaced.max()) >= vocab_size):
        raise UserError(f"a callback's replacement {name} holds token ids outside [0, {vocab_size})")
    return replaced
