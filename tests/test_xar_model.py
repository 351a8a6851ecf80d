"""xAR model on tiny random configs: every entity X (cells of any side, single tokens, dilated groups, the whole
image) regroups the grid reversibly with a mask causal over units and full inside one; KV-cached sampling with the
clean-unit refresh equals the full masked forward; official layouts; save/load; one-line errors for bad inputs."""

import json

import pytest
import torch
from conftest import LAYOUT_DIR

from vgen.checkpoints import state_dict_mismatch
from vgen.data import PROMPT_VOCABULARY
from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.models.xar import XAR, create_xar
from vgen.models.xar_entities import entity_layout
from vgen.models.xar_official import official_size_name, official_xar_config


def tiny(**overrides) -> XAR:
    torch.manual_seed(0)
    config = dict(latent_channels=4, grid_size=4, entity="cell", entity_size=2, encoder_embed_dim=32,
                  encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2,
                  num_classes=10, label_drop_prob=0.0)
    return XAR(**{**config, **overrides}).eval()


#: name -> (kind, size, grid): units expected
ENTITIES = {
    "cell 2 of 4": ("cell", 2, 4, [4] * 4),
    "cell 2 of 6": ("cell", 2, 6, [4] * 9),
    "cell 3 of 6": ("cell", 3, 6, [9] * 4),
    "token": ("token", None, 4, [1] * 16),
    "image": ("image", None, 4, [16]),
    "subsample 2 of 4": ("subsample", 2, 4, [4] * 4),
    "subsample 3 of 6": ("subsample", 3, 6, [4] * 9),
}


@pytest.mark.parametrize("name", ENTITIES)
def test_entity_regroups_the_grid_reversibly_with_a_unit_causal_mask(name):
    kind, size, grid, sizes = ENTITIES[name]
    layout = entity_layout(kind, grid, size)
    assert list(layout.unit_sizes) == sizes and layout.seq_len == grid * grid
    assert sorted(layout.order_L.tolist()) == list(range(grid * grid))  # a permutation
    x = torch.randn(2, grid * grid, 3)
    seq = layout.to_sequence(x)
    assert torch.equal(layout.to_raster(seq), x)
    assert [u.shape[1] for u in layout.split_units(seq)] == sizes
    mask = layout.block_causal_mask()
    for u, (a, b) in enumerate(layout.unit_bounds):
        assert bool(mask[a:b, a:b].all())                     # full inside the unit
        assert bool(mask[a:b, :a].all())                      # sees every earlier unit
        assert not bool(mask[a:b, b:].any())                  # never a later one
        assert bool((layout.unit_L[a:b] == u).all())


def test_entity_orders_are_the_stated_ones():
    """Cells: raster over cells, raster inside; subsample d: group (i, j) holds (i + d a, j + d b)."""
    raster = torch.arange(16).view(4, 4)
    cell = entity_layout("cell", 4, 2).order_L.view(4, 4)
    assert cell[0].tolist() == [0, 1, 4, 5] and cell[1].tolist() == [2, 3, 6, 7]
    assert cell[3].tolist() == [10, 11, 14, 15]
    sub = entity_layout("subsample", 4, 2).order_L.view(4, 4)
    assert sub[0].tolist() == raster[0::2, 0::2].flatten().tolist() == [0, 2, 8, 10]
    assert sub[1].tolist() == raster[0::2, 1::2].flatten().tolist() and sub[3].tolist() == [5, 7, 13, 15]
    assert torch.equal(entity_layout("token", 4).order_L, torch.arange(16))
    assert torch.equal(entity_layout("image", 4).order_L, torch.arange(16))


@pytest.mark.parametrize("kind,size,grid,message", [
    ("cell", 3, 16, "xAR cell side 3 does not divide the 16x16 token grid; choose a divisor of 16 (1, 2, 4, 8, 16)"),
    ("subsample", 5, 16, "xAR subsample dilation 5 does not divide the 16x16 token grid"),
    ("scale", 2, 16, "unknown xAR entity 'scale'"),
    ("cell", None, 16, "needs a size"),
])
def test_bad_entity_is_one_clear_line(kind, size, grid, message):
    with pytest.raises(UserError) as err:
        XAR(grid_size=grid, entity=kind, entity_size=size, encoder_depth=0, decoder_depth=1,
            encoder_embed_dim=32, encoder_num_heads=2, decoder_embed_dim=32, decoder_num_heads=2)
    assert message in str(err.value) and "\n" not in str(err.value)


def _text_condition(model, prompts):
    encoder = ShapesTextEncoder(vocabulary=PROMPT_VOCABULARY, embed_dim=16)
    ids, mask = encoder.tokenize(prompts)
    pooled, tokens = encoder(ids, mask)
    return model.text_condition(pooled, tokens, mask)


CONFIGS = {
    "cell 2": dict(),
    "token": dict(entity="token", entity_size=None),
    "subsample 2": dict(entity="subsample", entity_size=2),
    "image": dict(entity="image", entity_size=None),
    "patch 2, cell 3, wider decoder": dict(grid_size=6, entity_size=3, patch_size=2, decoder_embed_dim=48,
                                           decoder_num_heads=2, encoder_embed_dim=48),
}


