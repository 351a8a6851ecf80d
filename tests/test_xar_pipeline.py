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

from test_flowar_pipeline import FLOW_SAMPLER_DEFAULTS
from step_callbacks import interrupt_after, seeds

#: the CSpD settings a pipeline saves unless told otherwise (FlowAR's, without its choice of flow sampler)
CSPD_DEFAULTS = {k: v for k, v in FLOW_SAMPLER_DEFAULTS.items() if k != "flow_sampler"}


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
    assert pipe.sampling_defaults() == {"guidance_scale": 2.7, "num_steps": 40, **CSPD_DEFAULTS}
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
    assert report["pipeline"] == "XARPipeline"
    assert report["sampling"] == {"guidance_scale": 2.7, "num_steps": 3, **CSPD_DEFAULTS}
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
    assert loaded.sampling_defaults() == {"guidance_scale": 3.0, "num_steps": 4, **CSPD_DEFAULTS}
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


# -- diffusers conventions: step callback per cell, interruption, latent output, unconditional images ---------------


@pytest.fixture(scope="module")
def xar():
    pipe = XARPipeline(vae=tiny_vae(), transformer=tiny_xar(), default_guidance_scale=3.0, default_num_steps=3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def loop_units(pipe, cond, batch_size, generators, **hooks):
    """The shared loop with the pipeline's settings (3 SDE points, cfg 3 on xAR's ramp)."""
    return generate_flow_units(pipe.transformer, cond, batch_size, xar_time_grid(3), EulerMaruyamaSDE(),
                               guidance_scale=3.0, generators=generators, **hooks)


def test_xar_callback_sees_every_cell_with_the_declared_tensors(xar):
    calls = []

    def record(p, step_index, timestep, kwargs):
        assert p is xar and set(kwargs) == {"x_clean", "velocity"}
        calls.append((step_index, timestep, tuple(kwargs["x_clean"].shape), kwargs["x_clean"].dtype,
                      tuple(kwargs["velocity"].shape), kwargs["velocity"].dtype,
                      bool(torch.isfinite(kwargs["velocity"]).all())))
        return kwargs

    xar(class_labels=[1, 2], generator=seeds(0, 1), callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["x_clean", "velocity"], output_type="latent")
    # 4 cells of 2x2 tokens, 4 latent channels (patch 1)
    assert calls == [(k, k, (2, 4, 4), torch.float32, (2, 4, 4), torch.float32, True) for k in range(4)]
    assert xar.num_timesteps == 4
    seen = []
    xar(class_labels=[1], generator=seeds(0), callback_on_step_end=lambda p, i, t, kw: seen.append(set(kw)))
    assert seen == [{"x_clean"}] * 4  # the default tensor inputs; returning None keeps the cell


def test_replacing_a_cell_is_what_the_later_cells_condition_on_and_what_is_decoded(xar):
    fixed = torch.linspace(-1, 1, 2 * 4 * 4).view(2, 4, 4)  # cell 1 (top right): 2x2 tokens of 4 channels

    def replace_cell_one(p, step_index, timestep, kwargs):
        return {"x_clean": fixed} if step_index == 1 else kwargs

    def call(output_type):
        return xar(class_labels=[3, 5], generator=seeds(2, 4), callback_on_step_end=replace_cell_one,
                   output_type=output_type).images

    latents = call("latent")
    cond, _ = xar.encode_condition(None, [3, 5], 1)
    out = loop_units(xar, cond, 2, seeds(2, 4), on_unit=lambda k, x: fixed if k == 1 else None)
    assert torch.equal(out.units[1], fixed)
    assert latents.shape == (2, 4, 4, 4) and latents.dtype == torch.float32
    assert torch.allclose(latents, xar.transformer.units_to_latents(out.units), atol=1e-6)
    # the replaced cell is in the latent where cell 1 lies (rows 0-1, columns 2-3), token by token
    torch.testing.assert_close(latents[:, :, :2, 2:], fixed.view(2, 2, 2, 4).permute(0, 3, 1, 2))
    free = xar(class_labels=[3, 5], generator=seeds(2, 4), output_type="latent").images
    assert (free[:, :, 2:] - latents[:, :, 2:]).abs().max() > 1e-3  # the later cells saw the replacement
    torch.testing.assert_close(free[:, :, :2, :2], latents[:, :, :2, :2])  # the cell before it did not change
    images = call("pt")
    assert torch.allclose(images, xar.decode_latents(latents, output_type="pt").images, atol=1e-6)


def test_xar_interrupt_stops_after_the_cell_and_leaves_the_rest_nan_and_black(xar):
    stop_after_two = interrupt_after(1, record="x_clean")
    cells = stop_after_two.seen
    latents = xar(class_labels=[4], generator=seeds(9), callback_on_step_end=stop_after_two,
                  output_type="latent").images
    assert len(cells) == 2 and latents.shape == (1, 4, 4, 4)
    assert latents[:, :, 2:].isnan().all() and torch.isfinite(latents[:, :, :2]).all()  # cells 2, 3: bottom half
    full = xar(class_labels=[4], generator=seeds(9), output_type="latent").images
    assert torch.allclose(latents[:, :, :2], full[:, :, :2], atol=1e-6) and not xar.interrupt
    images = xar(class_labels=[4], generator=seeds(9), callback_on_step_end=stop_after_two, output_type="pt").images
    assert images.shape == (1, 3, 8, 8)
    assert torch.allclose(images, xar.decode_latents(latents, output_type="pt").images, atol=1e-6)
    assert (images[:, :, 4:] == 0).all() and images[:, :, :4].abs().sum() > 0  # the cells not made are black
    assert len(xar.decode_latents(latents).images) == 1  # PIL by default


def test_xar_latent_output_round_trips_and_bad_input_is_one_clear_error(xar):
    latents = xar(class_labels=[1, 2], generator=seeds(5, 6), output_type="latent").images
    assert latents.shape == (2, 4, 4, 4) and latents.dtype == torch.float32 and torch.isfinite(latents).all()
    images = xar(class_labels=[1, 2], generator=seeds(5, 6), output_type="pt").images
    assert torch.allclose(xar.decode_latents(latents, output_type="pt").images, images, atol=1e-6)
    assert torch.equal(xar(class_labels=[1, 2], generator=seeds(5, 6), return_latents=True), latents)
    assert xar(class_labels=[1], generator=seeds(5), output_type="latent", return_dict=False)[0].shape == (1, 4, 4, 4)
    with pytest.raises(UserError, match=r"this xAR model generates a 4x4 latent .* got 3x3"):
        xar.decode_latents(latents[:, :, :3, :3])
    with pytest.raises(UserError, match="latents must be the float latents"):
        xar.decode_latents(latents.long())
    with pytest.raises(UserError, match="'latents' not available in XARPipeline; its step tensors: x_clean, velocity"):
        xar(class_labels=[0], callback_on_step_end=lambda p, i, t, kw: kw,
            callback_on_step_end_tensor_inputs=["latents"])
    with pytest.raises(UserError, match="'velocity' is read-only .* may replace: x_clean"):
        xar(class_labels=[0], callback_on_step_end_tensor_inputs=["velocity"],
            callback_on_step_end=lambda p, i, t, kw: {"velocity": kw["velocity"] * 0})
    with pytest.raises(UserError, match=r"returned x_clean of shape \(1, 3, 4\); it must keep the shape \(1, 4, 4\)"):
        xar(class_labels=[0], callback_on_step_end=lambda p, i, t, kw: {"x_clean": kw["x_clean"][:, :3]})


def test_xar_unconditional_images_and_progress_bar(xar):
    import io

    images = xar(unconditional=True, num_images_per_prompt=2, generator=seeds(0, 1), output_type="pt").images
    out = loop_units(xar, xar.transformer.null_condition(2), 2, seeds(0, 1))
    expected = xar.latents_to_images(xar.transformer.units_to_latents(out.units))
    assert images.shape == (2, 3, 8, 8) and torch.allclose(images, expected, atol=1e-6)
    assert (xar(class_labels=[0, 0], generator=seeds(0, 1), output_type="pt").images - images).abs().max() > 1e-4
    with pytest.raises(UserError, match="unconditional images take no prompt and no class labels"):
        xar(unconditional=True, class_labels=[1])
    stream = io.StringIO()
    xar.set_progress_bar_config(file=stream, desc="cells", disable=False)
    try:
        xar(class_labels=[0], generator=seeds(0))
    finally:
        xar.set_progress_bar_config(disable=True)
    assert "cells: 100%" in stream.getvalue() and "4/4" in stream.getvalue()


def test_saved_xar_card_says_what_latent_output_is(xar, tmp_path):
    xar.save_pretrained(tmp_path / "p")
    card = (tmp_path / "p" / "README.md").read_text()
    assert f'`output_type="latent"` returns {XARPipeline.latent_description}' in card
    assert "NaN at the latent pixels of the cells it did not make" in card


def test_vgen_generate_unconditional_with_an_xar_folder(converted, tmp_path):
    assert main(["generate", "--model", str(converted), "--unconditional", "--n", "2", "--seed", "0",
                 "--num-steps", "2", "--out-dir", str(tmp_path / "out")]) == 0
    assert len(sorted((tmp_path / "out").glob("*.png"))) == 2
