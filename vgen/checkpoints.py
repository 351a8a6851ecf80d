"""Reading weight files a user hands to vgen, and comparing state dicts: the one place for both.

Every loader of an official or saved checkpoint (tokenizers, generators, training resume) reads through
:func:`read_state_dict` and checks keys through :func:`state_dict_mismatch` / :func:`check_state_dict`, so a wrong
file ends the same way everywhere: one :class:`~vgen.errors.UserError` line that names the file, what is wrong and
what to do. Pickled files are read with ``torch.load(weights_only=True)``: an untrusted file never runs code.
``.safetensors`` files are read with safetensors.

This module sits in the lowest layer (it imports torch, safetensors and :mod:`vgen.errors` only), so
``vgen.tokenizers`` and ``vgen.models`` may both use it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vgen.errors import UserError

#: wrapper keys under which training scripts of the official repositories store the weights, tried in order
DEFAULT_WRAPPER_KEYS = ("model", "state_dict", "module")


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


def load_safetensors_file(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file on CPU, or one :class:`UserError` line (missing, empty, corrupt)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is an empty file (0 bytes); save it again")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} {path} is truncated or not a safetensors file ({detail[:200]})") from None


def unwrap_state_dict(obj: Any, wrapper_keys: Sequence[str] = DEFAULT_WRAPPER_KEYS,
                      what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside ``obj``: ``obj`` itself or ``obj[key]`` for the first wrapper key present (nested
    paths like ``"trainer.var_wo_ddp"`` are allowed). Raises :class:`UserError` unless the result maps strings to
    tensors."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{what} is not a state dict (it holds a {type(obj).__name__}); pass a weights file")
    for key in wrapper_keys:
        inner: Any = obj
        for part in key.split("."):
            inner = inner.get(part) if isinstance(inner, Mapping) else None
        if isinstance(inner, Mapping):
            obj = inner
            break
    if not obj:
        raise UserError(f"{what} holds no tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{what} is not a state dict of tensors (entry {str(bad[0])[:60]!r} is not a tensor)")
    return dict(obj)


def read_state_dict(path_or_sd: str | Path | Mapping[str, Any], what: str = "checkpoint",
                    wrapper_keys: Sequence[str] = DEFAULT_WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` / ``.pt`` / ``.ckpt`` file (safe unpickling), a ``.safetensors`` file, or an
    in-memory mapping, unwrapped from the first of ``wrapper_keys`` that is present."""
    if isinstance(path_or_sd, Mapping):
        return unwrap_state_dict(path_or_sd, wrapper_keys, what)
    path = Path(path_or_sd)
    if path.suffix == ".safetensors":
        return load_safetensors_file(path, what)
    return unwrap_state_dict(load_torch_file(path, what, expect=Mapping), wrapper_keys, f"{what} {path}")


def _listed(keys: list[str], limit: int) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor],
                        limit: int = 20) -> str:
    """How ``saved`` differs from ``expected`` in keys and shapes (at most ``limit`` keys named per kind); "" when
    every expected key is saved with its shape and nothing else is."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing key(s): {_listed(missing, limit)}")
    if unexpected:
        parts.append(f"unexpected key(s): {_listed(unexpected, limit)}")
    if reshaped:
        shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(expected[k].shape)}" for k in reshaped]
        parts.append(f"other shape(s), saved vs expected: {_listed(shapes, limit)}")
    return "; ".join(parts)


def check_state_dict(expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], what: str,
                     hint: str = "", limit: int = 10) -> None:
    """Raise one :class:`UserError` line naming every kind of key/shape difference, unless the two match."""
    mismatch = state_dict_mismatch(expected, saved, limit=limit)
    if mismatch:
        raise UserError(f"{what} does not match the model: {mismatch}" + (f". {hint}" if hint else ""))
