"""The one training loop: every :class:`~vgen.train.task.TrainTask` (tokenizers, generators) runs through it.

The loop owns what every run needs and a task should not repeat: AdamW with decoupled weight decay on >=2-D
weights only, warmup + cosine/linear decay, gradient clipping, an optional EMA copy, mixed precision on CUDA,
DDP under ``torchrun``, a deterministic data order, JSONL logs, atomic checkpoints with exact resume, sample grids
and the final export. Outputs of a run, under ``TrainConfig.out_dir``::

    config.yaml                      # the resolved run config (task + train sections)
    log.jsonl                        # one line per log step: step, lr, loss, task metrics, grad_norm, seconds
    checkpoints/step_0000100.pt      # model, EMA, optimizer, grad scaler, step, RNG states, config
    checkpoints/latest.pt
    samples/step_0000100.png         # task.sample_grid(...)
    final/                           # task.export(EMA model if enabled, else the model)
    .vgen-train.lock                 # held while a run trains: a second run in the folder is refused

Ctrl-C (or SIGTERM) stops a run after the step it is in, with a checkpoint; a second Ctrl-C stops at once. A resumed
run continues from the newest checkpoint that reads (a corrupt ``latest.pt`` falls back to the step files), refuses
settings that differ from the run's (before it writes anything), and removes the ``.tmp`` files of a killed run.

Exact resume: the batches of optimiser step ``s`` depend only on ``(seed, s)`` (the epoch is ``s //
steps_per_epoch`` and resuming skips to the right position inside it), and every rank's RNG states are saved, so
``resume=True`` continues the loss curve of an uninterrupted run (bit-exact in fp32 on CPU; the running sums of a
log interval are saved too, so a checkpoint between log steps resumes the same log). Random augmentations
drawn inside data-loader workers are the exception: worker seeds depend on ``(seed, start step, rank)``, so those
streams restart at the resume point.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from vgen.atomic_files import remove_leftovers
from vgen.config import save_config, to_dict
from vgen.errors import UserError
from vgen.train.checkpoint import (
    capture_rng_state,
    checkpoint_files,
    load_checkpoint,
    newest_readable_checkpoint,
    restore_rng_state,
    save_checkpoint,
    step_filename,
)
from vgen.distributed import (
    DistContext,
    any_rank,
    barrier,
    broadcast_object,
    gather_objects,
    mean_across_ranks,
    setup_distributed,
    teardown_distributed,
)
from vgen.train.ema import EMA
from vgen.train.run_folder import RunLock, read_log, rewind_log
from vgen.train.stop import StopRequest, TrainingInterrupted, ignore_interrupts
from vgen.train.task import TrainTask

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Seeds of a run: ``train.seed`` plus rank and step offsets must stay a 64-bit seed.
MAX_TRAIN_SEED = 2**63
#: ``train.`` settings a resumed run may change: they decide how long it runs and what it writes, not what it computes.
RESUMABLE_CHANGES = ("steps", "max_seconds", "out_dir", "num_workers", "log_every", "ckpt_every", "sample_every",
                     "keep_checkpoints")


@dataclass
class TrainConfig:
    """The ``train:`` section of a run config."""

    steps: int = 1000
    #: batch size of each process (the global batch is ``batch_size * world_size``).
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    #: max global gradient norm; 0 turns clipping off (the norm is still logged).
    grad_clip: float = 2.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    #: the learning rate decays to ``lr * min_lr_ratio`` at ``steps`` (cosine and linear schedules).
    min_lr_ratio: float = 0.0
    #: EMA decay of the weights (e.g. 0.999); 0 turns EMA off.
    ema_decay: float = 0.0
    #: "fp32", "bf16" or "fp16" (autocast on CUDA; fp16 adds a GradScaler). On CPU training falls back to fp32.
    precision: str = "fp32"
    log_every: int = 10
    #: checkpoint every this many steps (and always after the last step); 0 saves only the last step.
    ckpt_every: int = 1000
    #: sample grid every this many steps; 0 turns it off.
    sample_every: int = 0
    #: how many ``step_*.pt`` files to keep; 0 keeps all.
    keep_checkpoints: int = 3
    seed: int = 0
    num_workers: int = 0
    #: stop early once this invocation has trained this many seconds (checked at log steps; the stop step is
    #: logged, checkpointed and exported like a last step, so ``--resume`` can continue); 0 = no limit.
    max_seconds: float = 0.0
    out_dir: str = "runs/train"

    def validate(self) -> None:
        """Raise :class:`UserError` for settings the loop cannot run with."""
        for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "ema_decay", "max_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise UserError(f"train.{name} must be a finite number, got {value!r}")
        if self.lr <= 0:
            raise UserError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError(f"train.weight_decay and train.grad_clip must be >= 0 (grad_clip 0 = off), got "
                            f"{self.weight_decay} and {self.grad_clip}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "sample_every", "keep_checkpoints", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay must be in [0, 1) (0 turns EMA off), got {self.ema_decay}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < MAX_TRAIN_SEED):
            raise UserError(f"train.seed must be an integer from 0 to {MAX_TRAIN_SEED - 1}, got {self.seed!r}")
        if self.max_seconds < 0:
            raise UserError(f"train.max_seconds must be >= 0 (0 = no limit), got {self.max_seconds}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise UserError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")


def learning_rate(cfg: TrainConfig, update: int) -> float:
    """Learning rate of optimiser update ``update`` (0-based): linear warmup to ``cfg.lr`` over ``warmup_steps``
    updates, then cosine/linear decay that would reach ``cfg.lr * min_lr_ratio`` at ``update == steps``."""
    if update < cfg.warmup_steps:
        return cfg.lr * (update + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (update - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP (or ``torch.compile``) wrapper."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on >=2-D weights (matrices, convolutions) and none on biases, norms and other
    1-D parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("the task's model has no trainable parameters")
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in a (nested) batch moved to ``device``; strings and numbers left as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        moved = [move_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


class StepIndices(Sampler):
    """Dataset indices for optimiser steps ``start_step + 1, start_step + 2, ...`` (``batch_size`` per step, no end),
    in an order fixed by ``(seed, step)``.

    Each epoch is one pass of a :class:`DistributedSampler` (shuffled with ``seed`` and the epoch number, this
    rank's share, the last incomplete batch dropped); a run resumed at step ``s`` starts epoch
    ``s // steps_per_epoch`` at batch ``s % steps_per_epoch``, which is exactly where the uninterrupted run was.
    One endless stream feeds one ``DataLoader`` iterator, so worker processes start once per run, not per epoch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, ctx: DistContext, start_step: int):
        self.epoch_sampler = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.steps_per_epoch = len(self.epoch_sampler) // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the dataset has {len(dataset)} items, fewer than one global batch "
                f"({batch_size} x {ctx.world_size} processes); lower train.batch_size or use more data"
            )
        self.start_step = start_step

    def __iter__(self) -> Iterator[int]:
        epoch, skip = divmod(self.start_step, self.steps_per_epoch)
        while True:
            self.epoch_sampler.set_epoch(epoch)
            yield from list(self.epoch_sampler)[skip * self.batch_size : self.steps_per_epoch * self.batch_size]
            epoch, skip = epoch + 1, 0


