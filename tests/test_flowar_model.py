"""FlowAR model on tiny random configs: KV-cached sampling steps equal the masked teacher-forced pass for any
scale list, patch size and conditioning; official layouts; save/load; one-line errors for bad inputs."""

import json

import pytest
import torch
from conftest import LAYOUT_DIR

from vgen.checkpoints import state_dict_mismatch
from vgen.models.ar_blocks import AdaLNBlock
from vgen.errors import UserError
from vgen.models.flowar import FLOWAR_SIZES, FlowAR, create_flowar
from vgen.models.flowar_official import official_flowar_config, official_size_name
from vgen.data import PROMPT_VOCABULARY
from vgen.models.text_encoder import ShapesTextEncoder


def tiny(**overrides) -> FlowAR:
    torch.manual_seed(0)
    config = dict(latent_channels=4, scales=(1, 2, 4), encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                  decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, flow_depth=1, flow_width=32,
                  flow_num_heads=2, num_classes=10, label_drop_prob=0.0)
    return FlowAR(**{**config, **overrides}).eval()


CONFIGS = {
    "official-like": dict(),
    "cross-attention head": dict(flow_head="cross_attention"),
    "odd scales, patch 2": dict(scales=(1, 3, 5), patch_size=2),
    "first scale 2": dict(scales=(2, 3, 6)),
    "wider decoder": dict(decoder_embed_dim=48, decoder_num_heads=2, encoder_embed_dim=48),
}


def _text_condition(model, prompts):
    encoder = ShapesTextEncoder(vocabulary=PROMPT_VOCABULARY, embed_dim=16)
    ids, mask = encoder.tokenize(prompts)
    pooled, tokens = encoder(ids, mask)
    return model.text_condition(pooled, tokens, mask)


@pytest.mark.parametrize("name", list(CONFIGS) + ["text + cross-attention"])
def test_kv_cached_steps_equal_the_masked_full_pass(name):
    if name == "text + cross-attention":
        model = tiny(conditioning="text", text_embed_dim=16, text_cross_attn=True)
        cond = _text_condition(model, ["a photo of a red circle", "a photo of two blue squares left of a star"])
    else:
        model = tiny(**CONFIGS[name])
        cond = model.class_condition(torch.tensor([3, 7]))
    side = model.latent_side
    latents = torch.randn(2, model.config.latent_channels, side, side)
    with torch.no_grad():
        scale_latents = model.scale_latents(latents)
        z_full = model.ar_condition(model.teacher_forcing_input(scale_latents), cond)
        state, z = model.prefill(cond)
        steps = [z]
        for k in range(len(model.scales) - 1):
            steps.append(model.commit(k, model.patchify(scale_latents[k]), state))
    assert z_full.shape == (2, model.seq_len, model.config.decoder_embed_dim)
    for k, (start, end) in enumerate(model.begin_ends):
        assert steps[k].shape == (2, end - start, model.config.decoder_embed_dim)
        err = (steps[k] - z_full[:, start:end]).abs().max().item()
        assert err < 1e-5, (k, err)
    # the block-causal mask matters: scale 1's condition changes with scale 1's own input, not with scale 2's
    later = [lat.clone() for lat in scale_latents]
    later[-2] = later[-2] + 1.0
    with torch.no_grad():
        z_later = model.ar_condition(model.teacher_forcing_input(later), cond)
    s1, e1 = model.begin_ends[1]
    assert torch.allclose(z_later[:, :e1], z_full[:, :e1], atol=1e-6)
    assert not torch.allclose(z_later[:, e1:], z_full[:, e1:], atol=1e-3)


def test_velocity_step_leaves_the_cache_alone_and_shapes_follow_the_units():
    model = tiny(scales=(1, 3, 5), patch_size=2)
    assert model.unit_shapes == [(1, 16), (9, 16), (25, 16)] and model.latent_side == 10
    cond = model.concat_conditions(model.class_condition(torch.tensor([1, 2])), model.null_condition(2))
    with torch.no_grad():
        state, z0 = model.prefill(cond)
        before = state.cache.seq_len
        x = torch.randn(4, 1, 16)
        v1 = model.velocity(0, x, torch.full((4,), 0.7), z0)
        v2 = model.velocity(0, x, torch.full((4,), 0.7), z0)
        assert state.cache.seq_len == before == 1
        assert v1.dtype == torch.float32 and v1.shape == x.shape and torch.equal(v1, v2)
        # the head embeds the truncated integer time, as official: 0.7004 and 0.7 embed alike, 0.702 does not
        assert torch.equal(model.velocity(0, x, torch.full((4,), 0.7004), z0), v1)
        assert not torch.equal(model.velocity(0, x, torch.full((4,), 0.702), z0), v1)
        z1 = model.commit(0, torch.randn(4, 1, 16), state)
        assert z1.shape == (4, 9, 32) and state.cache.seq_len == 10
        latents = model.tokens_to_latents(torch.randn(4, 25, 16))
    assert latents.shape == (4, 4, 10, 10)
    with pytest.raises(ValueError, match="last one"):
        model.commit(2, torch.randn(4, 25, 16), state)


