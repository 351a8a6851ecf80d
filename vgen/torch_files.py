"""Reading ``torch.save`` files that may come from anywhere (released checkpoints, a run folder someone else wrote).

Every such file is read with ``torch.load(..., weights_only=True)``: the safe unpickler builds tensors, numbers,
strings and containers only, so a planted file cannot run code. What goes wrong becomes one :class:`UserError` that
says what the file is and what to do; torch's own advice to retry with ``weights_only=False`` is never passed on.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vgen.errors import UserError

_REFUSED_GLOBAL = (
    re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
)


def refused_object(message: str) -> str | None:
    """The Python object a safe ``torch.load`` refused to build, from torch's error message (None if none is named)."""
    for pattern in _REFUSED_GLOBAL:
        match = pattern.search(message)
        if match:
            return match.group(1)
    return None


def describe_load_failure(path: Path, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line without torch's advice."""
    message = str(err)
    refused = refused_object(message)
    if refused is not None:
        return (
            f"{path} holds a Python object ({refused}) besides tensors, numbers, strings and containers; vgen does "
            "not load such files, because unpickling them can run code"
        )
    if isinstance(err, PermissionError):
        return f"{path} cannot be opened (permission denied)"
    if isinstance(err, (EOFError, OSError)) or "central directory" in message or "PytorchStreamReader" in message:
        return f"{path} is truncated or corrupt (not a complete PyTorch file)"
    first_line = next((line.strip() for line in message.splitlines() if line.strip()), "")
    if "Weights only load failed" in first_line or "Unsupported operand" in message:
        first_line = "not written by torch.save"
    return f"{path} is not a readable PyTorch file ({type(err).__name__}: {first_line[:120] or 'no details'})"


def load_torch_file(
    path: str | Path, what: str, expect: type | tuple[type, ...] = dict, allowed_globals: Sequence[Any] = ()
) -> Any:
    """Read ``path`` safely on CPU; the object must be an instance of ``expect``.

    ``what`` names the file in errors (e.g. "VAR checkpoint"). ``allowed_globals`` are extra classes or functions the
    safe unpickler may build (e.g. NumPy's array reconstruction for files written by older vgen versions).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes): it was not written completely; use another copy")
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it may not read: the result tells
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if allowed_globals and hasattr(torch.serialization, "safe_globals"):
                with torch.serialization.safe_globals(list(allowed_globals)):
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load fails with many types (UnpicklingError, EOFError, ...)
        raise UserError(f"cannot read {what}: {describe_load_failure(path, err)}") from None
    if not isinstance(obj, expect):
        raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a dictionary (of names to tensors) as expected")
    return obj
