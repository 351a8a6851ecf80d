"""``vgen train var``: a 30-step CPU run of a tiny text-conditional config lowers the loss and exports a pipeline
that generates; the shipped config parses."""

import importlib.util
import json
import os
import subprocess

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.errors import UserError
from vgen.pipelines import DEFAULT_MODEL_BUDGET_BYTES
from vgen.pipelines.var import VARPipeline
from vgen.train.loop import TrainConfig, train
from vgen.train.registry import load_run_config, load_task
from vgen.train.var_task import VARTask, VARTaskConfig


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    vq = MultiScaleVQModel(vocab_size=64, z_channels=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                           using_sa=False, patch_nums=(1, 2, 4, 8))  # 32 px images, 85 tokens
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    vq.save_pretrained(path)
    return path


def tiny_cfg(tokenizer_dir, **kw) -> VARTaskConfig:
    base = dict(tokenizer=str(tokenizer_dir), depth=2, embed_dim=64, num_heads=2, conditioning="text",
                text_embed_dim=32, text_depth=1, text_heads=2, resolution=32, dataset_length=64,
                sample_prompts=("a photo of a red circle", "a photo of two blue stars"))
    return VARTaskConfig(**{**base, **kw})


def test_registered_and_shipped_config_parses():
    assert load_task("var") is VARTask
    task_cfg, train_cfg = load_run_config("var", REPO_ROOT / "configs" / "shapes" / "var_text.yaml")
    assert task_cfg.conditioning == "text" and task_cfg.resolution == 64
    assert train_cfg.steps > 0


@pytest.mark.parametrize("tokenizer_yaml, var_yaml, bytes_per_param", [
    ("default_model_tokenizer.yaml", "default_model_var.yaml", 2),  # the shipped default model (fp16)
    ("tokenizer.yaml", "var_text.yaml", 2),  # the larger recipe, to ship in fp16
])
def test_shapes_recipes_fit_the_shipped_model_budget(tmp_path, tokenizer_yaml, var_yaml, bytes_per_param):
    # A default model ships inside the package: tokenizer + text VAR (+ text encoder) must total <= 25 MB.
    tok_cfg, _ = load_run_config("tokenizer", REPO_ROOT / "configs" / "shapes" / tokenizer_yaml)
    vqvae = load_task("tokenizer")(tok_cfg).build_model()
    vqvae.save_pretrained(tmp_path / "tokenizer")
    var_cfg, _ = load_run_config("var", REPO_ROOT / "configs" / "shapes" / var_yaml,
                                 [f"task.tokenizer={tmp_path / 'tokenizer'}"])
    model = VARTask(var_cfg).build_model()
    total = bytes_per_param * sum(p.numel() for m in (vqvae, model) for p in m.parameters())
    assert total <= DEFAULT_MODEL_BUDGET_BYTES, f"{total / 10**6:.1f} MB"


def test_text_binding_config_trains_only_the_text_path_of_the_default_model(tmp_path):
    tok_cfg, _ = load_run_config("tokenizer", REPO_ROOT / "configs" / "shapes" / "default_model_tokenizer.yaml")
    load_task("tokenizer")(tok_cfg).build_model().save_pretrained(tmp_path / "tokenizer")
    var_cfg, train_cfg = load_run_config("var", REPO_ROOT / "configs" / "shapes" / "var_text_binding_ft.yaml",
                                         [f"task.tokenizer={tmp_path / 'tokenizer'}", "task.init_from="])
    model = VARTask(var_cfg).build_model()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert model.text_encoder.word_mixer is not None and "transformer.head.weight" not in trained
    assert {n for n in trained if n.startswith("text_encoder.")} == {n for n, _ in model.text_encoder.named_parameters(
        prefix="text_encoder")}
    assert 0.2 < sum(p.numel() for n, p in model.named_parameters() if n in trained) / 11.2e6 < 0.3
    assert VARTask(var_cfg).coarse_rows(train_cfg.batch_size) == 84