@pytest.mark.parametrize("name", list(CONFIGS) + ["text + cross-attention"])
def test_kv_cached_velocity_with_clean_refresh_equals_the_masked_forward(name):
    """Unit k at time t after committing the clean units < k (each refreshed at t = 0) gives the velocity of the full
    masked forward whose units < k are clean (t = 0), unit k is at t and the later units are anything."""
    if name == "text + cross-attention":
        model = tiny(conditioning="text", text_embed_dim=16, text_cross_attn=True)
        cond = _text_condition(model, ["a photo of a red circle", "a photo of two blue squares left of a star"])
    else:
        model = tiny(**CONFIGS[name])
        cond = model.class_condition(torch.tensor([3, 7]))
    U, Ct = model.layout.num_units, model.token_channels
    clean = torch.randn(2, model.seq_len, Ct)
    noisy = torch.randn(2, model.seq_len, Ct)
    bounds = model.layout.unit_bounds
    errors = []
    with torch.no_grad():
        state, _ = model.prefill(cond)
        for k, (a, b) in enumerate(bounds):
            t = torch.full((2,), 0.37 + 0.05 * k)
            v_cached = model.velocity(k, noisy[:, a:b], t, state)
            x_full = torch.cat([clean[:, :a], noisy[:, a:]], dim=1)
            t_BU = torch.zeros(2, U)
            t_BU[:, k:] = t[:, None]
            t_BU[:, k + 1:] = torch.rand(2, U - k - 1)  # later units must not matter
            v_full = model.masked_velocity(x_full, t_BU, cond)[:, a:b]
            errors.append((v_cached - v_full).abs().max().item())
            if k + 1 < U:
                model.commit(k, clean[:, a:b], state)
    assert state.cache.seq_len == bounds[-1][0]
    assert max(errors) < 2e-5, errors


def test_velocity_refuses_a_unit_whose_context_is_missing():
    model = tiny()
    state, _ = model.prefill(model.class_condition(torch.tensor([1])))
    with pytest.raises(ValueError, match="commit each unit before the next"):
        model.velocity(1, torch.randn(1, 4, 4), torch.ones(1), state)


def test_training_pass_uses_one_time_per_unit_and_every_token():
    model = tiny().train()
    latents = torch.randn(3, 4, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = model(latents, torch.tensor([0, 1, 2]), generator=g)
    assert out.t.shape == (3, 4) and bool(((out.t > 0) & (out.t < 1)).all())
    assert out.v.shape == out.target.shape == (3, 16, 4)
    assert torch.allclose(out.loss, (out.v - out.target).pow(2).mean())
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("class_emb"))


def test_label_dropout_uses_the_null_class():
    model = tiny(label_drop_prob=1.0).train()
    latents = torch.randn(2, 4, 4, 4)
    t, noise = torch.rand(2, 4), torch.randn(2, 16, 4)
    with torch.no_grad():
        dropped = model(latents, torch.tensor([1, 2]), t_BU=t, noise_BLC=noise)
        model.eval()
        null = model(latents, torch.tensor([10, 10]), t_BU=t, noise_BLC=noise)
    assert torch.allclose(dropped.v, null.v, atol=1e-6)


def test_bad_latents_are_one_line():
    model = tiny()
    with pytest.raises(UserError, match="generates a 4x4 latent"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(UserError, match="4 latent channels"):
        model(torch.randn(1, 3, 4, 4), torch.tensor([1]))


@pytest.mark.parametrize("name", ["xar_base", "xar_large", "xar_huge"])
def test_official_layouts(name):
    path = LAYOUT_DIR / "xar_official.json"
    if not path.is_file():
        pytest.skip(f"official layouts not found at {path}")
    layout = json.loads(path.read_text())[name]
    saved = {k: torch.empty(shape, device="meta") for k, (shape, _dtype) in layout.items()}
    size = official_size_name(official_xar_config(saved))
    assert size == {"xar_base": "xar-b", "xar_large": "xar-l", "xar_huge": "xar-h"}[name]
    with torch.device("meta"):
        model = create_xar(size)
    hd = model.encoder_blocks[0].attn.head_dim
    rope_tables = {f"{stack}.{i}.attn.rope.freqs_{f}": torch.empty(256, hd, device="meta")
                   for stack, blocks in (("encoder_blocks", model.encoder_blocks),
                                         ("decoder_blocks", model.decoder_blocks))
                   for i in range(len(blocks)) for f in ("cos", "sin")}
    expected = {**model.state_dict(), **rope_tables, "mask": torch.empty(1, 1, 256, 256, device="meta")}
    assert state_dict_mismatch(expected, saved) == ""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - {"xar-b": 172.6, "xar-l": 608.4, "xar-h": 1186.0}[size]) < 0.1


def test_save_and_load_round_trip(tmp_path):
    model = tiny(entity="subsample", entity_size=2, conditioning="text", text_embed_dim=16, text_cross_attn=True)
    model.save_pretrained(tmp_path / "m")
    loaded = XAR.from_pretrained(tmp_path / "m").eval()
    assert not any(k in model.state_dict() for k in ("attn_mask", "unit_index", "rope_cos"))
    cond = _text_condition(model, ["a photo of a star"])
    x, t = torch.randn(1, 16, 4), torch.rand(1, 4)
    with torch.no_grad():
        assert torch.equal(model.masked_velocity(x, t, cond), loaded.masked_velocity(x, t, cond))
    assert torch.equal(loaded.layout.order_L, model.layout.order_L)