def step_batches(dataset: Dataset, cfg: TrainConfig, ctx: DistContext, start_step: int) -> Iterator:
    """An endless iterator of (collated) batches for the steps after ``start_step``; see :class:`StepIndices`."""
    # Worker seeds come from this generator, not from the global RNG, so creating the loader (at the start or at a
    # resume point) leaves the training RNG streams untouched.
    worker_seeds = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + start_step) * 4099 + ctx.rank) % 2**64)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=StepIndices(dataset, cfg.batch_size, cfg.seed, ctx, start_step),
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=ctx.device.type == "cuda",
        generator=worker_seeds,
        worker_init_fn=ignore_interrupts if cfg.num_workers > 0 else None,
    )
    return iter(loader)


class _RunningMeans:
    """Sums of loss, grad norm and task metrics since the last log step, kept on device (no per-step sync)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count = 0

    def add(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            value = value.detach().float().mean() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def state_dict(self) -> dict:
        """The sums so far (on CPU), for a checkpoint taken between two log steps."""
        sums = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in self.sums.items()}
        return {"sums": sums, "count": self.count}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sums = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state["sums"].items()}
        self.count = int(state["count"])

    def pop(self, ctx: DistContext) -> dict[str, float]:
        """Means over the interval and over ranks (every rank must have logged the same keys)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        stacked = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=ctx.device) for k in keys])
        means = mean_across_ranks(stacked / max(1, self.count), ctx).tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, means))


