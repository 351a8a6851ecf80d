"""The draft/verify core shared by the speculative samplers (exact speculative sampling, speculative Jacobi decoding,
LANTERN's relaxed acceptance, MuLo-SD), written once against :class:`~vgen.samplers.interfaces.NextTokenModel`.

Three pieces:

- :class:`GuidedStepper` drives one model for B images: the CFG-doubled batch (conditional rows first), the guided
  and filtered probabilities of every scored unit (CFG weight of the unit's own position, then temperature / top-k /
  top-p: exactly what :func:`vgen.samplers.next_token.generate_next_token` samples from), per-row commits
  (``commit(keep_B)``), per-row rollback of committed units (``truncate_units``), dropping finished images from the
  batch and counting forward passes per image.
- :class:`Verifier` policies decide per drafted code: :class:`ExactVerifier` is the lossless rule of Leviathan et al.
  / Chen et al. (accept with ``min(1, p(x) / q(x))``, on rejection sample ``max(0, p - q)`` normalised);
  :class:`vgen.samplers.lantern.LanternVerifier` relaxes it.
- :func:`verify_drafts` applies a policy to a row's chain of drafted units: per-row acceptance lengths, the correction
  unit at the first rejection or the bonus unit after a fully accepted chain.

Units with several codes (Token-Shuffle windows, ``k = s^2``): the codes of one unit are conditionally independent
given the prefix under both the target and the drafter (both predict the whole window from one state), so each code
is verified on its own; the unit is accepted when all its codes are, and otherwise the corrected unit keeps its
accepted codes and resamples the rejected ones from their residuals. Each code's output is then distributed as the
target's, hence so is the unit's (a product of independent codes), and the chain rule does the rest.

Randomness: every round draws a fixed number of uniforms per image from that image's generator
(:func:`round_uniform`), so an image's random stream, its acceptance decisions and its tokens do not depend on the
other images of the batch (up to float rounding of batched matrix products). Drafts may run past the last unit of an
image (their tokens are discarded): which is why a round drafts the same number of units whatever is left, and why
a model's ``prefill`` keeps a margin of cache past the image (:data:`MAX_DRAFT_UNITS`).

Shapes: ``B`` active images (``R = 2B`` model rows under CFG), ``n`` scored units, ``k`` codes per unit, ``V``
codebook size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from vgen.samplers.guidance import GuidanceSchedule
from vgen.samplers.interfaces import NextTokenModel
from vgen.samplers.logits import Generators, apply_temperature, filter_top_k_top_p, sample_categorical
from vgen.samplers.next_scale import TokenSampling

#: The most units one pass may score past a row's committed ones. RasterAR's ``prefill`` keeps 16 units of cache past
#: the image, and a row with one unit left may draft this many; a larger window needs a larger margin.
MAX_DRAFT_UNITS = 16


# ------------------------------------------------------------------------------------------------ probabilities


def token_probs(logits_VLast: torch.Tensor, sampling: TokenSampling) -> torch.Tensor:
    """The distribution the plain loop samples from: temperature, top-k then top-p filtering, softmax (float32,
    any leading shape)."""
    top_p = 0.0 if sampling.top_p >= 1.0 else sampling.top_p  # LlamaGen's "off" (1.0) and VAR's (0.0) alike
    filtered = filter_top_k_top_p(apply_temperature(logits_VLast.float(), sampling.temperature),
                                  top_k=sampling.top_k, top_p=top_p)
    return filtered.softmax(dim=-1)


def sample_units(probs_BnkV: torch.Tensor, uniform_Bnk: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples (B, n, k) from probabilities (B, n, k, V) (need not be normalised) on uniforms (B, n, k),
    the same draw :func:`vgen.samplers.logits.sample_categorical` makes in the plain loop."""
    B, n, k, V = probs_BnkV.shape
    return sample_categorical(probs_BnkV.reshape(B, n * k, V), uniform_Bl=uniform_Bnk.reshape(B, n * k)).view(B, n, k)


