"""``vgen train video``: a tiny diffusion-forcing run lowers the loss and exports a pipeline that generates; a
self-forcing step on top of it; the recipes parse; bad settings are one-line errors."""

import json

import pytest
import torch
from conftest import REPO_ROOT

from vgen.errors import UserError
from vgen.pipelines.video import VideoPipeline
from vgen.train.loop import TrainConfig, train
from vgen.train.registry import load_run_config, load_task
from vgen.train.video_task import VideoTask, VideoTaskConfig


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    from vgen.tokenizers.kl_autoencoder import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(z_channels=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=4,
                          encoder_attn_levels=(), scale_factor=1.0)
    path = tmp_path_factory.mktemp("ae") / "kl"
    model.save_pretrained(path)
    return path


def tiny_cfg(autoencoder_dir, **overrides) -> VideoTaskConfig:
    base = dict(autoencoder=str(autoencoder_dir), size="video-ar-tiny", frames_per_block=2, num_frames=4,
                text_embed_dim=16, text_depth=1, text_heads=2, dataset_length=8, sample_euler_steps=2,
                sample_prompts=("a red circle moving right",), teacher_steps=2, sample_steps=2)
    return VideoTaskConfig(**{**base, **overrides})


def test_recipes_parse_and_the_task_is_registered():
    assert load_task("video") is VideoTask
    for name, stage in (("video_df.yaml", "diffusion_forcing"), ("video_sf.yaml", "self_forcing")):
        task_cfg, train_cfg = load_run_config("video", REPO_ROOT / "configs" / "moving_shapes" / name)
        assert task_cfg.stage == stage and task_cfg.num_frames == 16 and task_cfg.resolution == 32
        assert task_cfg.num_frames % task_cfg.frames_per_block == 0 and train_cfg.steps > 0


def test_diffusion_forcing_lowers_the_loss_then_self_forcing_runs(tmp_path, autoencoder_dir):
    cfg = tiny_cfg(autoencoder_dir, latent_cache=str(tmp_path / "latents.pt"))
    run = TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant", log_every=10,
                      ckpt_every=0, out_dir=str(tmp_path / "df"), seed=0)
    train(VideoTask(cfg), run, progress=False)
    log = [json.loads(line) for line in (tmp_path / "df" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], [r["loss"] for r in log]
    assert (tmp_path / "latents.pt").is_file()  # the encoded clips are reused by later runs
    pipe = VideoPipeline.from_pretrained(tmp_path / "df" / "final")
    assert pipe.resolve_sampling()["sampler"] == "euler"
    video = pipe("a red circle moving right", num_frames=6, generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 6, 32, 32, 3)

    sf_cfg = tiny_cfg(autoencoder_dir, stage="self_forcing", init_from=str(tmp_path / "df" / "final"),
                      latent_cache=str(tmp_path / "latents.pt"))
    sf_run = TrainConfig(steps=2, batch_size=4, lr=1e-4, log_every=1, ckpt_every=0, out_dir=str(tmp_path / "sf"))
    record = train(VideoTask(sf_cfg), sf_run, progress=False)
    assert record["loss"] >= 0 and 0 <= record["exit_step"] < 2
    sampling = VideoPipeline.from_pretrained(tmp_path / "sf" / "final").resolve_sampling()
    assert (sampling["sampler"], sampling["num_steps"], sampling["guidance_scale"]) == ("few_step", 2, 1.0)


def test_bad_settings_are_one_line_errors(tmp_path, autoencoder_dir):
    with pytest.raises(UserError, match=r"task.num_frames \(6\) must be a multiple of task.frames_per_block \(4\)"):
        VideoTask(tiny_cfg(autoencoder_dir, num_frames=6, frames_per_block=4))
    with pytest.raises(UserError, match="set task.init_from"):
        VideoTask(tiny_cfg(autoencoder_dir, stage="self_forcing"))
    with pytest.raises(UserError, match="task.stage must be one of"):
        VideoTask(tiny_cfg(autoencoder_dir, stage="distill"))
    with pytest.raises(UserError, match="trained KL autoencoder folder"):
        VideoTask(tiny_cfg(tmp_path / "nothing"))
    wrong = tmp_path / "wrong"
    from test_video_pipeline import tiny_pipeline

    tiny_pipeline().save_pretrained(wrong)  # another transformer size than the config's
    task = VideoTask(tiny_cfg(autoencoder_dir, init_from=str(wrong), size="video-ar-s", text_embed_dim=16))
    with pytest.raises(UserError, match="does not match this config's sizes"):
        task.build_model()