def test_training_pass_weights_scales_and_drops_labels():
    model = tiny(label_drop_prob=1.0).train()
    latents = torch.randn(3, 4, 4, 4)
    out = model(latents, torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    manual = sum(loss.mean() * s**2 / 16 for loss, s in zip(out.loss_per_scale, (1, 2, 4)))
    assert torch.allclose(out.loss, manual)
    assert [v.shape for v in out.v] == [(3, 1, 4), (3, 4, 4), (3, 16, 4)]
    assert all(((t >= 0) & (t < 1)).all() for t in out.t)
    out.loss.backward()
    assert model.class_emb.weight.grad[10].abs().sum() > 0  # every label was dropped to the null class
    assert model.class_emb.weight.grad[:10].abs().sum() == 0
    # same generator, same draws
    model.zero_grad()
    again = model(latents, torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.loss, out.loss)


@pytest.mark.parametrize("name", ["flowar_small", "flowar_large", "flowar_huge"])
def test_sizes_match_the_official_layouts(name):
    path = LAYOUT_DIR / "flowar_official.json"
    if not path.is_file():
        pytest.skip(f"official layouts not found at {path}")
    layout = json.loads(path.read_text())[name]
    saved = {k: torch.empty(shape, device="meta") for k, (shape, _dtype) in layout.items()}
    size = official_size_name(official_flowar_config(saved))
    assert size == {"flowar_small": "flowar-s", "flowar_large": "flowar-l", "flowar_huge": "flowar-h"}[name]
    with torch.device("meta"):
        model = create_flowar(size)
    expected = {**model.state_dict(), "mask": torch.empty(1, 1, 341, 341, device="meta")}
    assert state_dict_mismatch(expected, saved) == ""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - {"flowar-s": 171.7, "flowar-l": 586.9, "flowar-h": 1913.3}[size]) < 0.1


def test_save_and_load_round_trip(tmp_path):
    model = tiny(conditioning="text", text_embed_dim=16, text_cross_attn=True, flow_head="cross_attention")
    model.save_pretrained(tmp_path / "m")
    loaded = FlowAR.from_pretrained(tmp_path / "m").eval()
    assert "attn_mask" not in model.state_dict()
    cond = _text_condition(model, ["a photo of a star"])
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        a = model.ar_condition(model.teacher_forcing_input(model.scale_latents(latents)), cond)
        b = loaded.ar_condition(loaded.teacher_forcing_input(loaded.scale_latents(latents)), cond)
    assert (a - b).abs().max().item() < 1e-6, (a - b).abs().max().item()


def test_bad_inputs_give_one_line():
    model = tiny()
    with pytest.raises(UserError, match=r"latents of shape \(B, 4, 4, 4\).*an autoencoder with 4 latent channels"):
        model(torch.randn(1, 3, 4, 4), torch.tensor([0]))
    with pytest.raises(UserError, match=r"scales \[1, 2, 4\].*end at a 4x4 latent, got 8x8"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([0]))
    for scales in ((1, 4, 2), (0, 1), (), (1, 2.5)):
        with pytest.raises(UserError, match="strictly increasing positive integers"):
            tiny(scales=scales)
    with pytest.raises(UserError, match="same number and width of heads"):
        tiny(decoder_embed_dim=64, decoder_num_heads=2)
    with pytest.raises(UserError, match="multiple of 4"):
        tiny(flow_width=24, flow_num_heads=4)
    with pytest.raises(UserError, match="unknown flow_head"):
        tiny(flow_head="mlp")
    with pytest.raises(UserError, match="unknown FlowAR size"):
        create_flowar("flowar-b")
    assert set(FLOWAR_SIZES) == {"flowar-s", "flowar-l", "flowar-h"}


def test_shared_block_takes_one_condition_per_image_or_per_token():
    """xAR conditions every token (its cell's time); FlowAR every image: the same block serves both."""
    torch.manual_seed(0)
    block = AdaLNBlock(32, 2, cond_dim=16, rope=False).eval()
    x, cond_BD = torch.randn(2, 5, 32), torch.randn(2, 16)
    per_token = cond_BD[:, None].expand(2, 5, 16).clone()
    per_token[:, 3:] += 1.0  # tokens 3, 4 get another condition
    with torch.no_grad():
        a, b = block(x, cond_BD), block(x, per_token)
    assert block.attn.rope is None and "attn.rope.freqs" not in block.state_dict()
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)
    with torch.no_grad():  # with a causal mask the first tokens see neither the later tokens nor their condition
        mask = torch.ones(5, 5, dtype=torch.bool).tril()
        a, b = block(x, cond_BD, mask=mask), block(x, per_token, mask=mask)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)


def test_steps_run_in_bfloat16():
    """Half precision end to end (KV cache, RoPE tables kept in float32, float32 velocities out): close to float32."""
    model = tiny(conditioning="text", text_embed_dim=16, text_cross_attn=True, flow_head="cross_attention")
    cond = _text_condition(model, ["a photo of a red circle"])

    def run(m, c):
        with torch.no_grad():
            state, z = m.prefill(c)
            velocities = []
            for k, (n, ch) in enumerate(m.unit_shapes):
                x = torch.randn(1, n, ch, generator=torch.Generator().manual_seed(k))
                velocities.append(m.velocity(k, x, torch.full((1,), 0.5), z))
                if k + 1 < len(m.unit_shapes):
                    z = m.commit(k, x, state)
        return velocities

    full = run(model, cond)
    half = run(model.to(torch.bfloat16), cond.to(torch.bfloat16))
    for a, b in zip(full, half):
        assert b.dtype == torch.float32
        assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()  # measured 0.7-1.2% of the largest value
