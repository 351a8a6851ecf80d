"""Parsing and checking the numbers a user gives (command-line flags, call arguments, config values).

Each function takes a string or a number and returns the checked value, or raises ``ValueError`` whose message
starts with what the value must be ("must be ...") or what was expected; callers add the name of the setting
(:class:`vgen.pipelines.registry.SamplingOption`) or turn it into an argparse error (:mod:`vgen.cli.checks`).
"""

from __future__ import annotations

import math

#: Seeds are 64-bit unsigned integers (``torch.Generator.manual_seed``).
MAX_SEED = 2**64 - 1


def bounded_int(text, low: int, high: int | None = None) -> int:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None); floats with a fraction are refused."""
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError(f"expected an integer, got {str(text)[:40]!r}")
    try:
        value = int(text)
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"expected an integer, got {str(text)[:40]!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"must be an integer {bounds}, got {str(text)[:40]}")
    return value


def positive_int(text) -> int:
    """An integer >= 1."""
    return bounded_int(text, 1)


def nonnegative_int(text) -> int:
    """An integer >= 0."""
    return bounded_int(text, 0)


def seed(text) -> int:
    """A seed from 0 to 2**64 - 1."""
    return bounded_int(text, 0, MAX_SEED)


def finite_float(text) -> float:
    """A finite number (no nan, no inf)."""
    try:
        value = float(text)
    except (ValueError, TypeError):
        raise ValueError(f"expected a number, got {str(text)[:40]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {str(text)[:40]}")
    return value


def positive_float(text) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {str(text)[:40]}")
    return value


def probability(text) -> float:
    """A number in [0, 1]."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise ValueError(f"must be in [0, 1], got {str(text)[:40]}")
    return value
