"""diffusers' ``callback_on_step_end`` for every vgen pipeline: the user's callback wrapped as the loop's
:class:`vgen.samplers.step_end.StepEnd` hook.

diffusers' convention, kept here: ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict`` is
called once per generation step; ``callback_kwargs`` holds the tensors named in
``callback_on_step_end_tensor_inputs`` (each must be in the pipeline's ``_callback_tensor_inputs``); the returned
dict may replace some of them, and setting ``pipe._interrupt = True`` stops the call after the step. diffusers'
:class:`~diffusers.callbacks.PipelineCallback` objects (and ``MultiPipelineCallbacks``) bring their own
``tensor_inputs``.

vgen adds one rule: a family names the tensors a callback may replace (``_callback_writable_tensor_inputs``); giving
back another object for a read-only one is an error, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from vgen.errors import UserError

#: diffusers' signature of ``callback_on_step_end``
StepCallback = Callable[[Any, int, Any, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


class StepCallbackHook:
    """The hook a generation loop calls after each step (:class:`vgen.samplers.step_end.StepEnd`)."""

    def __init__(self, pipe, callback: StepCallback, tensor_inputs: Sequence[str]):
        self.pipe = pipe
        self.callback = callback
        self.tensor_inputs = list(tensor_inputs)
        self.writable = set(getattr(pipe, "_callback_writable_tensor_inputs", ()))

    @property
    def interrupted(self) -> bool:
        return bool(getattr(self.pipe, "_interrupt", False))

    def __call__(self, step_index: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        given = {name: tensors[name] for name in self.tensor_inputs}
        returned = self.callback(self.pipe, step_index, timestep, dict(given))
        if returned is None:
            return tensors
        if not isinstance(returned, dict):
            raise UserError(f"callback_on_step_end must return a dict of tensors (its callback_kwargs), got "
                            f"{type(returned).__name__}")
        result = dict(tensors)
        for name, value in returned.items():
            if name not in tensors or value is tensors[name]:
                continue  # diffusers callbacks hand back the whole dict; unchanged entries are fine
            if name not in self.writable:
                writable = ", ".join(sorted(self.writable)) or "none"
                raise UserError(f"{type(self.pipe).__name__}'s step tensor {name!r} is read-only in "
                                f"callback_on_step_end (tensors a callback may replace: {writable})")
            if not isinstance(value, torch.Tensor) or value.shape != tensors[name].shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UserError(f"callback_on_step_end returned {name} of shape {shape}; it must keep the shape "
                                f"{tuple(tensors[name].shape)}")
            result[name] = value
        return result


def step_callback_hook(pipe, callback: StepCallback | None, tensor_inputs: Sequence[str] | None,
                       ) -> StepCallbackHook | None:
    """The loop hook for ``callback`` (None when there is no callback), with ``tensor_inputs`` checked against
    ``pipe._callback_tensor_inputs``; diffusers' ``PipelineCallback`` objects bring their own tensor inputs."""
    if callback is None:
        if tensor_inputs:
            raise UserError("callback_on_step_end_tensor_inputs was given without callback_on_step_end")
        return None
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback.tensor_inputs
    elif not callable(callback):
        raise UserError(f"callback_on_step_end must be callable as callback(pipe, step_index, timestep, "
                        f"callback_kwargs), got {type(callback).__name__}")
    names = list(pipe._default_callback_tensor_inputs if tensor_inputs is None else tensor_inputs)
    available = list(pipe._callback_tensor_inputs)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise UserError(f"callback_on_step_end_tensor_inputs {', '.join(map(repr, unknown))} not available in "
                        f"{type(pipe).__name__}; its step tensors: {', '.join(available) or 'none'}")
    return StepCallbackHook(pipe, callback, names)
