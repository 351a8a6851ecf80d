"""Training checkpoints: atomic writes, ``latest.pt``, keep-the-last-N, RNG state capture, and finding the checkpoint
a resumed run continues from.

Layout under a run's ``out_dir``::

    checkpoints/step_0000100.pt   # one file per saved step
    checkpoints/latest.pt         # the newest one (a hard link when the file system allows, else a copy)

Every file is written to a temporary name first and moved into place with ``os.replace``
(:mod:`vgen.atomic_files`), so a crash mid-write never leaves a truncated checkpoint behind, only a temporary file
that the next start removes. A checkpoint holds
tensors, numbers, strings and plain containers only, and is read with ``torch.load(weights_only=True)``: a planted
file cannot run code when a run resumes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgen.atomic_files import temporary_path
from vgen.errors import UserError
from vgen.checkpoints import load_torch_file

LATEST = "latest.pt"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def step_filename(step: int) -> str:
    return f"step_{step:07d}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that readers see either the old file or the complete new one."""
    tmp = temporary_path(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _point_latest_at(path: Path) -> None:
    latest = path.with_name(LATEST)
    tmp = temporary_path(latest)
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


#: Keys every training checkpoint has (see ``vgen.train.loop``).
REQUIRED_KEYS = ("model", "optimizer", "step", "rng")


def _numpy_array_globals() -> list:
    """What the safe unpickler needs to read the NumPy RNG state as older vgen versions stored it (an ndarray)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (on CPU, ``weights_only=True``); a :class:`UserError`
    says what is wrong with a file that is not one."""
    state = load_torch_file(path, "training checkpoint", allowed_globals=_numpy_array_globals())
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise UserError(f"{path} is not a vgen training checkpoint (no {', '.join(missing)})")
    return state


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """Every checkpoint of a run folder, the newest first: step files by step, then ``latest.pt`` (a link to the
    newest step file, so read only when no step file is left)."""
    files = [path for _, path in reversed(step_checkpoints(ckpt_dir))]
    latest = ckpt_dir / LATEST
    if latest.is_file() and not any(os.path.samefile(latest, path) for path in files):
        files.append(latest)
    return files


def newest_readable_checkpoint(ckpt_dir: Path, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """``(path, state)`` of the newest checkpoint in ``ckpt_dir`` that reads; the newer ones that do not are named
    with ``warn``. None when there is no checkpoint at all. A :class:`UserError` when every one fails, so a resume
    never silently restarts a run that has checkpoints."""
    files = checkpoint_files(ckpt_dir)
    failures = []
    for path in files:
        try:
            state = load_checkpoint(path)
        except UserError as err:
            failures.append((path, str(err)))
            continue
        for skipped, reason in failures:
            warn(f"warning: skipping checkpoint {skipped.name}: {reason}")
        return path, state
    if files:
        raise UserError(
            f"none of the {len(files)} checkpoints in {ckpt_dir} can be read ({failures[0][1]}); nothing was "
            "changed: restore a checkpoint from a backup, or start a new run with another --out"
        )
    return None


def capture_rng_state() -> dict:
    """The state of every random number generator a training step may draw from, as tensors and plain Python values
    (what ``torch.load(weights_only=True)`` reads back)."""
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved) -> tuple:
    """``np.random.set_state``'s tuple from :func:`capture_rng_state`'s dict (or an older checkpoint's tuple)."""
    if not isinstance(saved, dict):
        return tuple(saved)
    key = saved["key"].numpy().astype(np.uint32)
    return saved["bit_generator"], key, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]


def restore_rng_state(state: dict) -> None:
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state(saved) -> tuple:
    """``random.setstate``'s nested tuple (a checkpoint may hand it back with lists inside)."""
    version, internal, gauss_next = saved
    return int(version), tuple(int(v) for v in internal), gauss_next
