"""Speculative Jacobi decoding (SJD; Teng et al., ICLR 2025): lossless self-speculation with the target alone.

Each image keeps a window of ``window`` drafted units after its finalised ones, each with the distribution ``q`` it
was sampled from. One target pass scores the last finalised unit and the whole window; the window is verified with
the probabilistic rule (accept ``x`` with ``min(1, p(x) / q(x))`` until the first rejection, which is resampled from
``max(0, p - q)``; a fully accepted window gains a bonus unit from ``p``). This is speculative sampling whose
proposal for a position is the target's own conditional from the previous iteration (given the drafts that were
in front of it then), so the output follows the target's sampling distribution exactly.

The window is then refilled: the positions that stay drafted get new drafts sampled from this pass's ``p`` at their
position (conditioned on the old drafts before them; ``q`` is that ``p``), the position one past the old window
from the pass's last ``p``, and positions beyond that are initialised uniformly at random over the codebook
(``q`` uniform), as SJD does. Each image advances by its own accepted length (the official code advances a batch by
its minimum; per-row commits on the cache make that unnecessary).

Cost: one target pass of ``window + 1`` units per iteration; the number of iterations is what SJD saves (about 2x
fewer than units on large text-to-image models). ``verifier`` swaps the rule (LANTERN's relaxed acceptance).
"""

from __future__ import annotations

import torch
from vgen.samplers.guidance import ConstantCFG, GuidanceSchedule
from vgen.samplers.interfaces import NextTokenModel
from vgen.samplers.logits import Generators
from vgen.samplers.next_scale import TokenSampling
from vgen.samplers.speculative_core import (
    MAX_DRAFT_UNITS,
    ExactVerifier,
    GuidedStepper,
    SpeculativeOutput,
    SpeculativeStats,
    UnitBuffer,
    Verifier,
    guidance_weights_tensor,
    round_uniform,
    sample_units,
    verify_drafts,
)


def refill_window(p_BmkV: torch.Tensor, accepted_B: torch.Tensor, u_Bwk: torch.Tensor) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """New drafts and their proposals after a verification.

    Args:
        p_BmkV: this pass's target probabilities at the old window's positions and one past it (m = window + 1).
        accepted_B: drafts accepted per row (the finalised units grow by ``accepted + 1``).
        u_Bwk: uniforms for the new drafts.
    Returns:
        ``(drafts_Bwk, q_BwkV)``: old window index ``j = accepted + 1 + i`` gives new draft i, sampled from
        ``p[:, j]`` while ``j <= window``, uniformly over the codebook beyond.
    """
    B, m, k, V = p_BmkV.shape
    w = m - 1
    j_Bw = accepted_B[:, None].to(p_BmkV.device) + 1 + torch.arange(w, device=p_BmkV.device)
    from_pass_Bw = j_Bw <= w
    q_BwkV = p_BmkV[torch.arange(B, device=p_BmkV.device)[:, None], j_Bw.clamp(max=w)]
    q_BwkV = torch.where(from_pass_Bw[:, :, None, None], q_BwkV, torch.full_like(q_BwkV, 1.0 / V))
    return sample_units(q_BwkV, u_Bwk), q_BwkV


@torch.no_grad()
def generate_jacobi(
    target: NextTokenModel,
    cond,
    batch_size: int,
    window: int = 16,
    guidance_scale: float = 1.0,
    guidance_schedule: GuidanceSchedule | None = None,
    sampling: TokenSampling | None = None,
    generators: Generators = None,
    verifier: Verifier | None = None,
) -> SpeculativeOutput:
    """Generate ``batch_size`` images' codes by speculative Jacobi decoding.

    Args:
        target: the next-token model.
        cond: its condition for the B images.
        window: drafted units per image (1..16; SJD's default 16).
        guidance_scale, guidance_schedule, sampling: as in the plain loop.
        generators: one ``torch.Generator`` per image, or None (global RNG).
        verifier: the acceptance rule (default :class:`ExactVerifier`: lossless).
    """
    if not 1 <= window <= MAX_DRAFT_UNITS:
        raise ValueError(f"window must be in 1..{MAX_DRAFT_UNITS}, got {window}")
    verifier = verifier if verifier is not None else ExactVerifier()
    sampling = sampling if sampling is not None else TokenSampling()
    schedule = guidance_schedule if guidance_schedule is not None else ConstantCFG()
    N, k, V = int(target.sequence_length), int(target.tokens_per_step), int(target.vocab_size)
    tgt = GuidedStepper(target, guidance_weights_tensor(schedule, guidance_scale, N), sampling, batch_size)
    stats = SpeculativeStats.zeros(batch_size)

    p0_B1kV = tgt.prefill(cond)
    device = p0_B1kV.device
    out = UnitBuffer(batch_size, N, k, window + 1, device)
    images = tgt.images_B
    u_B = round_uniform(((1 + window) * k,), generators, images, device)
    out.append(images, sample_units(p0_B1kV, u_B[:, None, :k]), torch.ones(batch_size, dtype=torch.long))
    q_BwkV = torch.full((batch_size, window, k, V), 1.0 / V, device=device)  # SJD's random initialisation
    drafts_Bwk = sample_units(q_BwkV, u_B[:, k:].view(-1, window, k))
    while True:
        keep_B = ~out.finished(tgt.images_B)
        tgt.keep_images(keep_B)
        keep_B = keep_B.to(device)
        drafts_Bwk, q_BwkV = drafts_Bwk[keep_B], q_BwkV[keep_B]
        if not tgt.active:
            break
        tgt.drop_guidance_when_over()
        images = tgt.images_B
        u_B = round_uniform(((2 * window + 1) * k,), generators, images, device)
        u_accept_Bwk = u_B[:, : window * k].view(-1, window, k)
        u_next_Bk = u_B[:, window * k : (window + 1) * k]
        u_refill_Bwk = u_B[:, (window + 1) * k :].view(-1, window, k)
        p_BmkV = tgt.decode(torch.cat((out.last(images)[:, None], drafts_Bwk), dim=1))
        ver = verify_drafts(p_BmkV, q_BwkV, drafts_Bwk, u_accept_Bwk, u_next_Bk, verifier)
        accepted_B = ver.accepted_B.cpu()
        tgt.commit(1 + accepted_B)
        new_Bmk = torch.cat((drafts_Bwk, drafts_Bwk[:, :1]), dim=1)
        new_Bmk[torch.arange(new_Bmk.shape[0]), ver.accepted_B] = ver.next_Bk
        out.append(images, new_Bmk, accepted_B + 1)
        drafts_Bwk, q_BwkV = refill_window(p_BmkV, ver.accepted_B, u_refill_Bwk)
        stats.rounds[images] += 1
        stats.drafted[images] += window
        stats.accepted[images] += accepted_B
    stats.target_forwards += tgt.forwards_B
    stats.units += N
    units_BNk = out.result()
    return SpeculativeOutput(target.to_raster(units_BNk), units_BNk, stats)
