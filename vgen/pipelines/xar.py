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

diffusers conventions (from :class:`vgen.pipelines.base.VGenPipeline`): one step per unit (cell) for
``callback_on_step_end`` (tensors ``x_clean``, the cell's clean tokens, replaceable, and ``velocity``, read-only;
see :meth:`XARPipeline.__call__`), ``pipe._interrupt = True`` (the cells not made are NaN in the latent and black in
the images), ``output_type="latent"`` (the scaled latents (B, C, h, w) the autoencoder decodes; ``decode_latents``
turns them into the images), ``unconditional=True`` and ``set_progress_bar_config`` (a bar over the cells).

``speculative="cspd"`` with a ``drafter`` (a smaller xAR pipeline folder with the same units, i.e. entity, grid and
patch, on the same autoencoder) runs continuous speculative decoding (:func:`vgen.samplers.cspd.generate_cspd`) on
the same SDE and CFG ramp, with ``gamma``, ``prefill_fraction`` and ``rejection_rounds``; its reference is this
pipeline's own (target-only) sampling, and its counts are in ``pipe.speculative_stats``
(:class:`~vgen.samplers.cspd.CSpDStats`). The call and the drafter checks are shared with FlowAR
(:mod:`vgen.pipelines.flow_speculative`).
"""

from __future__ import annotations

import torch

# The component modules are imported here, not only where they are used: diffusers loads a saved component only from
# a module that is already imported, so `XARPipeline.from_pretrained(dir)` must work in a fresh process.
import vgen.models.text_encoder  # noqa: F401
import vgen.tokenizers.kl_autoencoder  # noqa: F401
from vgen.errors import UserError
from vgen.models.xar import XAR
from vgen.pipelines.base import VGenPipeline, options_of
from vgen.pipelines.flow_speculative import FlowSpeculativeMixin
from vgen.pipelines.flowar import check_continuous_autoencoder
from vgen.samplers.guidance import WeightRampCFG


def units_key(model: XAR) -> tuple:
    """What fixes an xAR's AR units: entity kind and size, token grid, patch size and token channels."""
    layout = model.layout
    return (layout.kind, layout.size, layout.grid, model.config.patch_size, model.token_channels)


def describe_units(model: XAR) -> str:
    """An xAR's units in words, e.g. ``4 units (cell 2) of 4 tokens x 4 channels on a 4x4 grid, patch 1``."""
    layout = model.layout
    sizes = sorted(set(layout.unit_sizes))
    tokens = "/".join(map(str, sizes)) + (" token" if sizes == [1] else " tokens")
    return (f"{layout.num_units} units ({layout.kind} {layout.size}) of {tokens} x {model.token_channels} channels "
            f"on a {layout.grid}x{layout.grid} grid, patch {model.config.patch_size}")


