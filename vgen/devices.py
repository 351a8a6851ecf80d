"""The torch device a command runs on: ``--device`` checked before any work, so a typo or a missing GPU is one line."""

from __future__ import annotations

import torch

from vgen.errors import UserError

#: Device types vgen runs on.
DEVICE_TYPES = ("cpu", "cuda", "mps")


def _available(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return True


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``spec`` ("cpu", "cuda", "cuda:1", "mps") as a device this machine has; None picks CUDA when present, else the
    CPU. Anything else is a :class:`UserError` that says what to pass instead."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise UserError(f"unknown device {str(spec)!r}; use one of {', '.join(DEVICE_TYPES)} (e.g. cuda:0)")
    if not _available(device.type):
        raise UserError(f"device {str(spec)!r} is not available on this machine (torch finds no {device.type.upper()}"
                        " device); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {str(spec)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device
