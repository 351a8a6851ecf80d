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
    commands share: it checks the folder first (:mod:`vgen.pipelines.folder_check`), turns what is wrong with it into a
    :class:`UserError` and keeps diffusers' load chatter off stderr."""
    from diffusers.utils import logging as diffusers_logging

    from vgen.devices import resolve_device
    from vgen.pipelines.folder_check import check_pipeline_folder
    from vgen.pipelines.var import VARPipeline

    model_dir = resolve_model_dir(model)
    device = resolve_device(device)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        check_pipeline_folder(model_dir, required=("vqvae", "transformer"))
        pipe = VARPipeline.from_pretrained(str(model_dir))
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as err:  # what the checks cannot foresee
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load the pipeline in {model_dir}: {first_line[:300]}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.enable_progress_bar()
    return pipe.to(device), model_dir
