"""Number-for-number parity with official VAR (FoundationVision/VAR @ 78b9539) on the tiny random fixtures:
teacher-forced logits and a greedy CFG sample."""

import torch
from vgen.samplers.guidance import LinearRampCFG
from vgen.samplers.next_scale import TokenSampling, generate_next_scale
from vgen.tokenizers.msvq import load_official_var_vae

from vgen.models.var_official import load_official_var


def test_official_tiny_var_config_inferred(parity_dir):
    model = load_official_var(parity_dir / "var_tiny_var.pth")
    cfg = model.config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.num_classes, cfg.vocab_size) == (2, 128, 2, 10, 512)
    assert cfg.attn_l2_norm and not cfg.shared_aln and cfg.norm_eps == 1e-6


def test_teacher_forced_logits_match_official(parity_dir):
    io = torch.load(parity_dir / "var_tiny_io.pt", weights_only=True)
    model = load_official_var(parity_dir / "var_tiny_var.pth")
    with torch.no_grad():
        logits_BLV = model(io["labels"], io["var_input"])
    assert logits_BLV.shape == io["logits"].shape == (2, 680, 512)
    err = (logits_BLV - io["logits"]).abs().max().item()
    # measured 0 here (logits up to 2.8 in magnitude); the bound allows another CPU's float rounding
    assert err < 1e-5, err


def test_greedy_cfg_sample_matches_official(parity_dir):
    io = torch.load(parity_dir / "var_tiny_io.pt", weights_only=True)
    assert io["greedy_args"] == {"cfg": 1.5, "top_k": 1, "top_p": 0.0}
    model = load_official_var(parity_dir / "var_tiny_var.pth")
    vqvae = load_official_var_vae(parity_dir / "var_tiny_vae.pth")
    with torch.no_grad():
        out = generate_next_scale(
            model, vqvae.quantize, model.class_condition(io["labels"]), batch_size=2,
            guidance_scale=1.5, guidance_schedule=LinearRampCFG(), sampling=TokenSampling(top_k=1, top_p=0.0),
            generators=[torch.Generator().manual_seed(0) for _ in range(2)],
        )
        img = vqvae.fhat_to_img(out.f_hat).add(1).mul(0.5)
    assert img.shape == io["greedy_sample"].shape == (2, 3, 256, 256)
    err = (img - io["greedy_sample"]).abs().max().item()
    # measured 3.3e-6 (images in [0, 1]; the tokens are identical, the rest is decoder rounding)
    assert err < 2e-5, err
    # guidance matters at this precision: without CFG the sample differs
    with torch.no_grad():
        plain = generate_next_scale(model, vqvae.quantize, model.class_condition(io["labels"]), 2,
                                    guidance_scale=0.0, sampling=TokenSampling(top_k=1))
    assert any(not torch.equal(a, b) for a, b in zip(plain.idx_Bl, out.idx_Bl))
