"""``vgen bench speculative``: one speculative method (and a sweep of its knob) against target-only sampling of the
same pipeline, measured in one process; JSON on stdout, a speed-quality plot as PNG.

Speed (per batch size, ``--batch-sizes 1 16``): ``--repeats`` rounds after a warm-up round; every round calls the
target-only pipeline and every setting once, interleaved, on the same prompts (Shapes-GenEval prompts, a new set
per round) and seeds, so load from other processes hits every variant alike. Reported per setting: wall seconds
per image (median over rounds), ``speedup`` = the median over rounds of (target-only seconds / the setting's seconds
in that round), target and drafter forwards per image, acceptance rate (drafted units kept) and mean accepted length
(units per target forward), from the sampler's own counts. The load average at start and end is recorded.
Class-conditional models (e.g. FlowAR, xAR) are called on the class labels in turn instead of prompts.

``--speculative cspd`` (FlowAR and xAR pipelines, :mod:`vgen.samplers.cspd`): the target-only reference samples with
the same Euler-Maruyama SDE (FlowAR: ``flow_sampler=sde``; xAR samples with it anyway); forwards count every model
call (prefill, velocity calls, commits; CFG rows share a call); ``fallbacks_per_image`` counts units that kept the
target's own proposal after ``rejection_rounds`` failed ones; ``--sweep unit window --sweep-knob verification`` (xAR)
compares unit-by-unit and window verification, ``discarded_per_image`` counting accepted units the window dropped
because another image of the batch rejected an earlier one.

Quality (``--quality``): for target-only and every setting, Shapes-GenEval (``--geneval-images-per-prompt`` images
for each of the 553 prompts) and Shapes-FID (``--fid-samples`` images against ``--fid-ref``, a reference from
``vgen eval fid-ref --world shapes --resolution R --features shapes``), with the deltas against target-only.
Samples go to ``--samples-dir/<setting>/`` and are reused by later runs with the same settings (resumable; the
target-only folders serve every comparison of the same model).

The plot (``--plot``) shows speedup at the smallest batch size against Shapes-GenEval and Shapes-FID, one point per
setting, target-only at speedup 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

#: the knob each method sweeps by default
SWEPT = {"mulo-sd": "tau", "lantern": "delta"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="target pipeline folder (next-token; FlowAR or xAR for cspd)")
    parser.add_argument("--speculative", default=None, choices=("sjd", "exact", "lantern", "mulo-sd", "cspd"),
                        help="the method compared against target-only sampling (cspd: against target-only sampling "
                             "with the same SDE, flow_sampler=sde)")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="measure nothing: draw the reports of earlier runs into one --plot")
    parser.add_argument("--drafter", default=None,
                        help="drafter pipeline folder (exact, mulo-sd, cspd; optional: lantern)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KNOB=VALUE",
                        help="other speculative knobs, e.g. gamma=4 window=16 pool_k=8 radius=1 upsampler=DIR "
                             "(cspd: gamma, prefill_fraction, rejection_rounds)")
    parser.add_argument("--sweep", nargs="+", default=None, metavar="VALUE",
                        help="values of the method's knob to compare (tau for mulo-sd, delta for lantern)")
    parser.add_argument("--sweep-knob", default=None, help="sweep another knob than the method's default")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], metavar="B")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size (after one warm-up)")
    parser.add_argument("--quality", action="store_true", help="also Shapes-GenEval and Shapes-FID per setting")
    parser.add_argument("--geneval-images-per-prompt", type=int, default=4)
    parser.add_argument("--geneval-limit", type=int, default=None, help="only the first N prompts (quick checks)")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--fid-ref", default=None, help="reference statistics .npz for Shapes-FID (needed with --quality)")
    parser.add_argument("--samples-dir", default="runs/bench_speculative_samples",
                        help="where quality samples go (one folder per setting, reused across runs)")
    parser.add_argument("--sample-batch-size", type=int, default=16, help="images per pipeline call when sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--plot", default=None, help="write the speed-quality plot here (PNG)")


def parse_knobs(pairs: list[str]) -> dict:
    from vgen.errors import UserError

    knobs = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UserError(f"--set takes KNOB=VALUE pairs, got {pair!r}")
        knobs[name.strip().replace("-", "_")] = value.strip()
    return knobs


def settings_list(args: argparse.Namespace, pipe) -> list[tuple[str, dict]]:
    """``(label, call options)`` for every compared setting (target-only first)."""
    from vgen.errors import UserError
    from vgen.pipelines.speculative import SPECULATIVE_KNOBS

    base = {"speculative": args.speculative, **parse_knobs(args.set)}
    if args.drafter:
        base["drafter"] = args.drafter
    unknown = [k for k in base if k not in SPECULATIVE_KNOBS]
    if unknown:
        raise UserError(f"--set {', '.join(unknown)}: not a speculative knob; knobs: {', '.join(SPECULATIVE_KNOBS[1:])}")
    knob = args.sweep_knob or SWEPT.get(args.speculative)
    if args.sweep and knob is None:
        raise UserError(f"--speculative {args.speculative} has no default knob to sweep; name one with --sweep-knob")
    values = args.sweep or [None]
    # CSpD samples with the Euler-Maruyama SDE: its reference is target-only sampling with the same SDE (a family
    # with a choice of flow sampler, FlowAR, is told so; xAR always samples with it)
    reference = {"speculative": "none"}
    if args.speculative == "cspd" and "flow_sampler" in {option.name for option in pipe.sampling_options}:
        reference["flow_sampler"] = "sde"
    out = [("target-only", reference)]
    for value in values:
        options = dict(base) if value is None else {**base, knob: value}
        checked = {name: pipe.option(name).check(v) for name, v in options.items()}
        shown = checked.get(knob)
        shown = f"{shown:g}" if isinstance(shown, (int, float)) else shown
        label = args.speculative if value is None else f"{args.speculative} {knob}={shown}"
        out.append((label, checked))
    return out


def _call(pipe, prompts: list, seeds: list[int], options: dict):
    """One call on ``prompts`` (text models) or class labels (class models: ``prompts`` holds labels)."""
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    condition = {"prompt": prompts} if pipe.is_text_conditional else {"class_labels": prompts}
    return pipe(**condition, generator=generators, output_type="pt", **options).images


def target_only_forwards(pipe, options: dict) -> int:
    """Model calls per image of target-only sampling: the pipeline's own count when it has one (flow
    pipelines), else one per unit (next-token: the prefill and one decode per later unit)."""
    if hasattr(pipe, "target_only_forwards"):
        return int(pipe.target_only_forwards(**options))
    return int(pipe.transformer.sequence_length)


def measure_speed(pipe, variants, prompts, batch_size: int, repeats: int, device: str) -> list[dict]:
    import torch

    times = {label: [] for label, _ in variants}
    counts = {label: {"target": 0, "drafter": 0, "drafted": 0, "accepted": 0, "units": 0, "fallbacks": 0,
                      "discarded": 0} for label, _ in variants}
    for round_ in range(repeats + 1):  # round 0 warms up every variant
        start = (round_ * batch_size) % len(prompts)
        batch = [prompts[(start + i) % len(prompts)] for i in range(batch_size)]
        seeds = list(range(round_ * batch_size, (round_ + 1) * batch_size))
        for label, options in variants:
            t0 = time.perf_counter()
            _call(pipe, batch, seeds, options)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if not round_:
                continue
            times[label].append(elapsed / batch_size)
            stats, c = pipe.speculative_stats, counts[label]
            if stats is None:  # target-only
                c["target"] += batch_size * target_only_forwards(pipe, options)
                c["units"] += batch_size * len(_units_of(pipe))
            else:
                c["target"] += int(stats.target_forwards.sum())
                c["drafter"] += int(stats.drafter_forwards.sum())
                c["drafted"] += int(stats.drafted.sum())
                c["accepted"] += int(stats.accepted.sum())
                c["units"] += int(stats.units.sum())
                c["fallbacks"] += int(stats.fallbacks.sum()) if hasattr(stats, "fallbacks") else 0
                c["discarded"] += int(stats.discarded.sum()) if hasattr(stats, "discarded") else 0
    base = times["target-only"]
    rows = []
    for label, options in variants:
        c, images = counts[label], repeats * batch_size
        rows.append({
            "setting": label, "batch_size": batch_size,
            "seconds_per_image": statistics.median(times[label]),
            "speedup": statistics.median(b / t for b, t in zip(base, times[label])),
            "target_forwards_per_image": c["target"] / images,
            "drafter_forwards_per_image": c["drafter"] / images,
            "acceptance_rate": c["accepted"] / c["drafted"] if c["drafted"] else None,
            "mean_accepted_length": c["units"] / c["target"] if c["target"] else None,
            "fallbacks_per_image": c["fallbacks"] / images,
            "discarded_per_image": c["discarded"] / images,
            "per_round_seconds_per_image": times[label],
        })
    return rows


def _units_of(pipe) -> list:
    """The generated units of one image: next-token units, or a flow model's units (FlowAR scales, xAR cells)."""
    transformer = pipe.transformer
    if hasattr(transformer, "sequence_length"):
        return list(range(int(transformer.sequence_length)))
    return list(transformer.unit_shapes)


