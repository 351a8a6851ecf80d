"""Checking that a command's big allocation fits in memory before it is made, so too large a ``--n`` is one line
instead of a MemoryError traceback (or the kernel's out-of-memory killer) minutes later."""

from __future__ import annotations

import os

from vgen.errors import UserError


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def check_fits_in_memory(nbytes: int, what: str, advice: str) -> None:
    """A :class:`UserError` when ``what`` (needing about ``nbytes``) is larger than the memory available."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise UserError(f"{what} needs about {_gigabytes(nbytes)} of memory, more than the {_gigabytes(available)} "
                        f"available; {advice}")
