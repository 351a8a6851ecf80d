"""``vgen sample``: many images from a saved pipeline, for FID / GenEval, under ``torchrun`` or alone.

Writes ``{index:06d}.png``, ``manifest.jsonl`` (index, seed, prompt or class label), ``sample_config.json`` and,
with ``--npz``, ``samples.npz`` (``arr_0`` uint8 [N, H, W, 3] for OpenAI's ADM evaluator). Image i uses seed
``--seed + i``, so the set does not depend on the number of processes; existing images are skipped (resume).
The logic lives in :mod:`vgen.eval.sample_at_scale`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``vgen eval geneval --model``: the pipeline call's sampling knobs."""
    from vgen.cli.checks import finite_float, nonnegative_int, positive_int, seed

    parser.add_argument("--seed", type=seed, default=0, help="global seed; image i uses seed + i (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per pipeline call per process")
    parser.add_argument("--guidance-scale", type=finite_float, default=None,
                        help="classifier-free guidance scale (default: the model's saved setting)")
    parser.add_argument("--top-k", type=nonnegative_int, default=None,
                        help="top-k sampling, 0 = off (default: the model's)")
    parser.add_argument("--top-p", type=finite_float, default=None,
                        help="top-p (nucleus) sampling, 0 = off (default: the model's)")
    add_guidance_profile_arg(parser)


def add_guidance_profile_arg(parser: argparse.ArgumentParser) -> None:
    """``--guidance-profile``: how the CFG strength is shared over the scales (also used by ``vgen generate``)."""
    parser.add_argument(
        "--guidance-profile", type=_guidance_profile, default=None, metavar="ramp|S1,S2,...",
        help="CFG weight at scale k is 1 + guidance-scale x S_k: 'ramp' (VAR's, S_k = k/(K-1)) or one share per "
        "scale, e.g. 0.5,0.75,1,1,1,0.75,0.75 (default: the model's saved profile)",
    )


def _guidance_profile(text: str):
    from vgen.samplers.guidance import parse_guidance_profile

    try:
        return parse_guidance_profile(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def sampling_kwargs(args: argparse.Namespace, pipe) -> dict:
    """The sampling flags; a flag left out takes the pipeline's own saved setting (``pipe.resolve_sampling``)."""
    resolved = pipe.resolve_sampling(guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p,
                                     guidance_profile=args.guidance_profile)
    return {k: resolved[k] for k in ("guidance_scale", "top_k", "top_p", "guidance_profile")}


def default_out_dir(model_dir: Path, args: argparse.Namespace, sampling: dict) -> Path:
    """A folder name that records every sampling knob, e.g. ``samples/shapes-var-seed0-cfg1.5-topk0-topp1.0-n100``
    (``-profile0.5_1_1`` added when the CFG profile is not VAR's ramp)."""
    cfg, top_k, top_p = sampling["guidance_scale"], sampling["top_k"], sampling["top_p"]
    knobs = f"seed{args.seed}-cfg{cfg}-topk{top_k}-topp{top_p}-n{args.n}"
    profile = sampling["guidance_profile"]
    if not isinstance(profile, str):
        knobs += "-profile" + "_".join(f"{share:g}" for share in profile)
    return Path("samples") / f"{model_dir.name}-{knobs}"


def _run(args: argparse.Namespace) -> int:
    from vgen.cli.checks import check_output_folder, check_seed_range
    from vgen.eval.sample_at_scale import (
        flat_jobs,
        load_pipeline,
        load_prompts,
        parse_class_labels,
        pipeline_num_classes,
        run_sampling,
    )
    from vgen.pipelines import resolve_model_dir
    from vgen.distributed import setup_distributed, teardown_distributed

    prompts = load_prompts(args.metadata) if args.metadata is not None else None
    if args.out:
        check_output_folder(args.out, "--out")
    model_dir = resolve_model_dir(args.model)
    ctx = setup_distributed()
    try:
        pipe = load_pipeline(model_dir, ctx.device)
        sampling = sampling_kwargs(args, pipe)
        out = Path(args.out) if args.out else default_out_dir(model_dir, args, sampling)
        labels = parse_class_labels(args.class_labels, pipeline_num_classes(pipe)) if prompts is None else None
        n = args.n if args.n is not None else len(prompts if prompts is not None else labels)
        check_seed_range(args.seed, n)
        jobs = flat_jobs(out, n, args.seed, prompts=prompts, class_labels=labels)
        settings = {
            "model": str(model_dir.resolve()),
            "seed": args.seed,
            "condition": args.metadata if prompts is not None else args.class_labels,
            **sampling,
        }
        report = run_sampling(pipe, out, jobs, ctx, args.batch_size, sampling, settings, args.npz)
    finally:
        teardown_distributed(ctx)
    if ctx.is_main:
        print(report.table(), file=sys.stderr)
        summary = {"out": str(out), "manifest": str(out / "manifest.jsonl"), **report.__dict__}
        print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    from vgen.cli.checks import positive_int

    parser = subparsers.add_parser(
        "sample",
        help="many images from a saved pipeline (PNG folder + manifest, optional .npz); works under torchrun",
        description="Sample --num-samples images into --out as {index:06d}.png with manifest.jsonl. Image i is conditioned "
        "on class label i mod C or prompt i mod P and seeded with --seed + i, so 'torchrun --nproc-per-node K "
        "-m vgen sample --num-samples N ...' makes the same images as one process. Existing images are skipped (resume).",
    )
    parser.add_argument("--model", default=None,
                        help="saved pipeline folder (model_index.json); default: the model shipped with vgen")
    parser.add_argument(
        "--num-samples",
        "--n",
        dest="n",
        type=positive_int,
        default=None,
        help="number of images (default: one per class / prompt); under torchrun write --num-samples, since "
        "torchrun's own parser reads '--n' as an abbreviation of its options",
    )
    condition = parser.add_mutually_exclusive_group(required=True)
    condition.add_argument("--class-labels", help="'all' or comma-separated labels, e.g. 0,1,2 (cycled)")
    condition.add_argument("--metadata", help="prompts: 'shapes', 'geneval', a .jsonl ('prompt'/'text') or .txt")
    parser.add_argument("--out", default=None, help="output folder (default: samples/<model>-<knobs>)")
    parser.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0 uint8 N,H,W,3)")
    add_sampling_args(parser)
    parser.set_defaults(func=_run)
