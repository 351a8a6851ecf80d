"""``XARPipeline``: KL autoencoder + xAR transformer (+ text encoder) as a diffusers pipeline.

    from vgen.pipelines.xar import XARPipeline
    pipe = XARPipeline.from_pretrained("xar-b")                   # offline, from a local folder
    images = pipe(class_labels=[207, 360], guidance_scale=2.7, num_steps=40,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

Text-conditional models take ``prompt=...``. Generation is the shared unit-wise flow loop
(:func:`vgen.samplers.flow_units.generate_flow_units`) driving the model's velocity step: per unit (official: cell)
``num_steps - 1`` Euler-Maruyama steps on ``linspace(1, 0.04, num_steps)`` and a final deterministic step to 0; the
finished unit is written to the KV cache by a clean (t = 0) pass before the next one; classifier-free guidance with
xAR's ramp over the units (weight 1 at the first, ``guidance_scale`` at the last), at every step. With the official
settings this is official xAR's ``sample_tokens`` + ``vae.decode``, except that noise comes from one generator per
image.
"""

from __future__ import annotations

import torch

# The component modules are imported here, not only where they are used: diffusers loads a saved component only from
# a module that is already imported, so `XARPipeline.from_pretrained(dir)` must work in a fresh process.
import vgen.models.text_encoder  # noqa: F401
import vgen.tokenizers.kl_autoencoder  # noqa: F401
from vgen.models.xar import XAR
from vgen.pipelines.base import VGenPipeline, options_of
from vgen.pipelines.flowar import check_continuous_autoencoder
from vgen.samplers.flow_grids import xar_time_grid
from vgen.samplers.flow_transitions import EulerMaruyamaSDE
from vgen.samplers.flow_units import generate_flow_units
from vgen.samplers.guidance import WeightRampCFG


class XARPipeline(VGenPipeline):
    """Components: ``vae`` (:class:`vgen.tokenizers.kl_autoencoder.AutoencoderKL`, latents scaled by its
    ``scale_factor``), ``transformer`` (:class:`vgen.models.xar.XAR`) and, for text models, ``text_encoder``
    (e.g. :class:`vgen.models.text_encoder.ShapesTextEncoder`)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder"]
    sampling_options = options_of("XARPipeline")

    def __init__(self, vae, transformer: XAR, text_encoder=None, default_guidance_scale: float = 2.7,
                 default_num_steps: int = 40):
        super().__init__()
        check_continuous_autoencoder(vae, transformer, family="xAR")
        self.register_modules(vae=vae, transformer=transformer, text_encoder=text_encoder)
        # The model's own sampling settings (saved in model_index.json): what a call uses for knobs left at None.
        self.register_sampling_defaults(guidance_scale=default_guidance_scale, num_steps=default_num_steps)

    @property
    def resolution(self) -> int:
        """Side of the images this pipeline makes: the latent side times the autoencoder's downsampling."""
        return self.transformer.latent_side * self.vae.downsample

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
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
            guidance_scale: CFG weight at the last unit (official ``cfg``; the first unit is unguided, the ones
                between get the linear ramp; 1 = off).
            num_steps: points of ``linspace(1, 0.04, num_steps)``: ``num_steps - 1`` SDE steps and a final
                deterministic one per unit (official 40 for xAR-B, 50 for L and H).
                Every knob left at None takes the model's saved setting (:meth:`sampling_defaults`).
            generator: one ``torch.Generator`` per image (images independent of batch size) or a single one.
            output_type: ``"pil"``, ``"np"`` (B, H, W, 3) floats in [0, 1] or ``"pt"`` (B, 3, H, W) in [0, 1].
            return_dict: return :class:`ImagePipelineOutput` (else a tuple ``(images,)``).
            return_latents: return the generated latents (B, C, h, w) instead of images.
        """
        self.check_output_type(output_type)
        sampling = self.resolve_sampling(guidance_scale=guidance_scale, num_steps=num_steps)
        cond, _captions = self.encode_condition(prompt, class_labels, num_images_per_prompt)
        batch_size = cond.batch_size
        out = generate_flow_units(
            self.transformer,
            cond,
            batch_size,
            time_grid=xar_time_grid(sampling["num_steps"]),
            integrator=EulerMaruyamaSDE(),
            guidance_scale=sampling["guidance_scale"],
            guidance_schedule=WeightRampCFG(),
            generators=self.generators_for(generator, batch_size),
            progress=self.progress_bar,
        )
        latents = self.transformer.units_to_latents(out.units)
        if return_latents:
            return latents
        images = self.vae.decode_latents(latents.to(self.vae.dtype)).float().add(1).mul(0.5)
        return self.images_output(images, output_type, return_dict)
