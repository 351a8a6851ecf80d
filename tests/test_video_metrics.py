"""Video metrics (exact detector per frame, per-frame Shapes-FID), the evaluation driver and the video benchmark."""

import argparse
import json

import numpy as np
import pytest

from vgen.eval.video_metrics import frame_fid, real_videos, score_video, score_videos


@pytest.fixture(scope="module")
def real():
    return real_videos(12, 8, 32, seed=1)


def test_real_videos_reach_the_ceiling_and_broken_ones_do_not(real):
    good = score_videos(real)
    assert good["videos"] == 12 and good["frames"] == 96
    assert good["caption_adherence"] >= 0.95 and good["identity_persistence"] >= 0.95
    assert good["motion_adherence"] == 1.0
    rng = np.random.default_rng(0)
    shuffled = score_videos([(v[rng.permutation(len(v))], c) for v, c in real])
    assert shuffled["motion_adherence"] < 0.6 and shuffled["identity_persistence"] < good["identity_persistence"]
    captions = [c for _, c in real]
    swapped = score_videos([(v, captions[(i + 1) % len(real)]) for i, (v, _) in enumerate(real)])
    assert swapped["caption_adherence"] < 0.3
    frozen = score_videos([(np.repeat(v[:1], len(v), 0), c) for v, c in real])
    assert frozen["motion_adherence"] == 0.0 and frozen["identity_persistence"] >= 0.95  # still, but not moving


def test_score_video_counts_vanishing_objects():
    class Det:
        def __init__(self, label, color, box):
            self.label, self.color, self.box, self.score = label, color, box, 0.9

    circle = lambda x: Det("circle", "red", (x, 10, x + 6, 16))  # noqa: E731
    frames = [[circle(4)], [circle(6)], [], [circle(10)], [circle(12)]]
    score = score_video(frames, "a red circle moving right", 32)
    assert score.caption_adherence == pytest.approx(4 / 5) and not score.caption_adherence_all_frames
    assert score.identity_persistence == pytest.approx(2 / 4)  # 1->2 ok, 2->3 and 3->4 change, 4->5 ok
    assert score.motion_adherence == 1.0  # frame 0 -> frame 4: moved right
    left = score_video(frames, "a red circle moving left", 32)
    assert left.motion_adherence == 0.0


def test_frame_fid_separates_real_from_noise():
    frames = np.concatenate([v for v, _ in real_videos(24, 8, 32, seed=1)])  # 192 frames: FID still has a bias
    other = np.concatenate([v for v, _ in real_videos(24, 8, 32, seed=2)])  # of ~34 at this size (real vs real)
    noise = np.random.default_rng(0).integers(0, 256, frames.shape, dtype=np.uint8)
    assert frame_fid(other, frames) < 0.2 * frame_fid(noise, frames)


@pytest.mark.slow
def test_evaluation_driver_and_benchmark_on_a_tiny_model(tmp_path, capsys):
    from test_video_pipeline import tiny_pipeline
    from vgen.eval import bench_video
    from vgen.eval.video_eval import evaluate_video_model

    pipe = tiny_pipeline()
    report = evaluate_video_model(pipe, videos=3, lengths=(1,), modes=("full", "forcing_kv"), batch_size=2,
                                  workers=1, out_dir=tmp_path, log=lambda line: None)
    rows = {row["mode"]: row for row in report["results"]}
    assert set(rows) == {"real", "full", "forcing_kv"}
    assert rows["full"]["videos"] == 3 and rows["full"]["frames"] == 24 and rows["full"]["shapes_fid"] > 0
    assert rows["real"]["caption_adherence"] > rows["full"]["caption_adherence"]  # an untrained model
    assert (tmp_path / "video_eval.json").is_file() and (tmp_path / "forcing_kv_x1.png").is_file()

    model = tmp_path / "model"
    pipe.save_pretrained(model)
    args = argparse.Namespace(model=str(model), modes="full,sink_window,forcing_kv", lengths="2,4", videos=1,
                              prompt="a red circle moving right", seed=0, repeats=1, device="cpu", output=None)
    assert bench_video.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["results"]
    assert [(r["mode"], r["length_multiple"]) for r in rows] == [
        (m, n) for n in (2, 4) for m in ("full", "sink_window", "forcing_kv")]
    by = {(r["mode"], r["length_multiple"]): r for r in rows}
    assert by[("full", 4)]["cache_bytes_per_frame"] > 0 and by[("full", 2)]["speedup_vs_full"] == 1.0
    # once their windows are full the rolling caches hold a fixed history, the full cache keeps growing
    for mode in ("sink_window", "forcing_kv"):
        assert by[(mode, 4)]["cache_history_bytes"] == by[(mode, 2)]["cache_history_bytes"]
        assert by[(mode, 4)]["cache_reduction_vs_full"] > by[(mode, 2)]["cache_reduction_vs_full"] > 0
    assert all(r["generation_fps"] > 0 and r["first_frame_latency_seconds"] > 0 for r in rows)