def round_uniform(shape: Sequence[int], generators: Generators, images_B: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) noise (B, *shape) for the active images ``images_B`` (indices into ``generators``): row b from
    ``generators[images_B[b]]``, or from the global RNG when ``generators`` is None."""
    if generators is None:
        return torch.rand((images_B.numel(), *shape), device=device)
    rows = [torch.rand(tuple(shape), generator=generators[i], device=generators[i].device).to(device)
            for i in images_B.tolist()]
    return torch.stack(rows) if rows else torch.empty((0, *shape), device=device)


def guidance_weights_tensor(schedule: GuidanceSchedule, guidance_scale: float, num_units: int) -> torch.Tensor:
    """The CFG weight of every unit position (float64 (N,)); positions past the image reuse the last weight."""
    return torch.tensor([float(schedule.weight(guidance_scale, j, num_units)) for j in range(num_units)],
                        dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ one model


@dataclass
class GuidedStepper:
    """One :class:`NextTokenModel` driven for a batch of images with CFG, the sampling filters and per-row commits.

    ``images_B`` holds the batch index of every active image (finished images leave with :meth:`keep_images`).
    Probabilities returned by :meth:`prefill` and :meth:`decode` are float32 (B, n, k, V): entry ``[:, j]`` is the
    distribution of the unit at position ``units_B + 1 + j`` after the pass (``prefill``: position 0).

    Args:
        model: the generator.
        weights_N: CFG weight of each unit position (:func:`guidance_weights_tensor`); all ones = no CFG rows.
        sampling: temperature / top-k / top-p.
        batch_size: images B.
    """

    model: NextTokenModel
    weights_N: torch.Tensor
    sampling: TokenSampling
    batch_size: int
    forwards_B: torch.Tensor = field(init=False)  #: passes each image took part in, int64 (B,)
    images_B: torch.Tensor = field(init=False)
    state: Any = field(init=False, default=None)

    def __post_init__(self):
        if self.sampling.more_smooth:
            raise ValueError("more_smooth (Gumbel-smoothed embeddings) is VAR's; next-token sampling draws codes")
        self.forwards_B = torch.zeros(self.batch_size, dtype=torch.long)
        self.images_B = torch.arange(self.batch_size)
        guided = (self.weights_N != 1.0).nonzero()
        #: CFG rows are needed while some image still has a guided position ahead
        self.last_guided = int(guided.max()) if guided.numel() else -1
        self.guided = self.last_guided >= 0

    @property
    def num_units(self) -> int:
        return int(self.model.sequence_length)

    @property
    def active(self) -> int:
        return int(self.images_B.numel())

    @property
    def units_B(self) -> torch.Tensor:
        """Committed units of every active image, int64 (B,) on the CPU."""
        return self.state.units_B[: self.active]

    def _rows(self, x_B: torch.Tensor) -> torch.Tensor:
        return torch.cat((x_B, x_B)) if self.guided else x_B

    def _probs(self, logits_RnkV: torch.Tensor, position_Bn: torch.Tensor) -> torch.Tensor:
        logits_RnkV = logits_RnkV.float()
        B = self.active
        if self.guided:
            w_Bn = self.weights_N[position_Bn.clamp(max=self.num_units - 1)].to(logits_RnkV)
            cond, uncond = logits_RnkV[:B], logits_RnkV[B:]
            guided = uncond + w_Bn[:, :, None, None] * (cond - uncond)  # combine_cfg_difference, per position
            logits_RnkV = torch.where((w_Bn == 1.0)[:, :, None, None], cond, guided)
        return token_probs(logits_RnkV, self.sampling)

    def _count(self) -> None:
        self.forwards_B[self.images_B] += 1

    @torch.no_grad()
    def prefill(self, cond: Any) -> torch.Tensor:
        """Start the batch (``cond`` for the B conditional rows; the null condition is added under CFG). Returns the
        probabilities (B, 1, k, V) of unit 0."""
        if self.guided:
            cond = self.model.concat_conditions(cond, self.model.null_condition(self.batch_size))
        self.state, logits_RkV = self.model.prefill(cond)
        self._count()
        return self._probs(logits_RkV[:, None], torch.zeros(self.active, 1, dtype=torch.long))

    @torch.no_grad()  # inference only: the cache keeps per-row lengths, which attention with gradients refuses
    def decode(self, units_Bnk: torch.Tensor) -> torch.Tensor:
        """Append ``units_Bnk`` (B, n, k) tentatively at every image's end (one pass) and return the probabilities
        (B, n, k, V) of the unit after each."""
        n = units_Bnk.shape[1]
        position_Bn = self.units_B[:, None] + 1 + torch.arange(n)
        logits_RnkV = self.model.decode(self._rows(units_Bnk), self.state)
        self._count()
        return self._probs(logits_RnkV, position_Bn)

    def commit(self, keep_B: torch.Tensor | None = None) -> None:
        """Keep all units of the open pass, or the first ``keep_B[b]`` of image b."""
        self.state.cache.commit(None if keep_B is None else self._rows(torch.as_tensor(keep_B).cpu()))

    def rollback(self) -> None:
        self.state.cache.rollback()

    def truncate_units(self, units_B: torch.Tensor) -> None:
        """Per-image rollback of committed units: keep at most ``units_B[b]``."""
        self.state.truncate_units(self._rows(torch.as_tensor(units_B, dtype=torch.long).cpu()))

    def keep_images(self, keep_B: torch.Tensor) -> None:
        """Drop the active images where ``keep_B`` (bool (B,)) is False from the model's batch."""
        keep_B = keep_B.cpu()
        if bool(keep_B.all()):
            return
        index_B = keep_B.nonzero().flatten()
        self.images_B = self.images_B[index_B]
        self.state.select(torch.cat((index_B, index_B + keep_B.numel())) if self.guided else index_B)

    def drop_guidance_when_over(self) -> None:
        """Drop the unconditional rows once no active image has a guided position ahead of its committed units."""
        if self.guided and self.active and int(self.units_B.min()) > self.last_guided:
            self.state.select(torch.arange(self.active))
            self.guided = False


