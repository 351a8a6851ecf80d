"""Speculative decoding as an option of next-token pipelines (``speculative=`` and its knobs, declared in
:data:`vgen.pipelines.registry.SPECULATIVE_OPTIONS`): which sampler of :mod:`vgen.samplers` runs, the drafter and
up-sampler it needs, and the checks that a drafter fits the target.

=========  =====================================================  ==========  ======================================
method     sampler                                                lossless    needs
=========  =====================================================  ==========  ======================================
sjd        :func:`vgen.samplers.jacobi.generate_jacobi`             yes         ``window``
exact      :func:`vgen.samplers.speculative_exact.                  yes         ``drafter`` (same grid), ``gamma``
           generate_speculative_exact`
lantern    either of the above with                                 no          ``pool_k``, ``delta``; a drafter is
           :class:`vgen.samplers.lantern.LanternVerifier`                       optional (else self-speculative)
mulo-sd    :func:`vgen.samplers.mulo_sd.generate_mulo_sd`           no          ``drafter`` (a smaller grid),
                                                                                ``upsampler``, ``tau``, ``pool_k``,
                                                                                ``radius``, ``draft_rows``,
                                                                                ``island_lag``
=========  =====================================================  ==========  ======================================

A drafter is another saved pipeline folder of the same family on the same tokenizer (identical codebook); any
other is refused in one line. Paths: a ``drafter`` / ``upsampler`` given at call time is used as given (relative to
the working directory); one saved in ``model_index.json`` (``default_drafter``) is relative to the pipeline folder,
and :meth:`SpeculativeNextTokenMixin.save_pretrained` writes it that way. The counts of the last call (target and
drafter forwards, acceptance) are in ``pipe.speculative_stats``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vgen.errors import UserError

#: the knobs of speculative decoding (the rest of a call's sampling settings belong to the family)
SPECULATIVE_KNOBS = ("speculative", "drafter", "gamma", "window", "pool_k", "delta", "tau", "radius", "draft_rows",
                     "island_lag", "upsampler", "prefill_fraction", "rejection_rounds", "verification")
#: knobs that hold folder paths (saved relative to the pipeline folder)
PATH_KNOBS = ("drafter", "upsampler")
#: methods that cannot run without a drafter
NEEDS_DRAFTER = ("exact", "mulo-sd")


def same_tokenizer(a, b) -> bool:
    """Whether two single-scale VQ tokenizers share vocabulary, code width and codebook (values, not identity)."""
    if int(a.vocab_size) != int(b.vocab_size) or int(a.codebook_dim) != int(b.codebook_dim):
        return False
    return torch.equal(a.quantize.embedding.weight.detach().float().cpu(),
                       b.quantize.embedding.weight.detach().float().cpu())


class DrafterFoldersMixin:
    """What every speculative pipeline shares: path knobs (``drafter``, ``upsampler``) resolved as given at call
    time or relative to the pipeline folder when saved, ``save_pretrained`` writing them relative to the new folder,
    and the drafter pipeline loaded once and checked by the pipeline's own :meth:`check_drafter`. Put it before
    ``VGenPipeline`` in the bases."""

    speculative_stats = None  #: the sampler's counts of the last call (:class:`vgen.samplers.speculative_core.
    #: SpeculativeStats` or a subclass), or None

    # -- paths -------------------------------------------------------------------------------------------------

    def _folder(self) -> Path | None:
        name = getattr(self, "name_or_path", None)
        return Path(name) if name else None

    def knob_path(self, name: str, value: str, given: bool) -> Path:
        """The folder a path knob points to: as given at call time, or relative to the pipeline folder when it is
        the saved default."""
        path = Path(value)
        if not given and not path.is_absolute() and self._folder() is not None:
            path = self._folder() / path
        return path

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save, with the saved drafter / up-sampler paths rewritten relative to ``save_directory``."""
        original = {}
        for name in PATH_KNOBS:
            key = f"default_{name}"
            value = self.config.get(key, "")
            if value and value != "resize":
                original[key] = value
                absolute = self.knob_path(name, value, given=False).resolve()
                self.register_to_config(**{key: os.path.relpath(absolute, Path(save_directory).resolve())})
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if original:
                self.register_to_config(**original)

    # -- components --------------------------------------------------------------------------------------------

    def drafter_pipeline(self, value: str, given: bool, method: str):
        """The drafter pipeline (loaded once, on the target's device), checked against the target."""
        from vgen.pipelines import load_pipeline

        path = self.knob_path("drafter", value, given)
        cache = self.__dict__.setdefault("_drafters", {})
        key = str(path.resolve())
        if key not in cache:
            drafter, _ = load_pipeline(path, self._execution_device())
            drafter.set_progress_bar_config(disable=True)
            cache[key] = drafter
        drafter = cache[key]
        self.check_drafter(drafter, path, method)
        return drafter

    def check_drafter(self, drafter, path: Path, method: str) -> None:
        """One :class:`UserError` line when ``drafter`` cannot draft for this pipeline with ``method``."""
        raise NotImplementedError


