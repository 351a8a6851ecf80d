"""``VARPipeline``: multi-scale VQ tokenizer + VAR transformer (+ text encoder) as a diffusers pipeline.

    from vgen.pipelines.var import VARPipeline
    pipe = VARPipeline.from_pretrained("my-var-folder")          # offline, from a local folder
    images = pipe(class_labels=[207, 360], guidance_scale=1.5, top_k=900, top_p=0.96,
                  generator=torch.Generator().manual_seed(0)).images   # image i: seed 0 + i

Text-conditional models take ``prompt=...`` instead of ``class_labels``. Once this module is imported, diffusers'
generic ``diffusers.DiffusionPipeline.from_pretrained(folder)`` loads saved VAR folders too (see
:meth:`vgen.pipelines.base.VGenPipeline.__init_subclass__`). The generation loop is
:func:`vgen.samplers.next_scale.generate_next_scale`; every argument here maps onto it.

diffusers conventions (from :class:`vgen.pipelines.base.VGenPipeline`): one step per scale for
``callback_on_step_end`` (``step_index`` = scale index, ``timestep`` = the scale's token-map side ``pn``; tensors
``idx_Bl`` (B, pn^2) token ids, replaceable; ``f_hat`` (B, Cvae, h, w) summed features of the scales so far and
``logits_BlV`` (B, pn^2, V) guided float32 logits, read-only), ``output_type="latent"`` (token ids of every scale,
``decode_latents`` turns them into images), ``set_progress_bar_config`` (a bar over the scales), ``dtype=`` /
``.to(torch.bfloat16)`` (the head keeps float32 logits) and ``save_pretrained(dir, variant="fp16")``.
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
    _callback_tensor_inputs = ["idx_Bl", "f_hat", "logits_BlV"]
    _callback_writable_tensor_inputs = ("idx_Bl",)
    _default_callback_tensor_inputs = ("idx_Bl",)
    latent_description = (
        "the token ids of every scale, one (B, L) int64 tensor with the scales in order (L = sum of pn^2 over "
        "patch_nums; split it with torch.split(latents, [pn * pn for pn in patch_nums], dim=1)); "
        "pipe.decode_latents(latents) decodes them (with more_smooth the images were made from smoothed "
        "embeddings, so decoding the ids differs from them)."
    )

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

    def card_facts(self) -> dict[str, str]:
        patch_nums = list(self.transformer.config.patch_nums)
        side = self.image_size
        return {"images": f"{side}x{side} px", "scales (token-map sides)": ", ".join(map(str, patch_nums)),
                "codebook": f"{self.transformer.config.vocab_size} codes of dimension {self.transformer.config.Cvae}"}

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels (the tokenizer's resolution)."""
        return int(self.vqvae.resolution)

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) of ``output_type="latent"`` (all scales, or the first scales of an interrupted call) ->
        images (B, 3, H, W) in [0, 1]."""
        patch_nums = list(self.transformer.config.patch_nums)
        sizes, total = [], 0
        for pn in patch_nums:
            if total >= latents.shape[1]:
                break
            sizes.append(pn * pn)
            total += pn * pn
        if latents.ndim != 2 or total != latents.shape[1]:
            raise UserError(f"latents must be token ids (B, L) of whole scales (L one of "
                            f"{', '.join(str(sum(p * p for p in patch_nums[:k + 1])) for k in range(len(patch_nums)))}"
                            f"), got shape {tuple(latents.shape)}")
        idx_Bl = list(torch.split(latents.to(self.vqvae.device, torch.long), sizes, dim=1))
        return self.vqvae.idxBl_to_img(idx_Bl).float().add(1).mul(0.5)

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
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
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
            generator: a list of one ``torch.Generator`` per image (image i draws from ``generator[i]`` only, so it
                does not depend on the batch), or one generator: seeded ``s``, image i gets the stream of seed
                ``s + i`` (exactly ``vgen generate --seed s``) and the generator is left at ``manual_seed(s + B)``
                for the next call (:mod:`vgen.samplers.seeding`). Images are ordered prompt by prompt,
                ``num_images_per_prompt`` consecutive images each. None uses the global RNG.
            output_type: ``"pil"``, ``"np"`` (B, H, W, 3) floats in [0, 1], ``"pt"`` (B, 3, H, W) in [0, 1] or
                ``"latent"``: token ids (B, L) of all scales (see :attr:`latent_description`; ``decode_latents``).
            return_dict: return :class:`ImagePipelineOutput` (else a tuple ``(images,)``).
            unconditional: ``num_images_per_prompt`` images of the null prompt / null class (no prompt, no labels).
                An empty or blank prompt is an error, so an unconditional image is never made by accident.
            callback_on_step_end: diffusers' ``callback(pipe, step_index, timestep, callback_kwargs) -> dict``, called
                after every scale (``step_index`` = scale index, ``timestep`` = its side ``pn``). ``callback_kwargs``
                holds the tensors of ``callback_on_step_end_tensor_inputs`` (default ``["idx_Bl"]``; any of
                ``idx_Bl`` (B, pn^2) token ids, ``f_hat`` (B, Cvae, h, w) features of the scales so far,
                ``logits_BlV`` (B, pn^2, V) guided float32 logits). Returning a new ``idx_Bl`` replaces the scale's
                tokens (the next scales condition on them); ``f_hat`` and ``logits_BlV`` are read-only. Setting
                ``pipe._interrupt = True`` stops after the scale: the result holds the scales made so far.
        """
        self.check_output_type(output_type)
        sampling = self.resolve_sampling(guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                                         temperature=temperature, guidance_profile=guidance_profile)
        cond, _captions = self.encode_condition(prompt, class_labels, num_images_per_prompt, unconditional)
        batch_size = cond.batch_size
        on_step_end = self.step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                         len(self.transformer.config.patch_nums))
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
            on_step_end=on_step_end,
        )

        def images():  # the summed features decoded (with more_smooth they differ from the ids' decoding)
            return self.vqvae.fhat_to_img(out.f_hat.to(self.vqvae.dtype)).float().add(1).mul(0.5)

        return self.call_output(torch.cat(out.idx_Bl, dim=1), output_type, return_dict, images=images)