class XARPipeline(FlowSpeculativeMixin, VGenPipeline):
    """Components: ``vae`` (:class:`vgen.tokenizers.kl_autoencoder.AutoencoderKL`, latents scaled by its
    ``scale_factor``), ``transformer`` (:class:`vgen.models.xar.XAR`) and, for text models, ``text_encoder``
    (e.g. :class:`vgen.models.text_encoder.ShapesTextEncoder`)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder"]
    sampling_options = options_of("XARPipeline")
    # what CSpD's messages and drafter checks call this family (vgen.pipelines.flow_speculative)
    flow_family = "xAR"
    flow_family_article = "an"
    unit_name = "units"
    transformer_class = XAR
    _callback_tensor_inputs = ["x_clean", "velocity"]
    _callback_writable_tensor_inputs = ("x_clean",)
    _default_callback_tensor_inputs = ("x_clean",)
    latent_description = (
        "the latents (B, C, h, w) float32 the autoencoder decodes, already multiplied by its scale_factor (an "
        "interrupted call leaves NaN at the latent pixels of the cells it did not make); pipe.decode_latents(latents) "
        "decodes them (the cells not made are decoded as zeros and their pixels set to black)."
    )

    def __init__(self, vae, transformer: XAR, text_encoder=None, default_guidance_scale: float = 2.7,
                 default_num_steps: int = 40, default_speculative: str = "none", default_drafter: str = "",
                 default_gamma: int = 4, default_prefill_fraction: float = 0.05, default_rejection_rounds: int = 32,
                 default_verification: str = "unit"):
        super().__init__()
        check_continuous_autoencoder(vae, transformer, family="xAR")
        self.register_modules(vae=vae, transformer=transformer, text_encoder=text_encoder)
        # The model's own sampling settings (saved in model_index.json): what a call uses for knobs left at None.
        self.register_sampling_defaults(guidance_scale=default_guidance_scale, num_steps=default_num_steps,
                                        speculative=default_speculative, drafter=default_drafter,
                                        gamma=default_gamma, prefill_fraction=default_prefill_fraction,
                                        rejection_rounds=default_rejection_rounds,
                                        verification=default_verification)

    def units_mismatch(self, theirs: XAR, path) -> str | None:
        """Why the drafter xAR ``theirs`` does not generate this model's units (the same entity over the same
        token grid, hence the same tokens per unit in the same order, and the same token channels), or None."""
        mine = self.transformer
        if units_key(theirs) != units_key(mine) or not torch.equal(theirs.layout.order_L, mine.layout.order_L):
            return (f"the drafter {path} generates {describe_units(theirs)}, this model {describe_units(mine)}; a "
                    "drafter must share the units (entity, grid, patch) and the autoencoder")
        return None

    @property
    def resolution(self) -> int:
        """Side of the images this pipeline makes: the latent side times the autoencoder's downsampling."""
        return self.transformer.latent_side * self.vae.downsample

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) of ``output_type="latent"`` -> images (B, 3, H, W) in [0, 1]. The latent pixels an
        interrupted call did not make (NaN) are decoded as zeros (the latent prior's mean) and their pixels set to
        black (the pixels next to them see those zeros through the decoder, so a partial image differs slightly from
        the finished one there)."""
        if not latents.is_floating_point():
            raise UserError(f"latents must be the float latents (B, C, h, w) of output_type='latent', got "
                            f"{latents.dtype}")
        self.transformer.check_latents(latents)
        latents = latents.to(self.vae.device, torch.float32)
        made_B1hw = ~latents.isnan().any(dim=1, keepdim=True)
        complete = bool(made_B1hw.all())
        if not complete:
            latents = latents.where(made_B1hw, 0.0)
        images = self.vae.decode_latents(latents.to(self.vae.dtype)).float().add(1).mul(0.5)
        if complete:
            return images
        f = images.shape[-1] // latents.shape[-1]
        return images * made_B1hw.repeat_interleave(f, 2).repeat_interleave(f, 3)

    def partial_units(self, units: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
        """The units an interrupted call made, followed by NaN units (B, n_u, Ct) for those it did not make."""
        missing = self.transformer.unit_shapes[len(units):]
        like = units[-1]
        return units + [torch.full((batch_size, *shape), float("nan"), dtype=like.dtype, device=like.device)
                        for shape in missing]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        num_steps: int | None = None,
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
            guidance_scale: CFG weight at the last unit (official ``cfg``; the first unit is unguided, the ones
                between get the linear ramp; 1 = off).
            num_steps: points of ``linspace(1, 0.04, num_steps)``: ``num_steps - 1`` SDE steps and a final
                deterministic one per unit (official 40 for xAR-B, 50 for L and H).
            speculative: ``"none"`` or ``"cspd"`` (continuous speculative decoding on the same SDE; needs
                ``drafter``).
            drafter: a smaller xAR pipeline folder with the same units (entity, grid, patch) on the same autoencoder
                (for cspd).
            gamma, prefill_fraction, rejection_rounds: CSpD's units drafted per round, the fraction of units the
                target generates first, and the proposals per rejected unit (:class:`vgen.samplers.cspd.
                CSpDSettings`).
            verification: CSpD's ``"unit"`` (each drafted cell verified against the committed ones, none
                discarded) or ``"window"`` (the drafted cells verified together, one target pass per SDE step, kept
                up to the batch's first rejection: fewer, larger target passes).
                Every knob left at None takes the model's saved setting (:meth:`sampling_defaults`).
            generator: one ``torch.Generator`` per image (images independent of batch size) or a single one (see
                :mod:`vgen.pipelines.base`: seeded ``s``, image i gets the stream of seed ``s + i``).
            output_type: ``"pil"``, ``"np"`` (B, H, W, 3) floats in [0, 1], ``"pt"`` (B, 3, H, W) in [0, 1] or
                ``"latent"``: the scaled latents (B, C, h, w) before decoding (see :attr:`latent_description`;
                ``decode_latents``).
            return_dict: return :class:`ImagePipelineOutput` (else a tuple ``(images,)``).
            return_latents: return the generated latents (B, C, h, w) instead of images (a bare tensor; the same as
                ``output_type="latent"`` without the output wrapper).
            unconditional: ``num_images_per_prompt`` images of the null prompt / null class (no prompt, no labels).
            callback_on_step_end: diffusers' ``callback(pipe, step_index, timestep, callback_kwargs) -> dict``, called
                after every unit (``step_index`` = ``timestep`` = the unit's index in generation order; official xAR:
                a cell). A step is a unit, not one SDE step inside it: a unit is what xAR generates autoregressively
                (the next units condition on its clean tokens, so replacing them steers the image) and its SDE steps
                are the inner solver of that one prediction. ``callback_kwargs`` holds the tensors of
                ``callback_on_step_end_tensor_inputs`` (default ``["x_clean"]``; any of ``x_clean`` (B, n_u, C p^2)
                float32, the unit's clean tokens in the entity's order (``pipe.transformer.layout``; a cell's tokens
                in raster order inside the cell), and ``velocity`` (same shape), the guided velocity of the unit's
                last step). Returning a new ``x_clean`` replaces the unit (it is what the later units condition on and
                what is decoded); ``velocity`` is read-only. Setting ``pipe._interrupt = True`` stops after the
                unit: the latent holds the units made so far and NaN at the latent pixels of the others, whose
                pixels are black in the images (see :meth:`latents_to_images`).
        """
        self.check_output_type(output_type)
        sampling = self.resolve_sampling(guidance_scale=guidance_scale, num_steps=num_steps, speculative=speculative,
                                         drafter=drafter, gamma=gamma, prefill_fraction=prefill_fraction,
                                         rejection_rounds=rejection_rounds, verification=verification)
        cond, _captions = self.encode_condition(prompt, class_labels, num_images_per_prompt, unconditional)
        batch_size = cond.batch_size
        # xAR's CFG: the ramp over the units, at every step (no flow-time interval); the same for CSpD
        common = dict(guidance_scale=sampling["guidance_scale"], guidance_schedule=WeightRampCFG(),
                      generators=self.generators_for(generator, batch_size))
        condition_inputs = dict(prompt=prompt, class_labels=class_labels, num_images_per_prompt=num_images_per_prompt,
                                unconditional=unconditional)
        out = self.flow_units(sampling, drafter, condition_inputs, cond, batch_size, callback_on_step_end,
                              callback_on_step_end_tensor_inputs, **common)
        latents = self.transformer.units_to_latents(self.partial_units(out.units, batch_size))
        return self.call_output(latents, output_type, return_dict, return_latents=return_latents)
