"""A run folder under stress: planted and corrupt checkpoints, a second run, other settings on resume, Ctrl-C, the
leftovers of a killed run. Uses the toy task of test_train_loop (CPU, seconds)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_train_loop import ToyConfig, ToyTask, _config, _Interrupted, _log

from vgen.errors import UserError
from vgen.train import checkpoint as ckpt_io
from vgen.train.loop import TrainConfig, train
from vgen.train.run_folder import LOCK_FILE, RunLock
from vgen.train.stop import TrainingInterrupted


class CodeOnLoad:
    """Unpickling this object would create ``marker``: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SignalToyTask(ToyTask):
    """Sends itself ``signals`` SIGINTs after optimiser step ``at_step`` (a user pressing Ctrl-C)."""

    def __init__(self, cfg, at_step: int, signals: int = 1):
        super().__init__(cfg)
        self.at_step, self.signals = at_step, signals

    def after_step(self, model, batch, step):
        metrics = super().after_step(model, batch, step)
        if step == self.at_step:
            for _ in range(self.signals):
                os.kill(os.getpid(), signal.SIGINT)
        return metrics


def _files(folder):
    """Every file under ``folder`` with its bytes (what a refused command must leave as it was), but the lock file."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _final_weights(out_dir):
    return torch.load(out_dir / "final" / "weights.pt")


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_a_planted_checkpoint_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "code_ran"
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "step": 3, "rng": [], "payload": CodeOnLoad(marker)},
               out / "checkpoints" / "latest.pt")
    before = _files(out)
    with pytest.raises(UserError) as err:
        train(ToyTask(ToyConfig()), _config(out), resume=True, progress=False)
    message = str(err.value)
    assert "holds a Python object (" in message and "can run code" in message and "weights_only" not in message
    assert "\n" not in message
    assert not marker.exists()
    assert _files(out) == before  # nothing written, nothing deleted


def test_resume_falls_back_to_the_newest_readable_checkpoint_and_matches_an_uninterrupted_run(tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = {"steps": 30, "log_every": 3, "ckpt_every": 5, "keep_checkpoints": 3}
    train(ToyTask(ToyConfig()), _config(whole, **common), progress=False)
    with pytest.raises(_Interrupted):
        train(ToyTask(ToyConfig(crash_after_step=22)), _config(split, **common), progress=False)
    ckpt_dir = split / "checkpoints"
    assert [p.name for p in sorted(ckpt_dir.glob("step_*.pt"))] == ["step_0000010.pt", "step_0000015.pt",
                                                                    "step_0000020.pt"]
    # latest.pt (a hard link to step 20) is cut short in place, and a planted file poses as a newer step
    data = (ckpt_dir / "latest.pt").read_bytes()
    with open(ckpt_dir / "latest.pt", "r+b") as fh:
        fh.truncate(len(data) // 2)
    torch.save({"payload": CodeOnLoad(tmp_path / "code_ran")}, ckpt_dir / "step_0000025.pt")
    capsys.readouterr()
    train(ToyTask(ToyConfig()), _config(split, **common), resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipping checkpoint step_0000025.pt" in err and "skipping checkpoint step_0000020.pt" in err
    assert f"resumed from {ckpt_dir / 'step_0000015.pt'} at step 15" in err
    assert not (tmp_path / "code_ran").exists()
    assert [r["step"] for r in _log(split)] == list(range(3, 31, 3))
    assert [r["loss"] for r in _log(split)] == [r["loss"] for r in _log(whole)]
    assert _same_weights(_final_weights(whole), _final_weights(split))


def test_a_folder_whose_checkpoints_all_fail_is_left_alone(tmp_path):
    out = tmp_path / "run"
    train(ToyTask(ToyConfig()), _config(out, steps=10, ckpt_every=5), progress=False)
    for path in (out / "checkpoints").glob("*.pt"):
        path.write_bytes(b"")
    before = _files(out)
    with pytest.raises(UserError, match="none of the 2 checkpoints .* can be read .*nothing was changed"):
        train(ToyTask(ToyConfig()), _config(out, steps=10, ckpt_every=5), resume=True, progress=False)
    assert _files(out) == before


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = RunLock(out)
    holder.acquire()  # another run is training here
    try:
        with pytest.raises(UserError, match=f"another training run is using {out} \\(process {os.getpid()}\\)"):
            train(ToyTask(ToyConfig()), _config(out), progress=False)
        assert not (out / "config.yaml").exists() and not (out / "log.jsonl").exists()
    finally:
        holder.release()
    train(ToyTask(ToyConfig()), _config(out, steps=5), progress=False)  # free again once the first run is done
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4, 5]


def test_resume_with_other_settings_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    train(ToyTask(ToyConfig()), _config(out, steps=10), progress=False)
    before = _files(out)
    with pytest.raises(UserError, match=r"other settings \(task.hidden: 32 -> 16; train.lr: 0.01 -> 0.02\)"):
        train(ToyTask(ToyConfig(hidden=16)), _config(out, steps=20, lr=0.02), resume=True, progress=False)
    assert _files(out) == before
    # steps may grow: the run continues
    train(ToyTask(ToyConfig()), _config(out, steps=12), resume=True, progress=False)
    assert [r["step"] for r in _log(out)][-3:] == [10, 11, 12]


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = {"steps": 16, "log_every": 4, "ckpt_every": 5}  # step 7 is neither a log nor a checkpoint step
    train(ToyTask(ToyConfig()), _config(whole, **common), progress=False)
    with pytest.raises(TrainingInterrupted, match="stopped at step 7 of 16 .* --resume to continue"):
        train(SignalToyTask(ToyConfig(), at_step=7), _config(split, **common), progress=False)
    assert "SIGINT: finishing this step and saving a checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert ckpt_io.load_checkpoint(split / "checkpoints" / "latest.pt")["step"] == 7
    assert not (split / "final").exists()
    train(ToyTask(ToyConfig()), _config(split, **common), resume=True, progress=False)
    without_seconds = [[{k: v for k, v in r.items() if k != "seconds"} for r in _log(run)] for run in (whole, split)]
    assert [r["step"] for r in without_seconds[1]] == [4, 8, 12, 16]
    assert without_seconds[0] == without_seconds[1]  # step 8's record averages steps 5-8 across the interrupt
    assert _same_weights(_final_weights(whole), _final_weights(split))


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as err:
        train(SignalToyTask(ToyConfig(), at_step=7, signals=2), _config(out, steps=16, ckpt_every=5), progress=False)
    assert not isinstance(err.value, TrainingInterrupted)
    assert ckpt_io.load_checkpoint(out / "checkpoints" / "latest.pt")["step"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # the lock went with the run: the folder resumes
    train(ToyTask(ToyConfig()), _config(out, steps=16, ckpt_every=5), resume=True, progress=False)
    assert _log(out)[-1]["step"] == 16


def test_the_leftovers_of_a_killed_run_are_cleaned_up_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    train(ToyTask(ToyConfig()), _config(out, steps=10, ckpt_every=5), progress=False)
    dead_pid = 4194999  # above Linux's largest pid: no such process
    (out / "checkpoints" / f".step_0000015.pt.{dead_pid}.tmp").write_bytes(b"half a checkpoint")
    (out / f".log.jsonl.{dead_pid}.tmp").write_text("{}")
    with open(out / "log.jsonl", "a") as fh:
        fh.write('{"step": 11, "lr": 0.00')  # killed in the middle of a line
    capsys.readouterr()
    train(ToyTask(ToyConfig()), _config(out, steps=12, ckpt_every=5), resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"removed .step_0000015.pt.{dead_pid}.tmp" in err and f"removed .log.jsonl.{dead_pid}.tmp" in err
    assert "dropping line 11 of" in err
    assert not list(out.rglob("*.tmp"))
    assert [r["step"] for r in _log(out)] == list(range(1, 13))


@pytest.mark.parametrize("name, value", [("lr", float("nan")), ("lr", 0.0), ("weight_decay", float("inf")),
                                         ("max_seconds", float("nan")), ("betas", (0.9, float("nan")))])
def test_non_finite_or_impossible_train_settings_are_user_errors(tmp_path, name, value):
    with pytest.raises(UserError, match=f"train.{name} must be"):
        train(ToyTask(ToyConfig()), TrainConfig(**{**vars(_config(tmp_path)), name: value}), progress=False)
    assert not (tmp_path / "config.yaml").exists()
