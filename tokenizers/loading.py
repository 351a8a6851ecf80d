"""Load any saved vgen tokenizer folder (``save_pretrained`` output) by the class recorded in its ``config.json``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from vgen.errors import UserError

#: class name in config.json -> "module:Class"
TOKENIZER_CLASSES = {
    "MultiScaleVQModel": "vgen.tokenizers.msvq:MultiScaleVQModel",
    "FrequencyVQModel": "vgen.tokenizers.frvae:FrequencyVQModel",
    "SingleScaleVQModel": "vgen.tokenizers.single_scale_vq:SingleScaleVQModel",
    "AutoencoderKL": "vgen.tokenizers.kl_autoencoder:AutoencoderKL",
}


def tokenizer_class_of(folder: str | Path) -> type:
    """The tokenizer class that saved ``folder`` (read from ``config.json``'s ``_class_name``)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} is not a saved tokenizer folder (no config.json); pass a run's final/ folder")
    try:
        name = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"{config_path} is not a valid config file ({err})") from None
    if name not in TOKENIZER_CLASSES:
        raise UserError(
            f"{folder} holds a {name!r}, not a vgen tokenizer; known: {', '.join(sorted(TOKENIZER_CLASSES))}"
        )
    module, _, cls = TOKENIZER_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in ``folder``, in eval mode on CPU, whatever its class."""
    return tokenizer_class_of(folder).from_pretrained(str(folder), low_cpu_mem_usage=False).eval()
