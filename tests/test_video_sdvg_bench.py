"""``vgen bench video --sdvg`` on tiny random video pipelines: the JSON report (every field; target-only, draft-only
and the tau sweep on the same captions and seeds), tau = -inf keeps every drafted block after the first, tau = +inf
keeps none and its videos are the target-only videos, a separate drafter folder, the PNG plot, and bad flags as one
line."""

import json

import pytest
import torch
from PIL import Image
from vgen.cli import main

from test_video_pipeline import tiny_pipeline

INF = float("inf")
SETTINGS = ["target-only", "draft-only", "sdvg tau=inf", "sdvg tau=0.3", "sdvg tau=-inf"]
TOP_KEYS = {"benchmark", "method", "model", "drafter", "draft_steps", "device", "torch_threads", "torch", "videos",
            "batch_size", "rounds", "frames", "frames_per_block", "blocks_per_video", "seed", "world_seed", "scorer",
            "taus", "sampling", "draft_sampling", "load_average_start", "load_average_end", "speed", "quality",
            "real_fid_floor", "plot"}
SPEED_KEYS = {"setting", "tau", "batch_size", "wall_seconds_per_video", "diffusion_seconds_per_video",
              "routing_seconds_per_video", "decode_seconds_per_video", "speedup", "speedup_total", "speedup_diffusion",
              "acceptance_rate", "drafted_blocks", "accepted_blocks", "target_denoised_blocks", "target_block_share",
              "mean_worst_frame_score", "per_round_wall_seconds"}
QUALITY_KEYS = {"setting", "tau", "videos", "frames", "caption_adherence", "caption_adherence_all_frames",
                "identity_persistence", "motion_adherence", "shapes_fid", "pixel_mae_vs_target_only",
                "equal_to_target_only", "caption_adherence_vs_target_only", "shapes_fid_delta_vs_target_only"}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdvg_bench")
    tiny_pipeline(num_steps=3).save_pretrained(root / "target")
    drafter = tiny_pipeline(num_steps=1)
    with torch.no_grad():
        for p in drafter.transformer.parameters():
            p.mul_(0.5)
    drafter.save_pretrained(root / "drafter")
    (root / "image_model").mkdir()
    (root / "image_model" / "model_index.json").write_text(json.dumps({"_class_name": "VARPipeline"}))
    return root


def brightness_scorer():
    """A scorer factory (``--scorer module:factory``): each frame's mean brightness in [0, 1]."""
    return lambda frames, prompts: frames.mean(axis=(2, 3, 4)) / 255.0


def strict_json(text: str) -> dict:
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def bench(capsys, *flags) -> dict:
    assert main(["bench", "video", "--sdvg", "--device", "cpu", *flags]) == 0
    return strict_json(capsys.readouterr().out)


