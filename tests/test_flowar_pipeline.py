"""``FlowARPipeline`` and ``vgen convert flowar-official`` + ``vgen generate`` on random checkpoints in the official
key layouts (FlowAR with 2 x 1 AR blocks of width 32 and a width-32 flow head, 10 classes; an LDM/MAR KL autoencoder
with 4 latent channels and downsampling 2: 8 px images from 4x4 latents)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from vgen.tokenizers.kl_autoencoder import AutoencoderKL
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.cli import main
from vgen.data import PROMPT_VOCABULARY
from vgen.errors import UserError
from vgen.models.flowar import FlowAR
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.pipelines import load_pipeline
from vgen.pipelines.flowar import FlowARPipeline


#: the sampler and CSpD settings a pipeline saves unless told otherwise
FLOW_SAMPLER_DEFAULTS = {"flow_sampler": "ode", "speculative": "none", "drafter": "", "gamma": 4,
                         "prefill_fraction": 0.05, "rejection_rounds": 32, "verification": "unit"}


def tiny_flowar(**overrides) -> FlowAR:
    torch.manual_seed(0)
    config = dict(latent_channels=4, scales=(1, 2, 4), encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, flow_depth=1, flow_width=32,
                  flow_num_heads=2, num_classes=10)
    return FlowAR(**{**config, **overrides}).eval()


def tiny_vae(**overrides) -> AutoencoderKL:
    torch.manual_seed(1)
    config = dict(z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, encoder_attn_levels=(), scale_factor=0.5)
    return AutoencoderKL(**{**config, **overrides}).eval()


def official_flowar_state_dict() -> dict:
    model = tiny_flowar()
    sd = dict(model.state_dict())
    sd["mask"] = torch.where(model.attn_mask, 0.0, -torch.inf)  # released files carry the additive mask
    return sd


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    torch.save(official_flowar_state_dict(), root / "FlowAR-tiny.pth")
    torch.save({"model": tiny_vae().state_dict()}, root / "kl_tiny.ckpt")  # MAR: weights under "model"
    return root


@pytest.fixture(scope="module")
def converted(official_files):
    out = official_files / "pipe"
    proc = subprocess.run(
        [sys.executable, "-m", "vgen", "convert", "flowar-official", "--vae", str(official_files / "kl_tiny.ckpt"),
         "--flowar", str(official_files / "FlowAR-tiny.pth"), "--out", str(out), "--num-classes", "10"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "FlowAR (a non-released size: 1+1 blocks of width 32" in proc.stdout
    return out


def test_convert_writes_a_pipeline_with_official_weights_and_settings(converted):
    pipe = FlowARPipeline.from_pretrained(str(converted))
    assert pipe.text_encoder is None and pipe.transformer.config.num_classes == 10
    ref = official_flowar_state_dict()
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, ref[key]), key
    assert pipe.vae.scale_factor == 0.2325  # MAR's kl16 factor for official files
    assert pipe.sampling_defaults() == {"guidance_scale": 2.4, "guidance_interval": 0.9, "num_steps": 25,
                                        **FLOW_SAMPLER_DEFAULTS}
    assert pipe.resolution == 8


def test_generate_with_flow_flags_and_per_image_seeds(converted, tmp_path):
    args = ["generate", "--model", str(converted), "--num-steps", "6", "--guidance-interval", "0.8",
            "--guidance-scale", "2"]
    assert main([*args, "--class-label", "3", "7", "--n", "2", "--seed", "5", "--out-dir", str(tmp_path / "all")]) == 0
    files = sorted((tmp_path / "all").glob("*.png"))
    assert len(files) == 4 and Image.open(files[0]).size == (8, 8)
    settings = json.loads((tmp_path / "all" / "generate_config.json").read_text())
    assert (settings["num_steps"], settings["guidance_interval"], settings["guidance_scale"]) == (6, 0.8, 2.0)
    # image 3 (label 7, seed 5 + 3) regenerated alone
    assert main([*args, "--class-label", "7", "--n", "1", "--seed", "8", "--out-dir", str(tmp_path / "one")]) == 0
    alone = np.asarray(Image.open(tmp_path / "one" / "0000.png")).astype(int)
    assert np.abs(alone - np.asarray(Image.open(files[3])).astype(int)).max() <= 1


def test_generate_refuses_another_family_s_flags(converted, capsys):
    assert main(["generate", "--model", str(converted), "--class-label", "1", "--top-k", "5"]) == 2
    assert "--top-k: not a sampling option of FlowAR models" in capsys.readouterr().err
    # --num-steps is also the video family's (any count >= 1): FlowAR's own rule (>= 2) is checked once it is loaded
    assert main(["generate", "--model", str(converted), "--class-label", "1", "--num-steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == "vgen generate: error: --num-steps: must be an integer >= 2, got 1"


def test_convert_lists_bad_keys(official_files, tmp_path, capsys):
    sd = official_flowar_state_dict()
    sd.pop("z_proj_ln.weight")
    sd["flownet.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pth")
    rc = main(["convert", "flowar-official", "--vae", str(official_files / "kl_tiny.ckpt"), "--flowar",
               str(tmp_path / "bad.pth"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "missing key(s): z_proj_ln.weight" in err and "unexpected key(s): flownet.extra.weight" in err


def test_class_pipeline_call_save_load_and_batch_independence(tmp_path):
    pipe = FlowARPipeline(vae=tiny_vae(), transformer=tiny_flowar(), default_guidance_scale=3.0, default_num_steps=6)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    images = pipe(class_labels=[1, 2, 3], generator=gens, output_type="pt").images
    assert images.shape == (3, 3, 8, 8) and 0 <= images.min() and images.max() <= 1
    alone = pipe(class_labels=[3], generator=[torch.Generator().manual_seed(2)], output_type="pt").images
    assert (alone[0] - images[2]).abs().max().item() < 1e-5  # image 2's stream does not depend on the batch
    latents = pipe(class_labels=[3], generator=[torch.Generator().manual_seed(2)], return_latents=True)
    assert latents.shape == (1, 4, 4, 4)
    assert (pipe.vae.decode_latents(latents).add(1).mul(0.5) - alone).abs().max().item() < 1e-6
    # the saved defaults drive a call that leaves the knobs out; a knob given wins
    pipe.save_pretrained(tmp_path / "p")
    loaded, _ = load_pipeline(tmp_path / "p", "cpu")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, FlowARPipeline)
    assert loaded.sampling_defaults() == {"guidance_scale": 3.0, "guidance_interval": 0.9, "num_steps": 6,
                                          **FLOW_SAMPLER_DEFAULTS}
    again = loaded(class_labels=[3], generator=[torch.Generator().manual_seed(2)], output_type="pt").images
    assert (again - alone).abs().max().item() < 1e-5
    other = loaded(class_labels=[3], num_steps=4, generator=[torch.Generator().manual_seed(2)], output_type="pt")
    assert (other.images - alone).abs().max().item() > 1e-4


def test_text_pipeline_with_cross_attention():
    transformer = tiny_flowar(conditioning="text", text_embed_dim=16, text_cross_attn=True,
                              flow_head="cross_attention")
    encoder = ShapesTextEncoder(vocabulary=PROMPT_VOCABULARY, embed_dim=16, depth=1, num_heads=2)
    pipe = FlowARPipeline(vae=tiny_vae(), transformer=transformer, text_encoder=encoder, default_num_steps=4)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a photo of a red circle", "a photo of two blue stars"], num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (4, 8, 8, 3)
    with pytest.raises(UserError, match="text-conditional: pass a prompt"):
        pipe(class_labels=[1])
    with pytest.raises(UserError, match="zebra"):
        pipe(prompt="a photo of a red zebra")


def test_bad_components_and_settings_give_one_line():
    vq = MultiScaleVQModel(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False,
                           patch_nums=(1, 2, 4))
    with pytest.raises(UserError, match="continuous latents, but the tokenizer given is a MultiScaleVQModel"):
        FlowARPipeline(vae=vq, transformer=tiny_flowar())
    with pytest.raises(UserError, match="autoencoder has 8 latent channels but the FlowAR transformer expects 4"):
        FlowARPipeline(vae=tiny_vae(z_channels=8), transformer=tiny_flowar())
    pipe = FlowARPipeline(vae=tiny_vae(), transformer=tiny_flowar())
    with pytest.raises(UserError, match="num_steps"):
        pipe(class_labels=[0], num_steps=1)
    with pytest.raises(UserError, match="guidance_interval"):
        pipe(class_labels=[0], guidance_interval=1.5)
    with pytest.raises(UserError, match=r"class label\(s\) 10 out of range"):
        pipe(class_labels=[10])
