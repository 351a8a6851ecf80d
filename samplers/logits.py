"""Logits processing and sampling for discrete-token generators: temperature, top-k then top-p filtering,
Gumbel smoothing (VAR's ``more_smooth``) and per-sample seeded sampling.

Seeding rule: every image of a batch draws its randomness from its own ``torch.Generator`` (``generators[b]``), so the
random numbers of an image do not change when the batch size, the batch order or the number of GPUs changes. (The
logits they are applied to are batch-independent only up to float rounding: batched kernels may round differently.)
Noise is drawn on each generator's device and then moved to the logits' device, so CPU generators work with CUDA
models (diffusers' advice for reproducibility). Sampling itself is inverse-CDF on that per-row uniform noise, which
needs no generator on the logits' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = Sequence[torch.Generator] | None


def apply_temperature(logits_BlV: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``; ``temperature`` must be > 0 (use ``top_k=1`` for greedy decoding)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use top_k=1 for greedy decoding)")
    return logits_BlV if temperature == 1.0 else logits_BlV / temperature


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set filtered-out logits to ``-inf`` (out of place). Same numerics as VAR's ``sample_with_top_k_top_p_``:

    - top-k (``top_k > 0``): drop logits strictly below the k-th largest (ties with it are kept);
    - then top-p (``0 < top_p``): sort ascending, drop tokens whose cumulative softmax is ``<= 1 - top_p``; the
      largest token is always kept.

    ``logits_BlV``: (..., V). Returns a tensor of the same shape.
    """
    V = logits_BlV.shape[-1]
    if top_k > 0 and top_k < V:
        kth_largest = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_largest, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_to_remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        sorted_to_remove[..., -1:] = False
        to_remove = sorted_to_remove.scatter(-1, sorted_idx, sorted_to_remove)
        logits_BlV = logits_BlV.masked_fill(to_remove, -torch.inf)
    return logits_BlV


def _check_generators(generators: Generators, batch_size: int) -> None:
    if generators is not None and len(generators) != batch_size:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch_size}; pass one per sample")


def per_sample_uniform(shape_B: Sequence[int], generators: Generators, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) noise of shape ``shape_B`` whose row b comes from ``generators[b]`` (global RNG if None)."""
    B, *rest = shape_B
    if generators is None:
        return torch.rand(shape_B, device=device)
    _check_generators(generators, B)
    rows = [torch.rand(rest, generator=g, device=g.device).to(device) for g in generators]
    return torch.stack(rows)


def per_sample_exponential(shape_B: Sequence[int], generators: Generators, device: torch.device) -> torch.Tensor:
    """Exp(1) noise of shape ``shape_B`` whose row b comes from ``generators[b]`` (global RNG if None)."""
    B, *rest = shape_B
    if generators is None:
        return torch.empty(shape_B, device=device).exponential_()
    _check_generators(generators, B)
    rows = [torch.empty(rest, device=g.device).exponential_(generator=g).to(device) for g in generators]
    return torch.stack(rows)


def sample_categorical(probs_BlV: torch.Tensor, generators: Generators = None) -> torch.Tensor:
    """Draw one index per row of (B, l, V) probabilities (need not be normalised) by inverse CDF on per-sample
    uniform noise. Returns ``idx_Bl`` (B, l) int64. Tokens with probability 0 are never drawn."""
    B, l, V = probs_BlV.shape
    cdf_BlV = probs_BlV.float().cumsum(dim=-1)
    u_Bl = per_sample_uniform((B, l), generators, probs_BlV.device)
    # Scale u by the total mass so float rounding in the cumsum can never pick a token past the last nonzero one.
    target_Bl1 = u_Bl.unsqueeze(-1) * cdf_BlV[..., -1:]
    idx_Bl = torch.searchsorted(cdf_BlV.contiguous(), target_Bl1.contiguous(), right=True).squeeze(-1)
    return idx_Bl.clamp_(max=V - 1)


def sample_from_logits(
    logits_BlV: torch.Tensor,
    generators: Generators = None,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature -> top-k -> top-p -> categorical sample.

    Returns ``(idx_Bl, filtered_logits_BlV)``; the filtered logits (``-inf`` outside the kept set) are what Gumbel
    smoothing and speculative verifiers use.
    """
    logits_BlV = filter_top_k_top_p(apply_temperature(logits_BlV.float(), temperature), top_k=top_k, top_p=top_p)
    return sample_categorical(logits_BlV.softmax(dim=-1), generators), logits_BlV


def gumbel_softmax(logits_BlV: torch.Tensor, tau: float, generators: Generators = None) -> torch.Tensor:
    """Soft Gumbel-softmax weights (B, l, V) with per-sample noise (``hard=False``, as VAR's visualisation mode)."""
    gumbels_BlV = -per_sample_exponential(tuple(logits_BlV.shape), generators, logits_BlV.device).log()
    return ((logits_BlV + gumbels_BlV) / tau).softmax(dim=-1)


def more_smooth_weights(filtered_logits_BlV: torch.Tensor, ratio: float, generators: Generators = None) -> torch.Tensor:
    """VAR's ``more_smooth`` (visualisation only, not for FID): soft codebook weights
    ``gumbel_softmax(logits * (1 + ratio), tau=max(0.27 * (1 - 0.95 * ratio), 0.005))`` where ``ratio`` is the
    fraction of scales done (si / (K - 1)). Multiply by the codebook (V, Cvae) to get token embeddings."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    return gumbel_softmax(filtered_logits_BlV * (1 + ratio), tau=tau, generators=generators)
