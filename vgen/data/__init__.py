"""Data worlds: procedural ``shapes`` images and ``moving_shapes`` videos with exact annotations, and ``folder``
(your own images with optional captions). ``get_world(name, **kwargs)`` builds one by name.

Names are imported lazily (on first use), so light modules such as ``vgen.data.shape_render`` load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from vgen.errors import UserError

# exported name -> module that defines it
_EXPORTS = {
    "ImageFolderDataset": "vgen.data.folder",
    "MovingShapesDataset": "vgen.data.moving_shapes",
    "MovingShapesSample": "vgen.data.moving_shapes",
    "MovingShapesWorld": "vgen.data.moving_shapes",
    **{
        name: "vgen.data.shapes"
        for name in (
            "COLOR_NAMES",
            "COLOR_RGB",
            "NUM_CLASSES",
            "PROMPT_VOCABULARY",
            "RELATIONS",
            "SHAPE_NAMES",
            "TAGS",
            "ShapeObject",
            "ShapesDataset",
            "ShapesSample",
            "ShapesWorld",
            "caption_to_spec",
            "class_label_spec",
            "class_label_to_text",
            "geneval_relations",
            "render_spec",
            "shapes_geneval_prompts",
        )
    },
}

# world name -> (module, class)
WORLDS: dict[str, tuple[str, str]] = {
    "shapes": ("vgen.data.shapes", "ShapesWorld"),
    "moving_shapes": ("vgen.data.moving_shapes", "MovingShapesWorld"),
    "folder": ("vgen.data.folder", "ImageFolderDataset"),
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vgen.data' has no attribute {name!r}")


def get_world(name: str, **kwargs: Any):
    """``get_world("shapes", resolution=64, seed=0)``; ``"folder"`` needs ``path=``."""
    if name not in WORLDS:
        raise UserError(f"unknown data world {name!r}; choose one of: {', '.join(WORLDS)}")
    if name == "folder" and "path" not in kwargs:
        raise UserError("the folder world needs a path to a directory of images")
    module, cls = WORLDS[name]
    try:
        return getattr(importlib.import_module(module), cls)(**kwargs)
    except TypeError as err:
        raise UserError(f"bad settings for data world {name!r}: {err}") from err


__all__ = ["WORLDS", "get_world"] + list(_EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
