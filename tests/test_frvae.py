"""FR-VAE (NFIG's frequency-band residual VQ): band decomposition, residual quantization, the next-scale loop."""

import pytest
import torch
from einops import rearrange
from test_samplers import MockNextScaleModel
from vgen.samplers.interfaces import ResidualQuantizer
from vgen.samplers.next_scale import TokenSampling, generate_next_scale
from vgen.tokenizers.frequency_bands import (
    band_components,
    band_masks,
    check_band_edges,
    lowpass_masks,
    normalised_radius,
    token_share_band_edges,
)
from vgen.tokenizers.frvae import FrequencyResidualQuantizer, FrequencyVQModel
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.errors import UserError

TINY = {
    "vocab_size": 64, "z_channels": 8, "ch": 16, "ch_mult": (1, 2), "norm_num_groups": 8,
    "patch_nums": (1, 2, 3, 4, 6), "share_quant_resi": 4,
}
RES = 12


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **overrides) -> FrequencyVQModel:
    torch.manual_seed(seed)
    model = FrequencyVQModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(0.3)
    return model


def latents(shape=(2, 8, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_token_share_edges_follow_nfig_rule():
    pns = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    edges = token_share_band_edges(pns)
    total = sum(pn * pn for pn in pns)
    sigma = 0.0
    for pn, edge in zip(pns, edges):
        sigma += pn * pn / total  # sigma_i = sigma_{i-1} + (h_i w_i / sum_j h_j w_j) sigma_max, sigma_max = 1
        assert edge == pytest.approx(sigma, abs=1e-12)
    assert edges[-1] == 1.0


def test_band_masks_partition_the_spectrum_and_are_symmetric():
    for H in (16, 13):
        radius = normalised_radius(H, H)
        assert float(radius.max()) == 1.0 and float(radius[0, 0]) == 0.0
        edges = token_share_band_edges((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
        masks = band_masks(edges, H, H)
        assert masks.shape == (10, H, H)
        assert torch.equal(masks.sum(0), torch.ones(H, H))  # every bin in exactly one band
        assert float(masks[0, 0, 0]) == 1.0  # DC in band 0
        # symmetric under k -> -k, so the bands of a real latent are real
        flipped = torch.roll(torch.flip(masks, dims=(1, 2)), shifts=(1, 1), dims=(1, 2))
        assert torch.equal(masks, flipped)
        assert torch.equal(lowpass_masks(edges, H, H), masks.cumsum(0))


def test_band_components_sum_to_the_latent():
    f = latents()
    edges = token_share_band_edges((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    bands = band_components(f, edges)
    assert len(bands) == 10 and all(b.shape == f.shape and b.dtype == f.dtype for b in bands)
    assert float((sum(bands) - f).abs().max()) < 1e-5  # float32 FFT round trip (measured 5e-7)
    # band i holds only its own frequencies, and the low bands the slow variations: band 0 is the mean
    assert torch.allclose(bands[0], f.mean(dim=(2, 3), keepdim=True).expand_as(f), atol=1e-6)
    masks = band_masks(edges, 16, 16)
    for band, mask in zip(bands, masks):
        outside = torch.fft.fft2(band.double())[..., mask == 0]
        assert float(outside.abs().max()) < 1e-4
    model = tiny_model()
    img = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        parts = model.band_components(img)
        assert float((sum(parts) - model.img_to_f(img)).abs().max()) < 1e-5


def test_exact_codebook_reconstructs_the_latent_exactly():
    """With the exact per-band targets in the codebook (and phi off), residual quantization gives f_hat == f, and
    each band contributes nothing above its upper edge."""
    pns, B, C = (1, 2, 3, 4, 6), 2, 4
    quant = FrequencyResidualQuantizer(vocab_size=1, Cvae=C, patch_nums=pns, quant_resi=0.0)
    f = latents((B, C, 6, 6), seed=3)
    targets, rest = [], f.clone()
    for si, pn in enumerate(pns):  # the targets a perfect codebook would hold, band by band
        t_NC = quant._residual_at(rest, si, pn, len(pns))
        targets.append(t_NC)
        h = quant._scale_contribution(si, len(pns), rearrange(t_NC, "(b h w) c -> b c h w", b=B, h=pn, w=pn), 6)
        rest = rest - h
    codebook = torch.cat(targets)
    quant.embedding = torch.nn.Embedding.from_pretrained(codebook, freeze=False)
    quant.vocab_size = codebook.shape[0]
    f_hats = quant.f_to_idxBl_or_fhat(f, to_fhat=True)
    assert float((f_hats[-1] - f).abs().max()) < 1e-5
    idx_Bl = quant.f_to_idxBl_or_fhat(f, to_fhat=False)
    last = idx_Bl[-1]
    offset = sum(B * pn * pn for pn in pns[:-1])
    assert torch.equal(last.flatten(), torch.arange(offset, offset + B * 36))  # the last band picked its exact rows
    # every band's contribution lies below its upper edge
    P = lowpass_masks(quant.band_edges, 6, 6)
    for si in range(len(pns) - 1):
        h = f_hats[si] - (f_hats[si - 1] if si else 0)
        above = torch.fft.fft2(h.double())[..., P[si] == 0]
        assert above.numel() == 0 or float(above.abs().max()) < 1e-4


def test_same_keys_and_api_as_var_tokenizer(tmp_path):
    fr = tiny_model()
    var = MultiScaleVQModel(**TINY)
    assert {k: v.shape for k, v in fr.state_dict().items()} == {k: v.shape for k, v in var.state_dict().items()}
    img = torch.rand(3, 3, RES, RES, generator=torch.Generator().manual_seed(2)) * 2 - 1
    idx_Bl = fr.img_to_idxBl(img)
    assert [t.shape for t in idx_Bl] == [(3, pn * pn) for pn in TINY["patch_nums"]]
    with torch.no_grad():
        rec = fr.idxBl_to_img(idx_Bl)
        per_band = fr.img_to_reconstructed_img(img, last_one=False)
        var_input = fr.quantize.idxBl_to_var_input(idx_Bl)
    assert rec.shape == img.shape and len(per_band) == 5 and torch.allclose(per_band[-1], rec, atol=1e-5)
    assert var_input.shape == (3, fr.num_tokens - 1, 8)
    assert isinstance(fr.quantize, ResidualQuantizer)
    fr.save_pretrained(tmp_path / "fr")
    loaded = FrequencyVQModel.from_pretrained(tmp_path / "fr").eval()
    assert loaded.quantize.band_edges == fr.quantize.band_edges
    assert all(torch.equal(a, b) for a, b in zip(fr.img_to_idxBl(img), loaded.img_to_idxBl(img)))
    with pytest.raises(UserError, match="bands are fixed by that schedule"):
        fr.img_to_idxBl(torch.zeros(1, 3, 8, 8), patch_nums=(1, 2, 4))
    with pytest.raises(UserError, match="same_shape=True"):
        fr.idxBl_to_img(idx_Bl, same_shape=False)
    with pytest.raises(UserError, match="takes 3-channel images, got 1 channels"):
        fr.img_to_idxBl(torch.zeros(1, 1, RES, RES))
    with pytest.raises(UserError, match="expects 12x12 images"):
        fr.img_to_idxBl(torch.zeros(1, 3, 16, 16))


def test_var_input_matches_step_by_step_decoding():
    model = tiny_model()
    quant = model.quantize
    img = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(4)) * 2 - 1
    idx_Bl = model.img_to_idxBl(img)
    var_input = quant.idxBl_to_var_input(idx_Bl)
    f_hat = torch.zeros(2, 8, 6, 6)
    pieces = []
    with torch.no_grad():
        for si, pn in enumerate(TINY["patch_nums"]):
            h = rearrange(quant.embedding(idx_Bl[si]), "b (h w) c -> b c h w", h=pn, w=pn)
            f_hat, nxt = quant.get_next_autoregressive_input(si, len(TINY["patch_nums"]), f_hat, h)
            if si < len(TINY["patch_nums"]) - 1:
                pieces.append(rearrange(nxt, "b c h w -> b (h w) c"))
    assert torch.allclose(var_input, torch.cat(pieces, 1), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model.fhat_to_img(f_hat), model.idxBl_to_img(idx_Bl), atol=1e-5)


def test_next_scale_loop_runs_unchanged_on_the_frequency_tokenizer():
    model = tiny_model()
    pns = TINY["patch_nums"]
    mock = MockNextScaleModel(V=TINY["vocab_size"], patch_nums=pns)
    out = generate_next_scale(mock, model.quantize, mock.table[[0, 1]], 2, guidance_scale=2.0, sampling=TokenSampling(top_k=1))
    assert [t.shape for t in out.idx_Bl] == [(2, pn * pn) for pn in pns]
    assert mock.calls == [(si, 4) for si in range(len(pns))]
    # the loop's f_hat is the frequency tokenizer's own composition of the sampled bands
    with torch.no_grad():
        expected = model.quantize.embed_to_fhat(model.quantize.idxBl_to_h(out.idx_Bl), last_one=True)
        assert torch.allclose(out.f_hat, expected, atol=1e-5)
        assert model.fhat_to_img(out.f_hat).shape == (2, 3, RES, RES)


def test_uncovered_schedule_is_one_clear_error():
    with pytest.raises(UserError) as err:
        FrequencyVQModel(**TINY, band_edges=[0.1, 0.2, 0.4, 0.6, 0.8])
    message = str(err.value)
    assert "\n" not in message and "do not cover the spectrum" in message and "end the schedule at 1.0" in message
    with pytest.raises(UserError, match="has 3 entries but the schedule has 5 bands"):
        FrequencyVQModel(**TINY, band_edges=[0.1, 0.5, 1.0])
    with pytest.raises(UserError, match="strictly increasing"):
        check_band_edges([0.1, 0.1, 1.0], 3)
    # a last patch_num smaller than the latent cannot represent the highest band
    with pytest.raises(UserError, match="latent is 6x6 but the last patch_num is 4"):
        FrequencyVQModel(**{**TINY, "patch_nums": (1, 2, 4)}).quantize(torch.zeros(1, 8, 6, 6))
    custom = FrequencyVQModel(**TINY, band_edges=[0.05, 0.2, 0.4, 0.7, 1.0])
    assert custom.quantize.band_edges == (0.05, 0.2, 0.4, 0.7, 1.0)