def _folder_name(label: str) -> str:
    return label.replace(" ", "_").replace("=", "")


def measure_quality(pipe, model_dir: Path, variants, args) -> list[dict]:
    """Shapes-GenEval and Shapes-FID of every variant (samples reused when their folder holds them)."""
    from vgen.distributed import setup_distributed
    from vgen.eval.fid import compute_fid_report
    from vgen.eval.geneval import evaluate_images, load_metadata, summarise, write_prompt_metadata
    from vgen.eval.sample_at_scale import flat_jobs, geneval_jobs, load_prompts, run_sampling
    from vgen.eval.shapes_detector import ShapesDetector

    metadata = load_metadata("shapes")[: args.geneval_limit]
    prompts = load_prompts("shapes")
    ctx = setup_distributed()
    detector = ShapesDetector()
    rows = []
    for label, options in variants:
        root = Path(args.samples_dir) / f"{model_dir.name}-{_folder_name(label)}"
        sampling = {**pipe.resolve_sampling(**options)}
        settings = {"model": str(model_dir.resolve()), "seed": args.seed, **sampling}
        geneval_dir = root / "geneval"
        for p, entry in enumerate(metadata):
            write_prompt_metadata(geneval_dir, p, entry)
        t0 = time.perf_counter()
        jobs = geneval_jobs(geneval_dir, metadata, args.geneval_images_per_prompt, args.seed)
        run_sampling(pipe, geneval_dir, jobs, ctx, args.sample_batch_size, sampling,
                     {**settings, "images_per_prompt": args.geneval_images_per_prompt}, progress=False)
        fid_dir = root / "fid"
        jobs = flat_jobs(fid_dir, args.fid_samples, args.seed + 10**6, prompts=prompts)
        run_sampling(pipe, fid_dir, jobs, ctx, args.sample_batch_size, sampling, settings, progress=False)
        sampling_seconds = time.perf_counter() - t0
        summary = summarise(evaluate_images(geneval_dir, detector, None, progress=False, max_prompts=len(metadata),
                                            max_samples=args.geneval_images_per_prompt))
        fid = compute_fid_report(str(fid_dir), args.fid_ref, features="shapes", verbose=False)
        rows.append({"setting": label, "geneval": summary["overall"], "geneval_tasks": {tag: t["accuracy"] for tag, t in summary["tasks"].items()},
                     "fid": fid["fid"], "fid_samples": fid["n_samples"], "samples": str(root),
                     "sampling_seconds": sampling_seconds})
    base = rows[0]
    for row in rows:
        row["geneval_delta"] = row["geneval"] - base["geneval"]
        row["fid_delta"] = row["fid"] - base["fid"]
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    from vgen.errors import UserError
    from vgen.eval.sample_at_scale import load_prompts
    from vgen.pipelines import load_pipeline

    if args.combine:
        return combine(args)
    if args.model is None or args.speculative is None:
        raise UserError("give --model and --speculative (or --combine JSON ... --plot PNG)")
    if args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        raise UserError("--repeats and every --batch-sizes entry must be >= 1")
    if args.quality and not args.fid_ref:
        raise UserError("--quality needs --fid-ref (make one with 'vgen eval fid-ref --world shapes --resolution R "
                        "--features shapes')")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, model_dir = load_pipeline(args.model, args.device)
    if "speculative" not in {option.name for option in pipe.sampling_options}:
        raise UserError(f"{model_dir} holds a {type(pipe).__name__}, which has no speculative decoding")
    pipe.check_option(pipe.option("speculative"), args.speculative)  # one line when the family lacks the method
    if not pipe.is_text_conditional and args.quality:
        raise UserError("--quality measures on the Shapes-GenEval prompts: give a text-conditional model")
    pipe.set_progress_bar_config(disable=True)
    variants = settings_list(args, pipe)
    # text models: the Shapes-GenEval prompts; class models: the class labels in turn
    prompts = load_prompts("shapes") if pipe.is_text_conditional else list(range(pipe.num_classes))
    report = {"model": str(model_dir), "method": args.speculative, "drafter": args.drafter,
              "device": args.device, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "sampling": pipe.resolve_sampling(), "load_average_start": os.getloadavg(), "speed": []}
    for batch_size in args.batch_sizes:
        report["speed"] += measure_speed(pipe, variants, prompts, batch_size, args.repeats, args.device)
    report["load_average_end"] = os.getloadavg()
    if args.quality:
        report["quality"] = measure_quality(pipe, model_dir, variants, args)
    if args.plot:
        from vgen.eval.speed_quality_plot import plot_speed_quality

        report["plot"] = str(plot_speed_quality(report, args.plot))
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0


def combine(args: argparse.Namespace) -> int:
    """``--combine``: the saved reports in one plot (and one JSON)."""
    from vgen.errors import UserError
    from vgen.eval.speed_quality_plot import plot_speed_quality

    if not args.plot:
        raise UserError("--combine draws a plot: give --plot PNG")
    reports = []
    for path in args.combine:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the report {path}: {err}") from None
        if "speed" not in reports[-1]:
            raise UserError(f"{path} is not a 'vgen bench speculative' report (no speed section)")
    text = json.dumps({"reports": list(args.combine), "plot": str(plot_speed_quality(reports, args.plot))}, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0
