"""What every comparison with official code shares (``vgen bench sample --official PATH``): the family is chosen from
the model, the official checkout is imported under its own names, the official and vgen calls are timed alternately
in one process, and one JSON layout reports them.

* :func:`run_official`: picks the family (``--random-var`` / a ``VARPipeline`` folder: :mod:`vgen.eval.bench_official`;
  ``--random-xar`` / an ``XARPipeline`` folder: :mod:`vgen.eval.bench_official_xar`), so one ``--official`` flag
  serves both;
* :func:`import_checkout`: the official modules of a checkout, imported with the checkout first on ``sys.path`` and
  taken out of ``sys.modules`` again afterwards (the calls keep working through the module objects), so checkouts
  whose top-level packages share a name (VAR's and xAR's are both ``models``) can be compared in one process, and a
  module of that name the process had imported before is put back;
* :func:`time_alternately`: per batch size, ``warmup`` untimed rounds (at least one, the last of which measures each
  side's peak memory), then ``repeats`` timed rounds, the sides called in turn in every round so load on a shared
  machine falls on both alike; median seconds per batch, images/s and ``vgen_speedup`` = official s / vgen s;
* :func:`comparison_report` / :func:`emit_report`: the JSON keys both families print (and ``--output`` writes).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

#: ``--autocast`` -> the dtype both sides run under ``torch.autocast`` (None: fp32 throughout)
AUTOCAST_DTYPES = {"none": None, "fp16": "float16", "bf16": "bfloat16"}
#: the two sides of every comparison, in the order each round calls them
SIDES = ("official", "vgen")


def _never_called(*_args, **_kwargs):
    raise RuntimeError("a stand-in for a module the official code imports but does not call was called")


def import_checkout(path: str | Path, *, family: str, repository: str, required: Sequence[str],
                    modules: Sequence[str], stand_ins: Mapping[str, Sequence[str]] | None = None) -> list:
    """The modules ``modules`` (e.g. ``("models", "models.var")``) of the official ``family`` checkout at ``path``.

    ``required``: files the checkout must have (else one :class:`~vgen.errors.UserError` naming the missing ones and
    ``repository`` to clone). ``stand_ins``: module name -> attribute names of modules the official code imports but
    never calls (xAR's ``flash_attn``); when one does not import here, a stand-in module with those attributes is in
    ``sys.modules`` while the checkout imports, and removed afterwards. The checkout's own top-level modules are
    removed from ``sys.modules`` once imported (see the module docstring); nothing else of the process changes."""
    from vgen.errors import UserError

    root = Path(path).expanduser()
    missing = [name for name in required if not (root / name).is_file()]
    if missing:
        raise UserError(f"--official {path} is not a checkout of the official {family} code (missing "
                        f"{', '.join(missing)}); clone {repository} and pass its folder")
    root = root.resolve()
    before = dict(sys.modules)
    installed = []
    for name, attributes in (stand_ins or {}).items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        stand_in = types.ModuleType(name)
        for attribute in attributes:
            setattr(stand_in, attribute, _never_called)
        sys.modules[name] = stand_in
        installed.append(name)
    # a module the process had under a name the checkout uses (its own `models`, another checkout's) steps aside
    top_level = {name.split(".")[0] for name in modules} | {p.stem for p in root.iterdir()
                                                           if p.suffix == ".py" or (p / "__init__.py").is_file()}
    shadowed = {name: mod for name, mod in before.items() if name.split(".")[0] in top_level}
    for name in shadowed:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return [importlib.import_module(name) for name in modules]
    except ImportError as exc:
        raise UserError(f"the official {family} code at {path} does not import ({exc}); install what its "
                        "README or requirements name") from None
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] in top_level or n in installed]:
            del sys.modules[name]
        sys.modules.update(shadowed)


@contextmanager
def patched(owner, name: str, value):
    """``owner.name`` is ``value`` while inside and the original again afterwards (e.g. official code's
    ``torch.Tensor.cuda`` made a no-op for a CPU run)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def precision(device, autocast: str):
    """A context factory: both sides under ``torch.autocast`` in the dtype of ``--autocast``, or plain fp32."""
    import torch

    dtype = AUTOCAST_DTYPES[autocast]
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=getattr(torch, dtype))