def _say(message: str, ctx: DistContext) -> None:
    if ctx.is_main:
        tqdm.write(f"vgen train: {message}", file=sys.stderr)


def _autocast_dtype(cfg: TrainConfig, ctx: DistContext) -> torch.dtype | None:
    dtype = PRECISIONS[cfg.precision]
    if dtype is not None and ctx.device.type != "cuda":
        _say(f"warning: precision {cfg.precision} needs CUDA; training in fp32 on {ctx.device.type}", ctx)
        return None
    return dtype


def _out_of_time(cfg: TrainConfig, seconds: float, ctx: DistContext) -> bool:
    """Whether ``train.max_seconds`` is spent, as rank 0 sees it (every rank gets the same answer)."""
    if not cfg.max_seconds:
        return False
    flag = torch.tensor([float(seconds >= cfg.max_seconds)], device=ctx.device)
    if ctx.is_distributed:
        torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(saved: dict, current: dict, task_changes: tuple[str, ...] = ()) -> list[str]:
    """The settings of ``current`` that differ from the run config ``saved`` with a checkpoint, beyond those a resumed
    run may change (:data:`RESUMABLE_CHANGES`, and the task's ``task_changes``), as ``"key: saved -> current"``."""
    old, new = _flatten(saved), _flatten(current)
    allowed = {f"train.{name}" for name in RESUMABLE_CHANGES} | {f"task.{name}" for name in task_changes}
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if key not in allowed and old.get(key) != new.get(key)]


def _decided_on_main(ctx: DistContext, decide):
    """Run ``decide()`` on rank 0 only and give its result to every rank; a :class:`UserError` it raises is raised on
    every rank (so no rank waits for one that stopped)."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = decide()
        except UserError as err:
            error = str(err)
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise UserError(error)
    return result


def _prepare_run_folder(out_dir: Path, lock: RunLock, run_config: dict, resume: bool, task_changes: tuple[str, ...],
                        say) -> tuple[Path, dict] | None:
    """Rank 0, before anything is written: lock the folder, remove leftovers, pick the checkpoint to resume from and
    check its settings, then write ``config.yaml`` and rewind (or start) the log. Returns ``(path, state)`` of the
    checkpoint to resume from, or None to start at step 0."""
    ckpt_dir, log_path = out_dir / "checkpoints", out_dir / "log.jsonl"
    lock.acquire()
    for path in [*remove_leftovers(out_dir), *remove_leftovers(ckpt_dir)]:
        say(f"removed {path.name}, left by an interrupted write")
    found = None
    if resume:
        found = newest_readable_checkpoint(ckpt_dir, say)
        if found is None:
            say(f"no checkpoint in {ckpt_dir}; starting from step 0")
    elif checkpoint_files(ckpt_dir):
        raise UserError(
            f"{out_dir} already holds checkpoints of a run; pass --resume to continue it, or choose another --out"
        )
    if found is not None and isinstance(found[1].get("config"), dict):
        changes = config_changes(found[1]["config"], run_config, task_changes)
        if changes:
            raise UserError(
                f"{out_dir} holds a run made with other settings ({'; '.join(changes[:4])}"
                f"{f'; {len(changes) - 4} more' if len(changes) > 4 else ''}); resume with the run's settings "
                f"({out_dir / 'config.yaml'}), or choose another --out for a new run"
            )
    save_config(run_config, out_dir / "config.yaml")
    if found is not None:
        rewind_log(log_path, int(found[1]["step"]), say)
    elif log_path.exists():
        log_path.unlink()
    return found


def train(task: TrainTask, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train ``task``'s model with settings ``cfg``; return the metrics of the final log step.

    Runs as one process, or as every rank of a ``torchrun`` job (DDP; only rank 0 logs and saves). With
    ``resume=True`` the run continues from the newest checkpoint in ``out_dir/checkpoints`` that reads, if there is
    one. Ctrl-C / SIGTERM stops it after the current step with a checkpoint (:class:`TrainingInterrupted`).
    """
    cfg.validate()
    ctx = setup_distributed()
    try:
        return _train(task, cfg, ctx, resume, progress)
    finally:
        teardown_distributed(ctx)


