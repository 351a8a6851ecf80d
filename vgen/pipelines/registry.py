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
from vgen.values import (
    bounded_int,
    finite_float,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
)


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


#: speculative decoding methods of next-token pipelines (:mod:`vgen.pipelines.speculative`)
NEXT_TOKEN_SPECULATIVE_METHODS = ("none", "sjd", "exact", "lantern", "mulo-sd")
#: speculative decoding methods of continuous-token (flow) pipelines, FlowAR and xAR
#: (:mod:`vgen.pipelines.flow_speculative`)
FLOW_SPECULATIVE_METHODS = ("none", "cspd")
#: every method (one ``--speculative`` flag for all families; each family refuses the methods it does not have)
SPECULATIVE_METHODS = NEXT_TOKEN_SPECULATIVE_METHODS + FLOW_SPECULATIVE_METHODS[1:]


def speculative_method(text: str) -> str:
    """One of :data:`SPECULATIVE_METHODS`."""
    if text not in SPECULATIVE_METHODS:
        raise ValueError(f"must be one of {', '.join(SPECULATIVE_METHODS)}, got {str(text)[:40]!r}")
    return text


def folder_or_empty(text: str) -> str:
    """A folder path ("" = none); whether it exists is checked where it is used."""
    if not isinstance(text, str):
        raise ValueError(f"expected a folder path, got {str(text)[:40]!r}")
    return text


def draft_units(text: str | int) -> int:
    """Drafted units per round: 1 to 16 (the KV-cache margin a next-token model keeps past the image)."""
    return bounded_int(text, 1, 16)


def upsampler_choice(text: str) -> str:
    """``resize`` or a folder holding a trained latent up-sampler."""
    if not isinstance(text, str) or not text:
        raise ValueError("must be 'resize' or an up-sampler folder")
    return text


#: speculative decoding, declared once for every next-token family (``vgen generate --speculative sjd`` ...); saved
#: folder paths (drafter, up-sampler) are relative to the pipeline folder
SPECULATIVE_OPTIONS = (
    SamplingOption("speculative", speculative_method, "none",
                   "speculative decoding: none; sjd (lossless, the target alone); exact (lossless, needs --drafter); "
                   "lantern (relaxed acceptance, --pool-k / --delta; with --drafter or self-speculative); mulo-sd "
                   "(lossy, a lower-resolution --drafter, --tau); cspd (continuous tokens: FlowAR, xAR; approximate "
                   "in general, needs --drafter, --gamma, --prefill-fraction, --rejection-rounds; samples with the "
                   "SDE)",
                   metavar="|".join(SPECULATIVE_METHODS)),
    SamplingOption("drafter", folder_or_empty, "",
                   "drafter pipeline folder (same tokenizer / autoencoder) for --speculative exact, lantern, mulo-sd "
                   "or cspd", metavar="DIR"),
    SamplingOption("gamma", draft_units, 4,
                   "units the drafter proposes per round (exact, lantern with a drafter, cspd), 1-16"),
    SamplingOption("window", draft_units, 16,
                   "units in speculative Jacobi decoding's draft window (sjd, lantern without a drafter), 1-16"),
    SamplingOption("pool_k", nonnegative_int, 8,
                   "nearest codebook entries whose probability is pooled with a drafted code (lantern's k, mulo-sd's)"),
    SamplingOption("delta", probability, 0.2, "lantern: total-variation budget of the relaxed acceptance, 0-1"),
    SamplingOption("tau", nonnegative_float, 0.1,
                   "mulo-sd: a drafted code is rejected when its pooled target probability is below tau (0 = keep "
                   "every draft, > 1 = target only)"),
    SamplingOption("radius", nonnegative_int, 1, "mulo-sd: every rejection grows into its neighbourhood of this radius"),
    SamplingOption("draft_rows", positive_int, 1, "mulo-sd: drafter rows per round"),
    SamplingOption("island_lag", nonnegative_int, 0,
                   "mulo-sd: 0 = resample each rejection island in raster order; N >= 1 = ZipAR-style, an island's "
                   "rows together, each N codes behind the row above (fewer target passes)", metavar="N"),
    SamplingOption("upsampler", upsampler_choice, "resize",
                   "mulo-sd: 'resize' (decode, resize, re-encode) or a trained latent up-sampler folder",
                   metavar="resize|DIR"),
)


