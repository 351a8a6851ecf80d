"""``XARPipeline`` and ``vgen convert xar-official`` + ``vgen generate`` on random checkpoints in the official key
layout (xAR with 1 + 1 blocks of width 32 on a 4 x 4 grid in 2 x 2 cells of 2 x 2 tokens, 10 classes; an LDM/MAR KL
autoencoder with 4 latent channels and downsampling 2: 8 px images from 4x4 latents)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from vgen.samplers.flow_grids import xar_time_grid
from vgen.samplers.flow_transitions import EulerMaruyamaSDE
from vgen.samplers.flow_units import generate_flow_units
from vgen.tokenizers.kl_autoencoder import AutoencoderKL
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.cli import main
from vgen.data import PROMPT_VOCABULARY
from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.models.xar import XAR
from vgen.pipelines import load_pipeline
from vgen.pipelines.xar import XARPipeline


def tiny_xar(**overrides) -> XAR:
    torch.manual_seed(0)
    config = dict(latent_channels=4, grid_size=4, entity="cell", entity_size=2, encoder_embed_dim=32,
                  encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                  num_classes=10)
    return XAR(**{**config, **overrides}).eval()


def tiny_vae(**overrides) -> AutoencoderKL:
    torch.manual_seed(1)
    config = dict(z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, encoder_attn_levels=(), scale_factor=0.5)
    return AutoencoderKL(**{**config, **overrides}).eval()


def official_xar_state_dict() -> dict:
    """The tiny model in the released layout: the additive ``mask`` and every attention's cell-order RoPE table."""
    model = tiny_xar()
    sd = dict(model.state_dict())
    sd["mask"] = torch.where(model.attn_mask, 0.0, -torch.inf)
    for stack in ("encoder_blocks", "decoder_blocks"):
        sd[f"{stack}.0.attn.rope.freqs_cos"] = model.rope_cos.clone()
        sd[f"{stack}.0.attn.rope.freqs_sin"] = model.rope_sin.clone()
    return sd


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    torch.save(official_xar_state_dict(), root / "xAR-tiny.pth")
    torch.save({"model": tiny_vae().state_dict()}, root / "kl_tiny.ckpt")  # MAR: weights under "model"
    return root


