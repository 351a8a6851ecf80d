"""vgen's VAR sampler against the official VAR code in one process (``vgen bench sample --official PATH``).

The user points ``--official`` at a checkout of the official VAR repository (FoundationVision/VAR; the project never
vendors it). The official ``VQVAE`` and ``VAR`` classes are built from that checkout with the configuration of the
vgen pipeline being measured and loaded with *its* weights (vgen keeps the official key names, so the state dicts
load key for key), so both sides run the same model:

* ``--model DIR``: a class-conditional VAR pipeline folder (e.g. ``vgen convert var-official ...`` of the released
  checkpoints);
* ``--random-var var-d16`` (any size of :data:`vgen.models.var.VAR_SIZES`): random weights of that size on VAR's
  256 px tokenizer (4096 codes x 32 dims, ch 160), seeded by ``--seed``.

Both sides sample with official VAR's settings (``--cfg`` on VAR's linear ramp, ``--top-k``, ``--top-p``,
``more_smooth=False``), in fp32 or both under ``torch.autocast`` (``--autocast fp16`` is the official demo's
setting on GPUs; the greedy check always runs in fp32), and decode the images (the official
``autoregressive_infer_cfg`` returns images; vgen's call runs with ``output_type="pt"``). Per batch size the
official and vgen calls alternate (:func:`vgen.eval.official_compare.time_alternately`: ``--warmup`` untimed rounds,
at least one, the last of which measures peak memory; then ``--repeats`` timed ones), so load on a shared machine
falls on both alike; the JSON reports the median seconds per batch of each, images/s, the peak memory of one call,
and ``vgen_speedup`` = official seconds / vgen seconds, measured in this one run.

Same tokens for the same logits: before timing, both samplers run greedily (``top_k=1``) at the smallest batch size
and the token ids of every scale are compared (the official ids are read at its sampling function); the result is
``greedy_tokens_identical`` with the number of differing ids, and the largest pixel difference of the two images.
With sampling on, the two draw from different random streams (official: one generator for the batch; vgen: one per
image), so only the greedy comparison can check that the logits agree.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, redirect_stdout

#: the files a checkout of the official VAR repository has (and this module imports)
OFFICIAL_FILES = ("models/var.py", "models/vqvae.py", "models/helpers.py", "models/basic_var.py", "dist.py")
#: the sampling flags of the comparison and their defaults (official VAR's FID settings, fp32)
OFFICIAL_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "autocast": "none"}
#: the tokenizer settings the official ``VQVAE`` hard-codes (vgen's multi-scale VQ makes them configurable)
OFFICIAL_VQVAE_FIXED = {"ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2, "using_sa": True, "using_mid_sa": True,
                        "norm_num_groups": 32, "in_channels": 3}


def import_official_var(path):
    """The official ``models`` package of a VAR checkout at ``path`` (its ``VQVAE``, ``VAR``) and the ``models.var``
    module whose ``sample_with_top_k_top_p_`` the sampler calls, imported by
    :func:`vgen.eval.official_compare.import_checkout`. The official ``build_vae_var`` is never called (it replaces
    ``reset_parameters`` of torch's layer classes process-wide)."""
    from vgen.eval.official_compare import import_checkout

    models, var_module = import_checkout(path, family="VAR", repository="FoundationVision/VAR",
                                         required=OFFICIAL_FILES, modules=("models", "models.var"))
    return models, var_module


def random_var_pipeline(size: str, seed: int, device):
    """A class-conditional :class:`VARPipeline` of VAR size ``size`` (``var-d16`` ...) with random weights (vgen's
    initialisation, seed ``seed``) on VAR's 256 px tokenizer: 4096 codes of 32 dims, ch 160."""
    import torch

    from vgen.models.var import create_var
    from vgen.pipelines.var import VARPipeline
    from vgen.tokenizers.msvq import MultiScaleVQModel

    torch.manual_seed(seed)
    vqvae = MultiScaleVQModel(vocab_size=4096, z_channels=32, ch=160)
    transformer = create_var(size, num_classes=1000)
    pipe = VARPipeline(vqvae.eval(), transformer.eval())
    return pipe.to(device)


def official_twin(pipe, models):
    """The official ``(VQVAE, VAR)`` with ``pipe``'s configuration and weights, in eval mode on its device."""
    import torch

    from vgen.errors import UserError

    var, vq = pipe.transformer, pipe.vqvae
    if var.is_text_conditional or getattr(pipe, "text_encoder", None) is not None:
        raise UserError("the official VAR code is class-conditional: compare a class-conditional VAR pipeline "
                        "(--model DIR of `vgen convert var-official`, or --random-var var-d16)")
    vc, tc = vq.config, var.config
    differing = [k for k, v in OFFICIAL_VQVAE_FIXED.items()
                 if (tuple(vc[k]) if isinstance(v, tuple) else vc[k]) != v]
    if differing:
        raise UserError("the official VQVAE hard-codes " + ", ".join(f"{k}={v}" for k, v in
                        OFFICIAL_VQVAE_FIXED.items()) + f"; this pipeline's tokenizer differs in "
                        f"{', '.join(differing)}")
    with redirect_stdout(sys.stderr):  # the official constructors print their settings: stdout is for the JSON
        vae_o = models.VQVAE(vocab_size=vc.vocab_size, z_channels=vc.z_channels, ch=vc.ch, dropout=0.0,
                             beta=vc.beta, using_znorm=vc.using_znorm, quant_conv_ks=vc.quant_conv_ks,
                             quant_resi=vc.quant_resi, share_quant_resi=vc.share_quant_resi,
                             v_patch_nums=tuple(vc.patch_nums), test_mode=True)
        var_o = models.VAR(vae_o, num_classes=tc.num_classes, depth=tc.depth, embed_dim=tc.embed_dim,
                           num_heads=tc.num_heads, mlp_ratio=tc.mlp_ratio, drop_rate=0.0, attn_drop_rate=0.0,
                           drop_path_rate=0.0, norm_eps=tc.norm_eps, shared_aln=tc.shared_aln, cond_drop_rate=0.0,
                           attn_l2_norm=tc.attn_l2_norm, patch_nums=tuple(tc.patch_nums))
    for name, theirs, mine in (("VQVAE", vae_o, vq), ("VAR", var_o, var)):
        result = theirs.load_state_dict({k: v.detach().float().cpu() for k, v in mine.state_dict().items()},
                                        strict=False)
        # buffers the official classes compute themselves (masks, level ids) need not come from the checkpoint
        missing = [k for k in result.missing_keys if k not in dict(theirs.named_buffers())]
        if missing or result.unexpected_keys:
            raise UserError(f"the official {name} does not take this pipeline's weights: missing "
                            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    device = next(var.parameters()).device
    var_o.rng = torch.Generator(device=device)
    return vae_o.to(device).eval(), var_o.to(device).eval()


@contextmanager
def recording_official_tokens(var_module):
    """Collects, while inside, the token ids (B, l) the official sampler draws at each scale."""
    original = var_module.sample_with_top_k_top_p_
    drawn = []

    def recorded(*args, **kwargs):
        idx = original(*args, **kwargs)
        drawn.append(idx[:, :, 0].clone())
        return idx

    var_module.sample_with_top_k_top_p_ = recorded
    try:
        yield drawn
    finally:
        var_module.sample_with_top_k_top_p_ = original


def greedy_check(pipe, var_o, var_module, batch: int, cfg: float) -> dict:
    """Both samplers with ``top_k=1`` on classes ``0 .. batch-1``: do the token ids of every scale agree?"""
    import torch

    labels = torch.arange(batch, device=next(var_o.parameters()).device) % var_o.num_classes
    with recording_official_tokens(var_module) as drawn:
        images_o = var_o.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, cfg=cfg, top_k=1, top_p=0.0)
    ids_o = torch.cat(drawn, dim=1).cpu()
    settings = dict(class_labels=labels.tolist(), guidance_scale=cfg, guidance_profile="ramp", top_k=1, top_p=0.0,
                    more_smooth=False, generator=[torch.Generator().manual_seed(i) for i in range(batch)])
    ids_v = pipe(**settings, output_type="latent").images
    images_v = pipe.decode_latents(ids_v, output_type="pt").images  # the ids decode to the call's images (no smoothing)
    ids_v = ids_v.cpu()
    return {"batch_size": batch, "greedy_tokens_identical": bool(torch.equal(ids_o, ids_v)),
            "greedy_tokens_differing": int((ids_o != ids_v).sum()), "tokens_per_image": int(ids_v.shape[1]),
            "greedy_max_pixel_difference": float((images_o.float().cpu() - images_v.float().cpu()).abs().max())}


def run(args, pipe=None, model_name: str | None = None) -> int:
    """``vgen bench sample --official PATH`` for VAR (``pipe``: the loaded ``--model``; None: ``--random-var``):
    see the module docstring. Prints (and with --output writes) JSON."""
    import torch

    from vgen.devices import resolve_device
    from vgen.errors import UserError
    from vgen.eval.bench_sample import timing_batch_sizes
    from vgen.eval.official_compare import (comparison_report, emit_report, load_average,
                                            precision, synchronized, time_alternately)

    load_before = load_average()
    sizes = timing_batch_sizes(args)
    if getattr(args, "num_steps", None) is not None:
        raise UserError("--num-steps is xAR's; VAR's official comparison samples with --cfg, --top-k and --top-p")
    for flag, default in OFFICIAL_SAMPLING.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    models, var_module = import_official_var(args.official)
    if pipe is None:
        from vgen.models.var import VAR_SIZES

        if args.random_var not in VAR_SIZES:
            raise UserError(f"unknown --random-var {args.random_var!r}; choose one of {', '.join(VAR_SIZES)}")
        pipe, model_name = random_var_pipeline(args.random_var, args.seed, resolve_device(args.device)), \
            f"random {args.random_var}"
    pipe.set_progress_bar_config(disable=True)
    if args.top_k > pipe.transformer.V:
        raise UserError(f"--top-k {args.top_k} is more than the model's {pipe.transformer.V} codes (the official "
                        "sampler cannot take it): give --top-k at most that, or 0 for no top-k")
    _vae_o, var_o = official_twin(pipe, models)  # the official VAR holds its VQVAE itself
    device = next(var_o.parameters()).device
    in_precision = precision(device, args.autocast)

    def official_call(batch: int):
        labels = torch.arange(batch, device=device) % var_o.num_classes
        with in_precision():
            return var_o.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=args.seed, cfg=args.cfg,
                                                  top_k=args.top_k, top_p=args.top_p)

    def vgen_call(batch: int):
        with in_precision():
            return pipe(class_labels=[i % var_o.num_classes for i in range(batch)], guidance_scale=args.cfg,
                        guidance_profile="ramp", top_k=args.top_k, top_p=args.top_p, more_smooth=False,
                        generator=[torch.Generator().manual_seed(args.seed + i) for i in range(batch)],
                        output_type="pt")

    parity = greedy_check(pipe, var_o, var_module, min(sizes), args.cfg)
    results = time_alternately({"official": synchronized(official_call, device),
                                "vgen": synchronized(vgen_call, device)}, sizes, args.warmup, args.repeats, device)
    family = {
        "sampling": {"cfg": args.cfg, "guidance": "VAR's linear ramp", "top_k": args.top_k, "top_p": args.top_p,
                     "more_smooth": False, "decode": True},
        "autocast": args.autocast,
    }
    return emit_report(comparison_report(
        model_name=model_name, official=args.official, device=device,
        parameters=sum(p.numel() for p in pipe.transformer.parameters()), family=family, parity=parity,
        results=results, load_before=load_before), args.output)
