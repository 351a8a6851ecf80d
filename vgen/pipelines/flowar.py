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
"""

from __future__ import annotations

import torch

# The component modules are imported here, not only where they are used: diffusers loads a saved component only from
# a module that is already imported, so `FlowARPipeline.from_pretrained(dir)` must work in a fresh process.
import vgen.models.text_encoder  # noqa: F401
import vgen.tokenizers.kl_autoencoder  # noqa: F401
from vgen.errors import UserError
from vgen.models.flowar import FlowAR
from vgen.pipelines.base import VGenPipeline, options_of
from vgen.samplers.flow_grids import flowar_time_grid
from vgen.samplers.flow_transitions import EulerODE
from vgen.samplers.flow_units import generate_flow_units
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


class FlowARPipeline(VGenPipeline):
    """Components: ``vae`` (:class:`vgen.tokenizers.kl_autoencoder.AutoencoderKL`, latents scaled by its
    ``scale_factor``), ``transformer`` (:class:`vgen.models.flowar.FlowAR`) and, for text models, ``text_encoder``
    (e.g. :class:`vgen.models.text_encoder.ShapesTextEncoder`)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder"]
    sampling_options = options_of("FlowARPipeline")

    def __init__(self, vae, transformer: FlowAR, text_encoder=None, default_guidance_scale: float = 2.4,
                 default_guidance_interval: float = 0.9, default_num_steps: int = 25):
        super().__init__()
        check_continuous_autoencoder(vae, transformer)
        self.register_modules(vae=vae, transformer=transformer, text_encoder=text_encoder)
        # The model's own sampling settings (saved in model_index.json): what a call uses for knobs left at None.
        self.register_sampling_defaults(guidance_scale=default_guidance_scale,
                                        guidance_interval=default_guidance_interval, num_steps=default_num_steps)

    @property
    def resolution(self) -> int:
        """Side of the images this pipeline makes: the latent side times the autoencoder's downsampling."""
        return self.transformer.latent_side * self.vae.downsample

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
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_latents: bool = False,
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
                Every knob left at None takes the model's saved setting (:meth:`sampling_defaults`).
            generator: one ``torch.Generator`` per image (images independent of batch size) or a single one.
            output_type: ``"pil"``, ``"np"`` (B, H, W, 3) floats in [0, 1] or ``"pt"`` (B, 3, H, W) in [0, 1].
            return_dict: return :class:`ImagePipelineOutput` (else a tuple ``(images,)``).
            return_latents: return the generated latents (B, C, h, w) instead of images.
        """
        self.check_output_type(output_type)
        sampling = self.resolve_sampling(guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                         num_steps=num_steps)
        cond, _captions = self.encode_condition(prompt, class_labels, num_images_per_prompt)
        batch_size = cond.batch_size
        out = generate_flow_units(
            self.transformer,
            cond,
            batch_size,
            time_grid=flowar_time_grid(sampling["num_steps"]),
            integrator=EulerODE(),
            guidance_scale=sampling["guidance_scale"],
            guidance_schedule=WeightRampCFG(),
            guidance_interval=(0.0, sampling["guidance_interval"]),
            generators=self.generators_for(generator, batch_size),
            progress=self.progress_bar,
        )
        latents = self.transformer.tokens_to_latents(out.units[-1])
        if return_latents:
            return latents
        images = self.vae.decode_latents(latents.to(self.vae.dtype)).float().add(1).mul(0.5)
        return self.images_output(images, output_type, return_dict)
