"""``vgen train raster-ar`` (a tiny CPU run lowers the loss and exports a pipeline that generates; the token cache)
and ``vgen convert llamagen-official`` + ``vgen generate`` on random checkpoints in the official key layout."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from vgen.tokenizers.single_scale_vq import SingleScaleVQModel

from vgen.errors import UserError
from vgen.models.raster_ar import RasterAR
from vgen.pipelines import load_pipeline
from vgen.pipelines.raster_ar import RasterARPipeline
from vgen.train.loop import TrainConfig, train
from vgen.train.raster_ar_task import RasterARTask, RasterARTaskConfig
from vgen.train.registry import load_run_config, load_task


def tiny_vq(vocab_size=64) -> SingleScaleVQModel:
    torch.manual_seed(0)
    # downsampling 8: 32 px images have a 4x4 token grid
    return SingleScaleVQModel(vocab_size=vocab_size, codebook_dim=8, z_channels=32, ch=32, ch_mult=(1, 1, 1, 1),
                              num_res_blocks=1, using_sa=False, using_mid_sa=False).eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "vq"
    tiny_vq().save_pretrained(path)
    return path


def tiny_cfg(tokenizer_dir, **kw) -> RasterARTaskConfig:
    base = dict(tokenizer=str(tokenizer_dir), depth=2, embed_dim=64, num_heads=2, conditioning="text",
                text_embed_dim=32, text_depth=1, text_heads=2, resolution=32, dataset_length=48,
                sample_prompts=("a photo of a red circle", "a photo of two blue stars"))
    return RasterARTaskConfig(**{**base, **kw})


def test_registered_and_shapes_configs_parse():
    assert load_task("raster-ar") is RasterARTask
    configs = sorted((REPO_ROOT / "configs" / "shapes").glob("raster_s*.yaml"))
    assert configs, "configs/shapes/raster_s*.yaml"
    for path in configs:
        task_cfg, train_cfg = load_run_config("raster-ar", path)
        assert task_cfg.shuffle_window in (1, 2, 4) and train_cfg.steps > 0


@pytest.mark.parametrize("window", [1, 2])
def test_a_short_run_lowers_the_loss_and_export_generates(tokenizer_dir, tmp_path, window):
    cache = tmp_path / "tokens.pt"
    task = RasterARTask(tiny_cfg(tokenizer_dir, shuffle_window=window, token_cache=str(cache),
                                 sample_guidance_scale=2.0, sample_guidance_schedule="ramp"))
    cfg = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=0, schedule="constant", log_every=5,
                      ckpt_every=0, sample_every=30, out_dir=str(tmp_path / "run"))
    train(task, cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < first - 0.3, (first, last)  # starts at ln(64) = 4.16 (the head starts at zero)
    assert log[-1]["accuracy"] > log[0]["accuracy"]
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    assert cache.is_file()
    pipe, _ = load_pipeline(tmp_path / "run" / "final", "cpu")
    assert isinstance(pipe, RasterARPipeline) and pipe.transformer.config.shuffle_window == window
    assert pipe.sampling_defaults()["guidance_schedule"] == "ramp"
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a photo of a red circle", generator=[torch.Generator().manual_seed(0)], output_type="pt")
    assert out.images.shape == (1, 3, 32, 32)


def test_token_cache_holds_the_tokenizers_codes_and_refuses_other_data(tokenizer_dir, tmp_path):
    cache = tmp_path / "tokens.pt"
    task = RasterARTask(tiny_cfg(tokenizer_dir, token_cache=str(cache), dataset_length=6))
    dataset = task.build_dataset()
    item = dataset[3]
    image = task.image_dataset()[3]
    assert torch.equal(item["tokens"], task.encode_images(image["image"][None])[0])
    assert item["caption"] == image["caption"] and item["tokens"].shape == (16,)
    again = RasterARTask(tiny_cfg(tokenizer_dir, token_cache=str(cache), dataset_length=6)).build_dataset()
    assert torch.equal(again.tokens_DL, dataset.tokens_DL)
    with pytest.raises(UserError, match="was made for other data"):
        RasterARTask(tiny_cfg(tokenizer_dir, token_cache=str(cache), dataset_length=7)).build_dataset()


def test_task_errors_are_one_line(tokenizer_dir):
    with pytest.raises(UserError, match="single-scale VQ folder"):
        RasterARTask(tiny_cfg("/nonexistent"))
    with pytest.raises(UserError, match="task.shuffle_window 3 does not tile the tokenizer's 4x4 token grid"):
        RasterARTask(tiny_cfg(tokenizer_dir, shuffle_window=3))
    with pytest.raises(UserError, match="not a multiple of this tokenizer's downsampling factor 8"):
        RasterARTask(tiny_cfg(tokenizer_dir, resolution=36))
    task = RasterARTask(tiny_cfg(tokenizer_dir, conditioning="class"))
    model = task.build_model()
    assert model.text_encoder is None and model.transformer.config.num_classes == 60
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "class_label": torch.tensor([1, 59]), "caption": ["", ""]}
    loss, metrics = task.loss(model, batch)
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 1e-4 and 0 <= metrics["accuracy"] <= 1


# ---------------------------------------------------------------------------------------------- convert + generate


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamagen")
    torch.manual_seed(0)
    gpt = RasterAR(vocab_size=64, grid_size=4, depth=2, embed_dim=64, num_heads=2, num_classes=10)
    sd = {k: torch.randn_like(v) * 0.1 for k, v in gpt.state_dict().items()}
    torch.save({"model": {**sd, "freqs_cis": torch.zeros(17, 16, 2)}, "steps": 1}, root / "c2i_tiny.pt")
    torch.save({"model": tiny_vq().state_dict()}, root / "vq_tiny.pt")
    torch.save({"model": SingleScaleVQModel(vocab_size=32, codebook_dim=8, z_channels=32, ch=32,
                                            ch_mult=(1, 1, 1, 1), num_res_blocks=1, using_sa=False,
                                            using_mid_sa=False).state_dict()}, root / "vq_other.pt")
    return root, sd


def run_vgen(*args):
    return subprocess.run([sys.executable, "-m", "vgen", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_convert_and_generate(official_files, tmp_path):
    root, sd = official_files
    out = tmp_path / "pipe"
    proc = run_vgen("convert", "llamagen-official", "--vq", str(root / "vq_tiny.pt"), "--gpt",
                    str(root / "c2i_tiny.pt"), "--out", str(out), "--image-size", "32", "--num-heads", "2")
    assert proc.returncode == 0, proc.stderr
    assert "LlamaGen GPT 2 layers (width 64, 2 heads, 10 classes), 4x4 tokens (32 px)" in proc.stdout
    pipe, _ = load_pipeline(out, "cpu")
    assert all(torch.equal(v, sd[k]) for k, v in pipe.transformer.state_dict().items())
    assert pipe.sampling_defaults()["guidance_scale"] == 2.0
    proc = run_vgen("generate", "--model", str(out), "--class-label", "3", "7", "--n", "2", "--out",
                    str(tmp_path / "grid.png"), "--top-k", "5")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "grid.png").is_file()
    assert json.loads((tmp_path / "grid.json").read_text())["top_k"] == 5


def test_convert_errors_are_one_line(official_files, tmp_path):
    root, sd = official_files
    proc = run_vgen("convert", "llamagen-official", "--vq", str(root / "vq_other.pt"), "--gpt",
                    str(root / "c2i_tiny.pt"), "--out", str(tmp_path / "a"), "--image-size", "32", "--num-heads", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "vgen convert: error: the tokenizer has 32 codes but the transformer predicts 64; pair the transformer "
        "with the tokenizer it was trained on"
    ]
    bad = {k: v for k, v in sd.items() if k != "norm.weight"}
    torch.save({"model": bad}, tmp_path / "bad.pt")
    proc = run_vgen("convert", "llamagen-official", "--vq", str(root / "vq_tiny.pt"), "--gpt", str(tmp_path / "bad.pt"),
                    "--out", str(tmp_path / "b"), "--num-heads", "2")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "missing key(s): norm.weight" in proc.stderr
    proc = run_vgen("convert", "llamagen-official", "--vq", str(root / "vq_tiny.pt"), "--gpt",
                    str(root / "c2i_tiny.pt"), "--out", str(tmp_path / "c"), "--image-size", "36", "--num-heads", "2")
    assert proc.returncode == 2 and "--image-size 36 is not a multiple of the VQ's downsampling factor 8" in proc.stderr
