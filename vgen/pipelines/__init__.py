"""End-to-end pipelines (``diffusers.DiffusionPipeline`` subclasses, one module per family, e.g.
:class:`vgen.pipelines.var.VARPipeline`), the registry that maps a saved folder to its class
(:mod:`vgen.pipelines.registry`), the shared loader, and the packaged default model."""

from __future__ import annotations

from pathlib import Path

from vgen.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
#: Where the packaged default pipeline folder (``model_index.json`` + component folders) lives once one ships.
DEFAULT_MODEL_DIR = ASSETS_DIR / "default_model"
#: Most bytes of weights a packaged model may take (it ships inside every install).
DEFAULT_MODEL_BUDGET_BYTES = 25 * 10**6
#: Most bytes of weights the packaged video model may take (the streaming demo's model, in every install).
VIDEO_MODEL_BUDGET_BYTES = 8 * 10**6
#: Most bytes of everything under vgen/assets together (a wheel must fit the usual 100 MB upload limit).
ASSETS_BUDGET_BYTES = 90 * 10**6
#: The models shipped inside the package, by the name ``--model`` takes for them (an existing folder of that name
#: wins): the default text-to-image VAR, the best raster AR of the Token-Shuffle comparison and the best xAR.
SHIPPED_MODELS = {"shapes-var": DEFAULT_MODEL_DIR, "shapes-raster": ASSETS_DIR / "raster_model",
                  "shapes-xar": ASSETS_DIR / "xar_model"}


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
    """``--model`` as a path, the name of a shipped model (:data:`SHIPPED_MODELS`, when no folder of that name
    exists) or, when it is omitted, the shipped default (see :func:`default_model_dir`)."""
    if model is None:
        return default_model_dir()
    path = Path(model)
    if not path.exists() and str(model) in SHIPPED_MODELS:
        shipped = SHIPPED_MODELS[str(model)]
        if not (shipped / "model_index.json").is_file():
            raise UserError(f"the shipped model {model} is not in this vgen installation ({shipped} is missing); "
                            "reinstall vgen or pass --model DIR")
        return shipped
    return path


def register_with_diffusers() -> None:
    """Import every registered pipeline class, which makes ``diffusers.DiffusionPipeline.from_pretrained(folder)``
    load any saved vgen pipeline (importing one family's module, e.g. ``vgen.pipelines.var``, registers that family
    alone)."""
    from vgen.pipelines.registry import PIPELINES, load_pipeline_class

    for name in PIPELINES:
        load_pipeline_class(name)


def pipeline_class_name(model_dir: Path) -> str:
    """``_class_name`` of a saved pipeline folder's ``model_index.json``, or a :class:`UserError` saying what is
    wrong with the folder."""
    from vgen.pipelines.folder_check import INDEX_FILE, read_json_object

    if not model_dir.is_dir():
        raise UserError(f"model folder not found: {model_dir} (pass a pipeline folder saved by vgen, or a shipped "
                        f"model: {', '.join(SHIPPED_MODELS)})")
    if not (model_dir / INDEX_FILE).is_file():
        raise UserError(f"{model_dir} is not a saved pipeline (no {INDEX_FILE}); give a folder saved by vgen")
    index = read_json_object(model_dir / INDEX_FILE, "the pipeline index")
    if not isinstance(index.get("_class_name"), str):
        raise UserError(f"{model_dir / INDEX_FILE} does not name a pipeline class (_class_name); save the pipeline "
                        "again")
    return index["_class_name"]


def required_components(pipeline_class: type) -> list[str]:
    """The components a pipeline class cannot do without (its ``__init__`` modules minus the optional ones)."""
    expected, optional = pipeline_class._get_signature_keys(pipeline_class)
    skip = set(optional) | set(getattr(pipeline_class, "_optional_components", []))
    return sorted(name for name in expected if name not in skip)


def load_pipeline(model: str | Path | None = None, device=None, dtype=None):
    """Load a saved pipeline folder of any registered family (``model_index.json``'s ``_class_name``, see
    :mod:`vgen.pipelines.registry`), or the shipped default when ``model`` is None, onto ``device`` (default: CUDA
    if available, else CPU), in ``dtype`` (default: float32, whatever the stored dtype). Returns ``(pipeline,
    model_dir)``. The one loader the CLI commands share: it checks the folder first
    (:mod:`vgen.pipelines.folder_check`; a folder whose weights exist as one variant only, ``*.fp16.safetensors``,
    loads that variant), turns what is wrong with it into a :class:`UserError` and keeps diffusers' load chatter
    off stderr."""
    from diffusers.utils import logging as diffusers_logging

    from vgen.devices import resolve_device
    from vgen.pipelines.base import only_variant
    from vgen.pipelines.folder_check import check_pipeline_folder
    from vgen.pipelines.registry import load_pipeline_class

    model_dir = resolve_model_dir(model)
    pipeline_class = load_pipeline_class(pipeline_class_name(model_dir))
    device = resolve_device(device)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        variant = only_variant(model_dir)
        check_pipeline_folder(model_dir, required=required_components(pipeline_class), variant=variant)
        pipe = pipeline_class.from_pretrained(str(model_dir), **({"dtype": dtype} if dtype is not None else {}))
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as err:  # what the checks cannot foresee
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load the pipeline in {model_dir}: {first_line[:300]}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.enable_progress_bar()
    return pipe.to(device), model_dir
