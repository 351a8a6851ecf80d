"""LANTERN's relaxed acceptance (Jang et al., ICLR 2025) as a :class:`~vgen.samplers.speculative_core.Verifier`:
lossy, with its two knobs explicit.

Visual tokens are ambiguous: many codes decode to nearly the same patch, so the target spreads its probability over
latent neighbours and a draft token is often rejected although a close code would have been likely. LANTERN pools
the target's probability of the draft ``x`` with that of its nearest codebook neighbours:

    p~(x) = p(x) + sum of p(y) over A(x),   A(x) = the longest prefix of x's ``k`` nearest neighbours
                                             (nearest first) whose pooled mass stays <= delta

and accepts with ``min(1, p~(x) / q(x))``. Moving at most ``delta`` of mass onto ``x`` keeps the modified target
within total variation ``delta`` of ``p`` (the paper's bound). On rejection the code is resampled from
``max(0, p - q)`` with the pooled neighbours ``A(x)`` removed (for a point-mass draft, as in the official EAGLE-tree
code, this is exactly its rule: zero ``p`` at ``x`` and at the pooled neighbours, renormalise), falling back to
``max(0, p - q)`` and then ``p`` when that leaves nothing. ``delta = 0`` is the exact rule.

Neighbours come from the tokenizer (e.g. :meth:`vgen.tokenizers.single_scale_vq.SingleScaleVQModel.codebook_neighbours`)
as a table passed in: this module never sees a model. It plugs into every draft/verify loop of vgen
(:func:`vgen.samplers.jacobi.generate_jacobi`, :func:`vgen.samplers.speculative_exact.generate_speculative_exact`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vgen.samplers.speculative_core import exact_residual, gather_codes


def neighbour_table(neighbours: Callable[[torch.Tensor, int], torch.Tensor], vocab_size: int, k: int) -> torch.Tensor:
    """The ``k + 1`` nearest codes of every code (V, k + 1) int64, the code itself first, from a function
    ``neighbours(ids, k) -> (*ids.shape, k)`` (nearest first, the code itself included first)."""
    table = neighbours(torch.arange(vocab_size), k + 1).long().cpu()
    if table.shape != (vocab_size, k + 1) or not bool((table[:, 0] == torch.arange(vocab_size)).all()):
        raise ValueError(f"a neighbour table must be (V={vocab_size}, k+1={k + 1}) with each code first, got "
                         f"{tuple(table.shape)}")
    return table


class LanternVerifier:
    """Relaxed acceptance over latent neighbours.

    Args:
        neighbours_VK: int64 (V, K + 1) table, row v = v then its nearest codes (:func:`neighbour_table`).
        k: neighbours pooled at most (<= K; LANTERN's paper: 1000 of 16384 codes; the official scripts 5-10).
        delta: total-variation budget in [0, 1] (the paper goes up to 0.4); 0 = exact speculative sampling.
    """

    def __init__(self, neighbours_VK: torch.Tensor, k: int, delta: float):
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1], got {delta}")
        if not 1 <= k < neighbours_VK.shape[1]:
            raise ValueError(f"k must be in 1..{neighbours_VK.shape[1] - 1} (the table's neighbours), got {k}")
        self.table_VK = neighbours_VK[:, 1 : k + 1].long()
        self.k, self.delta = k, float(delta)
        self._on: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.table_VK.to(device)
        return self._on[device]

    def pooled(self, p_VLast: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p~(x), ids of A(x) or -1)`` for codes ``x`` (any shape) under probabilities ``p`` (x.shape + (V,))."""
        nb_XK = self._table(x.device)[x]
        nb_p_XK = p_VLast.gather(-1, nb_XK)
        within_XK = nb_p_XK.cumsum(-1) <= self.delta  # a prefix: the cumulative sum only grows
        pooled = gather_codes(p_VLast, x) + (nb_p_XK * within_XK).sum(-1)
        return pooled, torch.where(within_XK, nb_XK, -1)

    def accept_probability(self, p_BnkV, q_BnkV, x_Bnk):
        pooled, _ = self.pooled(p_BnkV, x_Bnk)
        qx = gather_codes(q_BnkV, x_Bnk)
        return (pooled / qx.clamp_min(torch.finfo(qx.dtype).tiny)).clamp(max=1.0)

    def residual(self, p_BkV, q_BkV, x_Bk):
        # x itself needs no removal: a rejection implies p(x) < q(x), so max(0, p - q) is 0 there already
        _, pool_BkK = self.pooled(p_BkV, x_Bk)
        hits_BkV = torch.zeros_like(p_BkV, dtype=torch.long).scatter_add_(-1, pool_BkK.clamp_min(0),
                                                                           (pool_BkK >= 0).long())
        removed_BkV = hits_BkV > 0
        residual = torch.where(removed_BkV, 0.0, (p_BkV - q_BkV).clamp_min(0.0))
        empty = residual.sum(-1, keepdim=True) <= 0
        return torch.where(empty, exact_residual(p_BkV, q_BkV), residual)
