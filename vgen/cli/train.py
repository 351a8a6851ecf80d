"""``vgen train TASK --config FILE``: run a registered training task through :func:`vgen.train.loop.train`.

The same command runs on one device or many: ``torchrun --nproc_per_node 8 -m vgen train var --config ...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vgen.errors import UserError


def _run(args: argparse.Namespace) -> int:
    from vgen.train.loop import train
    from vgen.train.registry import check_task_name, load_run_config, load_task

    check_task_name(args.task)
    if not Path(args.config).is_file():
        raise UserError(f"config file not found: {args.config} (pass a run config YAML, e.g. from configs/)")
    task_class = load_task(args.task)
    task_cfg, train_cfg = load_run_config(args.task, args.config, args.set)
    if args.out is not None:
        train_cfg.out_dir = str(args.out)
    train_cfg.validate()  # before the task loads its data and models
    train(task_class(task_cfg), train_cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def register(subparsers) -> None:
    from vgen.train.registry import TASKS

    parser = subparsers.add_parser(
        "train",
        help="train a tokenizer or generator from a run config",
        description="Train a model. A run config is YAML with a 'task:' section (the task's settings) and a "
        "'train:' section (steps, batch_size, lr, schedule, precision, ...). Run under torchrun for DDP.",
        epilog=f"tasks: {', '.join(sorted(TASKS))}. Example: vgen train var --config configs/shapes/var_text.yaml "
        "--set train.lr=3e-4 --out runs/var. Ctrl-C saves a checkpoint and stops; --resume continues.",
    )
    parser.add_argument("task", metavar="TASK", help=f"what to train: {', '.join(sorted(TASKS))}")
    parser.add_argument("--config", required=True, metavar="FILE", help="run config YAML (task: and train: sections)")
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. --set train.lr=3e-4 task.resolution=64",
    )
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (train.out_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest readable checkpoint in DIR/checkpoints, if there is one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    parser.set_defaults(func=_run)