def _train(task: TrainTask, cfg: TrainConfig, ctx: DistContext, resume: bool, progress: bool) -> dict:
    lock = RunLock(Path(cfg.out_dir))
    try:
        with StopRequest(lambda message: _say(message, ctx)) as stop:
            return _train_locked(task, cfg, ctx, resume, progress, lock, stop)
    finally:
        lock.release()


def _train_locked(task: TrainTask, cfg: TrainConfig, ctx: DistContext, resume: bool, progress: bool, lock: RunLock,
                  stop: StopRequest) -> dict:
    out_dir = Path(cfg.out_dir)
    ckpt_dir, sample_dir, log_path = out_dir / "checkpoints", out_dir / "samples", out_dir / "log.jsonl"
    run_config = {"task": to_dict(task.cfg), "train": to_dict(cfg)}
    loaded: dict = {}

    def prepare() -> str | None:
        found = _prepare_run_folder(out_dir, lock, run_config, resume, task.resumable_changes,
                                    lambda message: _say(message, ctx))
        if found is None:
            return None
        loaded[str(found[0])] = found[1]
        return str(found[0])

    resume_path = _decided_on_main(ctx, prepare)

    # Same seed on every rank for the initial weights; per-rank seeds for the randomness of the steps.
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    # Only rank 0 saves, samples and exports, so only rank 0 keeps the EMA copy.
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 and ctx.is_main else None
    model.to(ctx.device)
    if ema is not None:
        ema.model.to(ctx.device)
    optimizer = build_optimizer(model, cfg, ctx.device)
    amp_dtype = _autocast_dtype(cfg, ctx)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    torch.manual_seed(cfg.seed + ctx.rank)
    means = _RunningMeans()

    start_step, seconds_before = 0, 0.0
    if resume_path is not None:
        state = loaded.pop(resume_path, None) or load_checkpoint(Path(resume_path))
        start_step, seconds_before = _restore(Path(resume_path), state, model, ema, optimizer, scaler, means, cfg, ctx)
        _say(f"resumed from {resume_path} at step {start_step}", ctx)

    dataset = task.build_dataset()
    batches = step_batches(dataset, cfg, ctx, start_step)
    train_model: nn.Module = model
    if ctx.is_distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    train_model.train()
    autocast = (
        (lambda: torch.autocast(device_type=ctx.device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    )
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    last_record: dict = {}
    if ctx.is_main and start_step:
        records = read_log(log_path, lambda message: _say(message, ctx))
        last_record = records[-1] if records else {}
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (progress and ctx.is_main), dynamic_ncols=True)
    t0 = time.perf_counter()

    out_of_time = False
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            lr = learning_rate(cfg, step - 1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = move_to_device(next(batches), ctx.device)
            with autocast():
                loss, metrics = task.loss(train_model, batch)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step)
            extra = task.after_step(train_model, batch, step)
            means.add({**metrics, **extra, "loss": loss, "grad_norm": grad_norm})
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                interval = means.pop(ctx)
                record = {
                    "step": step,
                    "lr": lr,
                    "loss": interval.pop("loss"),
                    "grad_norm": interval.pop("grad_norm"),
                    "seconds": seconds_before + time.perf_counter() - t0,
                    **interval,
                }
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(
                        f"the loss is {record['loss']} at step {step}; lower train.lr or train.grad_clip, or use "
                        "precision bf16/fp32"
                    )
                if ctx.is_main:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.3g}")
                last_record = record
                out_of_time = _out_of_time(cfg, time.perf_counter() - t0, ctx)

            if cfg.sample_every and step % cfg.sample_every == 0 and ctx.is_main:
                grid_path = sample_dir / step_filename(step).replace(".pt", ".png")
                _save_sample_grid(task, ema.model if ema is not None else model, grid_path, step, autocast, ctx)

            stopping = any_rank(stop.requested, ctx)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or out_of_time or stopping:
                rng_states = gather_objects(capture_rng_state(), ctx)
                log_sums = gather_objects(means.state_dict(), ctx)
                if ctx.is_main:
                    state = {
                        "model": model.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        "step": step,
                        "seconds": seconds_before + time.perf_counter() - t0,
                        "rng": rng_states,
                        "log_sums": log_sums,
                        "config": run_config,
                    }
                    save_checkpoint(state, ckpt_dir, step, cfg.keep_checkpoints)
                barrier(ctx)
            if stopping:
                raise TrainingInterrupted(
                    f"stopped at step {step} of {cfg.steps} with a checkpoint in {ckpt_dir}; run the same command "
                    "with --resume to continue"
                )
            if out_of_time:
                _say(
                    f"stopping at step {step} of {cfg.steps}: train.max_seconds ({cfg.max_seconds:g} s) is spent; "
                    "--resume continues the run",
                    ctx,
                )
                break
    finally:
        bar.close()

    if ctx.is_main:
        task.export(ema.model if ema is not None else model, out_dir / "final")
        _say(f"done: {out_dir / 'final'}", ctx)
    barrier(ctx)
    return last_record


