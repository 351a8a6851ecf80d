"""What every vgen pipeline shares: declared sampling options with per-model saved defaults, turning prompts or
class labels into the generator's condition, per-image generators and diffusers-style outputs.

A family's pipeline is ``class XPipeline(VGenPipeline)``: a :class:`diffusers.DiffusionPipeline` whose
``sampling_options`` come from its :mod:`vgen.pipelines.registry` entry. Its ``__init__`` registers its modules and
calls :meth:`VGenPipeline.register_sampling_defaults` with the values it was given, so ``save_pretrained`` writes
them into ``model_index.json`` (``default_<name>``) and ``from_pretrained`` gives them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from vgen.errors import UserError, excerpt
from vgen.models.conditioning import Condition
from vgen.pipelines.registry import PIPELINES, SamplingOption
from vgen.samplers.seeding import per_sample_generators

OUTPUT_TYPES = ("pil", "np", "pt")


class VGenPipeline(DiffusionPipeline):
    """Base of vgen's pipelines (components ``transformer`` and optionally ``text_encoder``; the rest is the
    family's)."""

    #: the registry entry's options (set from the registry by subclasses: ``sampling_options = options_of(...)``)
    sampling_options: ClassVar[tuple[SamplingOption, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        """Make every vgen pipeline class visible to diffusers' generic loader: ``DiffusionPipeline.from_pretrained``
        looks the saved ``_class_name`` up as an attribute of the ``diffusers`` module, so the class is added there
        (under its own name only; nothing of diffusers is replaced)."""
        super().__init_subclass__(**kwargs)
        import diffusers

        if getattr(diffusers, cls.__name__, cls) is cls:
            setattr(diffusers, cls.__name__, cls)

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

    @staticmethod
    def check_output_type(output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")

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
