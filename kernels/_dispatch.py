"""Backend choice for every kernel in :mod:`vgen.kernels`, and lazy Triton compilation.

Each kernel module holds a plain-PyTorch reference and a Triton kernel. ``backend`` picks one:

* ``"auto"``: Triton for CUDA tensors (when triton is importable), the reference otherwise (CPU);
* ``"triton"``: always Triton. On CPU this needs ``TRITON_INTERPRET=1`` (the interpreter runs the kernel with
  numpy; it has no bf16);
* ``"reference"``: always the PyTorch reference.

Triton decides between a compiled and an interpreted kernel when ``triton.jit`` is applied, so the kernel
functions are written undecorated and :func:`jit` wraps them on first use, once per interpreter setting. Setting
``TRITON_INTERPRET=1`` after importing ``vgen.kernels`` is enough for our kernels, but triton wraps its own standard
library (``tl.sum``, ...) when it is imported, so the variable must be set before triton's first import (the test
suite sets it in ``tests/conftest.py``). Importing ``vgen.kernels`` never needs triton.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "reference")

_JIT_CACHE: dict[tuple[Callable, bool], object] = {}


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it ships with CUDA builds of torch)."""
    try:
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the CPU interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_imported_for_interpreter() -> bool:
    """True when triton's standard library (``tl.sum``, ``tl.zeros``, ...) was wrapped for the interpreter.

    Triton wraps those at *its* import, so ``TRITON_INTERPRET=1`` must be set before triton is first imported;
    our own kernels are wrapped lazily by :func:`jit` and only need it before their first launch.
    """
    import triton.language as tl

    return type(tl.zeros).__name__ != "JITFunction"


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"reference"`` for a kernel whose inputs live where ``tensor`` lives.

    Raises ``ValueError`` for an unknown backend and ``RuntimeError`` when Triton was asked for but cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install 'vgen[kernels]')")
    if not tensor.is_cuda:
        if not interpreter_enabled():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter); "
                "use backend='reference' or 'auto' for the PyTorch path"
            )
        if not triton_imported_for_interpreter():
            raise RuntimeError(
                "triton was imported before TRITON_INTERPRET=1 was set; set it before anything imports triton "
                "(e.g. in the environment of the process) to run Triton kernels on CPU"
            )
        if tensor.dtype == torch.bfloat16:
            raise RuntimeError("the Triton interpreter has no bfloat16; test in float16 or float32 on CPU")
    return "triton"


def jit(fn: Callable):
    """``triton.jit(fn)``, compiled once per interpreter setting (see the module docstring)."""
    key = (fn, interpreter_enabled())
    if key not in _JIT_CACHE:
        import triton

        _JIT_CACHE[key] = triton.jit(fn)
    return _JIT_CACHE[key]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: full fp32 for fp32 inputs (TF32 would cost ~3e-4 relative error on GPU)."""
    return "ieee" if dtype == torch.float32 else "tf32"
