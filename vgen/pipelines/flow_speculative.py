"""Continuous speculative decoding (``speculative="cspd"``) as an option of the flow-family pipelines (FlowAR, xAR):
what the two share, written once.

A flow pipeline (components ``vae``, an :class:`~vgen.tokenizers.kl_autoencoder.AutoencoderKL`, and ``transformer``,
a :class:`~vgen.samplers.interfaces.VelocityModel`) puts :class:`FlowSpeculativeMixin` before ``VGenPipeline`` in its
bases, declares :data:`vgen.pipelines.registry.FLOW_SPECULATIVE_OPTIONS` among its options, and in ``__call__``
hands a ``speculative="cspd"`` call to :meth:`FlowSpeculativeMixin.cspd_units`
(:func:`vgen.samplers.cspd.generate_cspd` on the Euler-Maruyama SDE, :meth:`FlowSpeculativeMixin.sde_sampling`), or
calls :meth:`FlowSpeculativeMixin.refuse_drafter` before target-only sampling. The family names itself
(:attr:`~FlowSpeculativeMixin.flow_family`, its transformer class) and says whether a drafter's units fit
(:meth:`~FlowSpeculativeMixin.units_mismatch`); the rest (the drafter folder, its checks against the target, saved
relative paths, ``pipe.speculative_stats``) is here and in :class:`vgen.pipelines.speculative.DrafterFoldersMixin`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from vgen.errors import UserError
from vgen.pipelines.registry import FLOW_SPECULATIVE_METHODS
from vgen.pipelines.speculative import DrafterFoldersMixin
from vgen.samplers.cspd import CSpDOutput, CSpDSettings, generate_cspd
from vgen.samplers.flow_grids import xar_time_grid
from vgen.samplers.flow_transitions import EulerMaruyamaSDE
from vgen.samplers.flow_units import generate_flow_units


def _as_saved(value: Any) -> Any:
    """A configuration value as a saved ``config.json`` gives it back (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [_as_saved(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_saved(v) for k, v in value.items()}
    return value


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold the same configuration (when they have one), parameters and buffers. A module built
    in code and one loaded from a folder compare equal when they are (``(1, 1)`` in one config, ``[1, 1]`` in the
    other)."""
    def settings(module):  # the configuration without diffusers' bookkeeping (_name_or_path, ...)
        return {k: _as_saved(v) for k, v in dict(getattr(module, "config", {})).items() if not k.startswith("_")}

    if settings(a) != settings(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(sa[k].shape == sb[k].shape and torch.equal(sa[k].detach().cpu(), sb[k].detach().cpu()) for k in sa)


class FlowSpeculativeMixin(DrafterFoldersMixin):
    """CSpD for a flow-family pipeline (see the module doc). Subclasses set :attr:`flow_family`,
    :attr:`flow_family_article`, :attr:`unit_name`, :attr:`transformer_class` and implement
    :meth:`units_mismatch`."""

    #: the family's name in messages ("FlowAR", "xAR") and its indefinite article ("a", "an")
    flow_family: ClassVar[str] = ""
    flow_family_article: ClassVar[str] = "a"
    #: what the family's AR units are called in messages ("scales", "units")
    unit_name: ClassVar[str] = "units"
    #: the transformer class a drafter of this family has
    transformer_class: ClassVar[type] = torch.nn.Module

    def check_option(self, option, value):
        """The shared ``speculative`` flag also names the next-token methods: a flow family takes none and cspd."""
        value = super().check_option(option, value)
        if option.name == "speculative" and value not in FLOW_SPECULATIVE_METHODS:
            raise UserError(f"speculative {value} is for next-token models; {self.flow_family} takes "
                            f"{', '.join(FLOW_SPECULATIVE_METHODS)}")
        return value

    # -- the drafter -------------------------------------------------------------------------------------------

    def units_mismatch(self, theirs, path: Path) -> str | None:
        """The one-line reason why the drafter transformer ``theirs`` (of :attr:`transformer_class`) does not
        generate this model's units, or None when it does."""
        raise NotImplementedError

    def check_drafter(self, drafter, path, method: str) -> None:
        """One :class:`UserError` line unless ``drafter`` is a pipeline of this family with this model's units and
        conditioning on the same autoencoder (its units are decoded by this pipeline's)."""
        family = self.flow_family
        mine, theirs = self.transformer, getattr(drafter, "transformer", None)
        if not isinstance(theirs, self.transformer_class) or getattr(drafter, "vae", None) is None:
            raise UserError(f"the drafter {path} is not {self.flow_family_article} {family} pipeline; --speculative "
                            f"cspd drafts with a smaller {family} on the same autoencoder")
        mismatch = self.units_mismatch(theirs, path)
        if mismatch is not None:
            raise UserError(mismatch)
        if bool(mine.is_text_conditional) != bool(theirs.is_text_conditional):
            raise UserError(f"the drafter {path} and this model are conditioned differently (text vs class labels)")
        checked = self.__dict__.setdefault("_same_vae", {})
        if id(drafter) not in checked:
            checked[id(drafter)] = same_weights(self.vae, drafter.vae)
        if not checked[id(drafter)]:
            raise UserError(f"the drafter {path} uses another autoencoder than this model (a drafter must be trained "
                            "on the same autoencoder's latents)")

    def refuse_drafter(self, drafter: str | None) -> None:
        """Target-only sampling: a drafter given at call time is a mistake, said in one line."""
        if drafter:
            raise UserError("--drafter is for --speculative cspd; leave it out for target-only sampling")

    # -- sampling ----------------------------------------------------------------------------------------------

    @staticmethod
    def sde_sampling(num_steps: int):
        """``(time grid, integrator)`` of the Euler-Maruyama SDE (official xAR's): ``num_steps - 1`` stochastic
        steps on ``[1, 0.04]`` and a final drift step; what cspd samples with."""
        return xar_time_grid(num_steps), EulerMaruyamaSDE()

    def target_only_sampling(self, settings: dict[str, Any]):
        """``(time grid, integrator)`` of target-only sampling with the resolved ``settings`` (default the SDE)."""
        return self.sde_sampling(settings["num_steps"])

    def target_only_forwards(self, **options) -> int:
        """Model calls per image of target-only sampling with ``options``: the prefill, one velocity call per step
        of every unit (CFG rows go in the same call), one commit per unit but the last (CSpD's stats count alike)."""
        settings = self.resolve_sampling(**options)
        grid, _ = self.target_only_sampling(settings)
        units = len(self.transformer.unit_shapes)
        return 1 + units * (grid.numel() - 1) + units - 1

    def flow_units(self, sampling: dict[str, Any], drafter: str | None, condition_inputs: dict[str, Any], cond,
                   batch_size: int, callback_on_step_end=None, callback_on_step_end_tensor_inputs=None,
                   **guidance: Any):
        """The clean units of one call (``.units``, each (B, *unit_shape), in generation order): CSpD
        (:meth:`cspd_units`) with ``speculative="cspd"``, else the target alone on :meth:`target_only_sampling`
        with the user's callback (one step per unit) and the progress bar. Arguments as :meth:`cspd_units`'s."""
        self.speculative_stats = None
        if sampling["speculative"] == "cspd":
            return self.cspd_units(sampling, drafter, condition_inputs, cond, batch_size, callback_on_step_end,
                                   **guidance)
        self.refuse_drafter(drafter)
        on_step_end = self.step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                         len(self.transformer.unit_shapes))
        time_grid, integrator = self.target_only_sampling(sampling)
        return generate_flow_units(self.transformer, cond, batch_size, time_grid=time_grid, integrator=integrator,
                                   progress=self.progress_bar, on_step_end=on_step_end, **guidance)

    def cspd_units(self, sampling: dict[str, Any], drafter: str | None, condition_inputs: dict[str, Any], cond,
                   batch_size: int, callback_on_step_end=None, **guidance: Any) -> CSpDOutput:
        """Run :func:`~vgen.samplers.cspd.generate_cspd` for one call and keep its counts in
        ``self.speculative_stats``.

        Args:
            sampling: the call's resolved sampling settings (``drafter``, ``num_steps``, ``gamma``,
                ``prefill_fraction``, ``rejection_rounds``, ``verification``).
            drafter: the ``drafter`` given at call time (None: the saved one, relative to the pipeline folder).
            condition_inputs: ``prompt``, ``class_labels``, ``num_images_per_prompt``, ``unconditional`` of the call
                (the drafter encodes them with its own text encoder).
            cond: the target's condition for the B images.
            callback_on_step_end: refused (CSpD's steps are drafted windows of units).
            guidance: ``guidance_scale``, ``guidance_schedule``, ``guidance_interval``, ``generators`` as the
                family's target-only call takes them (the same CFG for draft and target).
        """
        family = self.flow_family
        if not sampling["drafter"]:
            raise UserError(f"--speculative cspd needs a drafter: pass --drafter DIR (a smaller {family} pipeline "
                            "folder on the same autoencoder)")
        if callback_on_step_end is not None:
            raise UserError(f"callback_on_step_end is not supported with speculative='cspd' (its steps are drafted "
                            f"windows of {self.unit_name}); sample target-only to use a callback")
        time_grid, integrator = self.sde_sampling(sampling["num_steps"])
        steps = time_grid.numel() - 1
        if not any(integrator.is_stochastic(i, steps) for i in range(steps)):
            raise UserError(f"--speculative cspd needs at least one stochastic SDE step: give --num-steps >= 2 (got "
                            f"{sampling['num_steps']})")
        # a drafter equal to the saved one (the CLI passes every resolved setting) is relative to the folder
        given = drafter is not None and drafter != self.sampling_defaults()["drafter"]
        draft_pipe = self.drafter_pipeline(sampling["drafter"], given, "cspd")
        draft_cond, _ = draft_pipe.encode_condition(**condition_inputs)
        if sampling["verification"] == "window" and not hasattr(self.transformer, "velocity_window"):
            raise UserError(f"--verification window needs a model that verifies several units in one pass (xAR); "
                            f"{family} verifies unit by unit: use --verification unit")
        settings = CSpDSettings(gamma=sampling["gamma"], prefill_fraction=sampling["prefill_fraction"],
                                rejection_rounds=sampling["rejection_rounds"], verification=sampling["verification"])
        out = generate_cspd(self.transformer, draft_pipe.transformer, cond, draft_cond, batch_size, time_grid,
                            integrator, settings, **guidance)
        self.speculative_stats = out.stats
        return out
