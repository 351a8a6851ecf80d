"""Wall times of a new user's first commands, for two installs of vgen side by side (e.g. before and after a change).

    python configs/startup_timings.py --python before=/path/to/old/.venv/bin/python \
        --python after=.venv/bin/python --repeats 7 --out runs/startup.json

Each install runs, in alternation (so a busy or shared CPU slows both alike), ``vgen --help``, ``vgen generate
"a photo of a red circle" --n 4`` and a script that times the phases of the same work in one process (import
torch, import the pipeline module with diffusers, load the shipped model, first and second call). The medians
and every run go to JSON. The phases script runs with the environment ``vgen generate`` itself would set in that
install (``OMP_WAIT_POLICY`` when its CLI sets one); the whole commands run with the caller's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import vgen.pipelines.var  # noqa: F401 - the pipeline module pulls in diffusers
t2 = time.perf_counter()
from vgen.pipelines import load_pipeline
pipe, _ = load_pipeline(None, "cpu")
pipe.set_progress_bar_config(disable=True)
t3 = time.perf_counter()
prompt = ["a photo of a red circle"] * 4
pipe(prompt=prompt, generator=[torch.Generator().manual_seed(i) for i in range(4)])
t4 = time.perf_counter()
pipe(prompt=prompt, generator=[torch.Generator().manual_seed(i) for i in range(4)])
t5 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import vgen.pipelines.var (diffusers)": t2 - t1,
                  "load shipped model": t3 - t2, "first call (4 images)": t4 - t3,
                  "second call (4 images)": t5 - t4}))
"""

CLI_ENV = r"""
import json, vgen.cli
print(json.dumps({"OMP_WAIT_POLICY": getattr(vgen.cli, "OMP_WAIT_POLICY", None)}))
"""


def timed(cmd: list[str], env: dict, cwd: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", required=True, metavar="NAME=PATH",
                        help="an install to time: its name and its Python interpreter (give two or more)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--phase-repeats", type=int, default=None,
                        help="runs of the phases script per install (default: --repeats)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    installs = dict(item.split("=", 1) for item in args.python)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    runs: dict[str, dict[str, list]] = {name: {} for name in installs}
    phase_env = {}
    for name, python in installs.items():
        cli = json.loads(subprocess.run([python, "-c", CLI_ENV], capture_output=True, text=True, env=env,
                                        check=True).stdout)
        phase_env[name] = {**env, **{k: v for k, v in cli.items() if v is not None}}
    with tempfile.TemporaryDirectory() as work:
        phase_repeats = args.repeats if args.phase_repeats is None else args.phase_repeats
        for repeat in range(args.repeats):
            for name, python in installs.items():
                record = runs[name]
                seconds, _ = timed([python, "-m", "vgen", "--help"], env, work)
                record.setdefault("vgen --help", []).append(seconds)
                seconds, _ = timed([python, "-m", "vgen", "generate", "a photo of a red circle", "--n", "4",
                                    "--out", str(Path(work) / f"{name}.png")], env, work)
                record.setdefault("vgen generate (4 images, wall)", []).append(seconds)
                if repeat < phase_repeats:
                    _, out = timed([python, "-c", PHASES], phase_env[name], work)
                    for phase, value in json.loads(out.strip().splitlines()[-1]).items():
                        record.setdefault(phase, []).append(value)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {
        "repeats": args.repeats, "cpus": os.cpu_count(), "load_average_at_end": load,
        "phase_env": {name: {k: v for k, v in e.items() if k == "OMP_WAIT_POLICY"} for name, e in phase_env.items()},
        "median_s": {name: {k: round(statistics.median(v), 3) for k, v in r.items()} for name, r in runs.items()},
        "runs_s": {name: {k: [round(x, 3) for x in v] for k, v in r.items()} for name, r in runs.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
