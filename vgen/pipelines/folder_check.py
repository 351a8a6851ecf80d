"""Checking a saved pipeline folder before diffusers loads it, so that every way it can be broken is one line.

diffusers stops with tracebacks on a missing or corrupt file, and loads a component whose ``config.json`` and weights
disagree (a depth-14 config over a 12-block checkpoint) with random weights for what is missing and a warning that
vgen's quiet loading hides. :func:`check_pipeline_folder` reads ``model_index.json`` and each component's
``config.json`` and safetensors header, builds the component from its config on the meta device (no memory, no
init) and compares the state dict it expects with the one saved: missing, unexpected or reshaped weights are an
error that names them.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from vgen.errors import UserError
from vgen.checkpoints import state_dict_mismatch

INDEX_FILE = "model_index.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a :class:`UserError` when it is missing, not JSON or not an object."""
    if not path.is_file():
        raise UserError(f"{what} {path} is missing; copy the whole pipeline folder again")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} is not valid JSON ({getattr(err, 'msg', 'not UTF-8 text')}); restore it "
                        "from the original pipeline folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} holds a JSON {type(data).__name__}, not an object; restore it from the "
                        "original pipeline folder")
    return data


def listed_components(index: dict) -> dict[str, tuple[str, str] | None]:
    """``{name: (library, class name)}`` of ``model_index.json``; None for an optional component saved as absent."""
    components: dict[str, tuple[str, str] | None] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue
        if spec == [None, None]:
            components[name] = None
        elif all(isinstance(part, str) for part in spec):
            components[name] = (spec[0], spec[1])
    return components


def saved_shapes(path: Path) -> dict[str, torch.Tensor]:
    """Names and shapes (as meta tensors) of the tensors in a safetensors file, read from its header only; a
    component saved in shards (``<name>.index.json`` beside ``path``) reads every shard it lists."""
    from safetensors import SafetensorError, safe_open

    index = path.with_name(path.name + ".index.json")
    if not path.is_file() and index.is_file():
        weight_map = read_json_object(index, "the weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"the weights index {index} has no weight_map of file names; copy the whole pipeline "
                            "folder again")
        shapes: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shapes.update(saved_shapes(path.with_name(shard)))
        return shapes
    if not path.is_file():
        raise UserError(f"{path} is missing: the folder has no weights for {path.parent.name}; copy the whole "
                        "pipeline folder again")
    try:
        with safe_open(str(path), "pt") as fh:
            return {key: torch.empty(fh.get_slice(key).get_shape(), device="meta")
                    for key in fh.keys()}  # noqa: SIM118 - a safetensors handle is not a dict
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: copy "
                        "the pipeline folder again") from None


def expected_shapes(library: str, class_name: str, config: dict, where: Path) -> dict[str, torch.Tensor]:
    """The state dict (as meta tensors) of ``library.class_name`` built from ``config``."""
    try:
        component_class = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise UserError(f"{where.parent / INDEX_FILE} names the component class {library}.{class_name}, which "
                        "this vgen does not have; give a folder saved by vgen") from None
    try:
        with torch.device("meta"):
            model = component_class.from_config(config)
    except Exception as err:  # noqa: BLE001 - a constructor rejects a bad config with any exception type
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{where / CONFIG_FILE} does not describe a valid {class_name} ({first_line[:200]})") from None
    return dict(model.state_dict())


def check_component(model_dir: Path, name: str, library: str, class_name: str) -> None:
    """One component folder: config, weights file, and weights that fit the config exactly."""
    folder = model_dir / name
    if not folder.is_dir():
        raise UserError(f"{model_dir} lists the component {name!r} in {INDEX_FILE} but has no {name}/ folder; copy "
                        "the whole pipeline folder again")
    config = read_json_object(folder / CONFIG_FILE, f"the {name} config")
    saved = saved_shapes(folder / WEIGHTS_FILE)
    mismatch = state_dict_mismatch(expected_shapes(library, class_name, config, folder), saved, limit=5)
    if mismatch:
        raise UserError(f"the weights in {folder / WEIGHTS_FILE} do not fit its {CONFIG_FILE} ({mismatch}); the "
                        "config and the weights come from different models")


def check_pipeline_folder(model_dir: Path, required: Sequence[str] = ()) -> dict:
    """Check ``model_dir`` (see the module docstring) and return its ``model_index.json``; ``required`` components
    must be listed and present."""
    if not model_dir.is_dir():
        raise UserError(f"model folder not found: {model_dir} (pass a pipeline folder saved by vgen)")
    if not (model_dir / INDEX_FILE).is_file():
        raise UserError(f"{model_dir} is not a saved pipeline (no {INDEX_FILE}); give a folder saved by vgen")
    index = read_json_object(model_dir / INDEX_FILE, "the pipeline index")
    components = listed_components(index)
    absent = [name for name in required if components.get(name) is None]
    if absent:
        raise UserError(f"{model_dir / INDEX_FILE} lists no {', '.join(absent)} component; give a complete "
                        "pipeline folder")
    for name, spec in components.items():
        if spec is not None:
            check_component(model_dir, name, *spec)
    return index
