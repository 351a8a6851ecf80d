"""Copy a trained pipeline into the package (``vgen/assets/``): fp16 weights, a model card, names that do not point
at the training run's folders, and the size budgets checked before anything is replaced."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vgen.errors import UserError
from vgen.pipelines import ASSETS_BUDGET_BYTES, ASSETS_DIR, DEFAULT_MODEL_BUDGET_BYTES
from vgen.pipelines.model_card import ModelCardInfo


#: the licence fields of a card for weights vgen trained itself (``ModelCardInfo(**OWN_WEIGHTS, ...)``)
OWN_WEIGHTS = dict(
    license="apache-2.0",
    license_note="the weights were trained by vgen's authors on data vgen generates, and are released under vgen's "
    "licence",
    source="vgen's own training runs (configs/shapes/README.md)",
)


def weights_bytes(folder: Path) -> int:
    """Bytes of the safetensors files under ``folder`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def ship_pipeline(pipe, out: str | Path, name: str, card: ModelCardInfo,
                  budget_bytes: int = DEFAULT_MODEL_BUDGET_BYTES) -> int:
    """Save ``pipe`` to ``out`` in fp16 with ``card`` as its README and ``name`` as its ``_name_or_path`` (and
    ``name/<component>`` for each component). The folder is written next to ``out`` first and replaces it only when
    its weights fit ``budget_bytes`` and, for a folder under vgen/assets, everything there stays within
    :data:`ASSETS_BUDGET_BYTES`; else :class:`UserError` and ``out`` is left as it was. Returns the weights' bytes."""
    out = Path(out)
    pipe.register_to_config(_name_or_path=name)
    for component, module in pipe.components.items():
        if hasattr(module, "register_to_config"):
            module.register_to_config(_name_or_path=f"{name}/{component}")
    pipe.model_card = card
    # written under a folder of its own name (so the card names it right) inside a scratch folder next to ``out``
    scratch = out.with_name(out.name + ".tmp")
    staging = scratch / out.name
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        pipe.save_pretrained(str(staging), dtype=torch.float16)
        size = weights_bytes(staging)
        if size > budget_bytes:
            raise UserError(f"the weights take {size / 1e6:.1f} MB, over the {budget_bytes / 1e6:.0f} MB budget of "
                            "a shipped model; ship a smaller model")
        if out.resolve().parent == ASSETS_DIR.resolve():
            replaced = (out.resolve(), scratch.resolve())
            others = sum(p.stat().st_size for p in ASSETS_DIR.resolve().rglob("*")
                         if p.is_file() and not any(folder in p.parents for folder in replaced))
            if others + size > ASSETS_BUDGET_BYTES:
                raise UserError(f"vgen/assets would hold {(others + size) / 1e6:.1f} MB, over its "
                                f"{ASSETS_BUDGET_BYTES / 1e6:.1f} MB budget; ship a smaller model")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return size
