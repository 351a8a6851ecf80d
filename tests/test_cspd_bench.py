"""``vgen bench speculative --speculative cspd`` on tiny random class-conditional FlowAR and xAR pipelines:
target-only (the same SDE) first, acceptance, forwards and speedups (ratios in one process) at B=1 and B=16 (xAR:
B=1 and 4), a gamma sweep; one-line refusals for a method the family lacks."""

import json

import pytest
from vgen.cli import main

from test_flowar_cspd import folders  # noqa: F401  (the module fixture: target, small, same, ... folders)
from test_xar_cspd import xar_folders  # noqa: F401  (the xAR module fixture: target, small, ... folders)


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


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


def test_cspd_bench_on_xar_folders(xar_folders, capsys):  # noqa: F811
    """xAR samples with the SDE anyway: its target-only reference is the plain call (no flow_sampler option)."""
    assert main(["bench", "speculative", "--model", str(xar_folders / "target"), "--speculative", "cspd", "--drafter",
                 str(xar_folders / "small"), "--set", "gamma=2", "prefill_fraction=0.25", "--batch-sizes", "1", "4",
                 "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sampling"]["num_steps"] == 3 and "flow_sampler" not in report["sampling"]
    speed = report["speed"]
    assert [(r["setting"], r["batch_size"]) for r in speed] == [("target-only", 1), ("cspd", 1), ("target-only", 4),
                                                                 ("cspd", 4)]
    steps, cells = 3, 4
    for row in speed:  # the target's calls: prefill, 4 cells x 3 steps, a commit per cell but the last
        assert row["target_forwards_per_image"] == 1 + cells * steps + cells - 1 and row["speedup"] > 0
    for row in speed[1::2]:
        assert 0.0 <= row["acceptance_rate"] <= 1.0
        # the draft: prefill, the pre-filled cell's commit, 3 drafted cells, a commit inside each full window of 2,
        # the re-commits of the committed cells but the last
        assert row["drafter_forwards_per_image"] == 1 + 1 + 3 * steps + 1 + 2
    # the target as its own drafter: every cell accepted
    assert main(["bench", "speculative", "--model", str(xar_folders / "target"), "--speculative", "cspd", "--drafter",
                 str(xar_folders / "target"), "--batch-sizes", "2", "--repeats", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["speed"][1]["acceptance_rate"] == 1.0
    # unit and window verification in one run: the window takes fewer target calls for the same cells
    assert main(["bench", "speculative", "--model", str(xar_folders / "target"), "--speculative", "cspd", "--drafter",
                 str(xar_folders / "target"), "--set", "gamma=4", "prefill_fraction=0.0", "--sweep", "unit", "window",
                 "--sweep-knob", "verification", "--batch-sizes", "2", "--repeats", "1"]) == 0
    base, unit, window = json.loads(capsys.readouterr().out)["speed"]
    assert (unit["setting"], window["setting"]) == ("cspd verification=unit", "cspd verification=window")
    assert unit["target_forwards_per_image"] == base["target_forwards_per_image"] == 1 + cells * steps + cells - 1
    # prefill, 4 finishing steps, 3 speculative commits, 2 window passes (one per stochastic step)
    assert window["target_forwards_per_image"] == 1 + cells + (cells - 1) + (steps - 1)
    assert window["acceptance_rate"] == 1.0 and window["discarded_per_image"] == 0.0
    assert main(["bench", "speculative", "--model", str(xar_folders / "target"), "--speculative", "exact",
                 "--batch-sizes", "1", "--repeats", "1"]) == 2
    assert "xAR takes none, cspd" in capsys.readouterr().err
