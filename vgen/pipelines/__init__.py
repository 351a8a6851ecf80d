"""End-to-end pipelines (``diffusers.DiffusionPipeline`` subclasses), e.g. :class:`vgen.pipelines.var.VARPipeline`,
and the packaged default model."""

from __future__ import annotations

from pathlib import Path

from vgen.errors import UserError

#: Where the packaged default pipeline folder (``model_index.json`` + component folders) lives once one ships.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "default_model"


def default_model_dir() -> Path:
    """The packaged default pipeline folder; a :class:`UserError` while none is shipped. The one place that decides
    what ``--model`` means when it is omitted."""
    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        return DEFAULT_MODEL_DIR
    raise UserError(
        "no --model given and no default model is shipped with this vgen installation; "
        "pass --model DIR (a pipeline folder saved by 'vgen train' or 'vgen convert')"
    )
