"""Gaussian noise with one ``torch.Generator`` per image, for the flow integrators
(:mod:`vgen.samplers.flow_integrate`).

The seeding rule is the one of :mod:`vgen.samplers.logits`: row ``b`` of a batch of B images comes from
``generators[b]`` only, so an image's noise does not change with the batch size or its position in the batch. Noise
is drawn on each generator's device and then moved to the target device. With ``generators=None`` the whole tensor
comes from the global RNG in one call, which is exactly what official code does (``torch.randn(shape)``).

A state may hold several rows per image (the unconditional half of a CFG batch that keeps its own x, FlowAR's
official behaviour): with R = n * B rows, rows ``b, B + b, 2B + b, ...`` all come from ``generators[b]``, drawn in
that order, one unit-shaped tensor per draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vgen.samplers.logits import Generators


def per_sample_normal(
    shape_R: Sequence[int],
    generators: Generators,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of shape ``shape_R = (R, *unit)`` in ``dtype`` on ``device``.

    ``generators``: None (global RNG, one call), or B generators with ``R`` a multiple of B (see the module doc).
    """
    R, *unit = shape_R
    if generators is None:
        return torch.randn(tuple(shape_R), device=device, dtype=dtype)
    B = len(generators)
    if B == 0 or R % B != 0:
        raise ValueError(f"got {B} generators for a state of {R} rows; pass one generator per image")
    rows = [
        torch.randn(unit, generator=g, device=g.device, dtype=dtype).to(device)
        for _ in range(R // B)
        for g in generators
    ]
    return torch.stack(rows)
