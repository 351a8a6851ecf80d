"""Number-for-number parity of the LlamaGen VQ tokenizer and MAR's KL-16 autoencoder with their official code.

The fixtures were made by running the official code with small random weights (``../shared/reference/parity``:
``llamagen_tiny_vq.pth`` + ``llamagen_tiny_io.pt``, LlamaGen ce98ec4, ch=32, 512 codes of dim 8, downsampling 4;
``kl16_tiny_vae.pth`` + ``kl16_tiny_io.pt``, MAR fe470ac, ch=32, five levels). The files load key for key.

Tolerances: the decoders' float32 outputs reach |x| ~ 4; evaluating the same weights in float64 moves the fixture's
own outputs by 9e-6 (LlamaGen recon) and 1.1e-5 (KL-16 decoder), so float32 results from another CPU / kernel
order can differ by about twice that. Measured here: LlamaGen quant 6e-8, recon 1.5e-5; KL-16 mean 1.5e-6,
std 7e-7, logvar 1.4e-6, decoder 1.5e-5. Token ids are identical.
"""

import functools
from pathlib import Path

import pytest
import torch
from vgen.tokenizers.kl_autoencoder import load_official_kl16
from vgen.tokenizers.single_scale_vq import load_official_llamagen_vq

DECODER_ATOL = 3e-5  # 2x the float32-vs-float64 spread of the fixtures' own decoder outputs
LATENT_ATOL = 5e-6


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=1)
def _llamagen(parity_dir: Path) -> dict:
    vq = load_official_llamagen_vq(parity_dir / "llamagen_tiny_vq.pth")
    io = torch.load(parity_dir / "llamagen_tiny_io.pt", weights_only=True)
    with torch.no_grad():
        enc = vq.encode(io["img"])
        recon = vq.decode_code(io["vq_idx"].view(2, -1), (16, 16), clamp=False)
    return {"vq": vq, "io": io, "enc": enc, "recon": recon}


@functools.lru_cache(maxsize=1)
def _kl16(parity_dir: Path) -> dict:
    vae = load_official_kl16(parity_dir / "kl16_tiny_vae.pth")
    io = torch.load(parity_dir / "kl16_tiny_io.pt", weights_only=True)
    with torch.no_grad():
        post = vae.encode(io["img"])
        dec = vae.decode(io["z"])
    return {"vae": vae, "io": io, "post": post, "dec": dec}


def test_llamagen_config_read_from_the_file(parity_dir):
    run = _llamagen(parity_dir)
    cfg, ref = run["vq"].config, run["io"]["config"]["vq"]
    assert (cfg.vocab_size, cfg.codebook_dim, cfg.z_channels, cfg.ch) == (512, 8, ref["z_channels"], ref["ch"])
    assert list(cfg.ch_mult) == ref["encoder_ch_mult"] and cfg.num_res_blocks == ref["num_res_blocks"]
    assert cfg.codebook_l2_norm and run["vq"].downsample == 4 and run["vq"].grid_size(64) == (16, 16)
    assert run["vq"].quantize.codebook_used.shape == (65536,)


def test_llamagen_token_ids_match_exactly(parity_dir):
    run = _llamagen(parity_dir)
    idx = run["enc"].idx
    assert idx.shape == (2, 256) and idx.dtype == torch.int64
    assert torch.equal(idx.reshape(-1), run["io"]["vq_idx"])
    assert torch.equal(idx, run["io"]["tokens"])  # raster order, as the GPT reads them


def test_llamagen_quant_and_recon_match(parity_dir):
    run = _llamagen(parity_dir)
    assert float((run["enc"].quant - run["io"]["vq_quant"]).abs().max()) < 1e-6
    ref = run["io"]["vq_recon"]
    assert run["recon"].shape == ref.shape == (2, 3, 64, 64)
    assert float((run["recon"] - ref).abs().max()) < DECODER_ATOL


def test_kl16_config_read_from_the_file(parity_dir):
    run = _kl16(parity_dir)
    cfg, ref = run["vae"].config, run["io"]["config"]
    assert (cfg.z_channels, cfg.ch, tuple(cfg.ch_mult)) == (ref["embed_dim"], ref["ch"], tuple(ref["ch_mult"]))
    assert list(cfg.encoder_attn_levels) == [4] and list(cfg.decoder_attn_levels) == []  # 16 px level of 256 px
    assert run["vae"].scale_factor == 0.2325


def test_kl16_posterior_matches(parity_dir):
    run = _kl16(parity_dir)
    post, io = run["post"], run["io"]
    for name in ("mean", "std", "logvar"):
        ours, ref = getattr(post, name), io[f"post_{name}"]
        assert ours.shape == ref.shape == (2, 16, 8, 8)
        assert float((ours - ref).abs().max()) < LATENT_ATOL, name


def test_kl16_decoder_matches(parity_dir):
    run = _kl16(parity_dir)
    assert run["dec"].shape == run["io"]["dec"].shape == (2, 3, 128, 128)
    assert float((run["dec"] - run["io"]["dec"]).abs().max()) < DECODER_ATOL
    # decode_latents is MAR's vae.decode(z / 0.2325) (clamped to [-1, 1])
    with torch.no_grad():
        scaled = run["vae"].decode_latents(run["io"]["z"] * 0.2325)
    assert float((scaled - run["io"]["dec"].clamp(-1, 1)).abs().max()) < DECODER_ATOL
