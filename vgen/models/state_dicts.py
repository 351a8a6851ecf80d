"""Comparing a saved state dict with the one a model expects, for one-line errors when they do not match."""

from __future__ import annotations

import torch


def _listed(keys: list[str], limit: int) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def state_dict_mismatch(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], limit: int = 20) -> str:
    """How ``saved`` differs from ``expected`` in keys and shapes (at most ``limit`` keys named per kind); "" when
    every expected key is saved with its shape and nothing else is."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing key(s): {_listed(missing, limit)}")
    if unexpected:
        parts.append(f"unexpected key(s): {_listed(unexpected, limit)}")
    if reshaped:
        shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(expected[k].shape)}" for k in reshaped]
        parts.append(f"other shape(s), saved vs expected: {_listed(shapes, limit)}")
    return "; ".join(parts)
