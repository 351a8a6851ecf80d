"""MultiScaleVQModel (VAR's multi-scale residual VQ tokenizer) with tiny random configs, and the official layout."""

import json

import pytest
import torch
from conftest import LAYOUT_DIR
from vgen.tokenizers.msvq import (
    PATCH_NUMS_512,
    MultiScaleVQModel,
    load_official_var_vae,
    phi_index,
)

from vgen.errors import UserError

TINY = {
    "vocab_size": 64, "z_channels": 8, "ch": 16, "ch_mult": (1, 2), "norm_num_groups": 8,
    "patch_nums": (1, 2, 3, 4, 6), "share_quant_resi": 4,
}
RES = 12  # patch_nums[-1] * 2 ** (len(ch_mult) - 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **overrides) -> MultiScaleVQModel:
    torch.manual_seed(seed)
    model = MultiScaleVQModel(**{**TINY, **overrides}).eval()
    # random-init codes are far from the encoder's features; put them on the latent scale so many get used
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(0.3)
    return model


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, RES, RES, generator=g) * 2 - 1


def official_layout() -> dict:
    path = LAYOUT_DIR / "var_official.json"
    if not path.is_file():
        pytest.skip(f"official checkpoint layouts not found at {path}")
    return json.loads(path.read_text())["vae_ch160v4096z32"]


def meta_state_dict(layout: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, (shape, _dtype) in layout.items()}


def test_phi_table_matches_official_numpy_rule():
    assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(si, 7, 4) for si in range(7)] == [0, 0, 1, 2, 2, 3, 3]
    assert [phi_index(si, 10, 3) for si in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    for num_scales in range(2, 17):  # non-shared: one phi per scale, in order
        assert [phi_index(si, num_scales, num_scales) for si in range(num_scales)] == list(range(num_scales))
    assert phi_index(0, 1, 4) == 0


def test_phi_sharing_variants_have_official_keys():
    keys = lambda m: sorted({k.rsplit(".", 1)[0] for k in m.state_dict() if k.startswith("quantize.quant_resi")})
    assert keys(tiny_model(share_quant_resi=4)) == [f"quantize.quant_resi.qresi_ls.{i}" for i in range(4)]
    assert keys(tiny_model(share_quant_resi=1)) == ["quantize.quant_resi.qresi"]
    assert keys(tiny_model(share_quant_resi=0)) == [f"quantize.quant_resi.{i}" for i in range(5)]
    assert keys(tiny_model(quant_resi=0.0)) == []


def test_round_trip_shapes_and_dtypes():
    model = tiny_model()
    img = images()
    idx_Bl = model.img_to_idxBl(img)
    assert [t.shape for t in idx_Bl] == [(3, pn * pn) for pn in TINY["patch_nums"]]
    assert all(t.dtype == torch.int64 for t in idx_Bl)
    assert all(0 <= int(t.min()) and int(t.max()) < TINY["vocab_size"] for t in idx_Bl)
    assert model.encode(img)[-1].equal(idx_Bl[-1])
    with torch.no_grad():
        rec = model.idxBl_to_img(idx_Bl, same_shape=True, last_one=True)
        per_scale = model.idxBl_to_img(idx_Bl, same_shape=True, last_one=False)
        grown = model.idxBl_to_img(idx_Bl, same_shape=False, last_one=True)
        decoded = model.decode(idx_Bl)
    assert rec.shape == (3, 3, RES, RES) and rec.dtype == torch.float32
    assert float(rec.abs().max()) <= 1.0
    assert len(per_scale) == 5 and torch.equal(per_scale[-1], rec)
    assert torch.equal(decoded, rec)
    assert model.num_tokens == 1 + 4 + 9 + 16 + 36 and model.resolution == RES
    assert grown.shape == rec.shape and not torch.allclose(grown, rec)
    # many codes in use: the test is not about a collapsed codebook
    assert torch.cat(idx_Bl, 1).unique().numel() > 20


def test_encoding_is_batch_independent():
    """An image's tokens do not depend on the batch it is encoded in. Batched and single-image convolutions may
    round differently (by ~1e-6), so the test first checks that no token of this data lies that close to a tie
    between two codes: then no CPU's rounding can change a token, and the ids must be equal."""
    model = tiny_model()
    quant = model.quantize
    real_nearest = quant.nearest_code
    margins = []

    def nearest_with_margin(z_NC):
        dist_NV = torch.cdist(z_NC.double(), quant.embedding.weight.double()).square()
        two_best = dist_NV.topk(2, dim=1, largest=False).values
        margins.append(((two_best[:, 1] - two_best[:, 0]) / two_best[:, 1].clamp_min(1e-12)).min().item())
        return real_nearest(z_NC)

    quant.nearest_code = nearest_with_margin
    img = images(4)
    full = model.img_to_idxBl(img)
    single = model.img_to_idxBl(img[2:3])
    assert min(margins) > 1e-4
    assert all(torch.equal(a[2:3], b) for a, b in zip(full, single))


def test_var_input_equals_incremental_sampling_steps():
    """Teacher-forcing inputs (all scales at once) == the maps get_next_autoregressive_input yields step by step."""
    model = tiny_model()
    quant = model.quantize
    idx_Bl = model.img_to_idxBl(images())
    var_input = quant.idxBl_to_var_input(idx_Bl)
    L = sum(pn * pn for pn in TINY["patch_nums"])
    assert var_input.shape == (3, L - 1, TINY["z_channels"]) and var_input.dtype == torch.float32

    SN = len(TINY["patch_nums"])
    f_hat = torch.zeros(3, TINY["z_channels"], 6, 6)
    pieces = []
    with torch.no_grad():
        for si, pn in enumerate(TINY["patch_nums"]):
            h_BChw = quant.embedding(idx_Bl[si]).transpose(1, 2).reshape(3, -1, pn, pn)
            f_hat, next_map = quant.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
            if si < SN - 1:
                pn_next = TINY["patch_nums"][si + 1]
                assert next_map.shape == (3, TINY["z_channels"], pn_next, pn_next)
                pieces.append(next_map.flatten(2).transpose(1, 2))
            else:
                assert next_map is f_hat
    torch.testing.assert_close(torch.cat(pieces, 1), var_input, rtol=0, atol=1e-6)
    # the summed f_hat decodes to the same image as idxBl_to_img
    with torch.no_grad():
        torch.testing.assert_close(model.fhat_to_img(f_hat), model.idxBl_to_img(idx_Bl), rtol=0, atol=1e-6)


def test_encoder_fhat_equals_fhat_rebuilt_from_indices():
    model = tiny_model()
    img = images()
    with torch.no_grad():
        f_hats = model.quantize.f_to_idxBl_or_fhat(model.img_to_f(img), to_fhat=True)
        idx_Bl = model.img_to_idxBl(img)
        rebuilt = model.quantize.embed_to_fhat(model.quantize.idxBl_to_h(idx_Bl), all_to_max_scale=True)
        for a, b in zip(f_hats, rebuilt):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.img_to_reconstructed_img(img), model.idxBl_to_img(idx_Bl), rtol=0, atol=1e-6)
        # coarse-to-fine: each added scale brings f_hat closer to the encoder's latent
        f = model.img_to_f(img)
        errors = [float((f - fh).square().mean()) for fh in f_hats]
        assert errors[-1] < errors[0]


