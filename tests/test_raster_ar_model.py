"""RasterAR (LlamaGen GPT + Token-Shuffle) on tiny random configs: official key layout, the KV-cached step against
the masked full forward, multi-unit decode, per-row rollback, Token-Shuffle order and round trip, bad inputs."""

import json

import pytest
import torch
from vgen.data import PROMPT_VOCABULARY
from vgen.errors import UserError
from vgen.models.raster_ar import RASTER_AR_SIZES, RasterAR, TokenShuffle, TokenUnshuffle, create_raster_ar
from vgen.models.text_encoder import ShapesTextEncoder

from conftest import LAYOUT_DIR


def tiny(**kw):
    cfg = dict(vocab_size=64, grid_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=5, token_dropout_p=0.0,
               resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.1)
    cfg.update(kw)
    torch.manual_seed(0)
    model = RasterAR(**cfg).eval()
    with torch.no_grad():  # LlamaGen zero-inits the head; random weights everywhere make every path matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def text_condition(model, prompts):
    encoder = ShapesTextEncoder(vocabulary=PROMPT_VOCABULARY, embed_dim=16, depth=1, num_heads=2).eval()
    ids, mask = encoder.tokenize(prompts)
    pooled, tokens = encoder(ids, mask)
    return model.text_condition(pooled, tokens, mask)


def condition(model, B):
    if model.is_text_conditional:
        prompts = ["a photo of a red circle", "a photo of three blue squares left of a green star", "a photo of a cat"]
        prompts = [p.replace("cat", "star") for p in prompts]
        return text_condition(model, (prompts * B)[:B])
    return model.class_condition(torch.arange(B) % model.config.num_classes)


def cached_logits(model, cond, units_BNk, chunk=1):
    """Logits of every unit through prefill + decode of ``chunk`` units per pass (committed after each)."""
    state, first_BkV = model.prefill(cond)
    out = [first_BkV[:, None]]
    N = units_BNk.shape[1]
    for j in range(0, N - 1, chunk):
        out.append(model.decode(units_BNk[:, j : min(j + chunk, N - 1)], state))
        state.cache.commit()
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------- official layout


@pytest.mark.parametrize("name,official", [("llamagen-b", "GPT-B_c2i"), ("llamagen-l", "GPT-L_c2i"),
                                           ("llamagen-xl", "GPT-XL_c2i"), ("llamagen-3b", "GPT-3B_c2i")])
def test_sizes_match_official_layout(name, official):
    layout_file = LAYOUT_DIR / "llamagen_official.json"
    if not layout_file.is_file():
        pytest.skip(f"layout file not found at {layout_file}")
    layout = json.loads(layout_file.read_text())[official]
    with torch.device("meta"):
        model = create_raster_ar(name, vocab_size=16384, grid_size=16, num_classes=1000)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: shape for k, (shape, _dtype) in layout.items()}


def test_size_registry_and_unknown_size():
    assert RASTER_AR_SIZES["llamagen-b"] == dict(depth=12, embed_dim=768, num_heads=12)
    with pytest.raises(UserError, match="unknown raster AR size 'gpt-z'; choose one of llamagen-b"):
        create_raster_ar("gpt-z")


# ---------------------------------------------------------------------------------------------- KV-cached step


