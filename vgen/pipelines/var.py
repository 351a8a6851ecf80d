"""``VARPipeline``: multi-scale VQ tokenizer + VAR transformer (+ text encoder) as a diffusers pipeline.

    from vgen.pipelines.var import VARPipeline
    pipe = VARPipeline.from_pretrained("my-var-folder")          # offline, from a local folder
    images = pipe(class_labels=[207, 360], guidance_scale=1.5, top_k=900, top_p=0.96,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

Text-conditional models take ``prompt=...`` instead of ``class_labels``. Load with ``VARPipeline.from_pretrained``
(diffusers' generic ``DiffusionPipeline.from_pretrained`` cannot find vgen's classes). The generation loop is
:func:`vgen.samplers.next_scale.generate_next_scale`; every argument here maps onto it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

# The component modules are imported here, not only where they are used: diffusers loads a saved component only from
# a module that is already imported, so `VARPipeline.from_pretrained(dir)` must work in a fresh process.
import vgen.models.text_encoder  # noqa: F401
import vgen.tokenizers.msvq  # noqa: F401
from vgen.errors import UserError, excerpt
from vgen.models.var import VAR, VARCondition
from vgen.samplers.guidance import RAMP, GuidanceSchedule, check_profile, schedule_from_profile
from vgen.samplers.next_scale import TokenSampling, generate_next_scale


def per_sample_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None, batch_size: int
) -> list[torch.Generator] | None:
    """One generator per image. A list must have ``batch_size`` entries; a single generator seeds one fresh
    generator per image (so the images depend on its seed, not on how the batch is later split); None keeps the
    global RNG."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (batch_size,), generator=generator, device=generator.device).tolist()
        return [torch.Generator(generator.device).manual_seed(s) for s in seeds]
    generators = list(generator)
    if len(generators) != batch_size:
        raise UserError(
            f"got {len(generators)} generators for {batch_size} images; pass one per image "
            "(prompts x num_images_per_prompt) or a single generator"
        )
    return generators


def check_sampling_values(sampling: dict) -> None:
    """A :class:`UserError` for a sampling setting no image can be made with (checked before anything is generated;
    a NaN guidance scale or an infinite temperature would otherwise make silent nonsense)."""
    for name in ("guidance_scale", "temperature", "top_p"):
        value = sampling[name]
        if not (isinstance(value, numbers.Real) and math.isfinite(value)):
            raise UserError(f"{name} must be a finite number, got {value!r}")
    if sampling["temperature"] <= 0:
        raise UserError(f"temperature must be > 0, got {sampling['temperature']} (use top_k=1 for greedy sampling)")
    top_k, top_p = sampling["top_k"], sampling["top_p"]
    if not isinstance(top_k, numbers.Integral) or top_k < 0 or not 0 <= top_p <= 1:
        raise UserError(f"top_k must be an integer >= 0 and top_p in [0, 1], got top_k={top_k}, top_p={top_p}")


