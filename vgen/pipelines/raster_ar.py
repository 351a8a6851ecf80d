"""``RasterARPipeline``: single-scale VQ tokenizer + raster next-token transformer (LlamaGen GPT, any Token-Shuffle
window) (+ text encoder) as a diffusers pipeline.

    from vgen.pipelines.raster_ar import RasterARPipeline
    pipe = RasterARPipeline.from_pretrained("llamagen-b-folder")      # offline, from a local folder
    images = pipe(class_labels=[207, 360], guidance_scale=2.0, top_k=0, top_p=1.0,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

Text-conditional models take ``prompt=...`` instead of ``class_labels``. ``guidance_scale`` follows diffusers and
LlamaGen (``uncond + w * (cond - uncond)``, 1 = off); ``guidance_schedule="ramp"`` moves ``w`` from 1 at the first
step to ``guidance_scale`` at the last (Token-Shuffle's schedule over the generated tokens); ``cfg_interval`` is
LlamaGen's (guide only the first ``cfg_interval + 2`` steps; -1 = all). A step is one code, or one ``s x s`` window
with Token-Shuffle. The generation loop is :func:`vgen.samplers.next_token.generate_next_token`; every argument here
maps onto it.

diffusers conventions (from :class:`vgen.pipelines.base.VGenPipeline`): one step per unit for
``callback_on_step_end`` (a code, or a Token-Shuffle window; ``step_index`` = ``timestep`` = the unit's index in
generation order; tensors ``unit_Bk`` (B, k) code ids, replaceable, and ``logits_BkV`` (B, k, V) guided float32
logits, read-only), ``pipe._interrupt = True`` (the codes not made are -1 and their pixels black),
``output_type="latent"`` (the code ids (B, L) in raster order; ``decode_latents`` turns them into the images) and
``set_progress_bar_config`` (a bar over the units).
"""

from __future__ import annotations

import torch

# The component modules are imported here, not only where they are used: diffusers loads a saved component only from
# a module that is already imported, so `RasterARPipeline.from_pretrained(dir)` must work in a fresh process.
import vgen.models.text_encoder  # noqa: F401
import vgen.tokenizers.single_scale_vq  # noqa: F401
from vgen.errors import UserError
from vgen.models.raster_ar import RasterAR
from vgen.pipelines.base import VGenPipeline, options_of
from vgen.pipelines.speculative import SpeculativeNextTokenMixin
from vgen.samplers.guidance import ConstantCFG, GuidanceSchedule, WeightRampCFG, llamagen_cfg_interval
from vgen.samplers.next_scale import TokenSampling
from vgen.samplers.next_token import NOT_MADE, generate_next_token

#: ``guidance_schedule`` names -> the schedule of the CFG weight over the steps
GUIDANCE_SCHEDULES = {"constant": ConstantCFG, "ramp": WeightRampCFG}


def guidance_schedule_named(name: str, cfg_interval: int = -1) -> GuidanceSchedule:
    """``"constant"`` / ``"ramp"``, guided only on LlamaGen's ``cfg_interval`` (-1 = every step)."""
    if name not in GUIDANCE_SCHEDULES:
        raise UserError(f"unknown guidance schedule {name!r}; choose one of {', '.join(GUIDANCE_SCHEDULES)}")
    return llamagen_cfg_interval(GUIDANCE_SCHEDULES[name](), cfg_interval)


def check_components(vqvae, transformer: RasterAR) -> None:
    """One :class:`UserError` line when the tokenizer and the transformer do not fit each other."""
    if vqvae.vocab_size != transformer.config.vocab_size:
        raise UserError(
            f"the tokenizer has {vqvae.vocab_size} codes but the transformer predicts {transformer.config.vocab_size}; "
            "pair the transformer with the tokenizer it was trained on"
        )


