"""``vgen eval geneval``: GenEval scores of a folder, of a model's samples, or of real Shapes renders.

Sources (one of):

* ``--images DIR``  a folder in GenEval layout (``00000/metadata.jsonl``, ``00000/samples/0000.png``, ...);
* ``--model DIR``   a saved pipeline: samples ``--images-per-prompt`` images per prompt into ``--out`` (GenEval
  layout, seed ``--seed + index``, resumable, works under ``torchrun``), then scores them;
* ``--real``        renders each Shapes prompt with the Shapes world into ``--out`` and scores it: the ceiling.

Prints JSON (per-task accuracy with counts, overall = mean of task scores, share of correct images and prompts) on
stdout and a table on stderr. The default detector is the exact Shapes detector for ``--metadata shapes``; any other
detector plugs in as ``--detector package.module:factory`` (see :mod:`vgen.eval.geneval` for the official
Mask2Former + CLIP recipe).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vgen.errors import UserError


def _detector_spec(args: argparse.Namespace) -> str:
    if args.detector is not None:
        return args.detector
    if args.metadata == "shapes":
        return "shapes"
    raise UserError(
        f"--metadata {args.metadata} needs a detector for its classes: pass --detector package.module:factory "
        "(e.g. the official Mask2Former + CLIP pair, see vgen.eval.geneval) or --detector shapes for Shapes prompts"
    )


def _official_options(args: argparse.Namespace):
    """The official evaluator's ``--options`` from their flags."""
    from vgen.eval.geneval import GenEvalConfig

    return GenEvalConfig(threshold=args.threshold, counting_threshold=args.counting_threshold,
                         max_objects=args.max_objects, max_overlap=args.max_overlap,
                         position_threshold=args.position_threshold)


def add_official_option_args(parser: argparse.ArgumentParser) -> None:
    """The official evaluator's ``--options key=value`` pairs, as flags with the official defaults."""
    from vgen.cli.checks import finite_float, positive_int
    from vgen.eval.geneval import GenEvalConfig

    defaults = GenEvalConfig()
    options = parser.add_argument_group("official GenEval options (evaluate_images.py --options)")
    options.add_argument("--threshold", type=finite_float, default=defaults.threshold,
                         help=f"keep detections with a score above this (default {defaults.threshold})")
    options.add_argument("--counting-threshold", type=finite_float, default=defaults.counting_threshold,
                         help=f"the same for the counting task (default {defaults.counting_threshold})")
    options.add_argument("--max-objects", type=positive_int, default=defaults.max_objects,
                         help=f"most detections kept per class (default {defaults.max_objects})")
    options.add_argument("--max-overlap", type=finite_float, default=defaults.max_overlap,
                         help=f"per-class NMS IoU; 1 keeps every box (default {defaults.max_overlap})")
    options.add_argument("--position-threshold", type=finite_float, default=defaults.position_threshold,
                         help="share of the summed box sizes discounted from centre offsets in position checks "
                              f"(default {defaults.position_threshold})")


def _select(metadata: list[dict], limit: int | None) -> list[dict]:
    return metadata[:limit] if limit is not None else metadata


def _generate_from_model(args: argparse.Namespace, metadata: list[dict], out: Path) -> bool:
    """Sample into ``out`` in GenEval layout; returns True on the rank that should score."""
    from vgen.cli.checks import check_seed_range
    from vgen.cli.sample import sampling_kwargs
    from vgen.eval.geneval import write_prompt_metadata
    from vgen.eval.sample_at_scale import geneval_jobs, load_pipeline, run_sampling
    from vgen.pipelines import resolve_model_dir
    from vgen.distributed import barrier, setup_distributed, teardown_distributed

    check_seed_range(args.seed, len(metadata) * args.images_per_prompt)
    model_dir = resolve_model_dir(args.model)
    ctx = setup_distributed()
    try:
        if ctx.is_main:
            for p, entry in enumerate(metadata):
                write_prompt_metadata(out, p, entry)
        barrier(ctx)
        pipe = load_pipeline(model_dir, ctx.device)
        jobs = geneval_jobs(out, metadata, args.images_per_prompt, args.seed)
        sampling = sampling_kwargs(args, pipe)
        settings = {"model": str(model_dir.resolve()), "seed": args.seed, "metadata": args.metadata,
                    "images_per_prompt": args.images_per_prompt, **sampling}  # fmt: skip
        report = run_sampling(pipe, out, jobs, ctx, args.batch_size, sampling, settings)
    finally:
        teardown_distributed(ctx)
    if ctx.is_main:
        print(report.table(), file=sys.stderr)
    return ctx.is_main


