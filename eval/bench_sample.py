"""Sampling speed of any saved pipeline (``vgen bench sample --model DIR``): one command for every family.

The pipeline is loaded through the shared loader (:func:`vgen.pipelines.load_pipeline`: any registered family) and
called with its saved sampling defaults, once per batch size (after ``--warmup`` untimed calls), ``--repeats``
times; the median wall time gives images/s. In the same process, for each batch size, it records:

* ``calls_per_batch``: how often each step method of the generator ran (VAR: ``prefill`` / ``logits_for_scale``;
  FlowAR: ``prefill`` / ``velocity`` (the flow head) / ``commit`` (an AR pass); ...), independent of the batch;
* ``forwards_per_image``: the model rows per image of the calls that ran the network (classifier-free guidance
  doubles the rows of every guided call), by method and in total (a call that only prepares inputs, like VAR's
  ``prefill``, is not a forward);
* ``structure``: what the generator's step structure is, where it says (raster AR / Token-Shuffle: units per image,
  tokens per step and the window; VAR/NFIG: the scales), so runs of one family with different settings read apart;
* ``peak_memory_bytes``: on CUDA the peak allocated by torch during one call; on CPU the peak growth of the
  process's resident memory during one call (sampled every 2 ms), so small models read close to 0.

The result is one JSON object on stdout: every number a ratio of is measured in this one process, e.g.
``throughput_ratio`` = images/s at the largest batch over images/s at the smallest. With several ``--model``
folders the timed calls of all models are interleaved, and ``images_per_s_relative_to_first`` compares each model
with the first at every batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from contextlib import contextmanager

#: the step methods of :mod:`vgen.samplers.interfaces` whose calls are counted (whichever the generator has)
STEP_METHODS = ("prefill", "logits_for_scale", "decode", "velocity", "commit")
#: the flags only the comparison with official code reads (the plain benchmark samples with the saved settings)
OFFICIAL_ONLY_FLAGS = ("random_var", "random_xar", "cfg", "top_k", "top_p", "num_steps", "autocast")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", default=None, metavar="DIR",
                        help="pipeline folder(s) (default: the model shipped with vgen); several are timed in one "
                             "process, their calls interleaved, with images/s relative to the first")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (default 1,16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each batch size's timing")
    parser.add_argument("--prompt", default="a photo of a red circle left of a blue square",
                        help="prompt for text-conditional models (every image of a batch uses it)")
    parser.add_argument("--class-label", type=int, default=0, help="class label for class-conditional models")
    parser.add_argument("--seed", type=int, default=0, help="image i of a batch uses seed + i")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's own choice)")
    official = parser.add_argument_group(
        "comparison with official code",
        "time vgen against the official code of the model's family (VAR or xAR) on the same model in one process, "
        "calls alternated (the checkout is the user's; vgen never ships it); checks first that both give the same "
        "tokens (VAR: greedy token ids; xAR: latents from the same noise)")
    official.add_argument("--official", default=None, metavar="PATH",
                          help="a checkout of the official code of the model's family: FoundationVision/VAR for a "
                               "VAR model, OliverRensu/xAR for an xAR one")
    official.add_argument("--random-var", default=None, metavar="SIZE",
                          help="with --official: random weights of this VAR size (var-d16 ... var-d30) instead of "
                               "--model DIR")
    official.add_argument("--random-xar", default=None, metavar="SIZE",
                          help="with --official: random weights of this xAR size (xar-tiny: 2 + 2 blocks of width "
                               "192 on the official 16 x 16 grid of 4 cells, for CPUs; xar-b, xar-l, xar-h) instead "
                               "of --model DIR")
    official.add_argument("--cfg", type=float, default=None,
                          help="with --official: the official cfg (VAR: default 1.5; xAR: the last cell's weight, "
                               "default the official one of the size, 2.7 for xar-b)")
    official.add_argument("--top-k", type=int, default=None, help="with --official, VAR: top-k (default 900)")
    official.add_argument("--top-p", type=float, default=None, help="with --official, VAR: top-p (default 0.96)")
    official.add_argument("--num-steps", type=int, default=None,
                          help="with --official, xAR: points of linspace(1, 0.04) per cell (default the official "
                               "one of the size, 40 for xar-b)")
    official.add_argument("--autocast", choices=("none", "fp16", "bf16"), default=None,
                          help="with --official: run both sides under torch.autocast in this dtype (fp16: the "
                               "official demo's GPU setting; default none = fp32)")


def _batch_sizes(text: str) -> list[int]:
    from vgen.errors import UserError

    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def timing_batch_sizes(args) -> list[int]:
    """The batch sizes of ``--batch-sizes``, once ``--repeats`` and ``--warmup`` are known to be usable (the plain
    benchmark and the comparison with official code both time with them)."""
    from vgen.errors import UserError

    sizes = _batch_sizes(args.batch_sizes)
    if args.repeats < 1 or args.warmup < 0:
        raise UserError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    return sizes


def apply_threads(threads: int) -> None:
    """``--threads``: torch's intra-op threads for the rest of the process (0 keeps torch's choice)."""
    from vgen.errors import UserError

    if threads < 0:
        raise UserError(f"--threads must be a positive number of threads, or 0 for torch's choice; got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


@contextmanager
def counting_steps(model):
    """Count, while inside, the calls of ``model``'s step methods and the model rows (batch dim of the first tensor
    argument, or of the condition) of those calls that ran the network: a call counts as a forward when one of the
    model's block stacks (every ``nn.ModuleList`` in it) ran during it (VAR's ``prefill`` only builds start
    tokens; FlowAR's runs the AR pass of the first scale). Yields ``(calls, rows)`` Counters by method name."""
    import torch

    calls, rows = Counter(), Counter()
    fired = [0]
    hooks = [stack[0].register_forward_pre_hook(lambda *_: fired.__setitem__(0, fired[0] + 1))
             for stack in model.modules() if isinstance(stack, torch.nn.ModuleList) and len(stack)]
    wrapped = []
    for name in STEP_METHODS:
        method = getattr(model, name, None)
        if not callable(method):
            continue

        def counted(*args, _name=name, _method=method, **kwargs):
            before = fired[0]
            out = _method(*args, **kwargs)
            calls[_name] += 1
            if fired[0] > before:
                first = next((a for a in args if isinstance(a, torch.Tensor)), None)
                if first is None and args:  # prefill(cond): the condition's rows
                    first = getattr(args[0], "cond_BD", None)
                rows[_name] += int(first.shape[0]) if first is not None else 0
            return out

        setattr(model, name, counted)
        wrapped.append(name)
    try:
        yield calls, rows
    finally:
        for name in wrapped:
            delattr(model, name)  # the class's method shows through again
        for hook in hooks:
            hook.remove()


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device):
    """Yields a dict whose ``bytes`` is set on exit: CUDA peak allocated, or CPU peak resident-memory growth."""
    import torch

    result = {"bytes": 0, "kind": ""}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.update(bytes=torch.cuda.max_memory_allocated(device) - base, kind="cuda_allocated")
        return
    try:
        base = _resident_bytes()
    except OSError:  # no /proc (not Linux): nothing to measure
        yield result
        result["kind"] = "unavailable"
        return
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _resident_bytes())
        result.update(bytes=peak[0] - base, kind="cpu_resident_growth")