def test_thirty_steps_lower_the_loss_and_export_generates(tokenizer_dir, tmp_path):
    task = VARTask(tiny_cfg(tokenizer_dir))
    cfg = TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant", log_every=5,
                      ckpt_every=0, sample_every=30, out_dir=str(tmp_path / "run"))
    train(task, cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < first - 0.3, (first, last)  # starts near ln(64) = 4.16
    assert 0 <= log[-1]["accuracy"] <= 1 and log[-1]["accuracy"] > log[0]["accuracy"]
    # the finest scale's share: logged separately (most tokens sit there, but layout is decided before it)
    assert log[-1]["loss_tail"] < log[0]["loss_tail"] and 0 <= log[-1]["accuracy_tail"] <= 1
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    pipe = VARPipeline.from_pretrained(str(tmp_path / "run" / "final"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a photo of a red circle", guidance_scale=1.0, top_k=0, top_p=0.0,
               generator=[torch.Generator().manual_seed(0)], output_type="pt")
    assert out.images.shape == (1, 3, 32, 32)


def test_tokenizer_encodes_in_fp32_inside_a_mixed_precision_step(tokenizer_dir):
    # Targets must be the codes inference picks: bf16 distances would flip near-ties of the nearest-code search.
    task = VARTask(tiny_cfg(tokenizer_dir))
    img_B3HW = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    idx_fp32, x_fp32 = task.encode_images(img_B3HW)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_amp, x_amp = task.encode_images(img_B3HW)
    assert all(torch.equal(a, b) for a, b in zip(idx_fp32, idx_amp))
    assert x_amp.dtype == torch.float32 and torch.equal(x_fp32, x_amp)


def test_class_conditional_task_and_errors(tokenizer_dir):
    task = VARTask(tiny_cfg(tokenizer_dir, conditioning="class"))
    model = task.build_model()
    assert model.text_encoder is None and model.transformer.config.num_classes == 60
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "class_label": torch.tensor([1, 59]), "caption": ["", ""]}
    loss, metrics = task.loss(model, batch)
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5 and 0 <= metrics["accuracy"] <= 1
    with pytest.raises(UserError, match="trained tokenizer folder"):
        VARTask(tiny_cfg("/nonexistent"))
    with pytest.raises(UserError, match="expects 32 px"):
        VARTask(tiny_cfg(tokenizer_dir, resolution=64))


def test_init_from_starts_a_run_from_an_exported_pipeline_and_refuses_other_sizes(tokenizer_dir, tmp_path):
    first = VARTask(tiny_cfg(tokenizer_dir))
    cfg = TrainConfig(steps=3, batch_size=4, lr=3e-3, log_every=1, ckpt_every=0, out_dir=str(tmp_path / "first"))
    train(first, cfg, progress=False)
    exported = VARPipeline.from_pretrained(str(tmp_path / "first" / "final"))
    model = VARTask(tiny_cfg(tokenizer_dir, init_from=str(tmp_path / "first" / "final"))).build_model()
    for name in ("transformer", "text_encoder"):
        saved = getattr(exported, name).state_dict()
        assert all(torch.equal(v, saved[k]) for k, v in getattr(model, name).state_dict().items())
    with pytest.raises(UserError, match="does not match this config's sizes .*unexpected key"):
        VARTask(tiny_cfg(tokenizer_dir, depth=1, init_from=str(tmp_path / "first" / "final"))).build_model()
    with pytest.raises(UserError, match="no transformer weights"):
        VARTask(tiny_cfg(tokenizer_dir, init_from=str(tmp_path / "nowhere"))).build_model()
    # word mixing starts as the identity, so it may be added to a run saved without it: same outputs
    mixed = VARTask(tiny_cfg(tokenizer_dir, text_word_mixing=3, init_from=str(tmp_path / "first" / "final")))
    encoder = mixed.build_model().text_encoder.eval()
    assert encoder.word_mixer is not None
    prompt = ["a photo of two blue stars"]
    with torch.no_grad():
        for a, b in zip(encoder.encode(prompt), exported.text_encoder.encode(prompt)):
            assert torch.equal(a, b)


def test_trainable_patterns_freeze_the_rest_of_the_model(tokenizer_dir, tmp_path):
    first = TrainConfig(steps=1, batch_size=4, lr=1e-3, log_every=1, ckpt_every=0, out_dir=str(tmp_path / "first"))
    train(VARTask(tiny_cfg(tokenizer_dir)), first, progress=False)
    start = VARPipeline.from_pretrained(str(tmp_path / "first" / "final"))
    patterns = ("text_encoder.*", "transformer.blocks.*.cross_attn.*")
    task = VARTask(tiny_cfg(tokenizer_dir, trainable=patterns, init_from=str(tmp_path / "first" / "final")))
    model = task.build_model()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.startswith("text_encoder.") or ".cross_attn." in n]
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, log_every=1, ckpt_every=0, out_dir=str(tmp_path / "run"))
    train(task, cfg, progress=False)
    tuned = VARPipeline.from_pretrained(str(tmp_path / "run" / "final"))
    for name in ("transformer", "text_encoder"):
        saved, now = getattr(start, name).state_dict(), getattr(tuned, name).state_dict()
        for key, value in now.items():
            trained = name == "text_encoder" or ".cross_attn." in key
            assert torch.equal(value, saved[key]) != trained, f"{name}.{key}"
    with pytest.raises(UserError, match=r"'transformer.blocks.\*.crossattn.\*' match\(es\) no parameter"):
        VARTask(tiny_cfg(tokenizer_dir, trainable=("text_encoder.*", "transformer.blocks.*.crossattn.*"))
                ).build_model()