def cfg_interval(text: str | int) -> int:
    """LlamaGen's ``cfg_interval``: -1 (guide every step) or a step count >= 0."""
    try:
        return bounded_int(text, -1)
    except ValueError as err:
        if str(err).startswith("must "):
            raise ValueError(f"must be -1 (every step) or >= 0, got {str(text)[:40]}") from None
        raise


def raster_guidance_schedule(text: str) -> str:
    """``constant`` or ``ramp`` (see :mod:`vgen.pipelines.raster_ar`)."""
    if text not in ("constant", "ramp"):
        raise ValueError(f"must be 'constant' or 'ramp', got {text!r}")
    return text


RASTER_AR_OPTIONS = (
    SamplingOption("guidance_scale", finite_float, 2.0,
                   "classifier-free guidance weight w: uncond + w (cond - uncond), LlamaGen's cfg_scale (1 = off)"),
    SamplingOption("top_k", nonnegative_int, 0, "top-k filtering, 0 = off, 1 = greedy"),
    SamplingOption("top_p", probability, 1.0, "top-p (nucleus) filtering, 0 or 1 = off"),
    SamplingOption("temperature", positive_float, 1.0, "sampling temperature (> 0; use top-k 1 for greedy)"),
    SamplingOption("guidance_schedule", raster_guidance_schedule, "constant",
                   "how the guidance weight moves over the generated tokens: 'constant' (LlamaGen) or 'ramp' (from 1 "
                   "at the first step to the guidance scale at the last, Token-Shuffle's schedule)",
                   metavar="constant|ramp"),
    SamplingOption("cfg_interval", cfg_interval, -1,
                   "LlamaGen's cfg_interval: guide only the first N + 2 steps (tokens or Token-Shuffle windows); "
                   "-1 = every step", metavar="N"),
    *SPECULATIVE_OPTIONS,
)


def one_of(*choices: str) -> Callable[[Any], str]:
    """A parser that accepts exactly one of ``choices``."""

    def parse(text: Any) -> str:
        if text not in choices:
            raise ValueError(f"choose one of {', '.join(choices)}")
        return str(text)

    return parse


#: block-causal video diffusion (VideoPipeline): the per-block sampler and the KV cache (vgen.models.video_cache)
VIDEO_OPTIONS = (
    SamplingOption("guidance_scale", finite_float, 1.0,
                   "video: classifier-free guidance weight on the velocity, the same for every block (1 = off)"),
    SamplingOption("sampler", one_of("few_step", "euler"), "few_step",
                   "per block: 'few_step' (Self-Forcing's: predict the clean block, re-noise to the next time) or "
                   "'euler' (the flow ODE)", metavar="few_step|euler"),
    SamplingOption("num_steps", positive_int, 4, "denoising steps per block"),
    SamplingOption("time_shift", positive_float, 3.0,
                   "time-grid shift s: t -> s t / (1 + (s - 1) t) spends the steps at high noise"),
    SamplingOption("cache", one_of("full", "sink_window", "forcing_kv"), "full",
                   "KV cache: 'full' (every frame), 'sink_window' (sink + rolling window) or 'forcing_kv' "
                   "(per-head compressed, needs the model's head profile)", metavar="full|sink_window|forcing_kv"),
    SamplingOption("sink_frames", nonnegative_int, 1, "first frames the sink_window / forcing_kv caches keep"),
    SamplingOption("window_frames", positive_int, 7, "recent frames the sink_window cache keeps"),
    SamplingOption("recent_frames", positive_int, 1, "recent frames every forcing_kv head keeps whole"),
    SamplingOption("segments_per_frame", positive_int, 4, "forcing_kv: bands a frame is cut into for scoring"),
    SamplingOption("dynamic_segments", nonnegative_int, 4,
                   "forcing_kv: most-changed bands a dynamic head keeps"),
)


