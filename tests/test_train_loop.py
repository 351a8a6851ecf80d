"""The training loop on a toy task: a small MLP regressing a fixed function of its input (CPU, fp32, seconds)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from vgen.errors import UserError
from vgen.train import checkpoint as ckpt_io
from vgen.train.loop import TrainConfig, build_optimizer, learning_rate, train, unwrap
from vgen.train.registry import TASKS, load_run_config, load_task
from vgen.train.task import TrainTask


@dataclass
class ToyConfig:
    num_items: int = 64
    dim: int = 6
    hidden: int = 32
    dropout: float = 0.1
    #: raise _Interrupted after this optimiser step (simulates a crash); 0 = never.
    crash_after_step: int = 0
    #: folder where every rank writes its final weights and the item indices it trained on; "" = nowhere.
    record_dir: str = ""


class _Interrupted(Exception):
    pass


class ToyTask(TrainTask):
    """y = sin(x . w): an MLP with LayerNorm and dropout (so the RNG matters), items carry a string field."""

    config_class = ToyConfig
    resumable_changes = ("crash_after_step", "record_dir")

    def __init__(self, cfg: ToyConfig):
        super().__init__(cfg)
        self.seen_indices: list[int] = []

    def build_model(self) -> nn.Module:
        c = self.cfg
        return nn.Sequential(
            nn.Linear(c.dim, c.hidden), nn.LayerNorm(c.hidden), nn.GELU(), nn.Dropout(c.dropout), nn.Linear(c.hidden, 1)
        )

    def build_dataset(self):
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(self.cfg.num_items, self.cfg.dim, generator=gen)
        y = torch.sin(x @ torch.linspace(-1, 1, self.cfg.dim)).unsqueeze(1)
        return [{"x": x[i], "y": y[i], "index": i, "name": f"item-{i}"} for i in range(self.cfg.num_items)]

    def loss(self, model, batch):
        assert batch["name"] == [f"item-{int(i)}" for i in batch["index"]]  # strings survive default_collate
        err = model(batch["x"]) - batch["y"]
        return err.pow(2).mean(), {"mae": err.abs().mean()}

    def after_step(self, model, batch, step):
        self.seen_indices += batch["index"].tolist()
        if step == self.cfg.crash_after_step:
            raise _Interrupted(step)
        return {"step_parity": float(step % 2)}

    def sample_grid(self, model, step):
        noise = torch.randn(4, self.cfg.dim)  # draws from the RNG: must not disturb training
        values = model(noise).detach().clamp(-1, 1).add(1).mul(127.5).to(torch.uint8)
        return Image.fromarray(values.expand(4, 8).numpy())

    def export(self, model, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out_dir / "weights.pt")


def _config(out_dir: Path, **overrides) -> TrainConfig:
    base = dict(
        steps=20, batch_size=8, lr=1e-2, warmup_steps=3, log_every=1, ckpt_every=5, keep_checkpoints=2, seed=7,
        out_dir=str(out_dir),
    )
    return TrainConfig(**(base | overrides))


def _log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_loss_decreases_and_log_has_one_line_per_log_step(tmp_path):
    cfg = _config(tmp_path, steps=60, log_every=10, warmup_steps=5, ckpt_every=0)
    final = train(ToyTask(ToyConfig()), cfg, progress=False)
    log = _log(tmp_path)
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    assert set(log[0]) == {"step", "lr", "loss", "grad_norm", "seconds", "mae", "step_parity"}
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert final == log[-1]
    assert [r["lr"] for r in log] == pytest.approx([learning_rate(cfg, r["step"] - 1) for r in log])
    # step_parity is averaged over the 10 steps of each interval: five odd steps.
    assert all(r["step_parity"] == pytest.approx(0.5) for r in log)
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in log)
    assert [r["seconds"] for r in log] == sorted(r["seconds"] for r in log)
    saved = (tmp_path / "config.yaml").read_text()
    assert "steps: 60" in saved and "num_items: 64" in saved
    assert (tmp_path / "final" / "weights.pt").is_file()


def test_checkpoints_keep_the_last_ones_and_latest_points_at_the_newest(tmp_path):
    train(ToyTask(ToyConfig()), _config(tmp_path, steps=23, ckpt_every=5, keep_checkpoints=2), progress=False)
    ckpt_dir = tmp_path / "checkpoints"
    # step 23 is saved because it is the last step.
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest.pt", "step_0000020.pt", "step_0000023.pt"]
    latest = ckpt_io.load_checkpoint(ckpt_dir / "latest.pt")
    newest = ckpt_io.load_checkpoint(ckpt_dir / "step_0000023.pt")
    assert latest["step"] == newest["step"] == 23
    assert set(latest) == {"model", "ema", "optimizer", "scaler", "step", "seconds", "rng", "log_sums", "config"}
    assert latest["config"]["train"]["steps"] == 23 and latest["config"]["task"]["hidden"] == 32
    for key, value in latest["model"].items():
        assert torch.equal(value, newest["model"][key])
    # A fresh run must not mix its checkpoints with an earlier run's.
    with pytest.raises(UserError, match="--resume"):
        train(ToyTask(ToyConfig()), _config(tmp_path), progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    ckpt_io.atomic_torch_save({"step": 1}, path)

    def crash_mid_write(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def test_resume_reproduces_the_uninterrupted_loss_curve_exactly(tmp_path):
    # 64 items / batch 8 = 8 steps per epoch: the crash at step 13 resumes from step 10, inside epoch 1.
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = dict(steps=20, ema_decay=0.9)
    train(ToyTask(ToyConfig()), _config(whole, sample_every=4, **common), progress=False)
    with pytest.raises(_Interrupted):
        train(ToyTask(ToyConfig(crash_after_step=13)), _config(split, **common), progress=False)
    assert [r["step"] for r in _log(split)] == list(range(1, 13))
    assert ckpt_io.load_checkpoint(split / "checkpoints" / "latest.pt")["step"] == 10
    # The resumed half loads its batches in a worker process: same items, same order.
    train(ToyTask(ToyConfig()), _config(split, num_workers=1, **common), resume=True, progress=False)

    whole_log, split_log = _log(whole), _log(split)
    assert [r["step"] for r in split_log] == list(range(1, 21))
    assert [r["loss"] for r in split_log] == [r["loss"] for r in whole_log]
    assert [r["grad_norm"] for r in split_log] == [r["grad_norm"] for r in whole_log]
    whole_final = torch.load(whole / "final" / "weights.pt")
    split_final = torch.load(split / "final" / "weights.pt")
    assert all(torch.equal(whole_final[k], split_final[k]) for k in whole_final)
    assert sorted(p.name for p in (whole / "samples").iterdir()) == [
        "step_0000004.png", "step_0000008.png", "step_0000012.png", "step_0000016.png", "step_0000020.png"
    ]
    assert Image.open(whole / "samples" / "step_0000004.png").size == (8, 4)


def test_ema_differs_from_the_raw_weights_and_is_what_export_writes(tmp_path):
    train(ToyTask(ToyConfig()), _config(tmp_path, steps=30, ema_decay=0.95), progress=False)
    state = ckpt_io.load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    exported = torch.load(tmp_path / "final" / "weights.pt")
    weight = "0.weight"
    assert torch.equal(exported[weight], state["ema"][weight])
    assert (state["ema"][weight] - state["model"][weight]).abs().max() > 1e-4
    # The EMA lags the raw weights: it sits between the initial weights and the final ones.
    torch.manual_seed(7)
    initial = ToyTask(ToyConfig()).build_model().state_dict()[weight]
    moved_raw = (state["model"][weight] - initial).norm()
    moved_ema = (state["ema"][weight] - initial).norm()
    assert 0 < moved_ema < moved_raw


def test_learning_rate_schedule_warms_up_then_decays_to_the_min_ratio():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert [learning_rate(cfg, i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 60) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert learning_rate(cfg, 110) == pytest.approx(0.1)
    cosine = [learning_rate(cfg, i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    linear = TrainConfig(steps=110, lr=2.0, warmup_steps=10, schedule="linear", min_lr_ratio=0.0)
    assert [learning_rate(linear, i) for i in (10, 35, 60, 85)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
    constant = TrainConfig(steps=110, lr=2.0, warmup_steps=0, schedule="constant")
    assert {learning_rate(constant, i) for i in range(110)} == {2.0}


def test_weight_decay_applies_to_matrices_only():
    model = ToyTask(ToyConfig()).build_model()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05), torch.device("cpu"))
    by_decay = {g["weight_decay"]: {p.ndim for p in g["params"]} for g in opt.param_groups}
    assert by_decay == {0.05: {2}, 0.0: {1}}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_bad_train_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="train.schedule"):
        train(ToyTask(ToyConfig()), _config(tmp_path, schedule="step"), progress=False)
    with pytest.raises(UserError, match="fewer than one global batch"):
        train(ToyTask(ToyConfig(num_items=4)), _config(tmp_path), progress=False)
    with pytest.raises(UserError, match="train.max_seconds"):
        train(ToyTask(ToyConfig()), _config(tmp_path, max_seconds=-1), progress=False)


def test_max_seconds_stops_at_a_log_step_with_a_checkpoint_and_an_export_and_resume_finishes(tmp_path, capsys):
    # Any positive limit is spent by the first log step (step 4).
    train(ToyTask(ToyConfig()), _config(tmp_path, steps=20, log_every=4, max_seconds=1e-9), progress=False)
    assert [r["step"] for r in _log(tmp_path)] == [4]
    assert ckpt_io.load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 4
    assert (tmp_path / "final" / "weights.pt").is_file()
    assert "stopping at step 4 of 20: train.max_seconds (1e-09 s) is spent" in capsys.readouterr().err
    train(ToyTask(ToyConfig()), _config(tmp_path, steps=20, log_every=4), resume=True, progress=False)
    assert [r["step"] for r in _log(tmp_path)] == [4, 8, 12, 16, 20]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_bf16_on_cpu_falls_back_to_fp32_with_a_one_line_warning(tmp_path, capsys):
    train(ToyTask(ToyConfig()), _config(tmp_path / "fp32", steps=3), progress=False)
    train(ToyTask(ToyConfig()), _config(tmp_path / "bf16", steps=3, precision="bf16"), progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["vgen train: warning: precision bf16 needs CUDA; training in fp32 on cpu"]
    assert [r["loss"] for r in _log(tmp_path / "bf16")] == [r["loss"] for r in _log(tmp_path / "fp32")]


# --- two processes on gloo ------------------------------------------------------------------------------------


class RecordingToyTask(ToyTask):
    """Writes, per rank, the final weights and every item index it trained on."""

    def after_step(self, model, batch, step):
        metrics = super().after_step(model, batch, step)
        if step == self.total_steps:
            rank = torch.distributed.get_rank()
            out = Path(self.cfg.record_dir)
            torch.save(unwrap(model).state_dict(), out / f"weights_rank{rank}.pt")
            (out / f"indices_rank{rank}.json").write_text(json.dumps(self.seen_indices))
        return metrics


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, record_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    task = RecordingToyTask(ToyConfig(record_dir=record_dir))
    task.total_steps = 8
    train(task, _config(Path(out_dir), steps=8, ckpt_every=4, ema_decay=0.9), progress=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_on_two_cpu_processes_keeps_weights_equal_and_shards_the_data(tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "run"), str(record)), nprocs=2, join=True)
    w0, w1 = (torch.load(record / f"weights_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # 64 items over 2 ranks x batch 8 = 4 steps per epoch: steps 1-4 cover every item exactly once.
    seen0, seen1 = (json.loads((record / f"indices_rank{r}.json").read_text()) for r in (0, 1))
    assert len(seen0) == len(seen1) == 64
    assert sorted(seen0[:32] + seen1[:32]) == list(range(64))
    assert [r["step"] for r in _log(tmp_path / "run")] == list(range(1, 9))
    state = ckpt_io.load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["step"] == 8 and len(state["rng"]) == 2 and state["ema"] is not None
    assert torch.equal(state["model"]["0.weight"], w0["0.weight"])


# --- run configs and the command line -------------------------------------------------------------------------


def test_load_run_config_splits_sections_and_applies_overrides(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "toy", f"{__name__}:ToyTask")
    assert load_task("toy") is ToyTask
    path = tmp_path / "run.yaml"
    path.write_text("task:\n  hidden: 16\n  dim: 3\ntrain:\n  steps: 50\n  lr: 1e-3\n  betas: [0.9, 0.99]\n")
    task_cfg, train_cfg = load_run_config(
        "toy", path, ["train.lr=3e-4", "task.dim=5", "train.schedule=linear", "train.betas=[0.8,0.9]"]
    )
    assert task_cfg == ToyConfig(hidden=16, dim=5)
    assert (train_cfg.steps, train_cfg.lr, train_cfg.schedule) == (50, 3e-4, "linear")
    assert train_cfg.betas == (0.8, 0.9) and train_cfg.weight_decay == 0.05
    with pytest.raises(UserError, match="task.width"):
        load_run_config("toy", path, ["task.width=3"])
    with pytest.raises(UserError, match="must start with 'task.' or 'train.'"):
        load_run_config("toy", path, ["lr=3e-4"])
    with pytest.raises(UserError, match="config file not found"):
        load_run_config("toy", tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="unknown training task 'nope'"):
        load_task("nope")


def _vgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vgen", *args], capture_output=True, text=True, timeout=60)


def test_cli_train_errors_are_one_line_with_exit_code_2(tmp_path):
    unknown = _vgen("train", "no-such-task", "--config", str(tmp_path / "x.yaml"))
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        f"vgen train: error: unknown training task 'no-such-task'; available tasks: {', '.join(sorted(TASKS))}"
    ]
    missing = _vgen("train", "var", "--config", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "config file not found" in missing.stderr
    no_config = _vgen("train", "var")
    assert no_config.returncode == 2
    assert len(no_config.stderr.strip().splitlines()) == 1 and "--config" in no_config.stderr
    helped = _vgen("train", "--help")
    assert helped.returncode == 0 and "tokenizer" in helped.stdout and "var" in helped.stdout
