"""What a generation loop calls at the end of every step: the hook behind diffusers' ``callback_on_step_end``.

A loop written against a step interface (next-scale, next-token, flow units, video blocks) takes an optional
``on_step_end`` and, once step ``i`` is complete, calls ``tensors = on_step_end(i, timestep, tensors)`` with the
step's named tensors (the family documents which: VAR's are ``idx_Bl``, ``f_hat`` and ``logits_BlV``). The hook
returns the tensors to go on with: the same objects, or replacements for the names the family lets a callback
change (a loop re-applies its step with a replaced tensor). After the call the loop stops early when
``on_step_end.interrupted`` is True (diffusers' ``pipe._interrupt``), keeping the steps made so far.

The pipelines build the hook from the user's callback (:meth:`vgen.pipelines.base.VGenPipeline.step_callback`);
loops only see this protocol, so the sampling layer stays free of pipelines.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class StepEnd(Protocol):
    """The end-of-step hook a loop receives (see the module docstring)."""

    @property
    def interrupted(self) -> bool:
        """True once the caller asked to stop after the current step."""
        ...

    def __call__(self, step_index: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's tensors after the callback: the given objects, or replacements of the writable ones."""
        ...