def test_sweep_report_acceptance_extremes_and_plot(folders, tmp_path, capsys):
    out, plot = tmp_path / "sdvg.json", tmp_path / "sdvg.png"
    report = bench(capsys, "--model", str(folders / "target"), "--tau=0.3,-inf,inf,0.3", "--videos", "2",
                   "--batch-size", "1", "--frames", "8", "--scorer", "test_video_sdvg_bench:brightness_scorer",
                   "--output", str(out), "--plot", str(plot))
    assert strict_json(out.read_text()) == report
    assert set(report) == TOP_KEYS
    assert report["taus"] == ["inf", 0.3, "-inf"] and report["draft_steps"] == 1 and report["drafter"] is None
    assert report["rounds"] == 2 and report["blocks_per_video"] == 4 and report["videos"] == 2
    assert report["scorer"] == "test_video_sdvg_bench:brightness_scorer"
    assert report["sampling"]["num_steps"] == 3 and report["draft_sampling"]["num_steps"] == 1
    speed = {row["setting"]: row for row in report["speed"]}
    quality = {row["setting"]: row for row in report["quality"]}
    assert [row["setting"] for row in report["speed"]] == [row["setting"] for row in report["quality"]] == SETTINGS
    assert all(set(row) == SPEED_KEYS for row in report["speed"])
    assert all(set(row) == QUALITY_KEYS for row in report["quality"])

    drafted = 2 * (4 - 1)  # every block after the first of every video
    minus, plus = speed["sdvg tau=-inf"], speed["sdvg tau=inf"]
    assert minus["acceptance_rate"] == 1.0 and minus["accepted_blocks"] == minus["drafted_blocks"] == drafted
    assert minus["target_denoised_blocks"] == 2 and minus["target_block_share"] == 2 / 8  # block 0 of both rounds
    assert plus["acceptance_rate"] == 0.0 and plus["accepted_blocks"] == 0 and plus["drafted_blocks"] == drafted
    assert plus["target_denoised_blocks"] == 8 and plus["target_block_share"] == 1.0
    assert quality["sdvg tau=inf"]["equal_to_target_only"] and quality["sdvg tau=inf"]["pixel_mae_vs_target_only"] == 0
    for setting in ("draft-only", "sdvg tau=-inf"):  # the 1-step drafter makes other videos
        assert not quality[setting]["equal_to_target_only"] and quality[setting]["pixel_mae_vs_target_only"] > 0
    assert speed["target-only"]["acceptance_rate"] is None and speed["draft-only"]["target_block_share"] == 0
    target = speed["target-only"]
    assert target["speedup"] == target["speedup_diffusion"] == 1.0 and target["routing_seconds_per_video"] == 0
    middle = speed["sdvg tau=0.3"]
    assert middle["drafted_blocks"] == drafted and middle["acceptance_rate"] == middle["accepted_blocks"] / drafted
    assert minus["routing_seconds_per_video"] > 0 and 0 < minus["mean_worst_frame_score"] < 1
    for row in report["speed"]:
        assert len(row["per_round_wall_seconds"]) == 2 and row["speedup"] > 0
        assert row["wall_seconds_per_video"] >= row["diffusion_seconds_per_video"] > 0
    for row in report["quality"]:
        assert row["videos"] == 2 and row["frames"] == 16 and 0 <= row["caption_adherence"] <= 1
        assert row["shapes_fid"] > report["real_fid_floor"] > 0  # untrained models are far from real renders
    assert quality["target-only"]["shapes_fid_delta_vs_target_only"] == 0

    assert report["plot"] == str(plot)
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] == 2 * 460  # two panels: adherence and FID
        image.verify()


def test_separate_drafter_folder(folders, capsys):
    report = bench(capsys, "--model", str(folders / "target"), "--drafter", str(folders / "drafter"),
                   "--tau=-inf,inf", "--videos", "1", "--frames", "6", "--cache", "sink_window")
    assert report["drafter"] == str(folders / "drafter") and report["draft_steps"] is None
    assert report["draft_sampling"]["cache"] == report["sampling"]["cache"] == "sink_window"
    speed = {row["setting"]: row for row in report["speed"]}
    quality = {row["setting"]: row for row in report["quality"]}
    assert speed["sdvg tau=-inf"]["acceptance_rate"] == 1.0 and speed["sdvg tau=-inf"]["drafted_blocks"] == 2
    assert speed["sdvg tau=inf"]["acceptance_rate"] == 0.0 and quality["sdvg tau=inf"]["equal_to_target_only"]
    assert quality["draft-only"]["pixel_mae_vs_target_only"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--tau="], "--tau is empty"),
    (["--tau=,"], "--tau is empty"),
    (["--tau=0.1,nan"], "not NaN"),
    (["--tau=high"], "--tau takes numbers"),
    ([], "--sdvg needs --tau"),
    (["--tau=0", "--modes", "full"], "--modes set up the cache-mode benchmark"),
    (["--tau=0", "--drafter", "{root}/drafter", "--draft-steps", "2"], "not both"),
    (["--tau=0", "--drafter", "{root}/image_model"], "--drafter: {root}/image_model holds a VARPipeline, not a video"),
    (["--tau=0", "--drafter", "{root}/missing"], "--drafter: model folder not found"),
    (["--tau=0", "--frames", "5"], "multiple of this model's block size"),
])
def test_bad_flags_are_one_line_errors(folders, capsys, flags, message):
    flags = [f.format(root=folders) for f in flags]
    assert main(["bench", "video", "--sdvg", "--model", str(folders / "target"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(root=folders) in err, err


def test_sdvg_flags_without_sdvg_are_an_error(folders, capsys):
    assert main(["bench", "video", "--model", str(folders / "target"), "--tau=0.3", "--plot", "x.png"]) == 2
    assert "--tau, --plot set up the SDVG benchmark; add --sdvg" in capsys.readouterr().err