def flow_grid_steps(text) -> int:
    """Steps of FlowAR's time grid: an integer >= 2 (its two pieces need one step each)."""
    return bounded_int(text, 2)


def _speculative_option(name: str) -> SamplingOption:
    return next(option for option in SPECULATIVE_OPTIONS if option.name == name)


#: continuous speculative decoding (:mod:`vgen.samplers.cspd`) for flow families (FlowAR, xAR): the shared
#: ``speculative``, ``drafter`` and ``gamma`` declarations plus CSpD's own knobs
FLOW_SPECULATIVE_OPTIONS = (
    _speculative_option("speculative"),
    _speculative_option("drafter"),
    _speculative_option("gamma"),
    SamplingOption("prefill_fraction", probability, 0.05,
                   "cspd: fraction rho of the AR units the target generates before drafting starts (ceil(rho K))"),
    SamplingOption("rejection_rounds", positive_int, 32,
                   "cspd: proposals from the target's last transition per rejected unit before it keeps the last one"),
    SamplingOption("verification", one_of("unit", "window"), "unit",
                   "cspd: 'unit' (each drafted unit verified against the committed ones, none discarded) or 'window' "
                   "(xAR: the drafted units verified together, one target pass per SDE step, kept up to the batch's "
                   "first rejection)", metavar="unit|window"),
)

#: the knobs of FlowAR's flow sampling (Euler ODE per scale, CFG ramp over the scales with a flow-time interval)
FLOWAR_OPTIONS = (
    SamplingOption("guidance_scale", finite_float, 2.4,
                   "classifier-free guidance weight at the last scale (FlowAR's ramp from 1 at the first; 1 = off)"),
    SamplingOption("guidance_interval", probability, 0.9,
                   "guidance only at flow times t <= this value (t = 1 is noise; official 0.9, FlowAR-H 0.7)"),
    SamplingOption("num_steps", flow_grid_steps, 25,
                   "flow steps per scale on FlowAR's grid (25: 24 non-uniform Euler steps; 50: uniform); with the "
                   "sde sampler: num_steps - 1 stochastic steps on [1, 0.04] and a final drift step"),
    SamplingOption("flow_sampler", one_of("ode", "sde"), "ode",
                   "FlowAR: 'ode' (official Euler ODE on FlowAR's grid) or 'sde' (Euler-Maruyama on the xAR grid, "
                   "what --speculative cspd samples with and compares against)", metavar="ode|sde"),
    *FLOW_SPECULATIVE_OPTIONS,
)


#: the knobs of xAR's flow sampling (Euler-Maruyama per unit, CFG ramp over the units, always on) and CSpD (which
#: samples with the same SDE)
XAR_OPTIONS = (
    SamplingOption("guidance_scale", finite_float, 2.7,
                   "classifier-free guidance weight at the last unit (xAR's ramp from 1 at the first; 1 = off)"),
    SamplingOption("num_steps", positive_int, 40,
                   "xAR: SDE steps per unit on linspace(1, 0.04, N) then one deterministic step to 0 (official 40 for "
                   "xAR-B, 50 for L and H)"),
    *FLOW_SPECULATIVE_OPTIONS,
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
    "RasterARPipeline": PipelineEntry("vgen.pipelines.raster_ar:RasterARPipeline", "raster AR",
                                      RASTER_AR_OPTIONS),
    "VideoPipeline": PipelineEntry("vgen.pipelines.video:VideoPipeline", "video", VIDEO_OPTIONS),
    "FlowARPipeline": PipelineEntry("vgen.pipelines.flowar:FlowARPipeline", "FlowAR", FLOWAR_OPTIONS),
    "XARPipeline": PipelineEntry("vgen.pipelines.xar:XARPipeline", "xAR", XAR_OPTIONS),
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
