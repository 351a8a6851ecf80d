"""``VARPipeline``: multi-scale VQ tokenizer + VAR transformer (+ text encoder) as a diffusers pipeline.

    from vgen.pipelines.var import VARPipeline
    pipe = VARPipeline.from_pretrained("my-var-folder")          # offline, from a local folder
    images = pipe(class_labels=[207, 360], guidance_scale=1.5, top_k=900, top_p=0.96,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

Text-conditional models take ``prompt=...`` instead of ``class_labels``. Once this module is imported, diffusers'
generic ``diffusers.DiffusionPipeline.from_pretrained(folder)`` loads saved VAR folders too (see
:meth:`vgen.pipelines.base.VGenPipeline.__init_subclass__`). The generation loop is
:func:`vgen.samplers.next_scale.generate_next_scale`; every argument here maps onto it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The component modules are imported here, not only where they are used: diffusers loads a saved component only from
# a module that is already imported, so `VARPipeline.from_pretrained(dir)` must work in a fresh process.
import vgen.models.text_encoder  # noqa: F401
import vgen.tokenizers.frvae  # noqa: F401
import vgen.tokenizers.msvq  # noqa: F401
from vgen.errors import UserError
from vgen.models.var import VAR
from vgen.pipelines.base import VGenPipeline, options_of
from vgen.pipelines.next_scale_tokenizer import check_tokenizer_fits
from vgen.pipelines.registry import SamplingOption
from vgen.samplers.guidance import RAMP, GuidanceSchedule, check_profile, schedule_from_profile
from vgen.samplers.next_scale import TokenSampling, generate_next_scale


class VARPipeline(VGenPipeline):
    """Components: ``vqvae`` (:class:`vgen.tokenizers.msvq.MultiScaleVQModel`, or NFIG's frequency-band
    :class:`vgen.tokenizers.frvae.FrequencyVQModel`: an NFIG pipeline is this class with that tokenizer),
    ``transformer`` (:class:`vgen.models.var.VAR`) and, for text models, ``text_encoder`` (e.g.
    :class:`vgen.models.text_encoder.ShapesTextEncoder`; anything implementing
    :class:`vgen.models.text_encoder.TextEncoder`)."""

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _optional_components = ["text_encoder"]
    sampling_options = options_of("VARPipeline")

    def __init__(
        self, vqvae, transformer: VAR, text_encoder=None, default_guidance_scale: float = 1.5,
        default_top_k: int = 900, default_top_p: float = 0.96, default_temperature: float = 1.0,
        default_guidance_profile: str | Sequence[float] = RAMP,
    ):
        super().__init__()
        check_tokenizer_fits(vqvae, transformer)
        self.register_modules(vqvae=vqvae, transformer=transformer, text_encoder=text_encoder)
        # The model's own sampling settings (saved in model_index.json): what a call uses for knobs left at None.
        # The defaults are official VAR's ImageNet settings; a trained model stores the ones it was measured with.
        self.register_sampling_defaults(
            guidance_scale=default_guidance_scale, top_k=default_top_k, top_p=default_top_p,
            temperature=default_temperature, guidance_profile=default_guidance_profile,
        )

    def check_option(self, option: SamplingOption, value):
        value = super().check_option(option, value)
        return self.check_guidance_profile(value) if option.name == "guidance_profile" else value

    def check_guidance_profile(self, profile: str | Sequence[float]) -> str | list[float]:
        """``profile`` as saved (``"ramp"`` or one float per scale), or a :class:`UserError` saying what is wrong."""
        patch_nums = list(self.transformer.config.patch_nums)
        try:
            return check_profile(profile, len(patch_nums))
        except ValueError as err:
            raise UserError(f"{err} (this model generates {len(patch_nums)} scales: {patch_nums})") from None

    # -- generation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        more_smooth: bool = False,
        guidance_profile: str | Sequence[float] | None = None,
        guidance_schedule: GuidanceSchedule | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        unconditional: bool = False,
    ):
        """Generate images.

        Args:
            prompt: text prompt(s) for text-conditional models.
            class_labels: class id(s) for class-conditional models (ImageNet ids for official checkpoints).
            num_images_per_prompt: images per prompt / label.
            guidance_scale: CFG strength; with VAR's ramp (:class:`LinearRampCFG`, profile ``"ramp"``) it is official
                VAR's ``cfg`` (weight ``1 + guidance_scale * si / (K - 1)`` at scale si; 0 = no guidance).
            top_k, top_p, temperature: token filtering and sampling (0 disables top-k / top-p; top_k=1 is greedy).
                Every sampling knob left at None takes the model's saved setting (:meth:`sampling_defaults`).
            more_smooth: VAR's Gumbel-smoothed embeddings (visualisation only, not for FID).
            guidance_profile: how the strength is shared over the K scales: ``"ramp"`` (VAR's) or K shares, weight
                ``1 + guidance_scale * profile[si]`` at scale si (:class:`vgen.samplers.guidance.ProfileCFG`).
            guidance_schedule: any other CFG schedule, e.g. :class:`vgen.samplers.guidance.ConstantCFG` (replaces
                ``guidance_profile``).
            generator: one ``torch.Generator`` per image (its random numbers do not depend on the batch) or one.
            output_type: ``"pil"``, ``"np"`` (B, H, W, 3) floats in [0, 1] or ``"pt"`` (B, 3, H, W) in [0, 1].
            return_dict: return :class:`ImagePipelineOutput` (else a tuple ``(images,)``).
            unconditional: ``num_images_per_prompt`` images of the null prompt / null class (no prompt, no labels).
                An empty or blank prompt is an error, so an unconditional image is never made by accident.
        """
        self.check_output_type(output_type)
        sampling = self.resolve_sampling(guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                                         temperature=temperature, guidance_profile=guidance_profile)
        cond, _captions = self.encode_condition(prompt, class_labels, num_images_per_prompt, unconditional)
        batch_size = cond.batch_size
        out = generate_next_scale(
            self.transformer,
            self.vqvae.quantize,
            cond,
            batch_size,
            guidance_scale=sampling["guidance_scale"],
            guidance_schedule=guidance_schedule or schedule_from_profile(sampling["guidance_profile"]),
            sampling=TokenSampling(top_k=sampling["top_k"], top_p=sampling["top_p"],
                                   temperature=sampling["temperature"], more_smooth=more_smooth),
            generators=self.generators_for(generator, batch_size),
            progress=self.progress_bar,
        )
        images = self.vqvae.fhat_to_img(out.f_hat.to(self.vqvae.dtype)).float().add(1).mul(0.5)
        return self.images_output(images, output_type, return_dict)
