"""SingleScaleVQModel (LlamaGen's VQ layout) with tiny random configs, the official layout and bad input."""

import json

import pytest
import torch
from conftest import LAYOUT_DIR
from vgen.tokenizers.single_scale_vq import SingleScaleVQModel, VQEncoding, load_official_llamagen_vq

from vgen.errors import UserError

TINY = {"vocab_size": 32, "codebook_dim": 4, "z_channels": 16, "ch": 8, "ch_mult": (1, 2), "norm_num_groups": 4,
        "num_res_blocks": 1, "usage_window": 256}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **overrides) -> SingleScaleVQModel:
    torch.manual_seed(seed)
    model = SingleScaleVQModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # spread the codes so that many are used (the official init is tiny and then normalised)
        model.quantize.embedding.weight.normal_()
    return model


def images(batch: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def test_encode_gives_raster_ids_and_unit_codes():
    model = tiny_model()
    img = images(2, 12)
    enc = model.encode(img)
    assert isinstance(enc, VQEncoding)
    assert enc.idx.shape == (2, 36) and enc.idx.dtype == torch.int64
    assert enc.quant.shape == (2, 4, 6, 6)
    assert model.grid_size(12) == (6, 6) and model.grid_size((12, 8)) == (6, 4)
    # raster order: position (row r, col c) of the latent grid is token r * w + c
    codes = model.quantize.codebook()
    assert torch.allclose(enc.quant[1, :, 2, 5], codes[enc.idx[1, 2 * 6 + 5]], atol=1e-6)
    assert torch.allclose(enc.quant.norm(dim=1), torch.ones(2, 6, 6), atol=1e-5)  # l2-normalised codes
    # the nearest code by cosine similarity of the normalised latent
    z = torch.nn.functional.normalize(model.img_to_latent(img).detach(), dim=1)
    cos = torch.einsum("bdhw,vd->bhwv", z, codes.detach())
    assert torch.equal(cos.argmax(-1).flatten(1), enc.idx)
    assert enc.idx.unique().numel() > 8


def test_decode_code_round_trip_and_clamp():
    model = tiny_model()
    img = images(2, 8)
    enc = model.encode(img)
    with torch.no_grad():
        raw = model.decode_code(enc.idx, (4, 4), clamp=False)
        clamped = model.decode_code(enc.idx, (4, 4))
        assert torch.allclose(raw, model.decode(enc.quant), atol=1e-6)
    assert raw.shape == (2, 3, 8, 8)
    assert torch.equal(clamped, raw.clamp(-1, 1))
    # encode's quant is z + (code - z) (straight-through form), equal to the codes up to float rounding
    assert torch.allclose(model.img_to_reconstructed_img(img), clamped, atol=1e-5)
    # non-square grids work (the model is fully convolutional)
    assert model.decode_code(enc.idx[:, :8], (2, 4)).shape == (2, 3, 4, 8)


def test_codebook_neighbours_match_brute_force():
    model = tiny_model()
    codes = model.quantize.codebook().detach()
    idx = torch.tensor([[3, 7], [0, 31]])
    ids, dist = model.codebook_neighbours(idx, 5, return_distances=True)
    assert ids.shape == dist.shape == (2, 2, 5)
    assert torch.equal(ids[..., 0], idx)  # the code itself first
    for i in idx.flatten().tolist():
        brute = (codes - codes[i]).square().sum(1)
        expected = brute.argsort()[:5]
        got = ids[(idx == i).nonzero()[0].tolist()[0], (idx == i).nonzero()[0].tolist()[1]]
        assert torch.equal(got, expected)
        assert torch.allclose(dist[(idx == i)][0], brute[expected], atol=1e-5)
    assert bool((dist[..., 1:] >= dist[..., :-1] - 1e-6).all())
    with pytest.raises(UserError, match="k must be in 1..32"):
        model.codebook_neighbours(idx, 33)


def test_bad_input_is_one_clear_line():
    model = tiny_model()
    with pytest.raises(UserError, match="multiple of this tokenizer's downsampling factor 2"):
        model.encode(images(1, 7))
    with pytest.raises(UserError, match="takes 3-channel images, got 1 channels"):
        model.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(UserError, match=r"expected images of shape \(B, 3, H, W\)"):
        model.encode(torch.zeros(3, 8, 8))
    with pytest.raises(UserError, match=r"ids of shape \(B, 16\) for a 4x4 grid"):
        model.decode_code(torch.zeros(1, 15, dtype=torch.long), (4, 4))
    with pytest.raises(UserError, match="code ids must lie in 0..31"):
        model.decode_code(torch.full((1, 16), 32), (4, 4))
    with pytest.raises(UserError, match="multiple of this tokenizer's downsampling factor 2"):
        model.grid_size(9)


def test_usage_window_and_dead_code_restart():
    model = tiny_model(usage_window=64).train()
    assert model.quantize.usage_percent() == 0.0  # a fresh model has an empty window
    with torch.no_grad():
        model.quantize.embedding.weight[5:] = model.quantize.embedding.weight[0]  # codes 5.. never win
    img = images(2, 8)
    recon, vq_loss, usage = model(img)  # 2 x 16 = 32 ids recorded
    assert recon.shape == img.shape and vq_loss.ndim == 0 and float(vq_loss.detach()) > 0
    used = model.quantize.codebook_used
    assert int((used >= 0).sum()) == 32 and bool((used[:32] == -1).all())
    counts, tokens = model.quantize.usage_counts()
    assert tokens == 32 and int(counts.sum()) == 32 and int(counts[6:].sum()) == 0
    assert usage == pytest.approx(100 * float((counts >= 0.08 * 32 / 32).float().mean()))
    restarted = model.restart_dead_codes_from_images(img, threshold=0.5, generator=torch.Generator().manual_seed(0))
    assert restarted >= 27
    # restarted codes are latent vectors of the batch, so some of them are now picked
    model(img)
    counts_after, _ = model.quantize.usage_counts()
    assert int(counts_after[5:].sum()) > 0


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.train()(images(2, 8))  # fill part of the usage window
    model.save_pretrained(tmp_path / "vq")
    loaded = SingleScaleVQModel.from_pretrained(tmp_path / "vq").eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    img = images(2, 8, seed=3)
    assert torch.equal(model.eval().encode(img).idx, loaded.encode(img).idx)


def official_layout() -> dict:
    path = LAYOUT_DIR / "llamagen_official.json"
    if not path.is_file():
        pytest.skip(f"official checkpoint layouts not found at {path}")
    return json.loads(path.read_text())["vq_ds16_c2i"]


def test_default_config_has_the_official_vq16_layout():
    layout = official_layout()
    with torch.device("meta"):
        model = SingleScaleVQModel()
    sd = model.state_dict()
    assert set(sd) == set(layout)
    assert all(list(sd[k].shape) == layout[k][0] for k in layout)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 71.9
    assert model.vocab_size == 16384 and model.codebook_dim == 8 and model.downsample == 16
    assert model.grid_size(256) == (16, 16)


def test_official_layout_loads_from_a_wrapped_file_and_mismatches_are_listed(tmp_path):
    layout = official_layout()
    sd = {k: torch.zeros(shape) for k, (shape, _dtype) in layout.items()}
    torch.save({"model": sd}, tmp_path / "vq_ds16_c2i.pt")
    model = load_official_llamagen_vq(tmp_path / "vq_ds16_c2i.pt")
    assert model.config.ch == 128 and list(model.config.ch_mult) == [1, 1, 2, 2, 4]
    bad = dict(sd)
    bad.pop("decoder.conv_blocks.0.attn.1.q.weight")
    bad["decoder.conv_blocks.0.attn.1.qkv.weight"] = torch.zeros(1)
    with pytest.raises(UserError) as err:
        load_official_llamagen_vq(bad)
    message = str(err.value)
    assert "\n" not in message
    assert "missing key(s): decoder.conv_blocks.0.attn.1.q.weight" in message
    assert "unexpected key(s): decoder.conv_blocks.0.attn.1.qkv.weight" in message
    with pytest.raises(UserError, match="not a LlamaGen VQ state dict"):
        load_official_llamagen_vq({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(UserError, match="VQ checkpoint not found"):
        load_official_llamagen_vq(tmp_path / "missing.pt")