def _run(args: argparse.Namespace) -> int:
    from vgen.cli.checks import check_output_file, check_output_folder
    from vgen.eval.geneval import (
        build_detector,
        check_detector_classes,
        evaluate_images,
        format_summary,
        load_metadata,
        load_plugin,
        summarise,
        write_results,
    )

    detector_spec = _detector_spec(args)
    config = _official_options(args)
    if args.results is not None:
        check_output_file(args.results, "--results")
    if args.out is not None:
        check_output_folder(args.out, "--out")
    # Built before any sampling so that a broken plug-in fails fast.
    detector = build_detector(detector_spec)
    color_classifier = load_plugin(args.color_classifier, "colour classifier") if args.color_classifier else None
    limits = {}
    if args.images is not None:
        folder = Path(args.images)
    else:
        if args.out is None:
            raise UserError("scoring a model (--model, or the shipped default) or --real writes images: give --out DIR")
        folder = Path(args.out)
        metadata = _select(load_metadata(args.metadata), args.limit)
        check_detector_classes(detector, metadata)
        if args.real:
            from vgen.eval.shapes_geneval import write_real_folder

            write_real_folder(folder, metadata, args.images_per_prompt, args.resolution, args.seed)
        elif not _generate_from_model(args, metadata, folder):
            return 0  # ranks other than 0 stop after sampling
        # score only what this run asked for, even if --out holds more from an earlier run
        limits = {"max_prompts": len(metadata), "max_samples": args.images_per_prompt}
    results = evaluate_images(folder, detector, color_classifier, config, **limits)
    summary = summarise(results)
    if args.results:
        write_results(results, args.results)
    print(format_summary(summary), file=sys.stderr)
    print(json.dumps({"folder": str(folder), "detector": detector_spec, **summary}, indent=2))
    return 0


def register_geneval(eval_subparsers) -> None:
    """Add ``geneval`` to the ``vgen eval`` target parsers (called by :mod:`vgen.cli.eval`)."""
    from vgen.cli.checks import positive_int
    from vgen.cli.sample import add_sampling_args

    parser = eval_subparsers.add_parser(
        "geneval",
        help="GenEval scores (official rules, pluggable detector) of a folder, a model's samples or real Shapes",
        description="GenEval: each image is checked against its prompt's structured metadata with the official "
        "rules and arithmetic (threshold 0.3, 0.9 for counting, exact counts, colour of the most confident objects, "
        "position from box centres with a 10%% margin; the official options are flags below). Prints JSON on stdout "
        "and a table on stderr.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", help="folder in GenEval layout: 00000/metadata.jsonl, 00000/samples/0000.png")
    source.add_argument("--model", help="saved pipeline folder: sample into --out, then score (default when none of "
                        "--images/--model/--real is given: the model shipped with vgen)")
    source.add_argument("--real", action="store_true", help="render real Shapes images into --out and score them")
    parser.add_argument(
        "--metadata",
        default="shapes",
        help="prompt set for --model / --real: 'shapes' (default), 'geneval' (553 official) or a .jsonl; with --images "
        "the folder's metadata.jsonl files are used and this only picks the default detector",
    )
    parser.add_argument("--detector", default=None, help="'shapes' or package.module:factory (default for shapes)")
    parser.add_argument(
        "--color-classifier", default=None, help="package.module:factory for detectors without colours"
    )
    parser.add_argument("--out", default=None, help="folder to write images to (--model, --real)")
    parser.add_argument("--images-per-prompt", type=positive_int, default=4,
                        help="images per prompt (--model, --real)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts (--model, --real)")
    parser.add_argument("--resolution", type=positive_int, default=64, help="render resolution for --real")
    parser.add_argument("--results", default=None, help="also write per-image results (JSONL) here")
    add_sampling_args(parser)
    add_official_option_args(parser)
    parser.set_defaults(func=_run)