class RasterARPipeline(SpeculativeNextTokenMixin, VGenPipeline):
    """Components: ``vqvae`` (:class:`vgen.tokenizers.single_scale_vq.SingleScaleVQModel`), ``transformer``
    (:class:`vgen.models.raster_ar.RasterAR`) and, for text models, ``text_encoder`` (e.g.
    :class:`vgen.models.text_encoder.ShapesTextEncoder`; anything implementing
    :class:`vgen.models.text_encoder.TextEncoder`). Images are ``grid_size * vqvae.downsample`` pixels square."""

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _optional_components = ["text_encoder"]
    sampling_options = options_of("RasterARPipeline")
    _callback_tensor_inputs = ["unit_Bk", "logits_BkV"]
    _callback_writable_tensor_inputs = ("unit_Bk",)
    _default_callback_tensor_inputs = ("unit_Bk",)
    latent_description = (
        "the code ids (B, L) int64 in raster order (L = grid_size^2; an interrupted call leaves -1 at the codes it "
        "did not make); pipe.decode_latents(latents) decodes them (codes of -1 give black pixels)."
    )

    def __init__(
        self, vqvae, transformer: RasterAR, text_encoder=None, default_guidance_scale: float = 2.0,
        default_top_k: int = 0, default_top_p: float = 1.0, default_temperature: float = 1.0,
        default_guidance_schedule: str = "constant", default_cfg_interval: int = -1,
        default_speculative: str = "none", default_drafter: str = "", default_gamma: int = 4,
        default_window: int = 16, default_pool_k: int = 8, default_delta: float = 0.2, default_tau: float = 0.1,
        default_radius: int = 1, default_draft_rows: int = 1, default_island_lag: int = 0,
        default_upsampler: str = "resize",
    ):
        super().__init__()
        check_components(vqvae, transformer)
        self.register_modules(vqvae=vqvae, transformer=transformer, text_encoder=text_encoder)
        # The model's own sampling settings (saved in model_index.json): what a call uses for knobs left at None.
        # The defaults are LlamaGen's ImageNet settings; a trained model stores the ones it was measured with.
        self.register_sampling_defaults(
            guidance_scale=default_guidance_scale, top_k=default_top_k, top_p=default_top_p,
            temperature=default_temperature, guidance_schedule=default_guidance_schedule,
            cfg_interval=default_cfg_interval, speculative=default_speculative, drafter=default_drafter,
            gamma=default_gamma, window=default_window, pool_k=default_pool_k, delta=default_delta, tau=default_tau,
            radius=default_radius, draft_rows=default_draft_rows, island_lag=default_island_lag,
            upsampler=default_upsampler,
        )

    @property
    def resolution(self) -> int:
        """Side of the generated images in pixels."""
        return int(self.transformer.config.grid_size) * int(self.vqvae.downsample)

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Code ids (B, L) in raster order of ``output_type="latent"`` -> images (B, 3, H, W) in [0, 1]. The codes an
        interrupted call did not make (-1) are decoded as code 0 and their pixels set to black (the pixels next to
        them see code 0 through the decoder, so a partial image differs slightly from the finished one there)."""
        grid = int(self.transformer.config.grid_size)
        if latents.ndim != 2 or latents.shape[1] != grid * grid or latents.is_floating_point():
            raise UserError(f"latents must be code ids (B, {grid * grid}) in raster order (a {grid}x{grid} grid), got "
                            f"{tuple(latents.shape)} {latents.dtype}")
        codes_BL = latents.to(self.vqvae.device, torch.long)
        made_BL = codes_BL != NOT_MADE
        images = self.vqvae.decode_code(codes_BL.where(made_BL, 0), (grid, grid)).float().add(1).mul(0.5)
        if bool(made_BL.all()):
            return images
        f = images.shape[-1] // grid
        made_B1HW = made_BL.view(-1, 1, grid, grid).repeat_interleave(f, 2).repeat_interleave(f, 3)
        return images * made_B1HW

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
        guidance_schedule: str | GuidanceSchedule | None = None,
        cfg_interval: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        unconditional: bool = False,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **speculative,
    ):
        """Generate images.

        Args:
            prompt: text prompt(s) for text-conditional models.
            class_labels: class id(s) for class-conditional models (ImageNet ids for official checkpoints).
            num_images_per_prompt: images per prompt / label.
            guidance_scale: CFG weight ``w``: ``uncond + w * (cond - uncond)`` (LlamaGen's ``cfg_scale``; 1 = off).
            top_k, top_p, temperature: code filtering and sampling (top_k 0 and top_p 1 are off; top_k=1 is greedy).
                Every sampling knob left at None takes the model's saved setting (:meth:`sampling_defaults`).
            guidance_schedule: ``"constant"`` (LlamaGen) or ``"ramp"`` (``w`` from 1 at the first step to
                ``guidance_scale`` at the last: Token-Shuffle's schedule), or any
                :class:`vgen.samplers.guidance.GuidanceSchedule` object (then ``cfg_interval`` is not applied).
            cfg_interval: LlamaGen's: guide only the first ``cfg_interval + 2`` steps (-1 = every step); the
                unconditional half of the batch is dropped once guidance is over.
            generator: one ``torch.Generator`` per image (images independent of batch size) or a single one.
            output_type: ``"pil"``, ``"np"`` (B, H, W, 3) floats in [0, 1], ``"pt"`` (B, 3, H, W) in [0, 1] or
                ``"latent"``: the code ids (B, L) in raster order (see :attr:`latent_description`;
                ``decode_latents``).
            return_dict: return :class:`ImagePipelineOutput` (else a tuple ``(images,)``).
            unconditional: ``num_images_per_prompt`` images of the null prompt / null class (no prompt, no labels).
            callback_on_step_end: diffusers' ``callback(pipe, step_index, timestep, callback_kwargs) -> dict``, called
                after every step: one code, or one ``s x s`` Token-Shuffle window (``step_index`` = ``timestep`` = the
                unit's index, windows in raster order). ``callback_kwargs`` holds the tensors of
                ``callback_on_step_end_tensor_inputs`` (default ``["unit_Bk"]``; any of ``unit_Bk`` (B, k) the
                unit's code ids, raster order inside a window, and ``logits_BkV`` (B, k, V) guided float32 logits
                before filtering). Returning a new ``unit_Bk`` replaces the unit's codes (the later steps condition
                on them, as if they had been sampled); ``logits_BkV`` is read-only. Setting ``pipe._interrupt = True``
                stops after the step: the codes not made are -1 in ``output_type="latent"`` and black in images.
                Not with speculative decoding (its steps are drafted and verified blocks).
            **speculative: speculative decoding, ``speculative="sjd" | "exact" | "lantern" | "mulo-sd"`` and its
                knobs (``drafter``, ``gamma``, ``window``, ``pool_k``, ``delta``, ``tau``, ``radius``, ``draft_rows``,
                ``island_lag``, ``upsampler``; :mod:`vgen.pipelines.speculative`); None or left out = the saved setting.
        """
        self.check_output_type(output_type)
        schedule_object = guidance_schedule if not isinstance(guidance_schedule, (str, type(None))) else None
        sampling = self.resolve_sampling(
            guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, temperature=temperature,
            guidance_schedule=None if schedule_object is not None else guidance_schedule, cfg_interval=cfg_interval,
            **speculative,
        )
        schedule = schedule_object or guidance_schedule_named(sampling["guidance_schedule"], sampling["cfg_interval"])
        cond, _captions = self.encode_condition(prompt, class_labels, num_images_per_prompt, unconditional)
        batch_size = cond.batch_size
        token_sampling = TokenSampling(top_k=sampling["top_k"], top_p=sampling["top_p"],
                                       temperature=sampling["temperature"])
        generators = self.generators_for(generator, batch_size)
        self.speculative_stats = None
        on_step_end = self.step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                         int(self.transformer.sequence_length))
        if sampling["speculative"] != "none":
            if on_step_end is not None:
                raise UserError("callback_on_step_end works with plain next-token sampling; speculative decoding "
                                f"({sampling['speculative']}) drafts and verifies blocks of codes: leave one out")
            condition_inputs = dict(prompt=prompt, class_labels=class_labels,
                                    num_images_per_prompt=num_images_per_prompt, unconditional=unconditional)
            out = self.speculative_tokens(sampling, {k: v for k, v in speculative.items() if v is not None}, cond,
                                          batch_size, condition_inputs, sampling["guidance_scale"], schedule,
                                          token_sampling, generators)
            self.speculative_stats = out.stats
        else:
            out = generate_next_token(self.transformer, cond, batch_size, guidance_scale=sampling["guidance_scale"],
                                      guidance_schedule=schedule, sampling=token_sampling, generators=generators,
                                      progress=self.progress_bar, on_step_end=on_step_end)
        return self.call_output(out.tokens_BL, output_type, return_dict)
