"""Training tasks by name, imported lazily, and run configs split into their ``task:`` and ``train:`` sections.

A run config is YAML with two sections::

    task:   # fields of the task's config_class
      ...
    train:  # fields of vgen.train.loop.TrainConfig
      steps: 2000
      lr: 3e-4

``--set task.x=... train.y=...`` overrides go through :mod:`vgen.config` like every other config in vgen.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from vgen.config import load_config
from vgen.errors import UserError

# TASKS is read by `vgen --help`, so this module imports torch (through the loop and TrainTask) only when a task
# is actually loaded.

#: task name -> "module:Class" of a TrainTask subclass (imported only when the task is used).
TASKS: dict[str, str] = {
    "tokenizer": "vgen.train.tokenizer_task:TokenizerTask",
    "autoencoder": "vgen.train.autoencoder_task:AutoencoderTask",
    "var": "vgen.train.var_task:VARTask",
    "raster-ar": "vgen.train.raster_ar_task:RasterARTask",
    "latent-upsampler": "vgen.train.latent_upsampler_task:LatentUpsamplerTask",
    "flowar": "vgen.train.flowar_task:FlowARTask",
    "xar": "vgen.train.xar_task:XARTask",
    "shapes-features": "vgen.train.shapes_features_task:ShapesFeaturesTask",
    "video": "vgen.train.video_task:VideoTask",
}


def check_task_name(name: str) -> None:
    """Raise :class:`UserError` naming the available tasks if ``name`` is not registered."""
    if name not in TASKS:
        raise UserError(f"unknown training task {name!r}; available tasks: {', '.join(sorted(TASKS))}")


def load_task(name: str) -> type:
    """The :class:`~vgen.train.task.TrainTask` subclass registered as ``name``."""
    from vgen.train.task import TrainTask

    check_task_name(name)
    module_name, _, class_name = TASKS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise UserError(
                f"training task {name!r} needs module {module_name}, which is not installed in this version of vgen"
            ) from err
        raise
    task_class = getattr(module, class_name, None)
    if not (isinstance(task_class, type) and issubclass(task_class, TrainTask)):
        raise UserError(f"training task {name!r}: {TASKS[name]} is not a TrainTask subclass")
    return task_class


def run_config_class(task_config_class: type) -> type:
    """A dataclass with fields ``task`` (the task's config class) and ``train`` (``TrainConfig``)."""
    from vgen.train.loop import TrainConfig

    return dataclasses.make_dataclass(
        "RunConfig",
        [
            ("task", task_config_class, dataclasses.field(default_factory=task_config_class)),
            ("train", TrainConfig, dataclasses.field(default_factory=TrainConfig)),
        ],
    )


def load_run_config(
    task_name: str, path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """Read the run config at ``path`` for task ``task_name``; return ``(task_cfg, train_cfg)``, the latter a
    :class:`vgen.train.loop.TrainConfig`.

    ``overrides`` are dotted ``key=value`` strings (or a dict) whose keys start with ``task.`` or ``train.``.
    """
    task_config_class = load_task(task_name).config_class
    if not dataclasses.is_dataclass(task_config_class):
        raise UserError(f"training task {task_name!r} has no config dataclass (set its config_class)")
    if isinstance(overrides, dict):
        keys = list(overrides)
    else:
        keys = [pair.split("=", 1)[0].strip() for pair in overrides or []]
    for key in keys:
        if key.split(".", 1)[0] not in ("task", "train") or "." not in key:
            raise UserError(f"--set key {key!r} must start with 'task.' or 'train.' (e.g. train.lr=3e-4)")
    try:
        run = load_config(run_config_class(task_config_class), path, overrides)
    except TypeError as err:  # a config field without a default that the file does not set
        raise UserError(f"config for task {task_name!r} is incomplete: {err}") from err
    return run.task, run.train