@pytest.fixture(scope="module")
def converted(official_files):
    out = official_files / "pipe"
    proc = subprocess.run(
        [sys.executable, "-m", "vgen", "convert", "xar-official", "--vae", str(official_files / "kl_tiny.ckpt"),
         "--xar", str(official_files / "xAR-tiny.pth"), "--out", str(out), "--num-classes", "10"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "xAR (a non-released size: 1+1 blocks of width 32, 4 cells of 2x2 tokens, 10 classes, 8 px)" in proc.stdout
    return out


def test_convert_writes_a_pipeline_with_official_weights_and_settings(converted):
    pipe = XARPipeline.from_pretrained(str(converted))
    assert pipe.text_encoder is None and pipe.transformer.config.num_classes == 10
    ref = official_xar_state_dict()
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, ref[key]), key
    assert torch.equal(pipe.transformer.rope_cos, ref["encoder_blocks.0.attn.rope.freqs_cos"])
    assert pipe.vae.scale_factor == 0.2325  # MAR's kl16 factor for official files
    assert pipe.sampling_defaults() == {"guidance_scale": 2.7, "num_steps": 40}
    assert pipe.resolution == 8


def test_generate_with_flow_flags_and_per_image_seeds(converted, tmp_path):
    args = ["generate", "--model", str(converted), "--num-steps", "4", "--guidance-scale", "2"]
    assert main([*args, "--class-label", "3", "7", "--n", "2", "--seed", "5", "--out-dir", str(tmp_path / "all")]) == 0
    files = sorted((tmp_path / "all").glob("*.png"))
    assert len(files) == 4 and Image.open(files[0]).size == (8, 8)
    settings = json.loads((tmp_path / "all" / "generate_config.json").read_text())
    assert (settings["num_steps"], settings["guidance_scale"]) == (4, 2.0)
    # image 3 (label 7, seed 5 + 3) regenerated alone
    assert main([*args, "--class-label", "7", "--n", "1", "--seed", "8", "--out-dir", str(tmp_path / "one")]) == 0
    alone = np.asarray(Image.open(tmp_path / "one" / "0000.png")).astype(int)
    assert np.abs(alone - np.asarray(Image.open(files[3])).astype(int)).max() <= 1


def test_generate_refuses_another_family_s_flags(converted, capsys):
    assert main(["generate", "--model", str(converted), "--class-label", "1", "--guidance-interval", "0.5"]) == 2
    assert "--guidance-interval: not a sampling option of xAR models" in capsys.readouterr().err


def test_bench_sample_counts_unit_passes(tmp_path, capsys):
    """``vgen bench sample`` works unchanged: with the folder's defaults (3 steps, cfg 2.7), per image 4 cells x 3
    velocity calls and one clean refresh pass per cell but the last, all on the CFG-doubled batch; the prefill only
    makes the cache (no network pass)."""
    XARPipeline(vae=tiny_vae(), transformer=tiny_xar(), default_num_steps=3).save_pretrained(tmp_path / "p")
    assert main(["bench", "sample", "--model", str(tmp_path / "p"), "--batch-sizes", "1", "--repeats", "1",
                 "--warmup", "0", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"] == "XARPipeline" and report["sampling"] == {"guidance_scale": 2.7, "num_steps": 3}
    row = report["results"][0]
    assert row["calls_per_batch"] == {"prefill": 1, "velocity": 12, "commit": 3}
    assert row["forwards_per_image"] == {"velocity": 24.0, "commit": 6.0, "total": 30.0}


def test_convert_lists_bad_keys(official_files, tmp_path, capsys):
    sd = official_xar_state_dict()
    sd.pop("time_embed.mlp.2.bias")
    sd["flownet.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pth")
    rc = main(["convert", "xar-official", "--vae", str(official_files / "kl_tiny.ckpt"), "--xar",
               str(tmp_path / "bad.pth"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "missing key(s): time_embed.mlp.2.bias" in err and "unexpected key(s): flownet.extra.weight" in err


def test_pipeline_is_the_shared_loop_and_images_are_batch_independent(tmp_path):
    pipe = XARPipeline(vae=tiny_vae(), transformer=tiny_xar(), default_guidance_scale=3.0, default_num_steps=4)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    latents = pipe(class_labels=[1, 2, 3], generator=gens, return_latents=True)
    assert latents.shape == (3, 4, 4, 4)
    # the pipeline is the loop: same generators, same latents
    model = pipe.transformer
    ref = generate_flow_units(model, model.class_condition(torch.tensor([1, 2, 3])), 3, xar_time_grid(4),
                              EulerMaruyamaSDE(), guidance_scale=3.0,
                              generators=[torch.Generator().manual_seed(s) for s in (0, 1, 2)])
    assert torch.equal(model.units_to_latents(ref.units), latents)
    alone = pipe(class_labels=[3], generator=[torch.Generator().manual_seed(2)], return_latents=True)
    assert (alone[0] - latents[2]).abs().max().item() < 1e-5  # image 2's stream does not depend on the batch
    images = pipe(class_labels=[3], generator=[torch.Generator().manual_seed(2)], output_type="pt").images
    assert images.shape == (1, 3, 8, 8) and 0 <= images.min() and images.max() <= 1
    assert (pipe.vae.decode_latents(alone).add(1).mul(0.5) - images).abs().max().item() < 1e-6
    pipe.save_pretrained(tmp_path / "p")
    loaded, _ = load_pipeline(tmp_path / "p", "cpu")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, XARPipeline)
    assert loaded.sampling_defaults() == {"guidance_scale": 3.0, "num_steps": 4}
    again = loaded(class_labels=[3], generator=[torch.Generator().manual_seed(2)], return_latents=True)
    assert (again - alone).abs().max().item() < 1e-5
    other = loaded(class_labels=[3], num_steps=3, generator=[torch.Generator().manual_seed(2)], return_latents=True)
    assert (other - alone).abs().max().item() > 1e-4


@pytest.mark.parametrize("entity", [dict(entity="subsample", entity_size=2), dict(entity="token", entity_size=None),
                                    dict(entity="image", entity_size=None)])
def test_every_entity_generates(entity):
    pipe = XARPipeline(vae=tiny_vae(), transformer=tiny_xar(**entity), default_num_steps=2)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[4], generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 8, 8, 3) and np.isfinite(out.images).all()


def test_text_pipeline_with_cross_attention():
    transformer = tiny_xar(conditioning="text", text_embed_dim=16, text_cross_attn=True)
    encoder = ShapesTextEncoder(vocabulary=PROMPT_VOCABULARY, embed_dim=16, depth=1, num_heads=2)
    pipe = XARPipeline(vae=tiny_vae(), transformer=transformer, text_encoder=encoder, default_num_steps=3)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a photo of a red circle", "a photo of two blue stars"], num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (4, 8, 8, 3)
    with pytest.raises(UserError, match="text-conditional: pass a prompt"):
        pipe(class_labels=[1])


def test_bad_components_and_settings_give_one_line():
    vq = MultiScaleVQModel(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False,
                           patch_nums=(1, 2, 4))
    with pytest.raises(UserError, match="xAR generates continuous latents, but the tokenizer given is a Multi"):
        XARPipeline(vae=vq, transformer=tiny_xar())
    with pytest.raises(UserError, match="autoencoder has 8 latent channels but the xAR transformer expects 4"):
        XARPipeline(vae=tiny_vae(z_channels=8), transformer=tiny_xar())
    pipe = XARPipeline(vae=tiny_vae(), transformer=tiny_xar())
    with pytest.raises(UserError, match="num_steps"):
        pipe(class_labels=[0], num_steps=0)
    with pytest.raises(UserError, match=r"class label\(s\) 10 out of range"):
        pipe(class_labels=[10])
