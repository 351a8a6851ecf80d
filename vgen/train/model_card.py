"""What a training export puts on its model card: how the run was trained, read from the run folder.

Every task's ``export`` calls :func:`training_card_info` with its task name and the run folder, and sets the result
as the pipeline's ``model_card`` before saving (see :meth:`vgen.train.var_task.VARTask.export`). The card then says
which task, data world, steps, batch size, learning rate, precision and EMA the run used, and the last logged
training loss; settings that are local paths (tokenizer folders, data folders) are named but not printed, so a
shipped card never carries the trainer's file system.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vgen.pipelines.model_card import ModelCardInfo

#: ``train:`` settings the card reports, in this order
TRAIN_KEYS = ("steps", "batch_size", "lr", "schedule", "warmup_steps", "weight_decay", "ema_decay", "precision",
              "seed")


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` (``{}`` when absent or unreadable)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def last_log_record(run_dir: Path) -> dict[str, Any]:
    """The last complete line of the run's ``log.jsonl`` (``{}`` when there is none)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return {}
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            return record
    return {}


def training_text(task_name: str, run_dir: Path) -> str:
    """One paragraph: ``vgen train <task>`` and the run's data and settings."""
    settings = run_settings(run_dir)
    task = settings.get("task") if isinstance(settings.get("task"), dict) else {}
    train = settings.get("train") if isinstance(settings.get("train"), dict) else {}
    parts = [f"Trained with `vgen train {task_name}`"]
    world = task.get("world")
    if world:
        data = f"the `{world}` data world"
        if task.get("resolution"):
            data += f" at {task['resolution']} px"
        parts.append(f" on {data}")
    parts.append(".")
    shown = [f"{key} {train[key]}" for key in TRAIN_KEYS if key in train]
    if shown:
        parts.append(" Run settings: " + ", ".join(shown) + ".")
    started = [key for key in ("tokenizer", "init_from") if task.get(key)]
    if started:
        parts.append(" It used " + " and ".join(
            {"tokenizer": "a tokenizer trained before (task.tokenizer)",
             "init_from": "the weights of an earlier run as its start (task.init_from)"}[key] for key in started) + ".")
    record = last_log_record(run_dir)
    if "loss" in record and "step" in record:
        metrics = ", ".join(f"{key} {record[key]:.4g}" for key in ("loss", "accuracy") if isinstance(
            record.get(key), (int, float)))
        parts.append(f" Last logged training metrics (step {record['step']}): {metrics}.")
    if not settings:
        parts.append(" (The run's config.yaml was not found beside the export.)")
    return "".join(parts)


def training_card_info(task_name: str, run_dir: Path, **fields: Any) -> ModelCardInfo:
    """A :class:`ModelCardInfo` for an export of ``vgen train <task_name>`` in ``run_dir`` (extra ``fields``, e.g.
    ``title`` or ``license``, are set as given)."""
    return ModelCardInfo(training=training_text(task_name, run_dir), **fields)