def sampling_structure(transformer) -> dict:
    """The step structure a generator declares: ``units_per_image`` (``sequence_length``: raster codes or Token-Shuffle
    windows), ``tokens_per_step`` and ``shuffle_window`` of next-token models, ``patch_nums`` of next-scale ones."""
    out = {}
    if hasattr(transformer, "sequence_length"):
        out["units_per_image"] = int(transformer.sequence_length)
    if hasattr(transformer, "tokens_per_step"):
        out["tokens_per_step"] = int(transformer.tokens_per_step)
    config = getattr(transformer, "config", {})
    if "shuffle_window" in config:
        out["shuffle_window"] = int(config["shuffle_window"])
    patch_nums = getattr(transformer, "patch_nums", None)
    if patch_nums is not None:
        out["patch_nums"] = [int(p) for p in patch_nums]
    return out


def _one_model(pipe, model_dir, sizes: list[int], args):
    """Per-model bench state: its call, counts and memory per batch size (timings are added by :func:`run`)."""
    import torch

    device = pipe._execution_device()
    sampling = pipe.resolve_sampling()

    def call(batch: int):
        condition = {"prompt": [args.prompt] * batch} if pipe.is_text_conditional else \
            {"class_labels": [args.class_label] * batch}
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(batch)]
        out = pipe(**condition, **sampling, generator=generators, output_type="pt")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    results = []
    for batch in sizes:
        for _ in range(args.warmup):
            call(batch)
        with counting_steps(pipe.transformer) as (calls, rows), peak_memory(device) as memory:
            call(batch)
        results.append({
            "batch_size": batch,
            "calls_per_batch": dict(calls),
            "forwards_per_image": {**{k: v / batch for k, v in rows.items()}, "total": sum(rows.values()) / batch},
            "peak_memory_bytes": memory["bytes"],
            "peak_memory_kind": memory["kind"],
            "seconds_all": [],
        })
    report = {
        "model": str(model_dir),
        "pipeline": type(pipe).__name__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "sampling": sampling,
        "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "structure": sampling_structure(pipe.transformer),
        "results": results,
    }
    return report, call


def run(args) -> int:
    from vgen.errors import UserError
    from vgen.pipelines import load_pipeline

    if args.official:
        from vgen.eval.official_compare import run_official

        return run_official(args)
    given = [f"--{flag.replace('_', '-')}" for flag in OFFICIAL_ONLY_FLAGS if getattr(args, flag) is not None]
    if given:  # every other pipeline samples with its saved settings
        raise UserError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for the comparison with official "
                        "code: add --official PATH")
    sizes = timing_batch_sizes(args)
    apply_threads(args.threads)
    benches = []
    for model in args.model or [None]:
        pipe, model_dir = load_pipeline(model, args.device)
        pipe.set_progress_bar_config(disable=True)
        benches.append(_one_model(pipe, model_dir, sizes, args))
    # Timed calls interleaved over models and batch sizes, so slow phases of a shared machine hit all alike.
    for _ in range(args.repeats):
        for report, call in benches:
            for row in report["results"]:
                start = time.perf_counter()
                call(row["batch_size"])
                row["seconds_all"].append(time.perf_counter() - start)
    reports = []
    for report, _call in benches:
        for row in report["results"]:
            seconds = statistics.median(row["seconds_all"])
            row.update(images_per_s=row["batch_size"] / seconds, seconds_per_batch=seconds)
        rows = report["results"]
        report.update(throughput_ratio=rows[-1]["images_per_s"] / rows[0]["images_per_s"],
                      throughput_ratio_of=f"B={sizes[-1]} over B={sizes[0]}")
        reports.append(report)
    if len(reports) == 1:
        out = reports[0]
    else:
        first = reports[0]["results"]
        out = {"models": reports, "images_per_s_relative_to_first": [
            {str(row["batch_size"]): row["images_per_s"] / ref["images_per_s"]
             for row, ref in zip(report["results"], first)} for report in reports]}
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(text + "\n")
    return 0
