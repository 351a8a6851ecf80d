"""``FlowARPipeline``: KL autoencoder + FlowAR transformer (+ text encoder) as a diffusers pipeline.

    from vgen.pipelines.flowar import FlowARPipeline
    pipe = FlowARPipeline.from_pretrained("flowar-s")             # offline, from a local folder
    images = pipe(class_labels=[207, 360], guidance_scale=4.3, guidance_interval=0.9, num_steps=25,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

Text-conditional models take ``prompt=...``. Generation is the shared unit-wise flow loop
(:func:`vgen.samplers.flow_units.generate_flow_units`) driving the model's velocity step: per scale an Euler ODE from
noise (t = 1) to the scale's tokens (t = 0) on FlowAR's time grid, classifier-free guidance with FlowAR's ramp over
the scales (weight 1 at the first, ``guidance_scale`` at the last) applied only while ``t <= guidance_interval``;
then the autoencoder decodes the last scale. With ``num_steps=25, guidance_interval=0.9`` and the official cfg this
is official FlowAR's ``sample_tokens`` + ``vae.decode``, except that noise comes from one generator per image.

diffusers conventions (from :class:`vgen.pipelines.base.VGenPipeline`): one step per scale for
``callback_on_step_end`` (tensors ``x_clean``, the scale's clean tokens, replaceable, and ``velocity``, read-only;
see :meth:`FlowARPipeline.__call__`), ``pipe._interrupt = True``, ``output_type="latent"`` (the scaled latents
(B, C, h, w) the autoencoder decodes; ``decode_latents`` turns them into the images), ``unconditional=True`` and
``set_progress_bar_config`` (a bar over the scales).

``flow_sampler="sde"`` samples every scale with Euler-Maruyama instead (:class:`~vgen.samplers.flow_transitions.
EulerMaruyamaSDE` on :func:`~vgen.samplers.flow_grids.xar_time_grid`: ``num_steps - 1`` stochastic steps on
``[1, 0.04]`` and a final drift step). ``speculative="cspd"`` with a ``drafter`` (a smaller FlowAR pipeline folder
on the same autoencoder and scales) runs continuous speculative decoding (:func:`vgen.samplers.cspd.generate_cspd`)
on that SDE, with ``gamma``, ``prefill_fraction`` and ``rejection_rounds``; its reference is ``flow_sampler="sde"``
target-only sampling, and its counts are in ``pipe.speculative_stats``
(:class:`~vgen.samplers.cspd.CSpDStats`); the CSpD call and the drafter checks are shared with xAR
(:mod:`vgen.pipelines.flow_speculative`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The component modules are imported here, not only where they are used: diffusers loads a saved component only from
# a module that is already imported, so `FlowARPipeline.from_pretrained(dir)` must work in a fresh process.
import vgen.models.text_encoder  # noqa: F401
import vgen.tokenizers.kl_autoencoder  # noqa: F401
from vgen.errors import UserError
from vgen.models.flowar import FlowAR
from vgen.pipelines.base import VGenPipeline, options_of
from vgen.pipelines.flow_speculative import FlowSpeculativeMixin
from vgen.samplers.flow_grids import flowar_time_grid
from vgen.samplers.flow_transitions import EulerODE
from vgen.samplers.guidance import WeightRampCFG


def check_continuous_autoencoder(vae, transformer, family: str = "FlowAR") -> None:
    """A :class:`UserError` line unless ``vae`` gives continuous latents with the transformer's channel count
    (``transformer``: any continuous-token generator with ``config.latent_channels``: FlowAR, xAR)."""
    if not (hasattr(vae, "decode_latents") and hasattr(vae, "latent_channels")):
        raise UserError(f"{family} generates continuous latents, but the tokenizer given is a {type(vae).__name__} "
                        "(a VQ tokenizer?); use a KL autoencoder (vgen.tokenizers.kl_autoencoder.AutoencoderKL)")
    if vae.latent_channels != transformer.config.latent_channels:
        raise UserError(f"the autoencoder has {vae.latent_channels} latent channels but the {family} transformer "
                        f"expects {transformer.config.latent_channels}; pass the autoencoder it was trained on")


class FlowARPipeline(FlowSpeculativeMixin, VGenPipeline):
    """Components: ``vae`` (:class:`vgen.tokenizers.kl_autoencoder.AutoencoderKL`, latents scaled by its
    ``scale_factor``), ``transformer`` (:class:`vgen.models.flowar.FlowAR`) and, for text models, ``text_encoder``
    (e.g. :class:`vgen.models.text_encoder.ShapesTextEncoder`)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder"]
    sampling_options = options_of("FlowARPipeline")
    # what CSpD's messages and drafter checks call this family (vgen.pipelines.flow_speculative)
    flow_family = "FlowAR"
    flow_family_article = "a"
    unit_name = "scales"
    transformer_class = FlowAR
    _callback_tensor_inputs = ["x_clean", "velocity"]
    _callback_writable_tensor_inputs = ("x_clean",)
    _default_callback_tensor_inputs = ("x_clean",)
    latent_description = (
        "the latents (B, C, h, w) float32 the autoencoder decodes, already multiplied by its scale_factor (an "
        "interrupted call gives the last scale it made, at that scale's side); pipe.decode_latents(latents) decodes "
        "them."
    )

    def __init__(self, vae, transformer: FlowAR, text_encoder=None, default_guidance_scale: float = 2.4,
                 default_guidance_interval: float = 0.9, default_num_steps: int = 25,
                 default_flow_sampler: str = "ode", default_speculative: str = "none", default_drafter: str = "",
                 default_gamma: int = 4, default_prefill_fraction: float = 0.05, default_rejection_rounds: int = 32,
                 default_verification: str = "unit"):
        super().__init__()
        check_continuous_autoencoder(vae, transformer)
        self.register_modules(vae=vae, transformer=transformer, text_encoder=text_encoder)
        # The model's own sampling settings (saved in model_index.json): what a call uses for knobs left at None.
        self.register_sampling_defaults(guidance_scale=default_guidance_scale,
                                        guidance_interval=default_guidance_interval, num_steps=default_num_steps,
                                        flow_sampler=default_flow_sampler, speculative=default_speculative,
                                        drafter=default_drafter, gamma=default_gamma,
                                        prefill_fraction=default_prefill_fraction,
                                        rejection_rounds=default_rejection_rounds,
                                        verification=default_verification)

    def units_mismatch(self, theirs: FlowAR, path) -> str | None:
        """Why the drafter FlowAR ``theirs`` does not generate this model's scales and token channels (or None)."""
        mine = self.transformer
        if list(theirs.unit_shapes) != list(mine.unit_shapes) or theirs.config.patch_size != mine.config.patch_size:
            return (f"the drafter {path} generates scales {list(theirs.config.scales)} of {theirs.token_channels} "
                    f"channels, this model {list(mine.config.scales)} of {mine.token_channels}; a drafter must share "
                    "the scales and the autoencoder")
        return None

    def flow_sampling(self, flow_sampler: str, num_steps: int):
        """``(time grid, integrator)`` of ``flow_sampler``: FlowAR's Euler ODE or the Euler-Maruyama SDE."""
        if flow_sampler == "sde":
            return self.sde_sampling(num_steps)
        return flowar_time_grid(num_steps), EulerODE()

    def target_only_sampling(self, settings):
        """``(time grid, integrator)`` of target-only sampling: the call's ``flow_sampler``."""
        return self.flow_sampling(settings["flow_sampler"], settings["num_steps"])

    @property
    def resolution(self) -> int:
        """Side of the images this pipeline makes: the latent side times the autoencoder's downsampling."""
        return self.transformer.latent_side * self.vae.downsample

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) of ``output_type="latent"`` -> images (B, 3, H, W) in [0, 1]. The latent of a coarser
        scale (an interrupted call) is first brought to the full latent grid by bicubic interpolation, as FlowAR
        itself carries a scale to the next, so every image has the pipeline's resolution."""
        model = self.transformer
        sides = [s * model.config.patch_size for s in model.scales]
        C = model.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != C or latents.shape[2] != latents.shape[3] \
                or latents.shape[2] not in sides:
            raise UserError(f"latents must be (B, {C}, h, h) with h one of the scales' sides "
                            f"{', '.join(map(str, sides))}, got {tuple(latents.shape)}")
        latents = latents.to(self.vae.device, torch.float32)
        if latents.shape[2] != model.latent_side:
            latents = F.interpolate(latents, size=(model.latent_side, model.latent_side), mode="bicubic")
        return self.vae.decode_latents(latents.to(self.vae.dtype)).float().add(1).mul(0.5)

    # -- generation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        guidance_interval: float | None = None,
        num_steps: int | None = None,
        flow_sampler: str | None = None,
        speculative: str | None = None,
        drafter: str | None = None,
        gamma: int | None = None,
        prefill_fraction: float | None = None,
        rejection_rounds: int | None = None,
        verification: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_latents: bool = False,
        unconditional: bool = False,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Generate images.

        Args:
            prompt: text prompt(s) for text-conditional models.
            class_labels: class id(s) for class-conditional models (ImageNet ids for official checkpoints).
            num_images_per_prompt: images per prompt / label.
            guidance_scale: CFG weight at the last scale (official ``cfg``; the first scale is unguided, the ones
                between get the linear ramp; 1 = off).
            guidance_interval: guidance only at flow times ``t <= guidance_interval`` (official ``guidance``: 0.9
                for FlowAR-S/L, 0.7 for FlowAR-H).
            num_steps: FlowAR's time grid: ``num_steps // 2`` points on [1, 0.3] and ``num_steps // 2 + 1`` on
                [0.25, 0] (25 -> 24 Euler steps per scale); 50 -> 50 uniform steps.
                With ``flow_sampler="sde"``: ``num_steps - 1`` Euler-Maruyama steps and a final drift step.
            flow_sampler: ``"ode"`` (official Euler ODE) or ``"sde"`` (Euler-Maruyama; what cspd samples with).
            speculative: ``"none"`` or ``"cspd"`` (continuous speculative decoding on the SDE; needs ``drafter``).
            drafter: a smaller FlowAR pipeline folder on the same autoencoder and scales (for cspd).
            gamma, prefill_fraction, rejection_rounds: CSpD's units drafted per round, the fraction of scales the
                target generates first, and the proposals per rejected unit (:class:`vgen.samplers.cspd.
                CSpDSettings`).
            verification: CSpD's verification, ``"unit"`` only for FlowAR (``"window"``, several units in one
                target pass, is xAR's).
                Every knob left at None takes the model's saved setting (:meth:`sampling_defaults`).
            generator: one ``torch.Generator`` per image (images independent of batch size) or a single one.
            output_type: ``"pil"``, ``"np"`` (B, H, W, 3) floats in [0, 1], ``"pt"`` (B, 3, H, W) in [0, 1] or
                ``"latent"``: the scaled latents (B, C, h, w) before decoding (see :attr:`latent_description`;
                ``decode_latents``).
            return_dict: return :class:`ImagePipelineOutput` (else a tuple ``(images,)``).
            return_latents: return the generated latents (B, C, h, w) instead of images (a bare tensor; the same as
                ``output_type="latent"`` without the output wrapper).
            unconditional: ``num_images_per_prompt`` images of the null prompt / null class (no prompt, no labels).
            callback_on_step_end: diffusers' ``callback(pipe, step_index, timestep, callback_kwargs) -> dict``, called
                after every scale (``step_index`` = ``timestep`` = the scale index). A step is a scale, not one flow
                step inside it: a scale is what FlowAR generates autoregressively (the next scales condition on its
                clean tokens, so replacing them steers the image) and its flow steps are the inner solver of that one
                prediction, whose intermediate states are noisy and condition nothing. ``callback_kwargs`` holds the
                tensors of ``callback_on_step_end_tensor_inputs`` (default ``["x_clean"]``; any of ``x_clean``
                (B, s_k^2, C p^2) float32, the scale's clean tokens (``pipe.transformer.unpatchify`` gives its
                latent (B, C, s_k p, s_k p)), and ``velocity`` (same shape), the guided velocity of the scale's last
                flow step). Returning a new ``x_clean`` replaces the scale (the later scales condition on it; at the
                last scale it is the latent decoded); ``velocity`` is read-only. Setting ``pipe._interrupt = True``
                stops after the scale: the result is made from the last scale so far (see
                :meth:`latents_to_images`).
        """
        self.check_output_type(output_type)
        sampling = self.resolve_sampling(guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                         num_steps=num_steps, flow_sampler=flow_sampler, speculative=speculative,
                                         drafter=drafter, gamma=gamma, prefill_fraction=prefill_fraction,
                                         rejection_rounds=rejection_rounds, verification=verification)
        cond, _captions = self.encode_condition(prompt, class_labels, num_images_per_prompt, unconditional)
        batch_size = cond.batch_size
        common = dict(guidance_scale=sampling["guidance_scale"], guidance_schedule=WeightRampCFG(),
                      guidance_interval=(0.0, sampling["guidance_interval"]),
                      generators=self.generators_for(generator, batch_size))
        condition_inputs = dict(prompt=prompt, class_labels=class_labels, num_images_per_prompt=num_images_per_prompt,
                                unconditional=unconditional)
        out = self.flow_units(sampling, drafter, condition_inputs, cond, batch_size, callback_on_step_end,
                              callback_on_step_end_tensor_inputs, **common)
        latents = self.transformer.tokens_to_latents(out.units[-1])
        return self.call_output(latents, output_type, return_dict, return_latents=return_latents)
