"""What every vgen pipeline shares: declared sampling options with per-model saved defaults, turning prompts or
class labels into the generator's condition, per-image generators, diffusers-style outputs and the diffusers
conventions (step callbacks, latent output, progress bars, dtype-keeping saves with model cards, quiet loading).

A family's pipeline is ``class XPipeline(VGenPipeline)``: a :class:`diffusers.DiffusionPipeline` whose
``sampling_options`` come from its :mod:`vgen.pipelines.registry` entry. Its ``__init__`` registers its modules and
calls :meth:`VGenPipeline.register_sampling_defaults` with the values it was given, so ``save_pretrained`` writes
them into ``model_index.json`` (``default_<name>``) and ``from_pretrained`` gives them back.

**Adopting the diffusers conventions in a family** (VARPipeline is the worked example):

1. Class attributes: ``_callback_tensor_inputs`` (the step tensors a callback may read, e.g. VAR's
   ``["idx_Bl", "f_hat", "logits_BlV"]``), ``_callback_writable_tensor_inputs`` (the ones it may replace; the loop
   re-applies the step with them), ``_default_callback_tensor_inputs`` (what a callback gets when
   ``callback_on_step_end_tensor_inputs`` is left out) and ``latent_description`` (one sentence: what
   ``output_type="latent"`` returns; "" = no latent output).
2. ``__call__`` takes ``callback_on_step_end=None, callback_on_step_end_tensor_inputs=None`` and ``output_type``;
   it calls ``self.check_output_type(output_type)``, then ``hook = self.step_callback(callback_on_step_end,
   callback_on_step_end_tensor_inputs, num_steps)`` (checks the names, resets ``pipe._interrupt``) and hands
   ``hook`` to its sampling loop as ``on_step_end`` (:class:`vgen.samplers.step_end.StepEnd`: the loop calls
   ``tensors = hook(step_index, timestep, tensors)`` after each step, re-applies replaced tensors, and stops when
   ``hook.interrupted``). It passes ``progress=self.progress_bar`` to the loop (so ``set_progress_bar_config``
   works) and ``generators=self.generators_for(generator, batch_size)`` (the seed mapping below).
3. ``output_type="latent"``: end ``__call__`` with ``return self.call_output(latents, output_type, return_dict)``
   (latent output before any decoding, else the images as ``output_type``), and implement
   ``latents_to_images(latents) -> (B, 3, H, W)`` in [0, 1]; ``pipe.decode_latents(latents, output_type)`` then
   turns latent output into the images the same call would have returned.
4. Optionally ``card_facts()`` (family facts for the model card, e.g. resolution), ``output_field = "frames"``
   for families whose output holds frames and ``example_prompt`` (the card's loading example). Saving with dtypes
   and variants, model cards, quiet loading (no accelerate warning), ``dtype=`` on every diffusers version and the
   ``enable_model_cpu_offload`` message come by inheritance.

**Seeds.** ``generator`` is one ``torch.Generator`` per image (image i uses ``generator[i]``), or one generator:
seeded ``s`` it gives image i the stream of seed ``s + i`` (what ``vgen generate --seed s`` does) and is left at
``manual_seed(s + B)`` for the next call; see :mod:`vgen.samplers.seeding`. Images are ordered prompt by prompt,
``num_images_per_prompt`` consecutive images each.

**Saving.** ``save_pretrained(dir, variant=None, dtype=None)`` keeps each component's dtype (weights loaded from
fp16 files and unchanged are written as fp16 again), casts on request (``dtype=torch.float16``; ``variant="fp16"``
names the files as diffusers does and writes fp16), and writes ``README.md``, a model card from the pipeline and
``pipe.model_card`` (:class:`vgen.pipelines.model_card.ModelCardInfo`: what it is, training, scores, licence).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from vgen.errors import UserError, excerpt
from vgen.models.conditioning import Condition
from vgen.pipelines.model_card import ModelCardInfo, read_card_info, write_model_card
from vgen.pipelines.registry import PIPELINES, SamplingOption
from vgen.pipelines.step_callbacks import StepCallbackHook, step_callback_hook
from vgen.samplers.seeding import per_sample_generators

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class VGenPipeline(DiffusionPipeline):
    """Base of vgen's pipelines (components ``transformer`` and optionally ``text_encoder``; the rest is the
    family's)."""

    #: the registry entry's options (set from the registry by subclasses: ``sampling_options = options_of(...)``)
    sampling_options: ClassVar[tuple[SamplingOption, ...]] = ()
    #: the step tensors ``callback_on_step_end`` may read (diffusers' attribute), those it may replace, and what it
    #: gets when ``callback_on_step_end_tensor_inputs`` is left out
    _callback_tensor_inputs: ClassVar[list[str]] = []
    _callback_writable_tensor_inputs: ClassVar[tuple[str, ...]] = ()
    _default_callback_tensor_inputs: ClassVar[tuple[str, ...]] = ()
    #: what ``output_type="latent"`` returns, in one sentence for docs and model cards ("" = no latent output)
    latent_description: ClassVar[str] = ""
    #: the output field a call's results are in (the model card's example reads it): ``images``, or ``frames``
    output_field: ClassVar[str] = "images"
    #: a prompt the model card's loading example uses for text models (in the family's training vocabulary)
    example_prompt: ClassVar[str] = "a photo of a red circle"

    def __init_subclass__(cls, **kwargs):
        """Make every vgen pipeline class visible to diffusers' generic loader: ``DiffusionPipeline.from_pretrained``
        looks the saved ``_class_name`` up as an attribute of the ``diffusers`` module, so the class is added there
        (under its own name only; nothing of diffusers is replaced)."""
        super().__init_subclass__(**kwargs)
        import diffusers

        if getattr(diffusers, cls.__name__, cls) is cls:
            setattr(diffusers, cls.__name__, cls)

    # -- loading and saving --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, quiet and version-proof: without accelerate it loads the way diffusers falls back to
        anyway (``low_cpu_mem_usage=False``) instead of warning on every load; ``dtype=`` works on every diffusers
        version (older ones call it ``torch_dtype=``); a folder whose weights exist only as one variant
        (``*.fp16.safetensors``) loads that variant."""
        from diffusers.utils import is_accelerate_available

        if "low_cpu_mem_usage" not in kwargs and not is_accelerate_available():
            kwargs["low_cpu_mem_usage"] = False
        if "dtype" in kwargs and not _diffusers_takes_dtype():
            kwargs["torch_dtype"] = kwargs.pop("dtype")
        if kwargs.get("variant") is None:
            kwargs.pop("variant", None)
            only = only_variant(Path(pretrained_model_name_or_path))
            if only is not None:
                kwargs["variant"] = only
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        *args, dtype: torch.dtype | str | None = None, **kwargs):
        """diffusers' ``save_pretrained`` plus the weights' dtype and a model card (see the module docstring and
        :mod:`vgen.pipelines.weights_dtype`): ``dtype`` casts what is written, ``variant="fp16"`` (``"bf16"``,
        ``"fp32"``) names the files as diffusers does and writes that dtype, and without either each component keeps
        its dtype (or the narrower one it was loaded from, when nothing was changed since). Then ``README.md``."""
        from vgen.pipelines.weights_dtype import dtype_for_save, floating_dtype, kept_storage_dtype, written_as

        target = dtype_for_save(dtype, variant)
        source = _local_folder(self.name_or_path)
        with contextlib.ExitStack() as stack:
            for name, module in self.components.items():
                if not isinstance(module, torch.nn.Module):
                    continue
                wanted = target or kept_storage_dtype(module, source / name if source is not None else None)
                if wanted is not None and wanted != floating_dtype(module):
                    stack.enter_context(written_as(module, wanted))
            super().save_pretrained(save_directory, safe_serialization, variant, *args, **kwargs)
        write_model_card(self, save_directory)

    @property
    def model_card(self) -> ModelCardInfo:
        """What the model card says beyond what the pipeline shows (:class:`ModelCardInfo`); set its fields before
        ``save_pretrained``. A loaded pipeline starts from the card of its folder."""
        if getattr(self, "_model_card", None) is None:
            self._model_card = read_card_info(_local_folder(self.name_or_path))
            if self._model_card is None:
                self._model_card = ModelCardInfo()
        return self._model_card

    @model_card.setter
    def model_card(self, info: ModelCardInfo) -> None:
        self._model_card = info

    def card_facts(self) -> dict[str, str]:
        """Family facts for the model card's "What it is" (e.g. resolution); none by default."""
        return {}

    def enable_model_cpu_offload(self, *args, **kwargs):
        raise UserError(_OFFLOAD_MESSAGE.format(method="enable_model_cpu_offload"))

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        raise UserError(_OFFLOAD_MESSAGE.format(method="enable_sequential_cpu_offload"))

    @classmethod
    def option(cls, name: str) -> SamplingOption:
        for option in cls.sampling_options:
            if option.name == name:
                return option
        raise KeyError(name)

    # -- saved sampling defaults ---------------------------------------------------------------------------------

    def register_sampling_defaults(self, **values: Any) -> None:
        """Check and save the model's own defaults (``default_<name>`` in model_index.json) for the saved options;
        an option missing from ``values`` takes the family default."""
        saved = {}
        for option in self.sampling_options:
            if option.saved:
                value = values.get(option.name)
                saved[f"default_{option.name}"] = self.check_option(option, option.default if value is None else value)
        self.register_to_config(**saved)

    def check_option(self, option: SamplingOption, value: Any) -> Any:
        """``value`` for ``option`` converted and checked (subclasses add model-dependent checks)."""
        return option.check(value)

    def sampling_defaults(self) -> dict[str, Any]:
        """What a call uses for every saved option it leaves at None."""
        return {o.name: self.config.get(f"default_{o.name}", o.default) for o in self.sampling_options if o.saved}

    def resolve_sampling(self, **given: Any) -> dict[str, Any]:
        """The given settings (checked) and the model's saved ones for those left at None; only saved options.
        A name the family does not declare is a :class:`UserError`."""
        names = {o.name for o in self.sampling_options}
        unknown = [name for name in given if name not in names]
        if unknown:
            raise UserError(
                f"{type(self).__name__} has no sampling option {', '.join(unknown)}; its options: {', '.join(names)}"
            )
        defaults = self.sampling_defaults()
        resolved = {}
        for option in self.sampling_options:
            if option.saved:
                value = given.get(option.name)
                resolved[option.name] = self.check_option(option, defaults[option.name] if value is None else value)
        return resolved

    # -- conditions ----------------------------------------------------------------------------------------------

    @property
    def is_text_conditional(self) -> bool:
        return self.transformer.is_text_conditional

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_classes)

    def _execution_device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def encode_condition(
        self, prompt: str | Sequence[str] | None, class_labels: int | Sequence[int] | torch.Tensor | None,
        num_images_per_prompt: int, unconditional: bool = False,
    ) -> tuple[Condition, list[str]]:
        """The transformer's condition for every image and a caption per image (prompt, ``class N`` or
        ``unconditional``: the null prompt / null class, for ``num_images_per_prompt`` images); images are ordered
        prompt by prompt (``num_images_per_prompt`` consecutive images each)."""
        if num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        device = self._execution_device()
        if unconditional:
            if prompt is not None or class_labels is not None:
                raise UserError("unconditional images take no prompt and no class labels; give one or the other")
            return self.transformer.null_condition(num_images_per_prompt), ["unconditional"] * num_images_per_prompt
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
            pooled_BD, tokens_BTD = self.text_encoder(ids_BT.to(device), mask_BT.to(device))
            return self.transformer.text_condition(pooled_BD, tokens_BTD, mask_BT.to(device)), prompts
        num_classes = self.num_classes
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
        label_B = torch.tensor(labels, device=device)
        return self.transformer.class_condition(label_B), [f"class {lab}" for lab in labels]

    # -- generators and outputs ------------------------------------------------------------------------------

    @staticmethod
    def generators_for(generator, batch_size: int) -> list[torch.Generator] | None:
        """One generator per image (see :func:`vgen.samplers.seeding.per_sample_generators`)."""
        return per_sample_generators(generator, batch_size)

    def check_output_type(self, output_type: str) -> None:
        """``output_type`` must be ``pil``, ``np``, ``pt`` or, for families with latent output, ``latent``."""
        known = OUTPUT_TYPES if self.latent_description else tuple(t for t in OUTPUT_TYPES if t != "latent")
        if output_type not in known:
            raise UserError(f"output_type must be one of {', '.join(known)}, got {output_type!r}")

    # -- step callbacks, progress and interruption (diffusers' conventions) ---------------------------------------

    def step_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs: Sequence[str] | None,
                      num_steps: int) -> StepCallbackHook | None:
        """The sampling loop's ``on_step_end`` hook for the user's ``callback_on_step_end`` (None without one):
        checks ``callback_on_step_end_tensor_inputs`` against ``_callback_tensor_inputs``, sets
        :attr:`num_timesteps` and clears :attr:`interrupt` (see :mod:`vgen.pipelines.step_callbacks`)."""
        self._num_timesteps = int(num_steps)
        self._interrupt = False
        return step_callback_hook(self, callback_on_step_end, callback_on_step_end_tensor_inputs)

    @property
    def num_timesteps(self) -> int:
        """Generation steps of the last call (diffusers callbacks read it, e.g. to act at a share of the steps)."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def interrupt(self) -> bool:
        """True once a callback set ``pipe._interrupt = True``: the call stops after the current step."""
        return bool(getattr(self, "_interrupt", False))

    # -- latent output ----------------------------------------------------------------------------------------

    def latent_output(self, latents, return_dict: bool):
        """``output_type="latent"``: ``latents`` as the output's ``images`` (see :attr:`latent_description`)."""
        return ImagePipelineOutput(images=latents) if return_dict else (latents,)

    def latents_to_images(self, latents) -> torch.Tensor:
        """Latent output -> images (B, 3, H, W) in [0, 1]; families with latent output implement it."""
        raise UserError(f"{type(self).__name__} has no latent output")

    def call_output(self, latents, output_type: str, return_dict: bool, *, return_latents: bool = False,
                    images: Callable[[], torch.Tensor] | None = None):
        """The end of an image pipeline's ``__call__``, once the loop has made ``latents`` (what
        ``output_type="latent"`` returns): the bare ``latents`` with ``return_latents``, the latent output with
        ``output_type="latent"``, else the images (B, 3, H, W) in [0, 1] as ``output_type``, made by ``images()``
        when the family does not decode its latents (VAR decodes its summed features) and by
        :meth:`latents_to_images` otherwise; nothing is decoded for latent output."""
        if return_latents:
            return latents
        if output_type == "latent":
            return self.latent_output(latents, return_dict)
        made_B3HW = images() if images is not None else self.latents_to_images(latents)
        return self.images_output(made_B3HW, output_type, return_dict)

    @torch.no_grad()
    def decode_latents(self, latents, output_type: str = "pil", return_dict: bool = True):
        """The images of a call's ``output_type="latent"`` result, as ``output_type``."""
        if output_type == "latent":
            raise UserError("decode_latents turns latents into images: give output_type pil, np or pt")
        self.check_output_type(output_type)
        return self.images_output(self.latents_to_images(latents), output_type, return_dict)

    def images_output(self, images_B3HW: torch.Tensor, output_type: str, return_dict: bool):
        """Images (B, 3, H, W) in [0, 1] as ``output_type`` (PIL list, numpy (B, H, W, 3) float32 or a CPU tensor),
        wrapped in :class:`ImagePipelineOutput` unless ``return_dict`` is False."""
        images_B3HW = images_B3HW.float().clamp(0, 1)
        if output_type == "pt":
            result = images_B3HW.cpu()
        else:
            result = images_B3HW.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        return ImagePipelineOutput(images=result) if return_dict else (result,)


