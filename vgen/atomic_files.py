"""Atomic file writes and the leftovers of interrupted ones.

A file is written to a temporary name beside it, ``.<name>.<pid>.tmp`` (plus a suffix a writer needs, e.g. ``.png``
for Pillow), and renamed into place with ``os.replace``: readers see the old file or the complete new one. A process
killed mid-write leaves only the temporary file, which :func:`remove_leftovers` deletes at the next start; the writer's
process id in the name keeps it from deleting the file of a process that is still writing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_TEMPORARY_NAME = re.compile(r"^\..+\.(\d+)\.tmp(\.[A-Za-z0-9]+)?$")


def temporary_path(path: Path, suffix: str = "") -> Path:
    """Where this process writes ``path`` before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


def write_text_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    tmp = temporary_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would end the process there; keep its files
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_leftovers(folder: Path, recursive: bool = False) -> list[Path]:
    """Delete the temporary files (see :func:`temporary_path`) that processes no longer running left in ``folder``
    (and below it if ``recursive``); returns those removed."""
    if not folder.is_dir():
        return []
    candidates = folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*")
    removed = []
    for path in sorted(candidates):
        match = _TEMPORARY_NAME.match(path.name)
        if match and path.is_file() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