@pytest.mark.parametrize("window,conditioning", [(1, "class"), (2, "class"), (1, "text"), (2, "text"), (4, "class")])
def test_cached_decode_equals_masked_full_forward(window, conditioning):
    kw = dict(shuffle_window=window, conditioning=conditioning)
    if conditioning == "text":
        kw.update(text_embed_dim=16)
    model = tiny(**kw)
    B = 3
    cond = condition(model, B)
    tokens_BL = torch.randint(0, 64, (B, 16))
    with torch.no_grad():
        full = model(tokens_BL, cond=cond)
        cached = cached_logits(model, cond, model.to_units(tokens_BL))
    assert full.shape == cached.shape == (B, 16 // window**2, window**2, 64)
    assert (full - cached).abs().max() < 1e-5
    if conditioning == "text":  # rows of different prompt lengths: the cache holds a length per row
        state, _ = model.prefill(cond)
        assert len(set(state.prefix_len_B.tolist())) > 1


def test_decode_n_equals_n_single_steps():
    model = tiny(conditioning="text", text_embed_dim=16)
    cond = condition(model, 3)
    units = model.to_units(torch.randint(0, 64, (3, 16)))
    with torch.no_grad():
        one = cached_logits(model, cond, units, chunk=1)
        five = cached_logits(model, cond, units, chunk=5)
        all_at_once = cached_logits(model, cond, units, chunk=15)
    assert (one - five).abs().max() < 1e-5 and (one - all_at_once).abs().max() < 1e-5


def test_decode_is_tentative_until_commit():
    model = tiny()
    cond = condition(model, 2)
    units = torch.randint(0, 64, (2, 6, 1))
    with torch.no_grad():
        state, _ = model.prefill(cond)
        ref = model.decode(units[:, :3], state)
        state.cache.rollback()  # the drafts leave nothing behind
        assert state.units_B.tolist() == [0, 0]
        again = model.decode(units[:, :3], state)
        state.cache.commit(torch.tensor([3, 1]))  # row 1 accepts one draft
        assert state.units_B.tolist() == [3, 1]
    assert torch.equal(ref, again)


def test_per_row_rollback_restores_the_cache_exactly():
    model = tiny(conditioning="text", text_embed_dim=16, shuffle_window=2)
    B = 3
    cond = condition(model, B)
    units = model.to_units(torch.randint(0, 64, (B, 16)))  # 4 windows of 4 codes
    keep = torch.tensor([1, 2, 0])
    nxt = torch.stack([units[b, keep[b]] for b in range(B)])[:, None]
    with torch.no_grad():
        rolled, _ = model.prefill(cond)
        model.decode(units[:, :3], rolled)
        rolled.cache.commit()
        rolled.truncate_units(keep)  # roll back a different suffix of committed units per row
        # the same batch that only ever kept those units (per-row commit of the tentative step)
        kept, _ = model.prefill(cond)
        model.decode(units[:, :3], kept)
        kept.cache.commit(keep)
        assert rolled.units_B.tolist() == kept.units_B.tolist() == keep.tolist()
        assert torch.equal(rolled.cache.lengths_B, kept.cache.lengths_B)
        for b, n in enumerate(kept.cache.lengths_B.tolist()):
            assert torch.equal(rolled.cache.k[:, b, :, :n], kept.cache.k[:, b, :, :n])
            assert torch.equal(rolled.cache.v[:, b, :, :n], kept.cache.v[:, b, :, :n])
        # the next step continues every row at its own position, identically in both
        logits = model.decode(nxt, rolled)
        assert torch.equal(logits, model.decode(nxt, kept))
        full = model(model.to_raster(units), cond=cond)
    for b in range(B):
        assert (logits[b, 0] - full[b, keep[b] + 1]).abs().max() < 1e-5


def test_state_select_keeps_rows():
    model = tiny()
    cond = condition(model, 4)
    units = model.to_units(torch.randint(0, 64, (4, 16)))
    with torch.no_grad():
        ref = cached_logits(model, cond, units)
        state, _ = model.prefill(cond)
        model.decode(units[:, :2], state)
        state.cache.commit()
        state.select(torch.tensor([2, 0]))
        out = model.decode(units[[2, 0], 2:5], state)
    assert (out - ref[[2, 0], 3:6]).abs().max() < 1e-5


def test_state_clone_is_independent():
    model = tiny(shuffle_window=2)
    cond = condition(model, 2)
    units = model.to_units(torch.randint(0, 64, (2, 16)))
    with torch.no_grad():
        state, _ = model.prefill(cond)
        model.decode(units[:, :1], state)
        state.cache.commit()
        copy = state.clone()
        a = model.decode(units[:, 1:3], copy)  # a branch that is thrown away
        copy.cache.commit()
        b = model.decode(units[:, 1:3], state)
    assert torch.equal(a, b) and state.units_B.tolist() == [1, 1] and copy.units_B.tolist() == [3, 3]


def test_training_mode_drops_conditions_and_tokens():
    model = tiny(class_dropout_prob=1.0).train()
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        dropped = model(tokens, torch.tensor([0, 1]))
        null = model.eval()(tokens, torch.tensor([5, 5]))  # label num_classes is the null class
    assert (dropped - null).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------- Token-Shuffle


def test_units_are_windows_in_raster_order():
    model = tiny(grid_size=4, shuffle_window=2)
    tokens = torch.arange(16)[None]  # code id = raster position on the 4x4 grid
    units = model.to_units(tokens)
    assert units.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
    assert torch.equal(model.to_raster(units), tokens)
    assert (model.sequence_length, model.tokens_per_step) == (4, 4)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_shuffle_unshuffle_round_trip_is_identity_at_init(window):
    dim, k = 32, window * window
    shuffle, unshuffle = TokenShuffle(window, dim), TokenUnshuffle(window, dim)
    emb = torch.randn(2, 3, k, dim)
    emb[..., dim // k :] = 0  # at init the fused token carries the first d/s^2 coordinates of each code
    fused = shuffle(emb)
    assert fused.shape == (2, 3, dim)
    assert torch.equal(unshuffle(fused), emb)
    if window == 1:  # no compression: the identity on everything
        full = torch.randn(2, 3, 1, dim)
        assert torch.equal(unshuffle(shuffle(full)), full)
    # the fused channels hold the window's codes side by side, in raster order
    assert torch.equal(fused.view(2, 3, k, dim // k), emb[..., : dim // k])


def test_shuffle_model_predicts_a_whole_window_per_step():
    model = tiny(grid_size=4, shuffle_window=2)
    cond = condition(model, 2)
    with torch.no_grad():
        state, first = model.prefill(cond)
        logits = model.decode(torch.randint(0, 64, (2, 1, 4)), state)
    assert first.shape == (2, 4, 64) and logits.shape == (2, 1, 4, 64)
    # one pass gives four different code distributions (one per window position), not one repeated
    assert (logits[:, 0, 0] - logits[:, 0, 1]).abs().max() > 1e-4
    keys = set(model.state_dict())
    assert {"token_shuffle.compress.weight", "token_unshuffle.expand.weight"} <= keys


# ---------------------------------------------------------------------------------------------- bad inputs


def test_window_that_does_not_tile_the_grid_is_one_clear_error():
    with pytest.raises(UserError, match=r"Token-Shuffle window 3 does not tile the 4x4 token grid"):
        RasterAR(vocab_size=8, grid_size=4, depth=1, embed_dim=32, num_heads=2, shuffle_window=3)
    with pytest.raises(UserError, match="not divisible by num_heads"):
        RasterAR(vocab_size=8, grid_size=4, depth=1, embed_dim=30, num_heads=4)


def test_wrong_token_count_is_one_clear_error():
    model = tiny()
    with pytest.raises(UserError, match=r"expected code ids of shape \(B, 16\) for the 4x4 token grid"):
        model(torch.zeros(2, 15, dtype=torch.long), torch.tensor([0, 1]))


def test_conditioning_mistakes_are_user_errors():
    with pytest.raises(UserError, match="class-conditional: pass class labels"):
        tiny().text_condition(torch.zeros(1, 16))
    with pytest.raises(UserError, match="text-conditional: pass a prompt"):
        tiny(conditioning="text", text_embed_dim=16).class_condition(torch.tensor([0]))