# ------------------------------------------------------------------------------------------------ verification


class Verifier(Protocol):
    """A per-code acceptance rule: ``accept_probability`` of drafted codes ``x`` (B, n, k) given the target's
    probabilities ``p`` and the drafter's ``q`` (B, n, k, V), and the ``residual`` (B, k, V) to resample a rejected
    code from (need not be normalised)."""

    def accept_probability(self, p_BnkV: torch.Tensor, q_BnkV: torch.Tensor, x_Bnk: torch.Tensor) -> torch.Tensor:
        ...

    def residual(self, p_BkV: torch.Tensor, q_BkV: torch.Tensor, x_Bk: torch.Tensor) -> torch.Tensor:
        ...


def gather_codes(probs_BnkV: torch.Tensor, x_Bnk: torch.Tensor) -> torch.Tensor:
    """``probs[b, j, c, x[b, j, c]]`` (B, n, k)."""
    return probs_BnkV.gather(-1, x_Bnk[..., None]).squeeze(-1)


def exact_residual(p_BkV: torch.Tensor, q_BkV: torch.Tensor) -> torch.Tensor:
    """``max(0, p - q)``; where it is all zero (p == q, so a rejection had probability 0) ``p`` itself."""
    residual = (p_BkV - q_BkV).clamp_min(0.0)
    empty = residual.sum(-1, keepdim=True) <= 0
    return torch.where(empty, p_BkV, residual)


class ExactVerifier:
    """Lossless speculative sampling: accept ``x ~ q`` with ``min(1, p(x) / q(x))``, on rejection sample from
    ``max(0, p - q) / sum`` (Leviathan et al. 2023, Chen et al. 2023)."""

    def accept_probability(self, p_BnkV, q_BnkV, x_Bnk):
        px, qx = gather_codes(p_BnkV, x_Bnk), gather_codes(q_BnkV, x_Bnk)
        return (px / qx.clamp_min(torch.finfo(qx.dtype).tiny)).clamp(max=1.0)

    def residual(self, p_BkV, q_BkV, x_Bk):
        return exact_residual(p_BkV, q_BkV)


@dataclass
class Verification:
    """Outcome of one round for each row: ``accepted_B`` leading drafted units accepted (0..n); ``next_Bk`` the unit
    after them (the correction at the first rejection, or the bonus unit when all n were accepted);
    ``codes_accepted_B`` drafted codes accepted (for statistics)."""

    accepted_B: torch.Tensor
    next_Bk: torch.Tensor
    codes_accepted_B: torch.Tensor


def verify_drafts(p_BmkV: torch.Tensor, q_BnkV: torch.Tensor, drafts_Bnk: torch.Tensor,
                  u_accept_Bnk: torch.Tensor, u_next_Bk: torch.Tensor, verifier: Verifier) -> Verification:
    """Verify a chain of ``n`` drafted units per row.

    Args:
        p_BmkV: the target's probabilities at the n drafted positions and the one after them (m = n + 1).
        q_BnkV: the distributions the drafts were sampled from.
        drafts_Bnk: the drafted codes.
        u_accept_Bnk: one uniform per drafted code (accept when ``u < acceptance probability``).
        u_next_Bk: uniforms for the correction / bonus unit's codes.
        verifier: the acceptance rule.
    """
    B, n, k = drafts_Bnk.shape
    code_ok_Bnk = u_accept_Bnk < verifier.accept_probability(p_BmkV[:, :n], q_BnkV, drafts_Bnk)
    unit_ok_Bn = code_ok_Bnk.all(-1)
    accepted_B = unit_ok_Bn.long().cumprod(1).sum(1)
    rows = torch.arange(B, device=drafts_Bnk.device)
    at_B = accepted_B.clamp(max=n - 1)  # the first rejected unit (when one was)
    residual_BkV = verifier.residual(p_BmkV[rows, at_B], q_BnkV[rows, at_B], drafts_Bnk[rows, at_B])
    all_ok_B = accepted_B == n
    dist_BkV = torch.where(all_ok_B[:, None, None], p_BmkV[rows, accepted_B], residual_BkV)
    sampled_Bk = sample_units(dist_BkV[:, None], u_next_Bk[:, None])[:, 0]
    keep_draft_Bk = ~all_ok_B[:, None] & code_ok_Bnk[rows, at_B]  # accepted codes of the corrected unit
    next_Bk = torch.where(keep_draft_Bk, drafts_Bnk[rows, at_B], sampled_Bk)
    # codes accepted in the chain: every code of the accepted units plus the accepted codes of the corrected one
    codes_accepted_B = accepted_B * k + torch.where(all_ok_B, 0, keep_draft_Bk.sum(-1))
    return Verification(accepted_B, next_Bk, codes_accepted_B)


