"""vgen's xAR sampler against the official xAR code in one process (``vgen bench sample --official PATH`` on an xAR
model; the shared parts are :mod:`vgen.eval.official_compare`).

The user points ``--official`` at a checkout of the official xAR repository (OliverRensu/xAR; the project never
vendors it). The official ``models.xar.xAR`` class is built from that checkout with the configuration of the vgen
model being measured and loaded with *its* weights (vgen keeps the official key names; the official class computes
its ``mask`` and RoPE tables itself), so both sides run the same model:

* ``--model DIR``: a class-conditional xAR pipeline folder (e.g. ``vgen convert xar-official ...`` of the released
  ``xAR-B.pth``);
* ``--random-xar SIZE``: random weights (vgen's initialisation, seed ``--seed``) of one of :data:`BENCH_XAR_SIZES`:
  the released ``xar-b`` / ``xar-l`` / ``xar-h``, or ``xar-tiny`` (2 + 2 blocks of width 192, 3 heads of 64 as in
  xAR-B) for CPUs; all on the official layout, a 16 x 16 grid of 16-channel tokens cut into 4 cells of 8 x 8, and
  1000 classes.

Both sides sample with the official ``sample_tokens`` settings: per cell ``num_steps - 1`` Euler-Maruyama steps on
``linspace(1, 0.04, num_steps)`` and a deterministic last step to 0, CFG at every step with xAR's ramp over the cells
(1 at the first, ``--cfg`` at the last); ``--num-steps`` and ``--cfg`` default to the official settings of the size
(40 and 2.7 for xAR-B). Decoding is excluded on both sides: the official ``sample_tokens`` returns the (scaled)
latents and vgen's call runs with ``output_type="latent"``; the KL-16 decoder is the same on both and is not xAR's
sampler. Both run in fp32, or both under ``--autocast``.

Same latents from the same noise: before timing, at the smallest batch size, the official ``sample_tokens`` runs
seeded (``torch.manual_seed(--seed)``) while its noise is recorded (each cell's initial noise at the official
``euler_maruyama_sampler`` and every step's eps at ``torch.randn_like``), and vgen's unit loop
(:func:`vgen.samplers.flow_units.generate_flow_units` with the pipeline's own time grid, integrator and CFG ramp: the
loop its ``__call__`` runs) replays that noise; the JSON reports the largest latent difference against
:data:`LATENT_TOLERANCE`. In the timed calls the official code draws from the global RNG and vgen from one generator
per image, as each does when used.

On a machine without CUDA the official code's ``torch.Tensor.cuda`` calls (in ``models/xar.py`` and
``models/sampler.py``) are made no-ops for the duration of each official call only, and restored after it; its
``from flash_attn import flash_attn_func`` (imported, never called) is given a stand-in module while the checkout
imports when flash-attn is not installed. No file of the checkout is changed.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext, redirect_stdout
from functools import partial

#: the files of the official xAR repository this module imports (directly or through ``models/xar.py``)
OFFICIAL_FILES = ("models/xar.py", "models/sampler.py", "models/rope.py", "models/flow.py")
#: what the official ``xAR`` class hard-codes (16 latent channels, a 16 x 16 grid in 2 x 2 cells of 64 tokens,
#: 1001 class rows, RMSNorm eps 1e-6) in vgen's config names
OFFICIAL_XAR_FIXED = {"latent_channels": 16, "patch_size": 1, "grid_size": 16, "entity": "cell", "entity_size": 8,
                      "num_classes": 1000, "norm_eps": 1e-6}
#: largest |official - vgen| latent from the same noise accepted as the same sample (fp32; latents reach about 5):
#: measured 4.1e-6 on xar-tiny (8 steps, B = 1; README "Speed against the official code"), 7.2e-7 on the parity fixture
LATENT_TOLERANCE = 1e-4


def bench_sizes() -> dict[str, dict]:
    """``--random-xar`` sizes: ``xar-tiny`` (CPU) and the released :data:`vgen.models.xar.XAR_SIZES`."""
    from vgen.models.xar import XAR_SIZES, xar_size

    return {"xar-tiny": xar_size(2, 192, 3), **XAR_SIZES}


def import_official_xar(path):
    """The official ``models.xar`` and ``models.sampler`` modules of an xAR checkout at ``path``
    (:func:`vgen.eval.official_compare.import_checkout`; ``flash_attn`` stood in for when it is not installed)."""
    from vgen.eval.official_compare import import_checkout

    xar_module, sampler_module = import_checkout(
        path, family="xAR", repository="OliverRensu/xAR", required=OFFICIAL_FILES,
        modules=("models.xar", "models.sampler"), stand_ins={"flash_attn": ("flash_attn_func",)})
    return xar_module, sampler_module


def check_size_name(size: str) -> None:
    """One :class:`~vgen.errors.UserError` line unless ``size`` is one of :func:`bench_sizes`."""
    from vgen.errors import UserError

    if size not in bench_sizes():
        raise UserError(f"unknown --random-xar {size!r}; choose one of {', '.join(bench_sizes())}")


def random_xar_pipeline(size: str, seed: int, device):
    """A class-conditional :class:`XARPipeline` of ``size`` (:func:`bench_sizes`) with random weights (vgen's
    initialisation, seed ``seed``) on the KL-16 autoencoder's layout (never called here: decoding is excluded)."""
    import torch

    from vgen.models.xar import XAR
    from vgen.models.xar_official import official_sampling_defaults
    from vgen.pipelines.xar import XARPipeline
    from vgen.tokenizers.kl_autoencoder import AutoencoderKL

    sizes = bench_sizes()
    check_size_name(size)
    torch.manual_seed(seed)
    transformer = XAR(**sizes[size], num_classes=1000).eval()
    defaults = official_sampling_defaults(transformer)
    pipe = XARPipeline(AutoencoderKL().eval(), transformer, default_guidance_scale=defaults["guidance_scale"],
                       default_num_steps=int(defaults["num_steps"]))
    return pipe.to(device)


