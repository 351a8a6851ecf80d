"""AutoencoderKL (MAR's KL-16 layout) with tiny random configs, the official layout and bad input."""

import json

import pytest
import torch
from conftest import LAYOUT_DIR
from vgen.tokenizers.kl_autoencoder import KL16_SCALE_FACTOR, AutoencoderKL, DiagonalGaussian, load_official_kl16

from vgen.errors import UserError

TINY = {"z_channels": 4, "ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "norm_num_groups": 4,
        "encoder_attn_levels": (1,), "decoder_attn_levels": (1,), "scale_factor": 0.5}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY, **overrides}).eval()


def images(batch: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_posterior_sample_mode_and_kl():
    moments = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    moments[:, 4:] *= 20  # some log-variances beyond LDM's clamp
    post = DiagonalGaussian(moments)
    assert torch.equal(post.mean, moments[:, :4]) and torch.equal(post.mode(), post.mean)
    assert torch.equal(post.logvar, moments[:, 4:].clamp(-30, 20))
    assert torch.allclose(post.std, torch.exp(0.5 * post.logvar)) and torch.allclose(post.var, post.std**2)
    a = post.sample(torch.Generator().manual_seed(5))
    b = post.sample(torch.Generator().manual_seed(5))
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.allclose(a, post.mean + post.std * eps)
    # one generator per row: a row does not depend on the others
    rows = post.sample([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    single = DiagonalGaussian(moments[1:]).sample([torch.Generator().manual_seed(2)])
    assert torch.equal(rows[1:], single)
    expected_kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).sum(dim=(1, 2, 3))
    assert post.kl().shape == (2,) and torch.allclose(post.kl(), expected_kl)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


def test_encode_decode_shapes_and_scale_factor():
    model = tiny_model()
    img = images(2, 8)
    with torch.no_grad():
        post = model.encode(img)
        assert post.mean.shape == (2, 4, 4, 4)
        assert model.latent_channels == 4 and model.downsample == 2 and model.latent_size(8) == (4, 4)
        z = model.encode_latents(img, generator=torch.Generator().manual_seed(3))
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(z, (post.mean + post.std * eps) * 0.5, atol=1e-6)
        assert torch.allclose(model.encode_latents(img, sample=False), post.mean * 0.5)
        dec = model.decode_latents(z)
        assert dec.shape == (2, 3, 8, 8) and float(dec.abs().max()) <= 1.0
        assert torch.allclose(dec, model.decode(z / 0.5).clamp(-1, 1))
        assert torch.allclose(model.img_to_reconstructed_img(img), model.decode(post.mean).clamp(-1, 1))
        recon, _ = model(img, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(recon, model.decode(post.mean + post.std * eps), atol=1e-5)
    model.set_scale_factor(0.25)
    assert model.scale_factor == 0.25 and model.config.scale_factor == 0.25
    with pytest.raises(UserError, match="scale_factor must be positive"):
        model.set_scale_factor(0.0)


def test_scale_factor_is_saved(tmp_path):
    model = tiny_model()
    model.set_scale_factor(0.3)
    model.save_pretrained(tmp_path / "kl")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "kl").eval()
    assert loaded.scale_factor == 0.3
    img = images(1, 8)
    with torch.no_grad():
        assert torch.allclose(model.encode_latents(img, sample=False), loaded.encode_latents(img, sample=False))


def test_bad_input_is_one_clear_line():
    model = tiny_model()
    with pytest.raises(UserError, match="multiple of this tokenizer's downsampling factor 2"):
        model.encode(images(1, 7))
    with pytest.raises(UserError, match="takes 3-channel images, got 4 channels"):
        model.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(UserError, match=r"expected latents of shape \(B, 4, h, w\)"):
        model.decode_latents(torch.zeros(1, 3, 4, 4))
    with pytest.raises(UserError, match="encoder_attn_levels \\[2\\] must lie in 0..1"):
        AutoencoderKL(**{**TINY, "encoder_attn_levels": (2,)})


def official_layout() -> dict:
    path = LAYOUT_DIR / "kl16_official.json"
    if not path.is_file():
        pytest.skip(f"official checkpoint layouts not found at {path}")
    return json.loads(path.read_text())["kl16"]


def test_default_config_has_the_official_kl16_layout():
    layout = official_layout()
    with torch.device("meta"):
        model = AutoencoderKL()
    sd = model.state_dict()
    assert set(sd) == set(layout) and all(list(sd[k].shape) == layout[k][0] for k in layout)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 66.5
    assert model.scale_factor == KL16_SCALE_FACTOR and model.downsample == 16 and model.latent_channels == 16


def test_official_file_loads_and_mismatches_are_listed(tmp_path):
    layout = official_layout()
    sd = {k: torch.zeros(shape) for k, (shape, _dtype) in layout.items()}
    torch.save({"model": sd}, tmp_path / "kl16.ckpt")
    model = load_official_kl16(tmp_path / "kl16.ckpt")
    assert list(model.config.encoder_attn_levels) == [4] and list(model.config.decoder_attn_levels) == []
    assert model.scale_factor == 0.2325
    bad = dict(sd)
    bad.pop("encoder.mid.attn_1.k.bias")
    bad["loss.logvar"] = torch.zeros(())  # LDM training checkpoints carry their loss module
    with pytest.raises(UserError) as err:
        load_official_kl16(bad)
    message = str(err.value)
    assert "\n" not in message
    assert "missing key(s): encoder.mid.attn_1.k.bias" in message and "unexpected key(s): loss.logvar" in message
    with pytest.raises(UserError, match="not a KL autoencoder state dict"):
        load_official_kl16({"decoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="KL autoencoder checkpoint not found"):
        load_official_kl16(tmp_path / "missing.ckpt")