def test_training_forward_losses_gradients_and_usage():
    model = tiny_model().train()
    img = images(4)
    recon, vq_loss, usage_pct = model(img)
    assert recon.shape == img.shape and vq_loss.ndim == 0 and float(vq_loss.detach()) > 0
    assert isinstance(usage_pct, float) and 0.0 < usage_pct <= 100.0
    # the EMA hit counts now hold this batch's code hits (first update copies them)
    hits = model.quantize.ema_vocab_hit_SV
    assert hits.shape == (5, 64)
    assert hits.sum(1).tolist() == [4.0 * pn * pn for pn in TINY["patch_nums"]]
    torch.testing.assert_close(model.quantize.codebook_usage_counts, hits.sum(0))
    # forward value = decoder(f_hat) of the quantized latent (straight-through keeps the value)
    with torch.no_grad():
        f_hat = model.quantize.f_to_idxBl_or_fhat(model.img_to_f(img), to_fhat=True)[-1]
        torch.testing.assert_close(recon, model.decoder(model.post_quant_conv(f_hat)), rtol=0, atol=1e-5)
    (recon.square().mean() + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "decoder.conv_out.weight",
                 "quantize.embedding.weight", "quantize.quant_resi.qresi_ls.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    # eval mode does not touch the statistics
    model.eval()
    before = hits.clone()
    model(img)
    assert torch.equal(model.quantize.ema_vocab_hit_SV, before)


def test_vq_loss_is_commitment_plus_codebook_terms():
    model = tiny_model(beta=0.0).train()
    _, loss_beta0, _ = model(images())
    model2 = tiny_model(beta=1.0).train()
    _, loss_beta1, _ = model2(images())
    # with beta = 1 the commitment term equals the codebook term: the loss doubles
    torch.testing.assert_close(loss_beta1, 2 * loss_beta0, rtol=1e-5, atol=0)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    model.quantize.ema_vocab_hit_SV.uniform_()
    model.save_pretrained(tmp_path)
    loaded = MultiScaleVQModel.from_pretrained(tmp_path).eval()
    assert tuple(loaded.config.patch_nums) == TINY["patch_nums"] and loaded.patch_nums == TINY["patch_nums"]
    assert loaded.Cvae == 8 and loaded.vocab_size == 64
    assert torch.equal(loaded.quantize.ema_vocab_hit_SV, model.quantize.ema_vocab_hit_SV)
    img = images()
    idx_a, idx_b = model.img_to_idxBl(img), loaded.img_to_idxBl(img)
    assert all(torch.equal(a, b) for a, b in zip(idx_a, idx_b))
    with torch.no_grad():
        assert torch.equal(model.idxBl_to_img(idx_a), loaded.idxBl_to_img(idx_b))


def test_restart_dead_codes_changes_dead_codes_only():
    model = tiny_model()
    quant = model.quantize
    counts = torch.arange(64) * 0.1 + 0.05
    quant.ema_vocab_hit_SV.zero_()
    quant.ema_vocab_hit_SV[0] = counts
    before = quant.embedding.weight.detach().clone()
    with torch.no_grad():
        samples = quant.residuals_NC(model.img_to_f(images()))
    assert samples.shape == (3 * (1 + 4 + 9 + 16 + 36), 8)
    dead = counts < 1.0
    n = quant.restart_dead_codes(samples, min_usage=1.0, generator=torch.Generator().manual_seed(0))
    assert n == int(dead.sum()) == 10
    after = quant.embedding.weight.detach()
    assert torch.equal(after[~dead], before[~dead])
    assert not torch.equal(after[dead], before[dead])
    # every restarted code is one of the samples
    assert all(bool((samples == row).all(1).any()) for row in after[dead])
    # restarted codes get usage min_usage, live ones keep theirs: an immediate second call restarts nothing
    torch.testing.assert_close(quant.codebook_usage_counts[dead], torch.full((10,), 1.0))
    assert torch.equal(quant.codebook_usage_counts[~dead], counts[~dead])
    assert quant.restart_dead_codes(samples, min_usage=1.0) == 0


def test_wrong_image_size_is_a_user_error():
    model = tiny_model()
    with pytest.raises(UserError, match="12x12 images"):
        model.img_to_idxBl(torch.zeros(1, 3, 16, 16))


def test_invalid_configs_are_user_errors():
    with pytest.raises(UserError, match="strictly increasing"):
        MultiScaleVQModel(**{**TINY, "patch_nums": (1, 3, 2)})
    with pytest.raises(UserError, match="norm_num_groups"):
        MultiScaleVQModel(**{**TINY, "ch": 12})


def test_official_layout_matches_key_for_key():
    layout = official_layout()
    with torch.device("meta"):
        model = MultiScaleVQModel()  # defaults = vae_ch160v4096z32
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: shape for k, (shape, _dtype) in layout.items()}
    assert len(ours) == 324
    assert sum(v.numel() for v in model.parameters()) == 108_948_355


