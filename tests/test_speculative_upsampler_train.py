"""``vgen train latent-upsampler``: a tiny CPU run lowers the pixel loss, logs its metrics, draws its grid and
exports a folder that MuLo-SD's ``--upsampler DIR`` loads; bad tokenizers and worlds are one line."""

import json

import pytest
import torch
from vgen.errors import UserError
from vgen.models.latent_upsampler import CodeUpsampler, LatentUpsampler
from vgen.train.latent_upsampler_task import LatentUpsamplerTask, LatentUpsamplerTaskConfig
from vgen.train.loop import TrainConfig, train
from vgen.train.registry import load_task

from test_raster_ar_train import tiny_vq


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "vq"
    tiny_vq().save_pretrained(path)
    return path


def test_a_short_run_lowers_the_loss_and_exports_an_upsampler(tokenizer_dir, tmp_path):
    assert load_task("latent-upsampler") is LatentUpsamplerTask
    task = LatentUpsamplerTask(LatentUpsamplerTaskConfig(tokenizer=str(tokenizer_dir), low_resolution=32,
                                                         dataset_length=32, width=16, depth=2, num_sample_images=2))
    cfg = TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=0, schedule="constant", log_every=5,
                      ckpt_every=0, sample_every=20, out_dir=str(tmp_path / "run"))
    train(task, cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["pixel_loss"] < log[0]["pixel_loss"]
    assert {"latent_loss", "psnr", "code_accuracy"} <= set(log[-1])
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    model = LatentUpsampler.from_pretrained(str(tmp_path / "run" / "final"))
    ids = CodeUpsampler(task.vqvae, model)(torch.randint(0, 64, (1, 2, 2)))
    assert ids.shape == (1, 4, 4)  # a 2x2 grid of codes -> 4x4


def test_bad_settings_are_one_line(tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match="task.tokenizer must be a trained single-scale VQ folder"):
        LatentUpsamplerTask(LatentUpsamplerTaskConfig(tokenizer=str(tmp_path / "none")))
    with pytest.raises(UserError, match="task.world must be 'shapes'"):
        LatentUpsamplerTask(LatentUpsamplerTaskConfig(tokenizer=str(tokenizer_dir), world="folder"))
    with pytest.raises(UserError, match="not a multiple of this tokenizer's downsampling factor 8"):
        LatentUpsamplerTask(LatentUpsamplerTaskConfig(tokenizer=str(tokenizer_dir), low_resolution=12))


def test_spec_configs_parse_and_the_driver_names_them():
    from conftest import REPO_ROOT
    from vgen.train.registry import load_run_config

    shapes = REPO_ROOT / "configs" / "shapes"
    for name, task in (("spec_drafter_128", "raster-ar"), ("spec_mulo_drafter_64", "raster-ar"),
                       ("spec_upsampler", "latent-upsampler")):
        task_cfg, train_cfg = load_run_config(task, shapes / f"{name}.yaml")
        assert train_cfg.steps > 0 and train_cfg.out_dir == f"runs/{name}"
    drafter, _ = load_run_config("raster-ar", shapes / "spec_drafter_128.yaml")
    target, _ = load_run_config("raster-ar", shapes / "raster_s1_128.yaml")
    # the drafter drafts the target's units: same resolution, window and data
    assert (drafter.resolution, drafter.shuffle_window, drafter.dataset_length, drafter.seed) == (
        target.resolution, target.shuffle_window, target.dataset_length, target.seed)
    driver = (shapes / "spec_train_and_bench.sh").read_text()
    assert all(f"configs/shapes/{name}.yaml" in driver
               for name in ("spec_drafter_128", "spec_upsampler", "spec_mulo_drafter_64"))
