"""A training run's folder: one run at a time, leftovers of a killed run removed, its log read back tolerantly.

* :class:`RunLock` is an exclusive ``flock`` on ``<out_dir>/.vgen-train.lock`` held while a run trains, so a second
  run (or a second ``--resume``) in the same folder stops with one line instead of interleaving its log with the
  first and tripping over its temporary files. The operating system drops the lock when a run dies, even by
  ``kill -9``, so a stale lock never blocks a resume.
* :func:`read_log` reads ``log.jsonl``; a line a killed run left half-written is dropped with a warning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from vgen.atomic_files import write_text_atomic
from vgen.errors import UserError

LOCK_FILE = ".vgen-train.lock"

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class RunLock:
    """Exclusive lock on a run folder; :meth:`acquire` raises :class:`UserError` while another process holds it."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise UserError(f"the run folder {folder} is a file; give --out a folder (new or of an earlier run)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write to the run folder {folder} ({err.strerror}); give another --out") from None
        if not _try_lock(fd):
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"another training run is using {self.path.parent} (process {holder}); wait for it to finish, "
                "or give this run another --out"
            )
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None


def read_log(log_path: Path, warn: Callable[[str], None]) -> list[dict]:
    """The records of ``log.jsonl``; lines that are not JSON objects with a step (a half-written last line after a
    kill) are dropped with a warning."""
    if not log_path.is_file():
        return []
    records = []
    for line_no, line in enumerate(log_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            warn(f"warning: dropping line {line_no} of {log_path}, which is not a complete log record")
            continue
        records.append(record)
    return records


def rewind_log(log_path: Path, step: int, warn: Callable[[str], None]) -> list[dict]:
    """Keep the records up to ``step`` (those written after the checkpoint a resumed run restarts from are dropped),
    rewriting the file atomically; returns the kept records."""
    kept = [record for record in read_log(log_path, warn) if record["step"] <= step]
    if log_path.is_file():
        write_text_atomic(log_path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept
