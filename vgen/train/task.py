"""The contract between the training loop and what it trains.

The loop (``vgen.train.loop``) owns optimisation, mixed precision, DDP, checkpoints, resume, logging and sample
grids. A :class:`TrainTask` owns the model, the data and the loss. A run config is YAML with two sections::

    task:   # fields of the task's ``config_class`` (model size, data world, resolution, ...)
    train:  # fields of ``vgen.train.loop.TrainConfig`` (steps, batch size, lr, schedule, ...)

Tasks are registered by name in ``vgen.train.registry.TASKS`` and run with ``vgen train <name> --config FILE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class TrainTask:
    """One kind of training run. Subclasses set ``config_class`` (a dataclass) and implement the methods below."""

    #: dataclass holding the task's own settings; filled from the ``task:`` section of the run config.
    config_class: type = object
    #: task settings a resumed run may change (they shape sample grids or the export, not the training); every other
    #: setting must be the one the run started with.
    resumable_changes: tuple[str, ...] = ()

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        """A fresh model (on CPU, fp32). The loop moves it, wraps it in DDP and loads checkpoints into it."""
        raise NotImplementedError

    def build_dataset(self) -> torch.utils.data.Dataset:
        """Training items; batched with ``torch.utils.data.default_collate`` (so tensors, numbers, strings)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and metrics for the JSONL log (``model`` may be DDP-wrapped: call it, and use
        ``unwrap(model)`` from ``vgen.train.loop`` for attributes)."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, float]:
        """Hook after each optimiser step (e.g. dead-code restart); returns extra metrics to log."""
        return {}

    def sample_grid(self, model: nn.Module, step: int):
        """A ``PIL.Image`` grid showing progress (reconstructions, samples), or None. Called on rank 0 only."""
        return None

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained model in its load format (diffusers ``save_pretrained`` folders)."""
        model.save_pretrained(out_dir)
