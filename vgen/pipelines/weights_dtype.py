"""In which dtype a pipeline's weights are written: what ``VGenPipeline.save_pretrained`` decides per component.

* ``save_pretrained(dir, dtype=torch.float16)`` writes every floating weight in that dtype (a copy is cast while it
  is written; the pipeline in memory keeps its dtype);
* ``variant="fp16"`` / ``"bf16"`` / ``"fp32"`` names the files as diffusers does
  (``diffusion_pytorch_model.fp16.safetensors``, loaded with ``from_pretrained(dir, variant="fp16")``) and, without
  ``dtype``, writes the weights in that dtype;
* otherwise each component is written in the dtype it is in, except one that was loaded from narrower weights and
  is unchanged since: diffusers upcasts such weights to float32 on load, and writing them back in their stored dtype
  loses nothing (checked value by value), so a 23 MB fp16 folder loaded and saved again stays 23 MB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from vgen.errors import UserError

#: diffusers' usual variant names and the dtype their files hold
VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def dtype_for_save(dtype: torch.dtype | str | None, variant: str | None) -> torch.dtype | None:
    """The dtype every weight is written in (None = decided per component)."""
    if isinstance(dtype, str):
        named = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float32": torch.float32, "fp32": torch.float32}
        if dtype not in named:
            raise UserError(f"dtype {dtype!r} is not a floating dtype; use torch.float16, torch.bfloat16 or "
                            "torch.float32")
        dtype = named[dtype]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserError(f"dtype must be a floating torch dtype (torch.float16, torch.bfloat16, torch.float32), got "
                        f"{dtype!r}")
    if dtype is None and variant is not None:
        return VARIANT_DTYPES.get(variant)
    return dtype


def floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s floating weights when they share one (None otherwise)."""
    dtypes = {t.dtype for t in module.state_dict().values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def stored_dtype(component_folder: Path) -> torch.dtype | None:
    """The one floating dtype of the weights stored in a component folder (None: none, mixed or unreadable)."""
    from safetensors import SafetensorError, safe_open

    dtypes = set()
    for path in component_folder.glob("*.safetensors"):
        try:
            with safe_open(str(path), "pt") as fh:
                dtypes |= {fh.get_slice(key).get_dtype() for key in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError):
            return None
    floating = {_SAFETENSORS_DTYPES[d] for d in dtypes if d in _SAFETENSORS_DTYPES}
    return floating.pop() if len(floating) == 1 else None


def round_trips(module: torch.nn.Module, dtype: torch.dtype) -> bool:
    """True when every floating weight of ``module`` is exactly representable in ``dtype``."""
    for tensor in module.state_dict().values():
        if tensor.is_floating_point() and not torch.equal(tensor.to(dtype).to(tensor.dtype), tensor):
            return False
    return True


def kept_storage_dtype(module: torch.nn.Module, source_folder: Path | None) -> torch.dtype | None:
    """The narrower dtype ``module`` was loaded from when writing it in that dtype loses nothing, else None."""
    if source_folder is None or not source_folder.is_dir():
        return None
    stored, current = stored_dtype(source_folder), floating_dtype(module)
    if stored is None or current is None or torch.finfo(stored).bits >= torch.finfo(current).bits:
        return None
    return stored if round_trips(module, stored) else None


@contextlib.contextmanager
def written_as(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """While active, ``module.state_dict()`` (what ``save_pretrained`` writes) returns its floating tensors cast to
    ``dtype``; the module's own weights are never touched."""
    original = module.state_dict

    def cast_state_dict(*args, **kwargs):
        return {key: value.to(dtype) if value.is_floating_point() else value
                for key, value in original(*args, **kwargs).items()}

    module.state_dict = cast_state_dict
    try:
        yield
    finally:
        del module.state_dict  # the class's method again
