"""Number-for-number parity with official LlamaGen (FoundationVision/LlamaGen @ ce98ec4) on the tiny random GPT
fixture: teacher-forced logits and the greedy CFG sample; the official loader's wrappers and errors."""

import pytest
import torch
from vgen.errors import UserError
from vgen.samplers.guidance import ConstantCFG, llamagen_cfg_interval
from vgen.samplers.next_scale import TokenSampling
from vgen.samplers.next_token import generate_next_token

from vgen.models.raster_ar_official import load_official_llamagen_gpt, official_llamagen_config


def load_tiny(parity_dir, **kw):
    return load_official_llamagen_gpt(parity_dir / "llamagen_tiny_gpt.pth", num_heads=2, grid_size=16, **kw)


def test_official_tiny_gpt_config_inferred(parity_dir):
    cfg = load_tiny(parity_dir).config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.vocab_size, cfg.num_classes) == (2, 64, 2, 512, 1000)
    assert (cfg.ffn_hidden_dim, cfg.grid_size, cfg.norm_eps, cfg.shuffle_window) == (256, 16, 1e-5, 1)


def test_teacher_forced_logits_match_official(parity_dir):
    io = torch.load(parity_dir / "llamagen_tiny_io.pt", weights_only=True)
    model = load_tiny(parity_dir)
    with torch.no_grad():
        logits_BNkV = model(io["tokens"], io["labels"])
    assert logits_BNkV.shape == (2, 256, 1, 512) and io["logits"].shape == (2, 256, 512)
    err = (logits_BNkV[:, :, 0] - io["logits"]).abs().max().item()
    assert err < 1e-4, err
    loss = torch.nn.functional.cross_entropy(logits_BNkV.flatten(0, 2), io["tokens"].flatten())
    assert abs(loss.item() - io["loss"].item()) < 1e-5


def test_greedy_cfg_sample_matches_official(parity_dir):
    io = torch.load(parity_dir / "llamagen_tiny_io.pt", weights_only=True)
    args = io["greedy_args"]
    assert (args["cfg_scale"], args["cfg_interval"], args["top_k"]) == (2.0, -1, 1)
    model = load_tiny(parity_dir)
    out = generate_next_token(
        model, model.class_condition(io["labels"]), batch_size=2, guidance_scale=args["cfg_scale"],
        guidance_schedule=llamagen_cfg_interval(ConstantCFG(), args["cfg_interval"]),
        sampling=TokenSampling(top_k=args["top_k"], top_p=args["top_p"], temperature=args["temperature"]),
        generators=[torch.Generator().manual_seed(0) for _ in range(2)],
    )
    assert torch.equal(out.tokens_BL, io["greedy_tokens"].long())
    # guidance matters: without it the greedy sample differs
    plain = generate_next_token(model, model.class_condition(io["labels"]), 2, guidance_scale=1.0,
                                sampling=TokenSampling(top_k=1))
    assert not torch.equal(plain.tokens_BL, out.tokens_BL)


@pytest.mark.parametrize("wrapper", [None, "model", "module", "state_dict"])
def test_loader_accepts_llamagen_wrappers_and_ignores_runtime_entries(parity_dir, tmp_path, wrapper):
    sd = torch.load(parity_dir / "llamagen_tiny_gpt.pth", weights_only=True)
    reference = load_tiny(parity_dir)
    extra = {**sd, "freqs_cis": torch.zeros(257, 16, 2), "layers.0.attention.kv_cache.k_cache": torch.zeros(1)}
    path = tmp_path / "gpt.pt"
    torch.save(extra if wrapper is None else {wrapper: extra, "args": {"gpt_model": "GPT-tiny"}}, path)
    model = load_official_llamagen_gpt(path, num_heads=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_loader_errors_are_one_line(parity_dir, tmp_path):
    sd = torch.load(parity_dir / "llamagen_tiny_gpt.pth", weights_only=True)
    with pytest.raises(UserError, match="cannot tell the number of heads .* 2 layers of width 64.*pass num_heads"):
        load_official_llamagen_gpt(sd)
    broken = {k: v for k, v in sd.items() if k != "layers.1.ffn_norm.weight"}
    broken["layers.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(UserError) as err:
        load_official_llamagen_gpt(broken, num_heads=2)
    message = str(err.value)
    assert "\n" not in message
    assert "missing key(s): layers.1.ffn_norm.weight" in message and "unexpected key(s): layers.1.extra.weight" in message
    with pytest.raises(UserError, match="GPT checkpoint not found"):
        load_official_llamagen_gpt(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="text-to-image LlamaGen checkpoint"):
        official_llamagen_config({**sd, "cls_embedding.cap_proj.fc1.weight": torch.zeros(1)})
