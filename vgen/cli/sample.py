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

from vgen.pipelines import SHIPPED_MODELS


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``vgen eval geneval --model``: seeding, batch size and every declared sampling option."""
    from vgen.cli.checks import positive_int, seed
    from vgen.cli.sampling_flags import add_sampling_flags

    parser.add_argument("--seed", type=seed, default=0, help="global seed; image i uses seed + i (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per pipeline call per process")
    add_sampling_flags(parser)


def sampling_kwargs(args: argparse.Namespace, pipe) -> dict:
    """The pipeline call's sampling arguments: every saved option of the model's family (a flag left out takes the
    model's own setting) plus the call-only flags given."""
    from vgen.cli.sampling_flags import sampling_from_flags

    saved, extra = sampling_from_flags(args, pipe)
    return {**saved, **extra}


#: short names of sampling options in default sample-folder names (others appear under their own name)
_KNOB_NAMES = {"guidance_scale": "cfg", "top_k": "topk", "top_p": "topp", "temperature": "temp"}
#: options always named in the folder (the rest only when they differ from the family default)
_ALWAYS_NAMED = ("guidance_scale", "top_k", "top_p")


def default_out_dir(model_dir: Path, args: argparse.Namespace, sampling: dict, pipe=None) -> Path:
    """A folder name that records every sampling knob, e.g. ``samples/shapes-var-seed0-cfg1.5-topk0-topp1.0-n100``:
    guidance scale, top-k and top-p always (when the family has them), any other option when it differs from the
    family default (``-profile0.5_1_1`` for a CFG profile that is not VAR's ramp, ``-temp0.8``, ``-numsteps25``); the first three keep the names earlier versions gave."""
    knobs = [f"seed{args.seed}"]
    defaults = {o.name: o.default for o in getattr(pipe, "sampling_options", ())}
    defaults.setdefault("guidance_profile", "ramp")
    for name, value in sampling.items():
        if name not in _ALWAYS_NAMED and value == defaults.get(name, object()):
            continue
        if name == "guidance_profile":
            knobs.append("profile" + "_".join(f"{share:g}" for share in value))
        elif not isinstance(value, bool):
            text = Path(value).name if isinstance(value, str) and "/" in value else value  # a folder: its name
            knobs.append(f"{_KNOB_NAMES.get(name, name.replace('_', ''))}{text}")
        elif value:
            knobs.append(name.replace("_", ""))
    knobs.append(f"n{args.n}")
    return Path("samples") / f"{model_dir.name}-{'-'.join(knobs)}"


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
        out = Path(args.out) if args.out else default_out_dir(model_dir, args, sampling, pipe)
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
                        help=f"pipeline folder (model_index.json) or a shipped model ({', '.join(SHIPPED_MODELS)}); "
                             "default: the model shipped with vgen (shapes-var)")
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
