"""``vgen convert var-official`` + ``vgen generate`` on random checkpoints in the official key layout (tiny sizes of
the parity fixtures: VAR depth 2, width 128, 2 heads, 10 classes, V=512, Cvae=32), and ``VARPipeline`` itself."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from vgen.data import PROMPT_VOCABULARY
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.cli import main
from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.models.var import VAR
from vgen.pipelines.var import VARPipeline


def official_var_state_dict() -> dict:
    torch.manual_seed(0)
    model = VAR(vocab_size=512, Cvae=32, depth=2, embed_dim=128, num_heads=2, num_classes=10)
    sd = dict(model.state_dict())
    sd["lvl_1L"] = model.lvl_1L.clone()  # released files carry these buffers
    sd["attn_bias_for_masking"] = model.attn_bias_for_masking.clone()
    for i in range(2):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(128)
    return sd


def tiny_vqvae(**kw) -> MultiScaleVQModel:
    torch.manual_seed(1)
    cfg = dict(vocab_size=512, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    return MultiScaleVQModel(**{**cfg, **kw}).eval()  # 10 scales up to 16x16 latents, 32x32 images


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    torch.save(official_var_state_dict(), root / "var_tiny.pth")
    torch.save(tiny_vqvae().state_dict(), root / "vae_tiny.pth")
    return root


@pytest.fixture(scope="module")
def converted(official_files):
    out = official_files / "pipe"
    proc = subprocess.run(
        [sys.executable, "-m", "vgen", "convert", "var-official", "--vae", str(official_files / "vae_tiny.pth"),
         "--var", str(official_files / "var_tiny.pth"), "--out", str(out), "--num-classes", "10"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "VAR depth 2" in proc.stdout
    return out


def test_convert_writes_pipeline_folder(converted):
    assert (converted / "model_index.json").is_file()
    assert (converted / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (converted / "vqvae" / "config.json").is_file()
    pipe = VARPipeline.from_pretrained(str(converted))
    assert pipe.text_encoder is None and pipe.transformer.config.num_classes == 10
    ref = official_var_state_dict()
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_generate_grid_and_per_image_seeds(converted, tmp_path, generator_seeds):
    seeds = generator_seeds
    rc = main(["generate", "--model", str(converted), "--class-label", "3", "7", "--n", "2", "--seed", "5",
               "--top-k", "50", "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "imgs")])
    assert rc == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 2 * 32 and grid.height > 2 * 32
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [f.name for f in files] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert Image.open(files[0]).size == (32, 32)
    assert seeds == [[5, 6, 7, 8]]  # image i has its own generator, seeded --seed + i
    # Image 3 (label 7, seed 5 + 3) made alone draws from the same seed, and alone it is reproducible bit for bit.
    # (It equals image 3 of the batch only where batched and single-row arithmetic round alike; see the README.)
    for name in ("one", "again"):
        rc = main(["generate", "--model", str(converted), "--class-label", "7", "--n", "1", "--seed", "8",
                   "--top-k", "50", "--out-dir", str(tmp_path / name)])
        assert rc == 0
    assert seeds[1:] == [[8], [8]]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one" / "0000.png")),
                                  np.asarray(Image.open(tmp_path / "again" / "0000.png")))
    settings = json.loads((tmp_path / "one" / "generate_config.json").read_text())
    assert (settings["seed"], settings["n"], settings["class_label"]) == (8, 1, [7])


def test_generate_unconditional_images_and_rewrite_its_own_settings(converted, tmp_path):
    args = ["generate", "--model", str(converted), "--unconditional", "--n", "3", "--seed", "2",
            "--out", str(tmp_path / "u.png"), "--out-dir", str(tmp_path / "u")]
    assert main(args) == 0
    settings = json.loads((tmp_path / "u.json").read_text())
    assert settings["unconditional"] is True and settings["written_by"] == "vgen generate"
    assert sorted(p.name for p in (tmp_path / "u").glob("*.png")) == ["0000.png", "0001.png", "0002.png"]
    first = (tmp_path / "u" / "0000.png").read_bytes()
    assert main(args) == 0  # a second run replaces what the first one wrote
    assert (tmp_path / "u" / "0000.png").read_bytes() == first


def test_generate_in_a_fresh_process(converted, tmp_path):
    # A fresh interpreter has imported none of vgen's component modules; loading must still work.
    proc = subprocess.run(
        [sys.executable, "-m", "vgen", "generate", "--model", str(converted), "--class-label", "1", "--n", "1",
         "--out", str(tmp_path / "grid.png")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "grid.png").width > 32


def test_generate_bad_arguments(converted, capsys):
    assert main(["generate", "--model", str(converted), "a photo of a red circle"]) == 2
    assert "class-conditional (10 classes): pass class labels, not a prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(converted), "--class-label", "12"]) == 2
    assert "class label(s) 12 out of range" in capsys.readouterr().err


def test_convert_lists_bad_keys(official_files, tmp_path):
    sd = official_var_state_dict()
    sd.pop("head.bias")
    sd["blocks.0.attn.rope_freqs"] = torch.zeros(4)
    torch.save(sd, tmp_path / "bad.pth")
    proc = subprocess.run(
        [sys.executable, "-m", "vgen", "convert", "var-official", "--vae", str(official_files / "vae_tiny.pth"),
         "--var", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "missing key(s): head.bias" in lines[0] and "unexpected key(s): blocks.0.attn.rope_freqs" in lines[0]


def test_text_pipeline_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    enc = ShapesTextEncoder(PROMPT_VOCABULARY, embed_dim=32, depth=1, num_heads=2)
    var = VAR(vocab_size=512, Cvae=32, depth=1, embed_dim=64, num_heads=1, conditioning="text", text_embed_dim=32,
              text_cross_attn=True)
    pipe = VARPipeline(vqvae=tiny_vqvae(), transformer=var, text_encoder=enc)
    pipe.save_pretrained(str(tmp_path / "t2i"))
    loaded = VARPipeline.from_pretrained(str(tmp_path / "t2i"))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.text_encoder, ShapesTextEncoder)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]
    out = loaded(prompt=["a photo of a red circle", "a photo of two blue stars"], num_images_per_prompt=2,
                 generator=gens(), output_type="pt")
    assert out.images.shape == (4, 3, 32, 32) and 0 <= out.images.min() and out.images.max() <= 1
    pipe.set_progress_bar_config(disable=True)
    np_out = pipe(prompt=["a photo of a red circle", "a photo of two blue stars"], num_images_per_prompt=2,
                  generator=gens(), output_type="np").images
    np.testing.assert_allclose(np_out, out.images.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    with pytest.raises(UserError, match="text-conditional: pass a prompt, not class labels"):
        loaded(class_labels=[1])
    with pytest.raises(UserError, match="unknown word\\(s\\) 'dog'"):
        loaded(prompt="a photo of a dog")
    with pytest.raises(UserError, match="one per image"):
        loaded(prompt="a photo of a red circle", num_images_per_prompt=2, generator=[torch.Generator()])


def test_saved_sampling_defaults_drive_calls_and_cli(tmp_path):
    torch.manual_seed(0)
    var = VAR(vocab_size=512, Cvae=32, depth=1, embed_dim=64, num_heads=1, num_classes=10)
    pipe = VARPipeline(vqvae=tiny_vqvae(), transformer=var, default_guidance_scale=3.0, default_top_k=7,
                       default_top_p=0.0, default_temperature=0.5)
    pipe.save_pretrained(str(tmp_path / "m"))
    loaded = VARPipeline.from_pretrained(str(tmp_path / "m"))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.sampling_defaults() == {"guidance_scale": 3.0, "top_k": 7, "top_p": 0.0, "temperature": 0.5,
                                          "guidance_profile": "ramp"}
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]
    implicit = loaded(class_labels=[1, 2, 3], generator=gens(), output_type="pt").images
    explicit = loaded(class_labels=[1, 2, 3], guidance_scale=3.0, top_k=7, top_p=0.0, temperature=0.5,
                      generator=gens(), output_type="pt").images
    official = loaded(class_labels=[1, 2, 3], guidance_scale=1.5, top_k=900, top_p=0.96, temperature=1.0,
                      generator=gens(), output_type="pt").images
    assert torch.equal(implicit, explicit) and not torch.equal(implicit, official)
    # the CLI records the settings it resolved from the model, and a flag still overrides one knob
    assert main(["generate", "--model", str(tmp_path / "m"), "--class-label", "1", "--n", "1", "--top-k", "3",
                 "--out", str(tmp_path / "g.png")]) == 0
    settings = json.loads((tmp_path / "g.json").read_text())
    resolved = (settings["guidance_scale"], settings["top_k"], settings["top_p"], settings["temperature"])
    assert resolved == (3.0, 3, 0.0, 0.5)
    # a folder saved before sampling defaults existed loads with official VAR's settings
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    for key in ("default_guidance_scale", "default_top_k", "default_top_p", "default_temperature"):
        index.pop(key)
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(index))
    old = VARPipeline.from_pretrained(str(tmp_path / "m"))
    assert old.sampling_defaults() == {"guidance_scale": 1.5, "top_k": 900, "top_p": 0.96, "temperature": 1.0,
                                       "guidance_profile": "ramp"}


def test_saved_guidance_profile_drives_calls_and_cli(tmp_path):
    torch.manual_seed(0)
    var = VAR(vocab_size=512, Cvae=32, depth=1, embed_dim=64, num_heads=1, num_classes=10)
    num_scales = len(var.config.patch_nums)
    profile = [1.0] * 3 + [0.0] * (num_scales - 3)  # guidance on the first three scales only
    pipe = VARPipeline(vqvae=tiny_vqvae(), transformer=var, default_guidance_scale=4.0, default_top_k=0,
                       default_top_p=0.0, default_guidance_profile=profile)
    pipe.save_pretrained(str(tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["default_guidance_profile"] == profile
    loaded = VARPipeline.from_pretrained(str(tmp_path / "m"))
    loaded.set_progress_bar_config(disable=True)
    assert loaded.sampling_defaults()["guidance_profile"] == profile
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]
    implicit = loaded(class_labels=[1, 2], generator=gens(), output_type="pt").images
    explicit = loaded(class_labels=[1, 2], guidance_profile=profile, generator=gens(), output_type="pt").images
    ramp = loaded(class_labels=[1, 2], guidance_profile="ramp", generator=gens(), output_type="pt").images
    assert torch.equal(implicit, explicit) and not torch.equal(implicit, ramp)
    # the CLI takes a profile and records the one it used
    assert main(["generate", "--model", str(tmp_path / "m"), "--class-label", "1", "--n", "1",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["guidance_profile"] == profile
    assert main(["generate", "--model", str(tmp_path / "m"), "--class-label", "1", "--n", "1",
                 "--guidance-profile", "ramp", "--out", str(tmp_path / "r.png")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["guidance_profile"] == "ramp"
    # a profile that does not fit the model's scales is one clear error, at construction and at call time
    with pytest.raises(UserError, match=f"give {num_scales} shares >= 0, one per generation step.*{num_scales} scal"):
        loaded(class_labels=[1], guidance_profile=[1.0, 1.0])
    with pytest.raises(UserError, match=f"give {num_scales} shares >= 0"):
        VARPipeline(vqvae=tiny_vqvae(), transformer=var, default_guidance_profile=[1.0])
    with pytest.raises(UserError, match=f"give {num_scales} shares >= 0"):
        loaded(class_labels=[1], guidance_profile=[1.0] * (num_scales - 1) + [-1.0])
    assert main(["generate", "--model", str(tmp_path / "m"), "--class-label", "1", "--n", "1",
                 "--guidance-profile", "1,1", "--out", str(tmp_path / "bad.png")]) == 2
    assert not (tmp_path / "bad.png").exists()
    with pytest.raises(SystemExit):  # argparse: not numbers
        main(["generate", "--model", str(tmp_path / "m"), "--class-label", "1", "--guidance-profile", "high"])


def test_a_pipeline_with_sharded_weights_passes_the_folder_check(tmp_path):
    from vgen.pipelines import load_pipeline

    torch.manual_seed(0)
    var = VAR(vocab_size=512, Cvae=32, depth=1, embed_dim=64, num_heads=1, num_classes=10)
    VARPipeline(vqvae=tiny_vqvae(), transformer=var).save_pretrained(str(tmp_path / "m"), max_shard_size="50KB")
    shards = sorted((tmp_path / "m" / "transformer").glob("*.safetensors"))
    assert len(shards) > 1
    pipe, _ = load_pipeline(tmp_path / "m", "cpu")
    assert all(torch.equal(v, var.state_dict()[k]) for k, v in pipe.transformer.state_dict().items())
    shards[0].unlink()
    with pytest.raises(UserError, match="is missing: the folder has no weights for transformer"):
        load_pipeline(tmp_path / "m", "cpu")
