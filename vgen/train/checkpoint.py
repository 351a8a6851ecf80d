"""Training checkpoints: atomic writes, ``latest.pt``, keep-the-last-N, and RNG state capture.

Layout under a run's ``out_dir``::

    checkpoints/step_0000100.pt   # one file per saved step
    checkpoints/latest.pt         # the newest one (a hard link when the file system allows, else a copy)

Every file is written to ``<name>.tmp`` first and moved into place with ``os.replace``, so a crash mid-write never
leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgen.errors import UserError

LATEST = "latest.pt"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def step_filename(step: int) -> str:
    return f"step_{step:07d}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that readers see either the old file or the complete new one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _point_latest_at(path: Path) -> None:
    latest = path.with_name(LATEST)
    tmp = latest.with_name(LATEST + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)


def step_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of the per-step checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """Write ``state`` as ``step_XXXXXXX.pt``, point ``latest.pt`` at it, and delete all but the newest ``keep``
    step files (``keep <= 0`` keeps every one)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / step_filename(step)
    atomic_torch_save(state, path)
    _point_latest_at(path)
    if keep > 0:
        for _, old in step_checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (on CPU)."""
    try:
        # Checkpoints hold RNG states and plain config dicts next to tensors, so not weights_only.
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise UserError(f"cannot read checkpoint {path}: {err}; delete it to restart from an older one") from err


def capture_rng_state() -> dict:
    """The state of every random number generator a training step may draw from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
