"""Exact speculative sampling with a drafter model (Leviathan et al. 2023; Chen et al. 2023) for next-token models.

Per round and image: the drafter samples ``gamma`` units one by one from its guided, filtered distribution ``q``;
the target scores the last finalised unit and all drafts in one pass (``p`` at every drafted position and one past
them); :func:`~vgen.samplers.speculative_core.verify_drafts` accepts drafts with ``min(1, p / q)`` until the first
rejection, which is resampled from ``max(0, p - q)`` (or, when every draft is accepted, a bonus unit is sampled from
``p``). Images accept different numbers of drafts; each keeps its own length in both caches (``commit(keep_B)`` on
the target, ``truncate_units`` on the drafter). CFG (weights per unit position), temperature, top-k and top-p are
applied to both models identically, so the output follows the target's sampling distribution exactly: the same one
:func:`vgen.samplers.next_token.generate_next_token` samples from (the chi-square tests in
``tests/test_speculative_lossless.py`` check it against enumeration).

Cache invariant between rounds, for an image with ``A`` finalised units (the last one, ``c``, not yet decoded by
either model): the target holds ``A - 1`` units, the drafter ``A - 2``. A round decodes ``[x, c]`` on the drafter
(``x`` the unit before ``c``: re-decoding one unit keeps every image's pass the same length) and ``[c, drafts]`` on
the target.

Cost per round: ``gamma`` drafter passes and one target pass of ``gamma + 1`` units; with acceptance rate alpha the
expected units per round are ``(1 - alpha^(gamma + 1)) / (1 - alpha)``.
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
    check_same_layout,
    guidance_weights_tensor,
    round_uniform,
    sample_units,
    verify_drafts,
)


@torch.no_grad()
def generate_speculative_exact(
    target: NextTokenModel,
    drafter: NextTokenModel,
    target_cond,
    drafter_cond,
    batch_size: int,
    gamma: int = 4,
    guidance_scale: float = 1.0,
    guidance_schedule: GuidanceSchedule | None = None,
    sampling: TokenSampling | None = None,
    generators: Generators = None,
    verifier: Verifier | None = None,
) -> SpeculativeOutput:
    """Generate ``batch_size`` images' codes with drafter ``drafter`` and target ``target``.

    Args:
        target, drafter: next-token models with the same vocabulary, unit size and sequence length.
        target_cond, drafter_cond: each model's condition for the B images (the same prompts / labels).
        gamma: drafted units per round (1..16).
        guidance_scale, guidance_schedule: CFG as in the plain loop (default constant; 1 = off), for both models.
        sampling: temperature / top-k / top-p, for both models.
        generators: one ``torch.Generator`` per image, or None (global RNG).
        verifier: the acceptance rule (default :class:`ExactVerifier`: lossless; LANTERN's relaxes it).
    """
    check_same_layout(target, drafter)
    if not 1 <= gamma <= MAX_DRAFT_UNITS:
        raise ValueError(f"gamma must be in 1..{MAX_DRAFT_UNITS}, got {gamma}")
    verifier = verifier if verifier is not None else ExactVerifier()
    sampling = sampling if sampling is not None else TokenSampling()
    schedule = guidance_schedule if guidance_schedule is not None else ConstantCFG()
    N, k = int(target.sequence_length), int(target.tokens_per_step)
    weights_N = guidance_weights_tensor(schedule, guidance_scale, N)
    tgt = GuidedStepper(target, weights_N, sampling, batch_size)
    dft = GuidedStepper(drafter, weights_N, sampling, batch_size)
    stats = SpeculativeStats.zeros(batch_size)

    p0_B1kV = tgt.prefill(target_cond)
    dft.prefill(drafter_cond)
    device = p0_B1kV.device
    out = UnitBuffer(batch_size, N, k, gamma + 1, device)
    images = tgt.images_B
    first_Bk = sample_units(p0_B1kV, round_uniform((1, k), generators, images, device))[:, 0]
    out.append(images, first_Bk[:, None], torch.ones(batch_size, dtype=torch.long))
    first_round = True
    while True:
        keep_B = ~out.finished(tgt.images_B)
        tgt.keep_images(keep_B)
        dft.keep_images(keep_B)
        if not tgt.active:
            break
        tgt.drop_guidance_when_over()
        dft.drop_guidance_when_over()
        images = tgt.images_B
        u_B = round_uniform(((2 * gamma + 1) * k,), generators, images, device)
        u_draft_Bgk = u_B[:, : gamma * k].view(-1, gamma, k)
        u_accept_Bgk = u_B[:, gamma * k : 2 * gamma * k].view(-1, gamma, k)
        u_next_Bk = u_B[:, 2 * gamma * k :]
        c_Bk = out.last(images)
        # drafter: gamma units, each from the distribution it was sampled from (kept for the verifier)
        if first_round:
            q_BkV = dft.decode(c_Bk[:, None])[:, 0]
        else:
            q_BkV = dft.decode(torch.stack((out.last(images, back=2), c_Bk), dim=1))[:, 1]
        dft.commit()
        drafts, qs = [], []
        for i in range(gamma):
            draft_Bk = sample_units(q_BkV[:, None], u_draft_Bgk[:, i : i + 1])[:, 0]
            drafts.append(draft_Bk)
            qs.append(q_BkV)
            if i + 1 < gamma:
                q_BkV = dft.decode(draft_Bk[:, None])[:, 0]
                dft.commit()
        drafts_Bgk, q_BgkV = torch.stack(drafts, 1), torch.stack(qs, 1)
        # target: the last finalised unit and every draft in one pass; p at the gamma drafts and the bonus position
        p_BmkV = tgt.decode(torch.cat((c_Bk[:, None], drafts_Bgk), dim=1))
        ver = verify_drafts(p_BmkV, q_BgkV, drafts_Bgk, u_accept_Bgk, u_next_Bk, verifier)
        accepted_B = ver.accepted_B.cpu()
        tgt.commit(1 + accepted_B)
        new_Bmk = torch.cat((drafts_Bgk, drafts_Bgk[:, :1]), dim=1)
        new_Bmk[torch.arange(new_Bmk.shape[0]), ver.accepted_B] = ver.next_Bk
        out.append(images, new_Bmk, accepted_B + 1)
        dft.truncate_units(out.count_B[images] - 2)
        stats.rounds[images] += 1
        stats.drafted[images] += gamma
        stats.accepted[images] += accepted_B
        first_round = False
    stats.target_forwards += tgt.forwards_B
    stats.drafter_forwards += dft.forwards_B
    stats.units += N
    units_BNk = out.result()
    return SpeculativeOutput(target.to_raster(units_BNk), units_BNk, stats)
