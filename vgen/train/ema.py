"""Exponential moving average of a model's weights, kept as a full copy of the model.

The copy is an ordinary ``nn.Module`` of the same class, so sampling and ``export`` use it exactly like the raw
model. Early in training the effective decay is ``min(decay, (1 + step) / (10 + step))``, so the average follows
the fast-moving weights of the first steps instead of staying near the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay * ema + (1 - decay) * model`` for floating-point parameters; buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Decay used for the update after optimiser step ``step`` (1-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        ema_params, new_params = [], []
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            if ema_p.is_floating_point():
                ema_params.append(ema_p)
                new_params.append(p.detach().to(ema_p.dtype))
            else:
                ema_p.copy_(p)
        if ema_params:
            torch._foreach_lerp_(ema_params, new_params, weight)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
