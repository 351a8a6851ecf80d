"""``vgen train autoencoder`` (KL autoencoder) through the generic training loop: tiny models, 32 px, CPU."""

import json

import pytest
import torch
from vgen.tokenizers.kl_autoencoder import AutoencoderKL

from vgen.errors import UserError
from vgen.train.autoencoder_task import AutoencoderTask, AutoencoderTaskConfig
from vgen.train.loop import TrainConfig, train
from vgen.train.reconstruction import MovingShapesFramesDataset, psnr_01
from vgen.train.registry import load_task

TINY_TASK = {"ch": 16, "ch_mult": (1, 2, 2), "z_channels": 4, "norm_num_groups": 8, "resolution": 32,
             "dataset_length": 256, "num_sample_images": 4, "scale_factor_images": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, name: str, steps: int = 30, **overrides) -> tuple[AutoencoderTask, list[dict]]:
    task = AutoencoderTask(AutoencoderTaskConfig(**{**TINY_TASK, **overrides}))
    cfg = TrainConfig(steps=steps, batch_size=8, lr=2e-3, weight_decay=0.0, warmup_steps=3, grad_clip=1.0,
                      log_every=1, ckpt_every=0, sample_every=steps, seed=0, out_dir=str(tmp_path / name))
    train(task, cfg, progress=False)
    return task, [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]


def test_registered_under_autoencoder():
    assert load_task("autoencoder") is AutoencoderTask


def test_loss_decreases_and_export_stores_the_measured_scale_factor(tmp_path):
    task, records = _run(tmp_path, "kl")
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert sum(r["psnr"] for r in records[-5:]) / 5 > sum(r["psnr"] for r in records[:5]) / 5 + 2.0
    for key in ("recon_loss", "kl", "latent_std", "posterior_std"):
        assert all(key in r for r in records), key
    assert any((tmp_path / "kl" / "samples").glob("*.png"))

    final = tmp_path / "kl" / "final"
    stats = json.loads((final / "latent_stats.json").read_text())
    vae = AutoencoderKL.from_pretrained(final).eval()
    assert stats["measured"] and stats["images"] == 64
    assert vae.scale_factor == pytest.approx(1 / stats["latent_std"])
    # the stored statistics are those of the exported weights: recompute them
    again = task.latent_statistics(vae)
    assert again["latent_std"] == pytest.approx(stats["latent_std"], rel=1e-5)
    assert again["psnr"] == pytest.approx(stats["psnr"], rel=1e-4)
    # scaled latents of the training images have unit std
    img = torch.stack([task.build_dataset()[i]["image"] for i in range(64)])
    with torch.no_grad():
        z = vae.encode_latents(img, generator=torch.Generator().manual_seed(0))
        assert float(z.std()) == pytest.approx(1.0, abs=0.05)
        assert float(psnr_01(vae.decode_latents(vae.encode_latents(img, sample=False)), img)) > 12.0


def test_fixed_scale_factor_and_moving_shapes_frames(tmp_path):
    _, records = _run(tmp_path, "kl_video", steps=4, world="moving_shapes", num_frames=4, scale_factor=0.2325)
    assert len(records) == 4
    vae = AutoencoderKL.from_pretrained(tmp_path / "kl_video" / "final")
    assert vae.scale_factor == 0.2325
    assert not json.loads((tmp_path / "kl_video" / "final" / "latent_stats.json").read_text())["measured"]


def test_frames_dataset_holds_the_frames_of_the_video_dataset():
    from vgen.data.moving_shapes import MovingShapesDataset

    frames = MovingShapesFramesDataset(resolution=32, num_frames=5, length=20, seed=3)
    videos = MovingShapesDataset(resolution=32, num_frames=5, length=4, seed=3)
    for index in (0, 4, 7, 19):
        video, t = divmod(index, 5)
        assert torch.equal(frames[index]["image"], videos[video]["video"][t])
    assert len(frames) == 20 and frames[3]["image"].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        frames[20]


def test_bad_settings_are_one_line():
    with pytest.raises(UserError, match="resolution 30 does not fit the autoencoder"):
        AutoencoderTask(AutoencoderTaskConfig(**{**TINY_TASK, "resolution": 30}))
    with pytest.raises(UserError, match="task.world must be one of shapes, moving_shapes, folder"):
        AutoencoderTask(AutoencoderTaskConfig(**{**TINY_TASK, "world": "imagenet"}))
    with pytest.raises(UserError, match="data_path"):
        AutoencoderTask(AutoencoderTaskConfig(**{**TINY_TASK, "world": "folder"}))


def test_shipped_config_builds_a_16x16_latent_autoencoder():
    from conftest import REPO_ROOT

    from vgen.train.registry import load_run_config

    task_cfg, train_cfg = load_run_config("autoencoder", REPO_ROOT / "configs" / "shapes" / "kl_autoencoder.yaml")
    with torch.device("meta"):
        model = AutoencoderTask(task_cfg).build_model()
    assert model.latent_size(task_cfg.resolution) == (16, 16) and model.latent_channels == 4
    assert task_cfg.scale_factor == 0.0 and 0 < task_cfg.kl_weight < 1e-2
    assert train_cfg.steps > 0