def test_load_official_infers_config_from_shapes():
    layout = official_layout()
    model = load_official_var_vae(meta_state_dict(layout))
    cfg = model.config
    assert (cfg.ch, list(cfg.ch_mult), cfg.z_channels, cfg.vocab_size) == (160, [1, 1, 2, 2, 4], 32, 4096)
    assert (cfg.share_quant_resi, cfg.quant_conv_ks, cfg.num_res_blocks) == (4, 3, 2)
    assert list(cfg.patch_nums) == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] and not model.training
    # the same file at 512 px, and with a 12-scale schedule (the hit statistics are then reset, as officially)
    assert load_official_var_vae(meta_state_dict(layout), patch_nums=PATCH_NUMS_512).resolution == 512
    twelve = load_official_var_vae(meta_state_dict(layout), patch_nums=(1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16))
    assert twelve.quantize.ema_vocab_hit_SV.shape == (12, 4096)
    # the usage statistics are optional (zeros when a re-saved file dropped them)
    no_stats = meta_state_dict(layout)
    del no_stats["quantize.ema_vocab_hit_SV"]
    assert load_official_var_vae(no_stats).quantize.ema_vocab_hit_SV.shape == (10, 4096)
    # a training checkpoint wraps the VAE in trainer.vae_local
    wrapped = {"trainer": {"vae_local": meta_state_dict(layout)}, "epoch": 3}
    assert load_official_var_vae(wrapped).config.vocab_size == 4096


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys():
    layout = official_layout()
    sd = meta_state_dict(layout)
    dropped = sorted(k for k in sd if k.startswith("decoder.up.4.attn."))  # 18 keys
    for k in dropped:
        del sd[k]
    sd["decoder.extra.weight"] = torch.empty(3, device="meta")
    sd["encoder.conv_out.bias"] = torch.empty(7, device="meta")
    with pytest.raises(UserError) as info:
        load_official_var_vae(sd)
    msg = str(info.value)
    assert "missing key(s): " in msg and dropped[0] in msg and "(18 in all)" in msg
    assert "unexpected key(s): decoder.extra.weight" in msg
    assert "other shape(s), saved vs expected: encoder.conv_out.bias (7,) vs (32,)" in msg
    assert "\n" not in msg


def test_check_state_dict_accepts_own_state_dict():
    from vgen.checkpoints import check_state_dict

    model = tiny_model()
    check_state_dict(model.state_dict(), model.state_dict(), "tiny VQVAE")
    sd = model.state_dict()
    sd.pop("quant_conv.bias")
    with pytest.raises(UserError, match="tiny VQVAE does not match the model: missing key.s.: quant_conv.bias"):
        check_state_dict(model.state_dict(), sd, "tiny VQVAE")


def test_missing_checkpoint_file_names_the_path(tmp_path):
    path = tmp_path / "vae_ch160v4096z32.pth"
    with pytest.raises(UserError, match="not found: .*vae_ch160v4096z32.pth"):
        load_official_var_vae(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read VQVAE checkpoint: .*vae_ch160v4096z32.pth is not a readable"):
        load_official_var_vae(path)