def _restore(path: Path, state: dict, model, ema, optimizer, scaler, means: _RunningMeans, cfg: TrainConfig,
             ctx: DistContext) -> tuple[int, float]:
    """Load checkpoint ``state`` (read from ``path``) into the run's objects and this rank's RNGs; return (step,
    seconds trained so far)."""
    try:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(
            f"checkpoint {path} does not match the model this config builds "
            f"({str(err).splitlines()[0]}); resume with the config the run started with"
        ) from err
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    rng_states = state["rng"]
    if len(rng_states) == ctx.world_size:
        restore_rng_state(rng_states[ctx.rank])
        log_sums = state.get("log_sums")
        if log_sums is not None and len(log_sums) == ctx.world_size:
            means.load_state_dict(log_sums[ctx.rank], ctx.device)
    else:
        torch.manual_seed(cfg.seed + ctx.rank + step)
        _say(
            f"warning: the checkpoint has RNG states of {len(rng_states)} processes, this run has "
            f"{ctx.world_size}; reseeding",
            ctx,
        )
    return step, float(state.get("seconds", 0.0))


def _save_sample_grid(task: TrainTask, model: nn.Module, path: Path, step: int, autocast, ctx: DistContext) -> None:
    """``task.sample_grid`` in eval mode, with its random draws kept out of the training RNG streams."""
    was_training = model.training
    model.eval()
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast():
        image = task.sample_grid(model, step)
    model.train(was_training)
    if image is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
