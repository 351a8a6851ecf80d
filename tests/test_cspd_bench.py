"""``vgen bench speculative --speculative cspd`` on tiny random class-conditional FlowAR pipelines: target-only
(the same SDE) first, acceptance, forwards and speedups (ratios in one process) at B=1 and B=16, a gamma sweep;
one-line refusals for a method the family lacks."""

import json

import pytest
import torch
from vgen.cli import main

from test_flowar_cspd import folders  # noqa: F401  (the module fixture: target, small, same, ... folders)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cspd_speed_report_at_b1_and_b16(folders, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "cspd.json"
    assert main(["bench", "speculative", "--model", str(folders / "target"), "--speculative", "cspd", "--drafter",
                 str(folders / "small"), "--set", "prefill_fraction=0.3", "--sweep", "1", "2", "--sweep-knob",
                 "gamma", "--batch-sizes", "1", "16", "--repeats", "1", "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text()) and report["method"] == "cspd"
    speed = report["speed"]
    assert [r["setting"] for r in speed] == ["target-only", "cspd gamma=1", "cspd gamma=2"] * 2
    assert [r["batch_size"] for r in speed] == [1, 1, 1, 16, 16, 16]
    steps, scales = 4, 3  # num_steps 4 on the SDE grid: 3 stochastic steps + the final drift step per scale
    target_only = 1 + scales * steps + scales - 1
    for row in speed:
        # CSpD re-runs the target's whole trajectory per scale: as many target calls as target-only sampling
        assert row["target_forwards_per_image"] == target_only and row["speedup"] > 0
    base, gamma1, gamma2 = speed[3:]
    assert base["speedup"] == 1.0 and base["acceptance_rate"] is None and base["drafter_forwards_per_image"] == 0
    for row in (gamma1, gamma2):
        assert 0.0 <= row["acceptance_rate"] <= 1.0 and row["fallbacks_per_image"] == 0.0
    # the draft: prefill, the pre-filled scale's commit, 2 drafted trajectories, commits inside and after windows
    assert gamma1["drafter_forwards_per_image"] == 1 + 1 + 2 * steps + 0 + 1
    assert gamma2["drafter_forwards_per_image"] == 1 + 1 + 2 * steps + 1 + 1


def test_cspd_bench_refusals(folders, capsys):  # noqa: F811
    assert main(["bench", "speculative", "--model", str(folders / "target"), "--speculative", "sjd",
                 "--batch-sizes", "1", "--repeats", "1"]) == 2
    assert "FlowAR takes none, cspd" in capsys.readouterr().err
    assert main(["bench", "speculative", "--model", str(folders / "target"), "--speculative", "cspd", "--drafter",
                 str(folders / "small"), "--quality", "--fid-ref", "x.npz"]) == 2
    assert "give a text-conditional model" in capsys.readouterr().err
