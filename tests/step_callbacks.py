"""What the callback tests of every family share: one generator per image, and a ``callback_on_step_end`` that
interrupts the call after a given step (keeping one tensor of every step it saw)."""

import torch


def seeds(*values):
    """One ``torch.Generator`` per image, seeded with ``values``."""
    return [torch.Generator().manual_seed(v) for v in values]


def interrupt_after(step: int, record: str | None = None):
    """A diffusers ``callback_on_step_end`` that sets ``pipe._interrupt`` at step ``step``; with ``record`` it keeps
    ``kwargs[record]`` of every step it was called for in ``callback.seen``."""
    seen = []

    def callback(pipe, step_index, timestep, kwargs):
        if record is not None:
            seen.append(kwargs[record])
        if step_index == step:
            pipe._interrupt = True
        return kwargs

    callback.seen = seen
    return callback