def check_prompts(prompts: Sequence[str]) -> None:
    """Every prompt must have words: an empty or blank one would silently give an unconditional image."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not any(ch.isalnum() for ch in prompt):
            raise UserError(
                f"prompt {i + 1} ({excerpt(str(prompt))}) has no words; give a prompt, or ask for unconditional "
                "images explicitly (unconditional=True; vgen generate --unconditional)"
            )


class VARPipeline(DiffusionPipeline):
    """Components: ``vqvae`` (:class:`vgen.tokenizers.msvq.MultiScaleVQModel`), ``transformer``
    (:class:`vgen.models.var.VAR`) and, for text models, ``text_encoder`` (e.g.
    :class:`vgen.models.text_encoder.ShapesTextEncoder`; anything implementing
    :class:`vgen.models.text_encoder.TextEncoder`)."""

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _optional_components = ["text_encoder"]

    def __init__(
        self, vqvae, transformer: VAR, text_encoder=None, default_guidance_scale: float = 1.5,
        default_top_k: int = 900, default_top_p: float = 0.96, default_temperature: float = 1.0,
        default_guidance_profile: str | Sequence[float] = RAMP,
    ):
        super().__init__()
        self.register_modules(vqvae=vqvae, transformer=transformer, text_encoder=text_encoder)
        # The model's own sampling settings (saved in model_index.json): what a call uses for knobs left at None.
        # The defaults are official VAR's ImageNet settings; a trained model stores the ones it was measured with.
        self.register_to_config(
            default_guidance_scale=float(default_guidance_scale), default_top_k=int(default_top_k),
            default_top_p=float(default_top_p), default_temperature=float(default_temperature),
            default_guidance_profile=self.check_guidance_profile(default_guidance_profile),
        )

    def check_guidance_profile(self, profile: str | Sequence[float]) -> str | list[float]:
        """``profile`` as saved (``"ramp"`` or one float per scale), or a :class:`UserError` saying what is wrong."""
        patch_nums = list(self.transformer.config.patch_nums)
        try:
            return check_profile(profile, len(patch_nums))
        except ValueError as err:
            raise UserError(f"{err} (this model generates {len(patch_nums)} scales: {patch_nums})") from None

    def sampling_defaults(self) -> dict:
        """Keys ``guidance_scale, top_k, top_p, temperature, guidance_profile``: what a call uses for knobs it leaves
        at None."""
        names = ("guidance_scale", "top_k", "top_p", "temperature", "guidance_profile")
        return {name: self.config[f"default_{name}"] for name in names}

    def resolve_sampling(
        self, guidance_scale: float | None = None, top_k: int | None = None, top_p: float | None = None,
        temperature: float | None = None, guidance_profile: str | Sequence[float] | None = None,
    ) -> dict:
        """The sampling settings a call uses: the given ones, the model's saved ones for those left at None."""
        given = {"guidance_scale": guidance_scale, "top_k": top_k, "top_p": top_p, "temperature": temperature,
                 "guidance_profile": guidance_profile}
        defaults = self.sampling_defaults()
        resolved = {name: defaults[name] if value is None else value for name, value in given.items()}
        check_sampling_values(resolved)
        resolved["guidance_profile"] = self.check_guidance_profile(resolved["guidance_profile"])
        return resolved

    # -- conditions ----------------------------------------------------------------------------------------------

    @property
    def is_text_conditional(self) -> bool:
        return self.transformer.config.conditioning == "text"

    def _device(self) -> torch.device:
        return self.transformer.pos_1LC.device

    def encode_condition(
        self, prompt: str | Sequence[str] | None, class_labels: int | Sequence[int] | torch.Tensor | None,
        num_images_per_prompt: int, unconditional: bool = False,
    ) -> tuple[VARCondition, list[str]]:
        """The transformer's condition for every image and a caption per image (prompt, ``class N`` or
        ``unconditional``: the null prompt / null class, for ``num_images_per_prompt`` images)."""
        if num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        transformer = self.transformer
        if unconditional:
            if prompt is not None or class_labels is not None:
                raise UserError("unconditional images take no prompt and no class labels; give one or the other")
            cond = transformer.null_condition(num_images_per_prompt)
            return cond, ["unconditional"] * num_images_per_prompt
        if self.is_text_conditional:
            if class_labels is not None:
                raise UserError("this model is text-conditional: pass a prompt, not class labels")
            if prompt is None:
                raise UserError("this model is text-conditional: pass a prompt (e.g. 'a photo of a red circle')")
            if self.text_encoder is None:
                raise UserError("this text-conditional pipeline has no text_encoder component; pass text_encoder=")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise UserError("prompt list is empty")
            check_prompts(prompts)
            prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
            ids_BT, mask_BT = self.text_encoder.tokenize(prompts)
            pooled_BD, tokens_BTD = self.text_encoder(ids_BT.to(self._device()), mask_BT.to(self._device()))
            return transformer.text_condition(pooled_BD, tokens_BTD, mask_BT.to(self._device())), prompts
        num_classes = transformer.config.num_classes
        if prompt is not None:
            raise UserError(
                f"this model is class-conditional ({num_classes} classes): pass class labels, not a prompt"
            )
        if class_labels is None:
            raise UserError(f"this model is class-conditional: pass class_labels (0..{num_classes - 1})")
        labels = torch.as_tensor(class_labels).reshape(-1).tolist()
        bad = [lab for lab in labels if not 0 <= int(lab) < num_classes]
        if bad or not labels:
            raise UserError(
                f"class label(s) {', '.join(map(str, bad)) or '(none)'} out of range: this model has "
                f"{num_classes} classes, labels 0..{num_classes - 1}"
            )
        labels = [int(lab) for lab in labels for _ in range(num_images_per_prompt)]
        label_B = torch.tensor(labels, device=self._device())
        return transformer.class_condition(label_B), [f"class {lab}" for lab in labels]

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
        if output_type not in ("pil", "np", "pt"):
            raise UserError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        sampling = self.resolve_sampling(guidance_scale, top_k, top_p, temperature, guidance_profile)
        guidance_scale, top_k, top_p, temperature, guidance_profile = sampling.values()
        cond, _captions = self.encode_condition(prompt, class_labels, num_images_per_prompt, unconditional)
        batch_size = cond.cond_BD.shape[0]
        generators = per_sample_generators(generator, batch_size)
        out = generate_next_scale(
            self.transformer,
            self.vqvae.quantize,
            cond,
            batch_size,
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule or schedule_from_profile(guidance_profile),
            sampling=TokenSampling(top_k=top_k, top_p=top_p, temperature=temperature, more_smooth=more_smooth),
            generators=generators,
            progress=self.progress_bar,
        )
        images = self.vqvae.fhat_to_img(out.f_hat.to(self.vqvae.dtype)).float().add(1).mul(0.5).clamp(0, 1)
        if output_type == "pt":
            result = images.cpu()
        else:
            result = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