def synchronized(call: Callable[[int], object], device) -> Callable[[int], object]:
    """``call`` that returns only once the device has finished its work (CUDA runs asynchronously)."""
    import torch

    def done(batch: int):
        out = call(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return done


def time_alternately(calls: Mapping[str, Callable[[int], object]], sizes: Sequence[int], warmup: int, repeats: int,
                     device) -> list[dict]:
    """One row per batch size: ``{side}_peak_memory_bytes`` (of the last untimed call), ``{side}_seconds_per_batch``
    (median of ``repeats``), ``{side}_images_per_s``, ``{side}_seconds_all`` for each of ``calls`` (official first,
    then vgen) and ``vgen_speedup`` = official seconds / vgen seconds. Every round calls each side once, in turn."""
    from vgen.eval.bench_sample import peak_memory

    results = []
    for batch in sizes:
        row = {"batch_size": batch}
        untimed = max(warmup, 1)  # the last untimed round also measures each side's peak memory
        for round_index in range(untimed):
            for name, call in calls.items():
                if round_index < untimed - 1:
                    call(batch)
                    continue
                with peak_memory(device) as memory:
                    call(batch)
                row[f"{name}_peak_memory_bytes"] = memory["bytes"]
        seconds = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call(batch)
                seconds[name].append(time.perf_counter() - start)
        for name, values in seconds.items():
            median = statistics.median(values)
            row.update({f"{name}_seconds_per_batch": median, f"{name}_images_per_s": batch / median,
                        f"{name}_seconds_all": values})
        row["vgen_speedup"] = row["official_seconds_per_batch"] / row["vgen_seconds_per_batch"]
        results.append(row)
    return results


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where the system does not say)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def comparison_report(*, model_name: str, official: str | Path, device, parameters: int, family: dict,
                      parity: dict, results: list[dict], load_before: list[float] | None) -> dict:
    """The JSON both families print: the model, the official code, where and how it ran (threads, the load average
    before and after), ``family``'s own keys (sampling settings ...), the parity check before timing and the rows of
    :func:`time_alternately`."""
    import torch

    return {
        "model": model_name,
        "official_code": str(Path(official).expanduser().resolve()),
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "parameters": parameters,
        **family,
        "parity": parity,
        "results": results,
        "vgen_speedup_of": "official seconds per batch / vgen seconds per batch, calls alternated in one process",
        "load_average_before_after": [load_before, load_average()],
    }


def emit_report(report: dict, output: str | None) -> int:
    """Print the report as JSON (and write it to ``output``); the command's exit status."""
    import json

    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return 0


def run_official(args) -> int:
    """``vgen bench sample --official PATH``: the comparison of the model's family (VAR or xAR)."""
    from vgen.errors import UserError

    chosen = [flag for flag, value in (("--model", args.model), ("--random-var", args.random_var),
                                       ("--random-xar", args.random_xar)) if value]
    if len(chosen) > 1:
        raise UserError("give either --model DIR or --random-var SIZE (VAR) or --random-xar SIZE (xAR) for the "
                        f"official comparison, not {' and '.join(chosen)}")
    if not chosen:
        raise UserError("the official comparison needs the model: --model DIR (a class-conditional VAR or xAR "
                        "pipeline), --random-var var-d16 or --random-xar xar-tiny")
    from vgen.eval.bench_sample import apply_threads

    apply_threads(args.threads)
    if args.random_var:
        from vgen.eval.bench_official import run

        return run(args)
    if args.random_xar:
        from vgen.eval.bench_official_xar import run

        return run(args)
    if len(args.model) > 1:
        raise UserError("the official comparison measures one pipeline: give one --model DIR")
    from vgen.pipelines import load_pipeline
    from vgen.pipelines.var import VARPipeline
    from vgen.pipelines.xar import XARPipeline

    pipe, model_dir = load_pipeline(args.model[0], args.device)
    if isinstance(pipe, VARPipeline):
        from vgen.eval.bench_official import run
    elif isinstance(pipe, XARPipeline):
        from vgen.eval.bench_official_xar import run
    else:
        raise UserError(f"--official compares VAR or xAR: {model_dir} holds a {type(pipe).__name__}")
    return run(args, pipe, str(model_dir))
