"""``vgen train flowar``: a short CPU run of a tiny text-conditional config lowers the flow-matching loss and exports a
pipeline that generates; class-conditional runs, init_from, and one-line errors for bad settings."""

import json

import pytest
import torch
from conftest import REPO_ROOT
from vgen.tokenizers.kl_autoencoder import AutoencoderKL
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.errors import UserError
from vgen.pipelines.flowar import FlowARPipeline
from vgen.train.flowar_task import FlowARTask, FlowARTaskConfig
from vgen.train.loop import TrainConfig, train
from vgen.train.registry import load_run_config, load_task


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    torch.manual_seed(0)  # 32 px images -> 4 x 8 x 8 latents
    vae = AutoencoderKL(z_channels=4, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, encoder_attn_levels=(),
                        scale_factor=1.0)
    path = tmp_path_factory.mktemp("kl") / "autoencoder"
    vae.save_pretrained(path)
    return path


def tiny_cfg(autoencoder_dir, **kw) -> FlowARTaskConfig:
    base = dict(autoencoder=str(autoencoder_dir), embed_dim=32, depth=1, num_heads=2, flow_depth=1, flow_width=32,
                flow_num_heads=2, patch_size=2, conditioning="text", text_embed_dim=32, text_depth=1, text_heads=2,
                resolution=32, dataset_length=32, sample_num_steps=4,
                sample_prompts=("a photo of a red circle", "a photo of two blue stars"))
    return FlowARTaskConfig(**{**base, **kw})


def test_registered_and_model_follows_the_autoencoder(autoencoder_dir):
    assert load_task("flowar") is FlowARTask
    task = FlowARTask(tiny_cfg(autoencoder_dir))
    model = task.build_model()
    cfg = model.transformer.config
    # 8x8 latent, patch 2: a 4x4 token grid, scales 1, 2, 4 by default; 4 x 2 x 2 = 16 channels per token
    assert tuple(cfg.scales) == (1, 2, 4) and cfg.latent_channels == 4 and model.transformer.token_channels == 16
    assert tuple(FlowARTask(tiny_cfg(autoencoder_dir, patch_size=1, scales=(1, 3, 8))).build_model()
                 .transformer.config.scales) == (1, 3, 8)


def test_shapes_recipe_parses_and_fits_the_asset_budget(tmp_path):
    ae_cfg, _ = load_run_config("autoencoder", REPO_ROOT / "configs" / "shapes" / "kl_autoencoder.yaml")
    vae = load_task("autoencoder")(ae_cfg).build_model()
    vae.save_pretrained(tmp_path / "kl")
    cfg, train_cfg = load_run_config("flowar", REPO_ROOT / "configs" / "shapes" / "flowar_text.yaml",
                                     [f"task.autoencoder={tmp_path / 'kl'}"])
    model = FlowARTask(cfg).build_model()
    transformer = model.transformer
    assert transformer.latent_side == 16 and tuple(transformer.config.scales) == (1, 2, 4, 8)
    assert transformer.is_text_conditional and train_cfg.max_seconds > 0
    fp16_bytes = 2 * sum(p.numel() for m in (vae, model) for p in m.parameters())
    assert fp16_bytes < 20 * 10**6, fp16_bytes  # all of vgen/assets must stay under 90 MB


@pytest.mark.slow
def test_forty_steps_lower_the_loss_and_export_generates(autoencoder_dir, tmp_path):
    task = FlowARTask(tiny_cfg(autoencoder_dir))
    cfg = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=0, schedule="constant", log_every=1,
                      ckpt_every=0, sample_every=40, ema_decay=0.9, out_dir=str(tmp_path / "run"))
    train(task, cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in log[:10]) / 10
    last = sum(r["loss"] for r in log[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert {"loss_s1", "loss_s2", "loss_s4"} <= set(log[-1])
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    pipe = FlowARPipeline.from_pretrained(str(tmp_path / "run" / "final"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.sampling_defaults()["num_steps"] == 4
    out = pipe(prompt="a photo of a red circle", generator=[torch.Generator().manual_seed(0)], output_type="pt")
    assert out.images.shape == (1, 3, 32, 32)
    # init_from copies the exported weights; other sizes are refused
    model = FlowARTask(tiny_cfg(autoencoder_dir, init_from=str(tmp_path / "run" / "final"))).build_model()
    saved = pipe.transformer.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.transformer.state_dict().items())
    with pytest.raises(UserError, match="does not match this config's sizes"):
        FlowARTask(tiny_cfg(autoencoder_dir, depth=2, init_from=str(tmp_path / "run" / "final"))).build_model()


def test_class_conditional_loss_and_latents_in_fp32(autoencoder_dir):
    task = FlowARTask(tiny_cfg(autoencoder_dir, conditioning="class"))
    model = task.build_model()
    assert model.text_encoder is None and model.transformer.config.num_classes == 60
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "class_label": torch.tensor([1, 59]), "caption": ["", ""]}
    torch.manual_seed(0)
    loss, metrics = task.loss(model, batch)
    assert loss.ndim == 0 and loss.item() > 0 and set(metrics) == {"loss_s1", "loss_s2", "loss_s4"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = task.encode_images(batch["image"])
    assert latents.dtype == torch.float32 and latents.shape == (2, 4, 8, 8)


def test_folder_world_with_captions(autoencoder_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for i, (colour, caption) in enumerate([((255, 0, 0), "a red card"), ((0, 0, 255), "a blue card")] * 2):
        Image.new("RGB", (40, 36), colour).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    task = FlowARTask(tiny_cfg(autoencoder_dir, world="folder", data_path=str(folder)))
    model = task.build_model()
    assert {"a", "red", "blue", "card"} <= set(model.text_encoder.vocabulary)
    batch = torch.utils.data.default_collate([task.build_dataset()[i] for i in range(4)])
    loss, _ = task.loss(model, batch)
    assert loss.item() > 0 and batch["image"].shape == (4, 3, 32, 32)


def test_bad_settings_give_one_line(autoencoder_dir, tmp_path):
    with pytest.raises(UserError, match="trained KL autoencoder folder"):
        FlowARTask(tiny_cfg("/nonexistent"))
    vq = tmp_path / "vq"
    MultiScaleVQModel(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False,
                      patch_nums=(1, 2, 4)).save_pretrained(vq)
    with pytest.raises(UserError, match="holds a MultiScaleVQModel model, but FlowAR generates continuous latents"):
        FlowARTask(tiny_cfg(vq))
    with pytest.raises(UserError, match=r"task.scales \[1, 2\] must end at the token grid 4"):
        FlowARTask(tiny_cfg(autoencoder_dir, scales=(1, 2)))
    with pytest.raises(UserError, match="patch_size 3 does not divide the 8x8 latent"):
        FlowARTask(tiny_cfg(autoencoder_dir, patch_size=3))
    with pytest.raises(UserError, match="not a multiple of this autoencoder's downsampling factor 4"):
        FlowARTask(tiny_cfg(autoencoder_dir, resolution=34))
    with pytest.raises(UserError, match="unknown flow_head"):
        FlowARTask(tiny_cfg(autoencoder_dir, flow_head="mlp"))
