"""Two-sample tests for continuous samples: the energy distance and its permutation test.

``energy_distance(X, Y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Szekely & Rizzo; the V-statistic, >= 0, zero iff
the two distributions are equal) for samples X (n, d), Y (m, d). :func:`energy_permutation_test` gives the
distance and the fraction of random relabellings of the pooled samples whose distance is at least as large (the
p-value, with the observed labelling counted).
"""

from __future__ import annotations

import torch


def _energy_from_distances(D: torch.Tensor, in_x: torch.Tensor) -> torch.Tensor:
    a, b = in_x.to(D.dtype), (~in_x).to(D.dtype)
    n, m = a.sum(), b.sum()
    Da, Db = D @ a, D @ b
    return 2 * (a @ Db) / (n * m) - (a @ Da) / (n * n) - (b @ Db) / (m * m)


def energy_distance(x_nd: torch.Tensor, y_md: torch.Tensor) -> float:
    """The energy distance (V-statistic) between samples (n, d) and (m, d), float64."""
    pooled = torch.cat([x_nd, y_md]).to(torch.float64).flatten(1)
    in_x = torch.zeros(pooled.shape[0], dtype=torch.bool)
    in_x[: x_nd.shape[0]] = True
    return float(_energy_from_distances(torch.cdist(pooled, pooled), in_x))


def energy_permutation_test(x_nd: torch.Tensor, y_md: torch.Tensor, permutations: int = 200,
                            generator: torch.Generator | None = None) -> tuple[float, float]:
    """``(energy distance, permutation p-value)`` of samples (n, d) and (m, d)."""
    pooled = torch.cat([x_nd, y_md]).to(torch.float64).flatten(1)
    N, n = pooled.shape[0], x_nd.shape[0]
    D = torch.cdist(pooled, pooled)
    in_x = torch.zeros(N, dtype=torch.bool)
    in_x[:n] = True
    observed = float(_energy_from_distances(D, in_x))
    at_least = 1
    for _ in range(permutations):
        perm = torch.randperm(N, generator=generator)
        mask = torch.zeros(N, dtype=torch.bool)
        mask[perm[:n]] = True
        at_least += int(float(_energy_from_distances(D, mask)) >= observed)
    return observed, at_least / (permutations + 1)
