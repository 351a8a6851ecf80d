"""End-to-end pipelines (``diffusers.DiffusionPipeline`` subclasses), e.g. :class:`vgen.pipelines.var.VARPipeline`,
and the packaged default model."""

from __future__ import annotations

from pathlib import Path

from vgen.errors import UserError

#: Where the packaged default pipeline folder (``model_index.json`` + component folders) lives once one ships.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "default_model"
#: Most bytes of weights the packaged default model may take (it ships inside every install).
DEFAULT_MODEL_BUDGET_BYTES = 25 * 10**6


def default_model_dir() -> Path:
    """The packaged default pipeline folder; a :class:`UserError` while none is shipped. The one place that decides
    what ``--model`` means when it is omitted."""
    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        return DEFAULT_MODEL_DIR
    raise UserError(
        "no --model given and no default model is shipped with this vgen installation; "
        "pass --model DIR (a pipeline folder saved by 'vgen train' or 'vgen convert')"
    )


def resolve_model_dir(model: str | Path | None) -> Path:
    """``--model`` as a path or, when it is omitted, the shipped default (see :func:`default_model_dir`)."""
    return Path(model) if model is not None else default_model_dir()


def load_pipeline(model: str | Path | None = None, device=None):
    """Load a saved VAR pipeline folder (``model_index.json``), or the shipped default when ``model`` is None, onto
    ``device`` (default: CUDA if available, else CPU). Returns ``(pipeline, model_dir)``. The one loader the CLI
    commands share: it turns a wrong folder into a :class:`UserError` and keeps diffusers' load chatter off stderr."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from vgen.pipelines.var import VARPipeline

    model_dir = resolve_model_dir(model)
    if not model_dir.is_dir():
        raise UserError(f"model folder not found: {model_dir} (pass a pipeline folder saved by vgen)")
    if not (model_dir / "model_index.json").is_file():
        raise UserError(f"{model_dir} is not a saved pipeline (no model_index.json); give a folder saved by vgen")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = VARPipeline.from_pretrained(str(model_dir))
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.enable_progress_bar()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device), model_dir
