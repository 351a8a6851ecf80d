"""Number-for-number parity of MultiScaleVQModel with the official VAR VQVAE.

The fixtures were made by running FoundationVision/VAR's own code (``var_tiny_vae.pth``: ch=32, V=512, Cvae=32,
share_quant_resi=4, the 256 px schedule; ``var_tiny_io.pt``: its inputs and outputs). The official file is loaded
key for key with :func:`load_official_var_vae`.
"""

import functools
from pathlib import Path

import pytest
import torch
from vgen.tokenizers.msvq import load_official_var_vae


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=1)
def _official_run(parity_dir: Path) -> dict:
    """The tiny official VAE, its reference outputs and ours, computed once per test session."""
    vae = load_official_var_vae(parity_dir / "var_tiny_vae.pth")
    io = torch.load(parity_dir / "var_tiny_io.pt", weights_only=True)
    with torch.no_grad():
        ours = {
            "idx_Bl": vae.img_to_idxBl(io["img"]),
            "recon": vae.idxBl_to_img(io["idx_Bl"], same_shape=True, last_one=True),
            "var_input": vae.quantize.idxBl_to_var_input(io["idx_Bl"]),
        }
    return {"vae": vae, "io": io, "ours": ours}


def test_config_read_from_official_file(parity_dir):
    run = _official_run(parity_dir)
    cfg, ref = run["vae"].config, run["io"]["config"]
    assert (cfg.vocab_size, cfg.z_channels, cfg.ch) == (ref["V"], ref["Cvae"], ref["ch"])
    assert cfg.share_quant_resi == ref["share_quant_resi"]
    assert tuple(cfg.patch_nums) == tuple(ref["patch_nums"])
    assert list(cfg.ch_mult) == [1, 1, 2, 2, 4]


def test_img_to_idxBl_matches_official_exactly(parity_dir):
    run = _official_run(parity_dir)
    ours, ref = run["ours"]["idx_Bl"], run["io"]["idx_Bl"]
    assert len(ours) == len(ref) == 10
    for si, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == torch.int64 and a.shape == b.shape, si
        assert torch.equal(a, b), f"scale {si}: {int((a != b).sum())} of {a.numel()} tokens differ"


def test_idxBl_to_img_matches_official(parity_dir):
    run = _official_run(parity_dir)
    ours, ref = run["ours"]["recon"], run["io"]["recon"]
    assert ours.shape == ref.shape == (2, 3, 256, 256)
    # measured 6.3e-6 (images in [-1, 1]); the bound leaves room for another CPU's float rounding
    assert float((ours - ref).abs().max()) < 2e-5


def test_idxBl_to_var_input_matches_official(parity_dir):
    run = _official_run(parity_dir)
    ours, ref = run["ours"]["var_input"], run["io"]["var_input"]
    assert ours.shape == ref.shape == (2, 679, 32) and ours.dtype == torch.float32
    # measured 0 (a codebook lookup and area downsampling of the same codes)
    assert float((ours - ref).abs().max()) < 1e-6