def check_official_layout(pipe) -> None:
    """One :class:`~vgen.errors.UserError` line unless the official ``xAR`` class can be built as ``pipe``'s
    transformer: class-conditional, on the layout of :data:`OFFICIAL_XAR_FIXED`."""
    from vgen.errors import UserError

    model = pipe.transformer
    if model.is_text_conditional or getattr(pipe, "text_encoder", None) is not None:
        raise UserError("the official xAR code is class-conditional: compare a class-conditional xAR pipeline "
                        "(--model DIR of `vgen convert xar-official`, or --random-xar xar-tiny)")
    config = model.config
    differing = [k for k, v in OFFICIAL_XAR_FIXED.items() if config[k] != v]
    if differing:
        raise UserError("the official xAR hard-codes " + ", ".join(f"{k}={v}" for k, v in OFFICIAL_XAR_FIXED.items())
                        + f"; this model differs in {', '.join(f'{k}={config[k]}' for k in differing)}")


def official_twin(pipe, xar_module):
    """The official ``xAR`` with ``pipe``'s configuration and weights (:func:`check_official_layout` first), in eval
    mode on the pipeline's device."""
    import torch

    from vgen.errors import UserError

    check_official_layout(pipe)
    model = pipe.transformer
    config = model.config
    with redirect_stdout(sys.stderr):  # stdout is for the JSON
        official = xar_module.xAR(
            encoder_embed_dim=config.encoder_embed_dim, encoder_depth=config.encoder_depth,
            encoder_num_heads=config.encoder_num_heads, decoder_embed_dim=config.decoder_embed_dim,
            decoder_depth=config.decoder_depth, decoder_num_heads=config.decoder_num_heads,
            mlp_ratio=config.mlp_ratio, label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    reshaped = [k for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if reshaped:
        raise UserError(f"the official xAR does not take this model's weights: {len(reshaped)} tensor(s) of another "
                        f"shape, e.g. {reshaped[0]} {tuple(state[reshaped[0]].shape)} (official "
                        f"{shapes[reshaped[0]]})")
    result = official.load_state_dict(state, strict=False)
    # buffers the official class computes itself (the cell mask, the RoPE tables) need not come from vgen
    missing = [k for k in result.missing_keys if k not in dict(official.named_buffers())]
    if missing or result.unexpected_keys:
        raise UserError(f"the official xAR does not take this model's weights: missing {missing[:5]}, unexpected "
                        f"{result.unexpected_keys[:5]}")
    return official.to(model.device).eval()


def official_device_calls(device):
    """Where the official code's ``tensor.cuda()`` calls go: nowhere (a no-op while inside) off CUDA."""
    import torch

    from vgen.eval.official_compare import patched

    if device.type == "cuda":
        return nullcontext()
    return patched(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


@contextmanager
def recording_official_noise(sampler_module):
    """Collects, while inside, one :class:`~vgen.samplers.flow_units.UnitNoise` per official
    ``euler_maruyama_sampler`` call: the cell's initial noise (B, 64, 16) and the eps (B, 64, 16) float64 of each
    stochastic step, drawn by ``torch.randn_like`` inside that call."""
    import torch

    from vgen.eval.official_compare import patched
    from vgen.samplers.flow_units import UnitNoise

    original = sampler_module.euler_maruyama_sampler
    noises: list[UnitNoise] = []

    def recorded(model, latents, *args, **kwargs):
        noise = UnitNoise(initial=latents.detach().float().clone())
        draw = torch.randn_like

        def randn_like(*a, **k):
            eps = draw(*a, **k)
            noise.step_noise.append(eps.detach().clone())
            return eps

        with patched(torch, "randn_like", randn_like):
            out = original(model, latents, *args, **kwargs)
        noises.append(noise)
        return out

    with patched(sampler_module, "euler_maruyama_sampler", recorded):
        yield noises


def same_noise_check(pipe, official, sampler_module, batch: int, cfg: float, num_steps: int, seed: int) -> dict:
    """The official ``sample_tokens`` (seeded, noise recorded) and vgen's unit loop on that noise, classes
    ``0 .. batch-1``: how far apart are their latents (B, 16, 16, 16)?"""
    import torch

    from vgen.samplers.flow_units import generate_flow_units
    from vgen.samplers.guidance import WeightRampCFG

    model = pipe.transformer
    labels = torch.arange(batch, device=model.device) % OFFICIAL_XAR_FIXED["num_classes"]
    torch.manual_seed(seed)
    with recording_official_noise(sampler_module) as noises, official_device_calls(model.device), torch.no_grad():
        latents_o = official.sample_tokens(num_steps=num_steps, cfg=cfg, label=labels).float()
    time_grid, integrator = pipe.target_only_sampling(pipe.resolve_sampling(guidance_scale=cfg, num_steps=num_steps))
    out = generate_flow_units(model, model.class_condition(labels), batch, time_grid=time_grid, integrator=integrator,
                              guidance_scale=cfg, guidance_schedule=WeightRampCFG(), noises=noises)
    latents_v = model.units_to_latents(out.units)
    difference = float((latents_o - latents_v).abs().max())
    return {"batch_size": batch, "noise": f"the official run's (torch.manual_seed({seed})), replayed in vgen's loop",
            "cells": len(noises), "sde_steps_per_cell": len(noises[0].step_noise),
            "latents_max_abs_difference": difference, "latents_max_abs": float(latents_o.abs().max()),
            "tolerance": LATENT_TOLERANCE, "latents_match": difference <= LATENT_TOLERANCE}


def run(args, pipe=None, model_name: str | None = None) -> int:
    """``vgen bench sample --official PATH`` for xAR (``pipe``: the loaded ``--model``; None: ``--random-xar``):
    see the module docstring. Prints (and with --output writes) JSON."""
    import torch

    from vgen.devices import resolve_device
    from vgen.errors import UserError
    from vgen.eval.bench_sample import timing_batch_sizes
    from vgen.eval.official_compare import (comparison_report, emit_report, load_average,
                                            precision, synchronized, time_alternately)
    from vgen.models.xar_official import official_sampling_defaults

    load_before = load_average()
    sizes = timing_batch_sizes(args)
    var_flags = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p)) if value is not None]
    if var_flags:
        raise UserError(f"{', '.join(var_flags)} {'is' if len(var_flags) == 1 else 'are'} VAR's; xAR's official "
                        "comparison samples with --cfg and --num-steps")
    if args.num_steps is not None and args.num_steps < 3:
        # with 2 points the official sampler's last step takes the first step's branch again (i == 0) and feeds
        # the previous cell a second time
        raise UserError(f"--num-steps must be at least 3 for the official xAR sampler (points of linspace(1, 0.04, "
                        f"num_steps) per cell; with fewer its last step repeats the first), got {args.num_steps}")
    if pipe is None:
        check_size_name(args.random_xar)
    else:
        check_official_layout(pipe)
    xar_module, sampler_module = import_official_xar(args.official)
    if pipe is None:
        pipe = random_xar_pipeline(args.random_xar, args.seed, resolve_device(args.device))
        model_name = f"random {args.random_xar}"
    pipe.set_progress_bar_config(disable=True)
    official = official_twin(pipe, xar_module)
    defaults = official_sampling_defaults(pipe.transformer)
    cfg = args.cfg if args.cfg is not None else defaults["guidance_scale"]
    num_steps = args.num_steps if args.num_steps is not None else int(defaults["num_steps"])
    autocast = args.autocast or "none"
    device = pipe.transformer.device
    in_precision = precision(device, autocast)
    classes = OFFICIAL_XAR_FIXED["num_classes"]

    def official_call(batch: int):
        torch.manual_seed(args.seed)  # the official evaluation seeds the global RNG
        labels = torch.arange(batch, device=device) % classes
        with official_device_calls(device), torch.no_grad(), in_precision():
            return official.sample_tokens(num_steps=num_steps, cfg=cfg, label=labels)

    def vgen_call(batch: int):
        with in_precision():
            return pipe(class_labels=[i % classes for i in range(batch)], guidance_scale=cfg, num_steps=num_steps,
                        generator=[torch.Generator().manual_seed(args.seed + i) for i in range(batch)],
                        output_type="latent")

    parity = same_noise_check(pipe, official, sampler_module, min(sizes), cfg, num_steps, args.seed)
    results = time_alternately({"official": synchronized(official_call, device),
                                "vgen": synchronized(vgen_call, device)}, sizes, args.warmup, args.repeats, device)
    family = {
        "sampling": {"cfg": cfg, "guidance": "xAR's linear ramp over the 4 cells (1 at the first), every step",
                     "num_steps": num_steps, "sampler": f"{num_steps - 1} Euler-Maruyama steps per cell on "
                     f"linspace(1, 0.04, {num_steps}), then a deterministic step to 0", "decode": False},
        "autocast": autocast,
    }
    return emit_report(comparison_report(
        model_name=model_name, official=args.official, device=device,
        parameters=sum(p.numel() for p in pipe.transformer.parameters()), family=family, parity=parity,
        results=results, load_before=load_before), args.output)
