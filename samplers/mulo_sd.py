"""MuLo-SD: multi-scale local speculative decoding (Peruzzo, Sautiere, Habibian; arXiv 2601.05149) for raster
next-token models. Lossy; ``tau`` is the speed / quality knob.

The drafter is a lower-resolution model of the same family (a ``g x g`` code grid, the target's is ``G = r g``)
on the same tokenizer. Per round and image:

1. the drafter samples ``draft_rows`` full rows of its grid (``draft_rows * g`` drafter passes);
2. an up-sampler turns every low-resolution row drafted so far into ``r`` times as many target rows (a learned latent
   up-sampler, or decode -> resize -> re-encode), and the round's ``r * draft_rows`` target rows are the draft;
3. the target scores every drafted position in one pass (teacher-forced on the drafts);
4. a position is rejected when the target's probability pooled over its draft code and the code's ``neighbours``
   nearest codebook entries is below ``tau``; every rejection grows into its neighbourhood of
   Chebyshev radius ``radius`` (clipped to the round's rows, and only from the first rejection on in raster order,
   since earlier positions were accepted in their own right);
5. each 8-connected island of rejected positions is resampled from the target given the accepted context, all
   islands concurrently: wave ``w`` resamples the ``w``-th position (raster order) of every island in one target
   pass, so a round costs ``1 + (largest island)`` target passes; with ``island_lag >= 1`` an island's rows advance
   together ZipAR-style (about ``width + lag x height`` waves). Accepted positions keep their draft even when an
   earlier island changed (MuLo-SD's locality assumption).

``tau = 0`` keeps the up-sampled draft unchanged; ``tau > 1`` rejects everything, so every round is one island
resampled position by position in raster order: target-only sampling. Resampling draws its noise exactly as
:func:`vgen.samplers.next_token.generate_next_token` does (one uniform per position, drawn up front from each image's
generator before anything else), so for ``tau > 1`` the tokens are the plain loop's for the same generator states.

Deviation from the paper: the drafter continues from its own drafted rows instead of re-encoding the accepted
target rows at its resolution (``D_r(x)``); this saves a tokenizer round trip and a drafter re-decode per round, at
the price of the drafter not seeing the target's resampled islands.

Every image advances by the same rows per round, so the target's cache stays uniform over the batch (one commit
count for all rows); images differ only in which positions they resample (an image with no island left idles through
the other images' waves).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from vgen.samplers.guidance import ConstantCFG, GuidanceSchedule
from vgen.samplers.interfaces import NextTokenModel
from vgen.samplers.logits import Generators, per_sample_uniform
from vgen.samplers.next_scale import TokenSampling
from vgen.samplers.speculative_core import (
    GuidedStepper,
    SpeculativeOutput,
    SpeculativeStats,
    guidance_weights_tensor,
    round_uniform,
    sample_units,
)

#: up-sampler: every low-resolution row drafted so far (B, rows, g) int64 -> r times as many target rows (B, r rows, G)
Upsampler = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ masks


def expand_rejections(reject_BHW: torch.Tensor, radius: int) -> torch.Tensor:
    """MuLo-SD's neighbourhood expansion: every position within Chebyshev distance ``radius`` of a rejected one, and
    only positions at or after the first rejection of the row's image in raster order. ``reject_BHW`` bool."""
    B, H, W = reject_BHW.shape
    grown = reject_BHW
    if radius > 0:
        grown = F.max_pool2d(reject_BHW[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0
    flat_BL = reject_BHW.reshape(B, H * W)
    first_B = torch.where(flat_BL.any(1), flat_BL.float().argmax(1), H * W)
    after_BL = torch.arange(H * W, device=reject_BHW.device)[None] >= first_B[:, None]
    return grown & after_BL.view(B, H, W)


def label_islands(mask_BHW: torch.Tensor) -> torch.Tensor:
    """8-connected components of ``mask_BHW`` (bool): int64 labels (B, H, W), 0 outside the mask, each island
    labelled by its first position in raster order plus one (so labels sort islands in raster order)."""
    B, H, W = mask_BHW.shape
    big = H * W + 1
    index = torch.arange(1, H * W + 1, device=mask_BHW.device, dtype=torch.float32).view(1, H, W)
    labels = torch.where(mask_BHW, index, big)
    while True:  # propagate the smallest index over 8-neighbours inside the mask until nothing changes
        smallest = -F.max_pool2d(-labels[:, None], 3, stride=1, padding=1)[:, 0]
        new = torch.where(mask_BHW, torch.minimum(labels, smallest), big)
        if torch.equal(new, labels):
            break
        labels = new
    return torch.where(mask_BHW, labels, 0).long()


def island_waves(labels_BL: torch.Tensor, lag: int = 0, width: int | None = None) -> torch.Tensor:
    """The wave in which every rejected position is resampled (-1 outside islands), int64 (B, L) for flattened
    labels (B, L) of a grid ``width`` wide.

    ``lag = 0``: its rank in raster order within its island (one position of every island per wave: exact raster
    order inside an island). ``lag >= 1`` (ZipAR-style, needs ``width``): the rows of an island advance together,
    each ``lag`` positions behind the row above: wave = rank within the island's part of its row + ``lag`` x rows
    below the island's top row. Fewer waves; a position then sees the row above resampled only ``lag`` positions
    ahead of it.
    """
    B, L = labels_BL.shape
    in_island = labels_BL > 0
    one_hot_BLI = F.one_hot(labels_BL, L + 1)[..., 1:]
    if lag <= 0:
        # rank = how many earlier positions share the label: a cumulative count per label over the raster order
        rank_BL = (one_hot_BLI.cumsum(1) * one_hot_BLI).sum(-1) - 1
        return torch.where(in_island, rank_BL, -1)
    if width is None or L % width:
        raise ValueError(f"ZipAR-style waves need the grid width (a divisor of {L}), got {width}")
    H = L // width
    per_row_BhwI = one_hot_BLI.view(B, H, width, L)
    rank_in_row_BL = ((per_row_BhwI.cumsum(2) * per_row_BhwI).sum(-1) - 1).view(B, L)
    row_L = torch.arange(L, device=labels_BL.device) // width
    top_BI = torch.where(one_hot_BLI.bool(), row_L[None, :, None], H).amin(1)  # top row of every label
    top_BL = top_BI.gather(1, (labels_BL - 1).clamp_min(0))
    return torch.where(in_island, rank_in_row_BL + lag * (row_L[None] - top_BL), -1)


def pooled_probability(p_BLV: torch.Tensor, draft_BL: torch.Tensor, neighbours_VK: torch.Tensor,
                       neighbours: int) -> torch.Tensor:
    """Target probability pooled over each draft code and its ``neighbours`` nearest codebook entries (the table's
    first column is the code itself): (B, L)."""
    table = neighbours_VK[:, : neighbours + 1].to(draft_BL.device)
    return p_BLV.gather(-1, table[draft_BL]).sum(-1)


# ------------------------------------------------------------------------------------------------ the loop


class _UniformScorer:
    """The target over a batch whose images all hold the same committed prefix ``C`` (positions ``[0, C)``), with the
    probabilities of position C kept from the pass that committed (``pending``)."""

    def __init__(self, stepper: GuidedStepper, first_B1V: torch.Tensor):
        self.stepper, self.C, self.pending_B1V = stepper, 0, first_B1V

    def score(self, tokens_BL: torch.Tensor, end: int) -> torch.Tensor:
        """Probabilities (B, end - C, V) of positions ``C .. end - 1`` given ``tokens_BL`` before each; the pass
        stays open (``commit_until`` or ``rollback`` next)."""
        if end - 1 > self.C:
            later = self.stepper.decode(tokens_BL[:, self.C : end - 1, None])[:, :, 0]
            self._open = True
            return torch.cat((self.pending_B1V, later), dim=1)
        self._open = False
        return self.pending_B1V

    def commit_until(self, position: int, probs_BnV: torch.Tensor) -> None:
        """Commit the open pass's tokens before ``position`` (it must have decoded them) and roll back the rest."""
        keep = position - self.C
        if self._open:
            self.stepper.commit(torch.full((self.stepper.active,), keep, dtype=torch.long))
        elif keep:
            raise ValueError("nothing was decoded to commit")
        self.pending_B1V = probs_BnV[:, keep : keep + 1]
        self.C = position


@torch.no_grad()
def generate_mulo_sd(
    target: NextTokenModel,
    drafter: NextTokenModel,
    target_cond,
    drafter_cond,
    batch_size: int,
    upsample: Upsampler,
    neighbours_VK: torch.Tensor,
    tau: float = 0.3,
    neighbours: int = 8,
    radius: int = 1,
    draft_rows: int = 1,
    island_lag: int = 0,
    guidance_scale: float = 1.0,
    guidance_schedule: GuidanceSchedule | None = None,
    sampling: TokenSampling | None = None,
    generators: Generators = None,
) -> SpeculativeOutput:
    """Generate ``batch_size`` images' codes with a low-resolution drafter.

    Args:
        target: next-token model on a ``G x G`` grid, one code per unit.
        drafter: next-token model on a ``g x g`` grid (``G = r g``), same vocabulary.
        target_cond, drafter_cond: each model's condition for the B images.
        upsample: low-resolution rows (B, rows, g) -> target rows (B, r rows, G).
        neighbours_VK: int64 (V, K) nearest codes of every code, the code itself first.
        tau: acceptance threshold on the pooled probability (0 = keep every draft; > 1 = target-only sampling).
        neighbours: nearest codebook entries pooled with each draft code (0 = the draft code alone).
        radius: neighbourhood radius ``l`` of every rejection.
        draft_rows: drafter rows per round.
        island_lag: 0 = resample each island in raster order; >= 1 = ZipAR-style, an island's rows together,
            each this many positions behind the row above (:func:`island_waves`).
        guidance_scale, guidance_schedule, sampling: for both models, as in the plain loop.
        generators: one ``torch.Generator`` per image, or None (global RNG).
    """
    sampling = sampling if sampling is not None else TokenSampling()
    schedule = guidance_schedule if guidance_schedule is not None else ConstantCFG()
    if target.tokens_per_step != 1 or drafter.tokens_per_step != 1:
        raise ValueError("MuLo-SD drafts code grids row by row: both models need one code per unit (no Token-Shuffle)")
    if target.vocab_size != drafter.vocab_size:
        raise ValueError(f"the drafter has {drafter.vocab_size} codes and the target {target.vocab_size}")
    N, n = int(target.sequence_length), int(drafter.sequence_length)
    G, g = math.isqrt(N), math.isqrt(n)
    if G * G != N or g * g != n or G % g or G == g:
        raise ValueError(f"MuLo-SD needs square grids with the target's side a multiple of the drafter's, got "
                         f"{N} and {n} units")
    if not 0 <= neighbours < neighbours_VK.shape[1] or radius < 0 or draft_rows < 1:
        raise ValueError(f"need 0 <= neighbours < {neighbours_VK.shape[1]}, radius >= 0 and draft_rows >= 1")
    r = G // g
    tgt = GuidedStepper(target, guidance_weights_tensor(schedule, guidance_scale, N), sampling, batch_size)
    dft = GuidedStepper(drafter, guidance_weights_tensor(schedule, guidance_scale, n), sampling, batch_size)
    stats = SpeculativeStats.zeros(batch_size)

    p0_B1kV = tgt.prefill(target_cond)
    device = p0_B1kV.device
    # the plain loop's noise, drawn first and the same way: resampling position j uses exactly its uniform
    resample_u_BN = per_sample_uniform((batch_size, N, 1), generators, device)[..., 0]
    q_B1V = dft.prefill(drafter_cond)[:, :, 0]
    scorer = _UniformScorer(tgt, p0_B1kV[:, :, 0])
    images = tgt.images_B
    low_Bn = torch.zeros(batch_size, n, dtype=torch.long, device=device)
    tokens_BN = torch.zeros(batch_size, N, dtype=torch.long, device=device)
    for low_start in range(0, g, draft_rows):
        rows = min(draft_rows, g - low_start)
        # 1. drafter: full rows
        u_Bm = round_uniform((rows * g,), generators, images, device)
        for j in range(rows * g):
            pos = low_start * g + j
            low_Bn[:, pos] = sample_units(q_B1V[:, :, None], u_Bm[:, j, None, None])[:, 0, 0]
            if pos + 1 < n:
                q_B1V = dft.decode(low_Bn[:, pos, None, None])[:, :, 0]
                dft.commit()
        # 2. up-sample every low-resolution row so far; this round's target rows are the draft
        high_BhG = upsample(low_Bn[:, : (low_start + rows) * g].view(batch_size, low_start + rows, g))
        S, E = low_start * r * G, (low_start + rows) * r * G
        draft_BL = high_BhG[:, low_start * r :].reshape(batch_size, -1).to(device)
        tokens_BN[:, S:E] = draft_BL
        # 3. one target pass over every drafted position
        p_BnV = scorer.score(tokens_BN, E)
        p_BLV = p_BnV[:, S - scorer.C :]
        # 4. rejections, neighbourhoods, islands
        reject_BhW = (pooled_probability(p_BLV, draft_BL, neighbours_VK, neighbours) < tau).view(batch_size, -1, G)
        resample_BhW = expand_rejections(reject_BhW, radius)
        wave_BL = island_waves(label_islands(resample_BhW).view(batch_size, -1), island_lag, G)
        stats.drafted[images] += E - S
        stats.accepted[images] += (wave_BL < 0).sum(1).cpu()
        stats.rounds[images] += 1
        # 5. resample the islands, one position of every island per target pass
        pos_BL = S + torch.arange(E - S, device=device).expand(batch_size, -1)
        first_changed = int(torch.where(wave_BL >= 0, pos_BL, E).min())
        scorer.commit_until(min(first_changed, E - 1), p_BnV)
        for wave in range(int(wave_BL.max()) + 1):
            now_BL = wave_BL == wave
            last = int(pos_BL[now_BL].max())
            p_BnV = scorer.score(tokens_BN, last + 1)
            at_BL = (pos_BL - scorer.C).clamp(0, p_BnV.shape[1] - 1)
            p_BLV = p_BnV.gather(1, at_BL[..., None].expand(-1, -1, p_BnV.shape[-1]))
            sampled_BL = sample_units(p_BLV[:, :, None], resample_u_BN[:, S:E, None])[:, :, 0]
            tokens_BN[:, S:E] = torch.where(now_BL, sampled_BL, tokens_BN[:, S:E])
            later_BL = wave_BL > wave
            next_changed = int(torch.where(later_BL, pos_BL, E).min())
            scorer.commit_until(min(next_changed, last), p_BnV)
    stats.target_forwards += tgt.forwards_B
    stats.drafter_forwards += dft.forwards_B
    stats.units += N
    return SpeculativeOutput(target.to_raster(tokens_BN[:, :, None]), tokens_BN[:, :, None], stats,
                             drafter.to_raster(low_Bn[:, :, None]))