# ------------------------------------------------------------------------------------------------ bookkeeping


@dataclass
class SpeculativeStats:
    """Per image counts of one speculative generation (int64 (B,) each): ``target_forwards`` and
    ``drafter_forwards`` passes the image took part in (prefill included), ``rounds`` verification passes,
    ``drafted`` / ``accepted`` drafted units verified / accepted, ``units`` units generated (the sequence length)."""

    target_forwards: torch.Tensor
    drafter_forwards: torch.Tensor
    rounds: torch.Tensor
    drafted: torch.Tensor
    accepted: torch.Tensor
    units: torch.Tensor

    @classmethod
    def zeros(cls, batch_size: int) -> SpeculativeStats:
        z = lambda: torch.zeros(batch_size, dtype=torch.long)  # noqa: E731
        return cls(z(), z(), z(), z(), z(), z())

    def summary(self) -> dict[str, float]:
        """Means over images: forwards per image, acceptance rate (accepted / drafted units over the batch) and
        mean accepted length (units committed per target forward, the bonus / correction unit included)."""
        images = max(1, self.units.numel())
        drafted = int(self.drafted.sum())
        return {
            "target_forwards_per_image": float(self.target_forwards.sum()) / images,
            "drafter_forwards_per_image": float(self.drafter_forwards.sum()) / images,
            "rounds_per_image": float(self.rounds.sum()) / images,
            "acceptance_rate": float(self.accepted.sum()) / drafted if drafted else 0.0,
            "mean_accepted_length": float(self.units.sum()) / max(1, int(self.target_forwards.sum())),
        }


@dataclass
class SpeculativeOutput:
    """``tokens_BL`` raster-order code ids (B, L) for the tokenizer; ``units_BNk`` the same codes per step;
    ``stats`` the per-image counts; ``drafter_tokens_BL`` the drafter's own codes where they are not the target's
    (MuLo-SD's low-resolution drafts), else None."""

    tokens_BL: torch.Tensor
    units_BNk: torch.Tensor
    stats: SpeculativeStats
    drafter_tokens_BL: torch.Tensor | None = None


class UnitBuffer:
    """The units of every image (B, N + margin, k) with how many each image has; writes past N are kept in the
    margin and cut off at the end."""

    def __init__(self, batch_size: int, num_units: int, k: int, margin: int, device: torch.device):
        self.N = num_units
        self.units_BMk = torch.zeros(batch_size, num_units + margin + 1, k, dtype=torch.long, device=device)
        self.count_B = torch.zeros(batch_size, dtype=torch.long)

    def append(self, images_B: torch.Tensor, new_Bnk: torch.Tensor, lengths_B: torch.Tensor) -> None:
        """Image ``images_B[b]`` gains its first ``lengths_B[b]`` units of ``new_Bnk``."""
        n = new_Bnk.shape[1]
        start_B = self.count_B[images_B]
        cols_Bn = start_B[:, None] + torch.arange(n)
        valid_Bn = torch.arange(n)[None] < lengths_B.cpu()[:, None]
        rows = images_B[:, None].expand(-1, n)[valid_Bn]
        self.units_BMk[rows.to(new_Bnk.device), cols_Bn[valid_Bn].to(new_Bnk.device)] = new_Bnk[valid_Bn.to(
            new_Bnk.device)]
        self.count_B[images_B] = start_B + lengths_B.cpu()

    def last(self, images_B: torch.Tensor, back: int = 1) -> torch.Tensor:
        """The ``back``-th last unit (B, k) of each image."""
        idx = (self.count_B[images_B] - back).clamp_min(0)
        return self.units_BMk[images_B.to(self.units_BMk.device), idx.to(self.units_BMk.device)]

    def finished(self, images_B: torch.Tensor) -> torch.Tensor:
        return self.count_B[images_B] >= self.N

    def result(self) -> torch.Tensor:
        return self.units_BMk[:, : self.N]


def check_same_layout(target: NextTokenModel, drafter: NextTokenModel) -> None:
    """A drafter for exact speculative sampling must produce the target's units: same vocabulary, unit size and
    sequence length."""
    mine = (int(target.vocab_size), int(target.tokens_per_step), int(target.sequence_length))
    theirs = (int(drafter.vocab_size), int(drafter.tokens_per_step), int(drafter.sequence_length))
    if mine != theirs:
        raise ValueError(f"the drafter's (vocabulary, codes per unit, units) {theirs} differ from the target's {mine}")
