"""``vgen bench kernels``: CLI wiring, the planned work, the no-CUDA message, and the measurement code on CPU."""

import json

import pytest
import torch
from vgen.eval import bench_kernels

from vgen.cli import OneLineErrorParser
from vgen.cli import bench as bench_cli
from vgen.errors import UserError


def _parse(argv):
    parser = OneLineErrorParser(prog="vgen")
    bench_cli.register(parser.add_subparsers(dest="command", parser_class=OneLineErrorParser))
    return parser.parse_args(argv)


def test_plan_counts_wan_work():
    args = _parse(["bench", "kernels", "--cache-frames", "5,21"])
    planned = bench_kernels.plan(args)
    assert [r["k_len"] for r in planned["attention"]] == [7800, 32760]
    # 0.94 TFLOP per layer at 21 frames (4 * 4680 * 32760 * 128 * 12)
    assert planned["attention"][1]["flops"] == 4 * 4680 * 32760 * 128 * 12
    assert planned["compressed"]["kept_frames_per_head"] == [5] * 5 + [6] * 7
    assert planned["compaction"]["bytes"] == 2 * 2 * 12 * 2 * 1560 * 128 * 2
    assert planned["scores"]["heads"] == 7


def test_bad_cache_frames_is_a_user_error():
    with pytest.raises(UserError, match="--cache-frames must all exceed --chunk-frames=3"):
        bench_kernels.plan(_parse(["bench", "kernels", "--cache-frames", "2,21"]))
    with pytest.raises(UserError, match="comma-separated integers"):
        bench_kernels.plan(_parse(["bench", "kernels", "--cache-frames", "five"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a CUDA device")
def test_without_cuda_prints_json_and_exits_1(capsys, tmp_path):
    args = _parse(["bench", "kernels", "--cache-frames", "5,9", "--output", str(tmp_path / "r.json")])
    assert args.func(args) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["status"] == "skipped" and result["device"] is None
    assert "nothing was measured" in result["reason"] and "nothing was measured" in captured.err
    assert [r["cache_frames"] for r in result["planned"]["attention"]] == [5, 9]
    assert json.loads((tmp_path / "r.json").read_text()) == result


def test_measurement_code_runs_on_cpu_with_reference_kernels():
    """Drive the GPU measurement path at tiny shapes on CPU (reference kernels, a counting timer)."""
    args = _parse(["bench", "kernels", "--heads", "4", "--head-dim", "32", "--frame-tokens", "8",
                   "--cache-frames", "5,7", "--static-heads", "2", "--segment-tokens", "3", "--dtype", "fp16"])
    calls = []

    def timer(fn):
        fn()
        calls.append(fn)
        return 1.0

    result = bench_kernels._measure(args, bench_kernels.plan(args), device="cpu", timer=timer, copy_bytes=1024)
    rows = result["attention"]
    assert [r["k_len"] for r in rows] == [40, 56]
    assert all(r["max_abs_err_vs_sdpa"] < 1e-2 for r in rows)  # kernel 1 agrees with SDPA on the same work
    assert rows[0]["ms"]["kernel1_one_segment"] == 1.0
    assert result["compressed"]["speedup_vs_full_cache_sdpa"] == 1.0
    assert result["compaction"]["gbs"] == round(2 * 2 * 4 * 16 * 32 * 2 / 1e-3 / 1e9, 1)
    assert set(result["targets"]) == {"kernel1_at_least_90pct_of_best_sdpa",
                                      "compressed_at_least_3x_faster_than_full_cache_sdpa",
                                      "compaction_at_least_70pct_of_copy", "scores_at_least_70pct_of_copy"}
    assert "| 7 | 56 |" in bench_kernels.to_markdown({**result, "device": "cpu", "torch": "x", "triton": "y",
                                                       "dtype": "fp16"})