_OFFLOAD_MESSAGE = (
    "{method} is not supported by vgen pipelines yet: their sampling loops call the models' step methods "
    "(prefill, logits per step), which accelerate's offload hooks do not see; move the pipeline with "
    "pipe.to(device) instead (half precision, pipe.to(torch.bfloat16), halves its memory)"
)


def _local_folder(name_or_path) -> Path | None:
    """The folder a pipeline was loaded from (diffusers' ``_name_or_path``), when it is a local folder."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        return None
    path = Path(name_or_path)
    return path if path.is_dir() else None


def _diffusers_takes_dtype() -> bool:
    """diffusers >= 0.36 names the load dtype ``dtype`` (``torch_dtype`` is deprecated); older ones only
    ``torch_dtype``."""
    import diffusers.utils.deprecation_utils as deprecation

    return hasattr(deprecation, "_resolve_dtype")


def only_variant(folder: Path) -> str | None:
    """The variant name when every component folder of a saved pipeline holds weights of that one variant only
    (``diffusion_pytorch_model.<variant>.safetensors``) and none without one; None otherwise."""
    from vgen.pipelines.folder_check import component_weights, listed_components, read_json_object

    index_path = folder / "model_index.json"
    if not index_path.is_file():
        return None
    try:
        components = listed_components(read_json_object(index_path, "the pipeline index"))
    except UserError:
        return None
    variants = set()
    for name, spec in components.items():
        if spec is None or not (folder / name).is_dir():
            continue
        found = component_weights(folder / name)
        if None in found or len(found) != 1:
            return None
        variants |= set(found)
    return variants.pop() if len(variants) == 1 else None


def check_prompts(prompts: Sequence[str]) -> None:
    """Every prompt must have words: an empty or blank one would silently give an unconditional image."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not any(ch.isalnum() for ch in prompt):
            raise UserError(
                f"prompt {i + 1} ({excerpt(str(prompt))}) has no words; give a prompt, or ask for unconditional "
                "images explicitly (unconditional=True; vgen generate --unconditional)"
            )


def options_of(class_name: str) -> tuple[SamplingOption, ...]:
    """The sampling options declared for ``class_name`` in the registry."""
    return PIPELINES[class_name].options
