"""Checks of command-line input that run before any work, so bad input costs one line and nothing on disk.

* argparse types: :func:`positive_int`, :func:`nonnegative_int`, :func:`finite_float` and :func:`seed` make a bad
  number an argparse error (one line, exit 2);
* :func:`check_seed_range`: image i of a run uses seed ``--seed + i``, which must stay below 2**64;
* output paths: :func:`check_output_file` and :func:`check_image_output` (a known extension, not a folder, a place
  that can be written) and :func:`check_output_folder`; they are checked before anything is generated;
* :func:`check_own_file`: a side file vgen writes next to an output (settings JSON) may replace only a file vgen
  wrote, never one the user had.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from vgen import values
from vgen.errors import UserError
from vgen.values import MAX_SEED

#: Image files the commands write, and what Pillow saves them as.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def argparse_type(parse):
    """An argparse ``type=`` from a :mod:`vgen.values` parser: its ``ValueError`` becomes an argparse error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


positive_int = argparse_type(values.positive_int)
nonnegative_int = argparse_type(values.nonnegative_int)
seed = argparse_type(values.seed)
finite_float = argparse_type(values.finite_float)
probability = argparse_type(values.probability)


def check_seed_range(first_seed: int, count: int, flag: str = "--seed") -> None:
    """Images use seeds ``first_seed`` .. ``first_seed + count - 1``; each must be a 64-bit seed."""
    if not 0 <= first_seed or first_seed + count - 1 > MAX_SEED:
        raise UserError(f"{flag} {first_seed} with {count} images needs seeds up to {first_seed + count - 1}, beyond "
                        f"the largest seed {MAX_SEED}; give a smaller {flag}")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_location(folder: Path, flag: str, given: Path | None = None) -> None:
    """``folder`` (or the nearest existing folder above it, where it would be created) must take new files;
    ``given`` is the path the user gave (default ``folder``), for the message."""
    given = folder if given is None else given
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{flag} {given}: {existing} is a file, not a folder; give another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{flag} {given}: cannot write in {existing} ({err.strerror}); give a path you can write"
                        ) from None


def check_output_file(path: str | Path, flag: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """A file to write: not a folder, ending in one of ``suffixes`` (any name when None), in a writable place.
    Returns it as a Path."""
    path = Path(path)
    example = f"out{suffixes[0]}" if suffixes else "out.txt"
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name such as {path / example}")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: the file name must end in one of {', '.join(suffixes)}")
    check_writable_location(path.parent, flag, path)
    return path


def check_image_output(path: str | Path, flag: str = "--out") -> Path:
    """An image file to write (:func:`check_output_file` with :data:`IMAGE_SUFFIXES`)."""
    return check_output_file(path, flag, IMAGE_SUFFIXES)


def check_output_folder(path: str | Path, flag: str = "--out-dir") -> Path:
    """A folder to write into (it may exist): not a file, in a writable place. Returns it as a Path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder (new or empty) to write into")
    check_writable_location(path, flag)
    return path


def written_by(path: Path) -> str | None:
    """The ``written_by`` mark of a JSON file vgen wrote (None for any other file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("written_by") if isinstance(data, dict) else None


def check_own_file(path: Path, writer: str, flag: str) -> None:
    """``path`` may be (re)written only if it does not exist or ``writer`` wrote it."""
    if path.exists() and written_by(path) != writer:
        raise UserError(f"{path} exists and was not written by {writer}, which would replace it with its settings; "
                        f"move that file, or give another {flag}")
