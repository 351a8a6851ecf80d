"""Speed of next-token pipelines against each other in one process (``vgen bench next-token``): e.g. the same
transformer in plain raster order (s = 1) and on Token-Shuffle windows (s = 2, 4).

For every model and batch size it reports the sequence length the transformer reads (prefix + units), the forward
passes per image (one prefill + one decode per unit after the first), and images/s of a whole pipeline call
(conditions, every step with CFG, tokenizer decode), each the median over ``--repeats`` timed calls after a warm-up
call. The calls of the models are interleaved round by round, so load from other processes hits every model alike,
and ``speedup`` is images/s relative to the first model at the same batch size: a ratio measured in one run, the
only way vgen compares speeds. The result is one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", required=True, metavar="DIR",
                        help="saved next-token pipeline folders; the first one is the baseline of the ratios")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], metavar="B",
                        help="images per pipeline call (default 1 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model and batch size (median)")
    parser.add_argument("--prompt", default="a photo of a red circle left of a blue square",
                        help="prompt for text-conditional models")
    parser.add_argument("--class-label", type=int, default=0, help="class label for class-conditional models")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")


def _condition_kwargs(pipe, args, batch_size: int) -> dict:
    if pipe.is_text_conditional:
        return {"prompt": [args.prompt] * batch_size}
    return {"class_labels": [args.class_label % pipe.num_classes] * batch_size}


def run(args: argparse.Namespace) -> int:
    import torch

    from vgen.errors import UserError
    from vgen.pipelines import load_pipeline

    if args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        raise UserError("--repeats and every --batch-sizes entry must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipes = []
    for folder in args.models:
        pipe, model_dir = load_pipeline(folder, args.device)
        transformer = pipe.transformer
        if not hasattr(transformer, "sequence_length"):
            raise UserError(f"{model_dir} is not a next-token pipeline (its transformer has no sequence_length)")
        pipe.set_progress_bar_config(disable=True)
        pipes.append((str(model_dir), pipe))

    results = []
    for batch_size in args.batch_sizes:
        times: dict[int, list[float]] = {i: [] for i in range(len(pipes))}
        for round_ in range(args.repeats + 1):  # round 0 warms up every model
            for i, (_, pipe) in enumerate(pipes):
                generators = [torch.Generator().manual_seed(b) for b in range(batch_size)]
                start = time.perf_counter()
                pipe(**_condition_kwargs(pipe, args, batch_size), generator=generators, output_type="pt")
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if round_:
                    times[i].append(time.perf_counter() - start)
        for i, (folder, pipe) in enumerate(pipes):
            t = pipe.transformer
            seconds = statistics.median(times[i])
            prefix = 1  # the class token, or the pooled prompt (+ the prompt's words when the prefix holds them)
            if pipe.is_text_conditional and t.config.text_cross_attn:
                prefix += int(pipe.text_encoder.tokenize([args.prompt])[1].sum())
            results.append({
                "model": folder, "batch_size": batch_size, "shuffle_window": int(t.config.shuffle_window),
                "tokens_per_step": int(t.tokens_per_step), "units_per_image": int(t.sequence_length),
                "sequence_length": prefix + int(t.sequence_length),
                "forwards_per_image": int(t.sequence_length), "seconds_per_call": seconds,
                "images_per_second": batch_size / seconds,
            })
    for row in results:
        base = next(r for r in results if r["batch_size"] == row["batch_size"])
        row["speedup"] = row["images_per_second"] / base["images_per_second"]
    report = {"device": args.device, "threads": torch.get_num_threads(), "repeats": args.repeats, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