def test_tag_weights_set_the_caption_mix_of_the_shapes_world(tokenizer_dir):
    dataset = VARTask(tiny_cfg(tokenizer_dir, tag_weights={"counting": 1.0, "position": 0.0})).build_dataset()
    assert {dataset.world.sample(i).spec["tag"] for i in range(40)} == {"counting"}
    with pytest.raises(UserError, match="shapes world only"):
        VARTask(tiny_cfg(tokenizer_dir, world="folder", data_path=str(tokenizer_dir),
                         tag_weights={"counting": 1.0})).build_dataset()


def test_coarse_rows_train_the_first_scales_of_part_of_the_batch(tokenizer_dir, tmp_path):
    # 6 of 8 rows teacher-forced on the first 2 scales (1 + 4 tokens), 2 rows on all 85: the loss is the mean over
    # every trained token, the same as the full rows' and coarse rows' logits scored by hand.
    task = VARTask(tiny_cfg(tokenizer_dir, coarse_fraction=0.75, coarse_scales=2, cond_drop_rate=0.0))
    model = task.build_model().eval()
    captions = ["a photo of a red circle", "a photo of two blue stars"] * 4
    batch = {"image": torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "caption": captions}
    assert task.coarse_rows(8) == 6 and task.coarse_rows(2) == 1
    loss, metrics = task.loss(model, batch)
    idx_Bl, x_BLCv = task.encode_images(batch["image"])
    target_BL = torch.cat(idx_Bl, dim=1)
    ids_BT, mask_BT = model.text_encoder.tokenize(captions)
    with torch.no_grad():
        logits_BLV = model(x_BLCv, ids_BT=ids_BT, mask_BT=mask_BT)
    ce_BL = torch.nn.functional.cross_entropy(logits_BLV.transpose(1, 2), target_BL, reduction="none")
    expected = (ce_BL[:2].sum() + ce_BL[2:, :5].sum()) / (2 * 85 + 6 * 5)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["loss_coarse"], ce_BL[2:, :5].mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["loss_tail"], ce_BL[:2, -64:].mean(), atol=1e-5, rtol=1e-5)
    # a run with coarse rows trains and exports like any other
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, log_every=1, ckpt_every=0, out_dir=str(tmp_path / "run"))
    train(VARTask(tiny_cfg(tokenizer_dir, coarse_fraction=0.5, coarse_scales=3, text_word_mixing=3)), cfg,
          progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "loss_coarse" in log[-1]
    exported = VARPipeline.from_pretrained(str(tmp_path / "run" / "final"))
    assert exported.text_encoder.config.word_mixing == 3 and exported.text_encoder.word_mixer is not None
    with pytest.raises(UserError, match="coarse_scales must be 1..3"):
        VARTask(tiny_cfg(tokenizer_dir, coarse_fraction=0.5, coarse_scales=4))
    with pytest.raises(UserError, match=r"coarse_fraction must be in \[0, 1\)"):
        VARTask(tiny_cfg(tokenizer_dir, coarse_fraction=1.0, coarse_scales=2))


def _ship_script():
    path = REPO_ROOT / "configs" / "shapes" / "ship_default_model.py"
    spec = importlib.util.spec_from_file_location("ship_default_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_guidance_profile_is_checked_early_and_exported(tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match="sample_guidance_profile: .* give 4 shares >= 0"):
        VARTask(tiny_cfg(tokenizer_dir, sample_guidance_profile=(1.0, 1.0)))
    with pytest.raises(UserError, match="sample_guidance_profile: guidance profile 'linear' does not fit"):
        VARTask(tiny_cfg(tokenizer_dir, sample_guidance_profile="linear"))
    task = VARTask(tiny_cfg(tokenizer_dir, sample_guidance_profile=(0.0, 1.0, 1.0, 0.5)))
    task.export(task.build_model(), tmp_path / "final")
    pipe = VARPipeline.from_pretrained(str(tmp_path / "final"))
    assert pipe.sampling_defaults()["guidance_profile"] == [0.0, 1.0, 1.0, 0.5]


def test_ship_script_writes_fp16_weights_with_sampling_defaults_and_refuses_over_budget(tokenizer_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    cfg = TrainConfig(steps=2, batch_size=4, lr=3e-3, log_every=1, ckpt_every=0, out_dir=str(tmp_path / "run"))
    train(VARTask(tiny_cfg(tokenizer_dir)), cfg, progress=False)
    ship = _ship_script()
    out = tmp_path / "shipped"
    assert ship.main([str(tmp_path / "run" / "final"), "--out", str(out), "--guidance-scale", "2.5",
                      "--top-k", "7", "--guidance-profile", "0.5,1,1,0.5"]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["default_guidance_scale"] == 2.5 and index["default_top_k"] == 7
    assert index["default_guidance_profile"] == [0.5, 1.0, 1.0, 0.5]  # the tiny tokenizer has 4 scales
    capsys.readouterr()
    assert ship.main([str(tmp_path / "run" / "final"), "--out", str(out), "--guidance-profile", "1,1"]) == 2
    assert "give 4 shares >= 0, one per generation step" in capsys.readouterr().err
    assert json.loads((out / "model_index.json").read_text())["default_guidance_profile"] == [0.5, 1.0, 1.0, 0.5]
    for path in (out / "model_index.json", *out.glob("*/config.json")):  # no local path of the training run
        assert str(tmp_path) not in path.read_text() and "run/final" not in path.read_text()
    saved = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float16}
    trained = VARPipeline.from_pretrained(str(tmp_path / "run" / "final")).transformer.state_dict()
    shipped = VARPipeline.from_pretrained(str(out)).transformer.state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, trained[k].half().float()) for k, v in shipped.items())
    # over the budget: refused in one line, and the folder already there is kept
    monkeypatch.setattr(ship, "DEFAULT_MODEL_BUDGET_BYTES", 1)
    capsys.readouterr()
    assert ship.main([str(tmp_path / "run" / "final"), "--out", str(out), "--guidance-scale", "9"]) == 2
    assert "over the 0 MB budget" in capsys.readouterr().err
    assert json.loads((out / "model_index.json").read_text())["default_guidance_scale"] == 2.5
    assert not (tmp_path / "shipped.tmp").exists()


@pytest.mark.slow
def test_default_model_script_trains_and_exports_a_pipeline(tmp_path):
    # configs/shapes/train_default_model.sh is the one command that retrains the shipped model; run it for 2 steps
    # of each stage.
    env = {**os.environ, "TOK_STEPS": "2", "VAR_STEPS": "2", "FT_STEPS": "2", "BIND_STEPS": "2", "FINAL_STEPS": "2",
           "BATCH": "4", "WORKERS": "0", "LR_SCALE": "0.5", "WORD_MIXING": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO_ROOT / "configs" / "shapes" / "train_default_model.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train.lr=0.0004" in proc.stdout and "train.lr=0.00015" in proc.stdout  # stage 1 and 2 rates, halved
    assert "train.steps=2" in proc.stdout
    stage2_config = (tmp_path / "var_ft" / "config.yaml").read_text()
    assert f"tokenizer: {tmp_path / 'tokenizer' / 'final'}" in stage2_config
    assert f"init_from: {tmp_path / 'var' / 'final'}" in stage2_config
    assert "text_word_mixing: 3" in stage2_config
    for stage, start in (("var_binding", "var_ft"), ("var_final", "var_binding")):
        config = (tmp_path / stage / "config.yaml").read_text()
        assert f"init_from: {tmp_path / start / 'final'}" in config and "lr: 0.00015" in config
    pipe = VARPipeline.from_pretrained(str(tmp_path / "var_final" / "final"))
    assert pipe.text_encoder.config.word_mixing == 3
    assert pipe.sampling_defaults()["guidance_profile"] == [0.5, 0.75, 1.0, 1.0, 1.0, 0.75, 0.75]
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a photo of a red circle", generator=[torch.Generator().manual_seed(0)]).images[0]
    assert image.size == (64, 64)
