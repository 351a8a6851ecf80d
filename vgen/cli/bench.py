"""``vgen bench <target>``: speed benchmarks that print JSON, each timed against a baseline in the same process.

Targets are the small dict :data:`TARGETS`: name -> (module, help). Each module defines
``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when its target runs, and its
``add_arguments`` must not import torch, so ``vgen --help`` stays fast.
"""

from __future__ import annotations

import importlib

from vgen.cli import OneLineErrorParser

TARGETS = {
    "kernels": ("vgen.eval.bench_kernels", "compressed-KV-cache kernels vs torch SDPA and copy bandwidth (CUDA)"),
    "sample": ("vgen.eval.bench_sample", "sampling speed of any saved pipeline: images/s per batch size, forwards "
               "per image, peak memory"),
    "speculative": ("vgen.eval.bench_speculative",
                    "a speculative method (sjd, exact, lantern, mulo-sd, cspd; a sweep of its knob) against "
                    "target-only sampling: speedups at B=1 and 16, forwards, acceptance, Shapes-GenEval / FID deltas, "
                    "plot"),
    "video": ("vgen.eval.bench_video", "video generation per KV cache: FPS, first-frame latency, cache bytes; "
              "--sdvg: SDVG routing over --tau against target-only and draft-only (acceptance, speedup, caption "
              "adherence, per-frame Shapes-FID, plot)"),
}


def _runner(module_name: str):
    def run(args) -> int:
        return importlib.import_module(module_name).run(args)

    return run


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="speed benchmarks (JSON on stdout)",
                                   description=__doc__.split("\n\n")[0])
    targets = parser.add_subparsers(dest="target", metavar="TARGET", parser_class=OneLineErrorParser)
    for name, (module_name, help_text) in TARGETS.items():
        sub = targets.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)
        sub.set_defaults(func=_runner(module_name))
