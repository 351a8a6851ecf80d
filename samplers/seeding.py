"""One ``torch.Generator`` per image: how a call's ``generator`` argument maps onto the images it makes.

Every sampling loop in :mod:`vgen.samplers` draws image b's randomness from ``generators[b]`` only, so an image does
not depend on the batch it was drawn in (its random stream is the same; its pixels are the same wherever the
arithmetic is: batched matrix products may round differently from single-row ones on some CPUs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vgen.errors import UserError


def per_sample_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None, batch_size: int
) -> list[torch.Generator] | None:
    """One generator per image. A list must have ``batch_size`` entries; a single generator seeds one fresh
    generator per image (so the images depend on its seed, not on how the batch is later split); None keeps the
    global RNG."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (batch_size,), generator=generator, device=generator.device).tolist()
        return [torch.Generator(generator.device).manual_seed(s) for s in seeds]
    generators = list(generator)
    if len(generators) != batch_size:
        raise UserError(
            f"got {len(generators)} generators for {batch_size} images; pass one per image "
            "(prompts x num_images_per_prompt) or a single generator"
        )
    return generators
