"""One ``torch.Generator`` per image: how a call's ``generator`` argument maps onto the images it makes.

Every sampling loop in :mod:`vgen.samplers` draws image b's randomness from ``generators[b]`` only, so an image does
not depend on the batch it was drawn in (its random stream is the same; its pixels are the same wherever the
arithmetic is: batched matrix products may round differently from single-row ones on some CPUs).

How a pipeline's ``generator`` argument becomes those per-image generators (:func:`per_sample_generators`), for a
call that makes B images (images are ordered prompt by prompt, ``num_images_per_prompt`` consecutive images each):

* **a list of B generators**: image i uses ``generator[i]`` as it is;
* **one generator made with** ``manual_seed(s)`` (and not used since): image i uses a fresh generator seeded with
  ``s + i``, exactly the seeds ``vgen generate --seed s`` and ``vgen sample --seed s`` give image i. Afterwards the
  generator is left at ``manual_seed(s + B)``, so a second call with it continues with seeds ``s + B, s + B + 1,
  ...`` (every image of a session gets its own seed, as diffusers users expect from reusing one generator);
* **one generator that has already drawn numbers**: its next 63-bit draw is taken as ``s``, then as above;
* **None**: the global torch RNG (results depend on the batch).

So ``pipe(prompt, generator=torch.Generator().manual_seed(0))`` and ``pipe(prompt, generator=[torch.Generator()
.manual_seed(0)])`` give the same single image, and ``generator=torch.Generator().manual_seed(s)`` for B images gives
the images of ``[torch.Generator().manual_seed(s + i) for i in range(B)]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vgen.errors import UserError

#: Largest seed a single generator's draw yields (seeds must fit in 64 bits after adding the batch size).
MAX_DRAWN_SEED = 2**62
#: Largest seed ``torch.Generator.manual_seed`` takes.
MAX_SEED = 2**64 - 1


def is_fresh(generator: torch.Generator) -> bool:
    """True when ``generator`` is exactly at ``manual_seed(generator.initial_seed())`` (nothing drawn since)."""
    fresh = torch.Generator(generator.device).manual_seed(generator.initial_seed())
    return torch.equal(fresh.get_state(), generator.get_state())


def base_seed(generator: torch.Generator) -> int:
    """The seed ``s`` of image 0 for a single ``generator`` (see the module docstring)."""
    if is_fresh(generator):
        return int(generator.initial_seed())
    return int(torch.randint(0, MAX_DRAWN_SEED, (), generator=generator, device=generator.device))


def per_sample_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None, batch_size: int
) -> list[torch.Generator] | None:
    """One generator per image (the mapping in the module docstring). A list must have ``batch_size`` entries; a
    single generator seeded ``s`` gives image i seed ``s + i`` and is left at ``manual_seed(s + batch_size)``; None
    keeps the global RNG."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        seed = base_seed(generator)
        if seed + batch_size > MAX_SEED:
            raise UserError(f"generator seed {seed} + {batch_size} images passes the largest seed {MAX_SEED}; use a "
                            "smaller seed")
        generators = [torch.Generator(generator.device).manual_seed(seed + i) for i in range(batch_size)]
        generator.manual_seed(seed + batch_size)
        return generators
    generators = list(generator)
    if len(generators) != batch_size:
        raise UserError(
            f"got {len(generators)} generators for {batch_size} images; pass one per image "
            "(prompts x num_images_per_prompt) or a single generator"
        )
    return generators
