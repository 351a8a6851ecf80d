"""Which pipeline classes exist and what sampling options each one takes, without importing any of them.

A saved pipeline folder names its class in ``model_index.json`` (``_class_name``); :data:`PIPELINES` maps that name
to the module that defines it (imported only when such a folder is loaded) and to the pipeline's declared sampling
options. The declaration is the one source of truth for three things:

* the pipeline's call arguments and the defaults it saves in ``model_index.json`` (``default_<name>``);
* the command line: ``vgen generate``, ``vgen sample`` and ``vgen eval geneval`` build one flag per option name
  declared by any family (``--guidance-scale``, ``--top-k``, ...), and a flag the loaded family does not declare is
  refused in one line;
* the help texts (each flag lists the families that have it).

This module imports neither torch nor diffusers, so building the CLI stays fast. A new family adds its options and
one :class:`PipelineEntry` here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vgen.errors import UserError
from vgen.values import finite_float, nonnegative_int, positive_float, probability


def guidance_profile(text: str | Sequence[float]) -> str | list[float]:
    """``"ramp"`` or shares per step (a comma-separated string or a sequence of finite numbers)."""
    if not isinstance(text, str):
        return [finite_float(x) for x in text]
    from vgen.samplers.guidance import parse_guidance_profile

    profile = parse_guidance_profile(text)
    return profile if isinstance(profile, str) else [finite_float(x) for x in profile]


@dataclass(frozen=True)
class SamplingOption:
    """One sampling knob of a pipeline: its call argument ``name`` (CLI flag ``--name-with-dashes``), a ``parse``
    function that converts and checks a value (raises ValueError with the reason), the family default, and help.

    ``saved=True`` options are stored per model in ``model_index.json`` as ``default_<name>``: a call that leaves
    them at None uses the model's saved value. ``flag=True`` options are booleans switched on by the bare flag."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str | None = None
    saved: bool = True
    flag: bool = False

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """``value`` converted by :attr:`parse`, or a :class:`UserError` naming the option."""
        try:
            return self.parse(value)
        except (ValueError, TypeError) as err:
            reason = str(err)
            if reason.startswith("must "):
                raise UserError(f"{self.name} {reason}") from None
            raise UserError(f"{self.name} {value!r} is not valid ({reason})") from None


#: the knobs of discrete-token sampling (VAR, NFIG, raster AR)
TOKEN_SAMPLING_OPTIONS = (
    SamplingOption("top_k", nonnegative_int, 900, "top-k filtering, 0 = off, 1 = greedy"),
    SamplingOption("top_p", probability, 0.96, "top-p (nucleus) filtering, 0 = off"),
    SamplingOption("temperature", positive_float, 1.0, "sampling temperature (> 0; use top-k 1 for greedy)"),
)

VAR_OPTIONS = (
    SamplingOption("guidance_scale", finite_float, 1.5,
                   "classifier-free guidance strength; with VAR's ramp it is official VAR's cfg (0 = off)"),
    *TOKEN_SAMPLING_OPTIONS,
    SamplingOption("guidance_profile", guidance_profile, "ramp",
                   "how the guidance strength is shared over the K scales: 'ramp' (VAR's, share k/(K-1) at scale k) "
                   "or K comma-separated shares, e.g. 0.5,0.75,1,1,1,0.75,0.75 (weight 1 + scale x share)",
                   metavar="ramp|S1,S2,..."),
    SamplingOption("more_smooth", bool, False, "VAR's Gumbel-smoothed embeddings (for pictures only, not for FID)",
                   saved=False, flag=True),
)


@dataclass(frozen=True)
class PipelineEntry:
    """Where a pipeline class lives (``"module:Class"``), the family's name for help texts, and its options."""

    target: str
    family: str
    options: tuple[SamplingOption, ...]


PIPELINES: dict[str, PipelineEntry] = {
    # NFIG is this pipeline with the frequency-band tokenizer (vqvae: FrequencyVQModel), hence the same options
    "VARPipeline": PipelineEntry("vgen.pipelines.var:VARPipeline", "VAR/NFIG", VAR_OPTIONS),
}


def pipeline_entry(class_name: str) -> PipelineEntry:
    """The entry for ``class_name`` (a ``model_index.json`` ``_class_name``), or a :class:`UserError`."""
    if class_name not in PIPELINES:
        raise UserError(
            f"this folder holds a {class_name!r} pipeline, which this version of vgen does not know; known pipelines: "
            f"{', '.join(PIPELINES)}"
        )
    return PIPELINES[class_name]


def load_pipeline_class(class_name: str) -> type:
    """Import and return the pipeline class registered as ``class_name``."""
    import importlib

    module_name, _, attr = pipeline_entry(class_name).target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def all_sampling_options() -> dict[str, tuple[SamplingOption, list[str]]]:
    """Every option name declared by any family -> (its first declaration, the families that have it), in
    declaration order (the CLI's flags)."""
    merged: dict[str, tuple[SamplingOption, list[str]]] = {}
    for entry in PIPELINES.values():
        for option in entry.options:
            if option.name in merged:
                merged[option.name][1].append(entry.family)
            else:
                merged[option.name] = (option, [entry.family])
    return merged