class SpeculativeNextTokenMixin(DrafterFoldersMixin):
    """Speculative decoding for a next-token pipeline with components ``vqvae`` (single-scale VQ) and
    ``transformer`` (a :class:`~vgen.samplers.interfaces.NextTokenModel`). Put it before ``VGenPipeline`` in the
    bases; the pipeline's ``__call__`` hands its resolved settings to :meth:`speculative_tokens`."""

    def check_option(self, option, value):
        """The shared ``speculative`` flag also names the flow families' methods: refuse those here."""
        from vgen.pipelines.registry import NEXT_TOKEN_SPECULATIVE_METHODS

        value = super().check_option(option, value)
        if option.name == "speculative" and value not in NEXT_TOKEN_SPECULATIVE_METHODS:
            raise UserError(f"speculative {value} is for continuous-token (FlowAR, xAR) models; this next-token "
                            f"model takes {', '.join(NEXT_TOKEN_SPECULATIVE_METHODS)}")
        return value

    def check_drafter(self, drafter, path: Path, method: str) -> None:
        """One :class:`UserError` line when ``drafter`` cannot draft for this pipeline with ``method``."""
        mine, theirs = self.transformer, getattr(drafter, "transformer", None)
        if getattr(drafter, "vqvae", None) is None or not hasattr(theirs, "sequence_length"):
            raise UserError(f"the drafter {path} is not a next-token pipeline (it has no single-scale tokenizer and "
                            "next-token transformer); give a raster AR pipeline folder")
        if int(theirs.vocab_size) != int(mine.vocab_size) or not same_tokenizer(self.vqvae, drafter.vqvae):
            raise UserError(f"the drafter {path} uses another tokenizer or vocabulary than this model (a drafter must "
                            "share the target's tokenizer: train it on the same VQ folder)")
        if bool(mine.is_text_conditional) != bool(theirs.is_text_conditional):
            raise UserError(f"the drafter {path} and this model are conditioned differently (text vs class labels)")
        if method == "mulo-sd":
            G, g = int(mine.config.grid_size), int(theirs.config.grid_size)
            if mine.tokens_per_step != 1 or theirs.tokens_per_step != 1 or g >= G or G % g:
                raise UserError(f"mulo-sd needs a drafter on a smaller grid that divides this model's {G}x{G} (both "
                                f"in plain raster order); the drafter {path} has {g}x{g} with "
                                f"{theirs.tokens_per_step} code(s) per step")
        elif (int(theirs.sequence_length), int(theirs.tokens_per_step)) != (int(mine.sequence_length),
                                                                            int(mine.tokens_per_step)):
            raise UserError(f"--speculative {method} needs a drafter at this model's resolution and Token-Shuffle "
                            f"window; the drafter {path} makes {theirs.sequence_length} units of "
                            f"{theirs.tokens_per_step} code(s), this model {mine.sequence_length} of "
                            f"{mine.tokens_per_step} (a lower-resolution drafter is for mulo-sd)")

    def neighbour_table(self, k: int) -> torch.Tensor:
        """The ``k + 1`` nearest codes of every code, the code itself first (computed once per k)."""
        from vgen.samplers.lantern import neighbour_table

        tables = self.__dict__.setdefault("_neighbour_tables", {})
        if k not in tables:
            if not 0 <= k < int(self.vqvae.vocab_size):
                raise UserError(f"pool_k must be in 0..{int(self.vqvae.vocab_size) - 1} (the codebook size - 1), "
                                f"got {k}")
            tables[k] = neighbour_table(self.vqvae.codebook_neighbours, int(self.vqvae.vocab_size), k)
        return tables[k]

    def code_upsampler(self, value: str, given: bool, factor: int):
        """The MuLo-SD up-sampler: ``resize`` or a trained :class:`vgen.models.latent_upsampler.LatentUpsampler`."""
        from vgen.models.latent_upsampler import CodeUpsampler, LatentUpsampler

        if value == "resize":
            return CodeUpsampler(self.vqvae, None, factor)
        path = self.knob_path("upsampler", value, given)
        if not (path / "config.json").is_file():
            raise UserError(f"up-sampler folder {path} not found (no config.json); give 'resize' or a folder saved by "
                            "'vgen train latent-upsampler'")
        cache = self.__dict__.setdefault("_upsamplers", {})
        key = str(path.resolve())
        if key not in cache:
            try:
                model = LatentUpsampler.from_pretrained(str(path), low_cpu_mem_usage=False)
            except (OSError, ValueError, TypeError, RuntimeError) as err:
                raise UserError(f"cannot load the up-sampler in {path}: {str(err).splitlines()[0][:200]}") from None
            cache[key] = model.eval().to(self._execution_device())
        upsampler = CodeUpsampler(self.vqvae, cache[key])
        if upsampler.factor != factor:
            raise UserError(f"the up-sampler {path} enlarges grids {upsampler.factor}x but the drafter's grid is "
                            f"{factor}x smaller than this model's")
        return upsampler

    # -- generation --------------------------------------------------------------------------------------------

    def speculative_tokens(self, settings: dict[str, Any], given: dict[str, Any], cond, batch_size: int,
                           condition_inputs: dict[str, Any], guidance_scale: float, schedule, sampling, generators):
        """Run the speculative sampler ``settings["speculative"]`` and return its
        :class:`~vgen.samplers.speculative_core.SpeculativeOutput`.

        Args:
            settings: the call's resolved sampling settings (speculative knobs included).
            given: the knobs given at call time (paths given there are not relative to the pipeline folder).
            cond: the target's condition for the B images.
            condition_inputs: ``prompt``, ``class_labels``, ``num_images_per_prompt``, ``unconditional`` of the call
                (the drafter encodes them with its own text encoder).
            guidance_scale, schedule, sampling, generators: as for the plain loop.
        """
        from vgen.samplers.jacobi import generate_jacobi
        from vgen.samplers.lantern import LanternVerifier
        from vgen.samplers.mulo_sd import generate_mulo_sd
        from vgen.samplers.speculative_exact import generate_speculative_exact

        method = settings["speculative"]
        drafter_value = settings["drafter"]
        if method in NEEDS_DRAFTER and not drafter_value:
            raise UserError(f"--speculative {method} needs a drafter: pass --drafter DIR (a pipeline folder on the "
                            "same tokenizer)")
        if method == "sjd" and given.get("drafter"):
            raise UserError("--speculative sjd drafts with the target itself; leave out --drafter (or use exact, "
                            "lantern or mulo-sd)")
        common = dict(guidance_scale=guidance_scale, guidance_schedule=schedule, sampling=sampling,
                      generators=generators)
        drafter = drafter_cond = None
        if drafter_value and method != "sjd":
            drafter = self.drafter_pipeline(drafter_value, "drafter" in given, method)
            drafter_cond, _ = drafter.encode_condition(**condition_inputs)
        if method == "sjd":
            return generate_jacobi(self.transformer, cond, batch_size, window=settings["window"], **common)
        if method in ("exact", "lantern"):
            verifier = None
            if method == "lantern":
                k = settings["pool_k"]
                if k < 1:
                    raise UserError("lantern pools at least one neighbour: give --pool-k >= 1")
                verifier = LanternVerifier(self.neighbour_table(k), k, settings["delta"])
            if drafter is None:
                return generate_jacobi(self.transformer, cond, batch_size, window=settings["window"],
                                       verifier=verifier, **common)
            return generate_speculative_exact(self.transformer, drafter.transformer, cond, drafter_cond, batch_size,
                                              gamma=settings["gamma"], verifier=verifier, **common)
        factor = int(self.transformer.config.grid_size) // int(drafter.transformer.config.grid_size)
        upsampler = self.code_upsampler(settings["upsampler"], "upsampler" in given, factor)
        return generate_mulo_sd(self.transformer, drafter.transformer, cond, drafter_cond, batch_size, upsampler,
                                self.neighbour_table(settings["pool_k"]), tau=settings["tau"],
                                neighbours=settings["pool_k"], radius=settings["radius"],
                                draft_rows=settings["draft_rows"], island_lag=settings["island_lag"], **common)
