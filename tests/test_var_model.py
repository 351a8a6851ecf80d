"""VAR transformer: KV-cached sampling vs the masked full forward, official key layout, loading errors,
conditioning (class and text), per-sample seeding."""

import json

import pytest
import torch
from conftest import LAYOUT_DIR
from vgen.data import PROMPT_VOCABULARY
from vgen.samplers.next_scale import TokenSampling, generate_next_scale
from vgen.tokenizers.msvq import MultiScaleVQModel

from vgen.errors import UserError
from vgen.models.text_encoder import ShapesTextEncoder
from vgen.models.var import VAR, VAR_SIZES, create_var
from vgen.models.var_official import load_official_var

PATCH_NUMS = (1, 2, 3, 4)
RECOMPUTED = {"lvl_1L", "attn_bias_for_masking"}


def tiny_vqvae(V=32, Cvae=8):
    torch.manual_seed(0)
    return MultiScaleVQModel(vocab_size=V, z_channels=Cvae, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                             norm_num_groups=8, patch_nums=PATCH_NUMS).eval()


def tiny_var(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, Cvae=8, patch_nums=PATCH_NUMS, depth=2, embed_dim=64, num_heads=2, num_classes=5)
    model = VAR(**{**cfg, **kw}).eval()
    with torch.no_grad():  # official init makes AdaLN gammas ~1e-3; randomise so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_text_encoder():
    torch.manual_seed(0)
    return ShapesTextEncoder(PROMPT_VOCABULARY, embed_dim=32, depth=1, num_heads=2).eval()


def _teacher_forced_check(model, vq, cond, cond_for_forward):
    out = generate_next_scale(model, vq.quantize, cond, cond.cond_BD.shape[0], guidance_scale=0.0,
                              sampling=TokenSampling(top_k=4),
                              generators=[torch.Generator().manual_seed(i) for i in range(cond.cond_BD.shape[0])],
                              keep_logits=True)
    x_BLCv = vq.quantize.idxBl_to_var_input(out.idx_Bl)
    with torch.no_grad():
        full_BLV = model(None, x_BLCv, cond=cond_for_forward)
    cached_BLV = torch.cat(out.logits_BlV, dim=1)
    assert full_BLV.shape == cached_BLV.shape == (cond.cond_BD.shape[0], model.L, 32)
    torch.testing.assert_close(cached_BLV, full_BLV, atol=2e-5, rtol=1e-5)


def test_kv_cached_sampling_equals_masked_full_forward_class():
    model, vq = tiny_var(), tiny_vqvae()
    with torch.no_grad():
        cond = model.class_condition(torch.tensor([0, 3, 4]))
        _teacher_forced_check(model, vq, cond, cond)


def test_kv_cached_sampling_equals_masked_full_forward_text_cross_attn():
    enc = tiny_text_encoder()
    model, vq = tiny_var(conditioning="text", text_embed_dim=32, text_cross_attn=True), tiny_vqvae()
    with torch.no_grad():
        pooled, tokens, mask = enc.encode(["a photo of a red circle", "a photo of two blue stars", ""])
        cond = model.text_condition(pooled, tokens, mask)
        assert cond.context_BTC.shape == (3, 6, 64) and mask.sum(1).tolist() == [6, 6, 1]
        _teacher_forced_check(model, vq, cond, cond)


def test_forward_on_the_first_scales_gives_the_full_forwards_first_logits():
    # Coarse training rows feed only the first k scales: the block-causal mask makes their logits exact.
    enc = tiny_text_encoder()
    model, vq = tiny_var(conditioning="text", text_embed_dim=32, text_cross_attn=True), tiny_vqvae()
    idx_Bl = [torch.randint(32, (2, pn * pn), generator=torch.Generator().manual_seed(pn)) for pn in PATCH_NUMS]
    x_BLCv = vq.quantize.idxBl_to_var_input(idx_Bl)
    with torch.no_grad():
        cond = model.text_condition(*enc.encode(["a photo of a red circle", "a photo of two blue stars"]))
        full_BLV = model(None, x_BLCv, cond=cond)
        for k, (_, end) in enumerate(model.begin_ends[:-1], start=1):
            first_BlV = model(None, x_BLCv[:, : end - 1], cond=cond)
            assert first_BlV.shape == (2, end, 32), k
            torch.testing.assert_close(first_BlV, full_BLV[:, :end], atol=2e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="whole number of scales .*1, 5, 14, 30"):
            model(None, x_BLCv[:, :6], cond=cond)


def test_mask_is_block_causal():
    model = tiny_var()
    bias = model.attn_bias_for_masking[0, 0]
    # token 1 (scale 1) sees tokens 0..4 (scales 0, 1) and not token 5 (scale 2)
    assert torch.isfinite(bias[1, :5]).all() and torch.isinf(bias[1, 5:]).all()
    assert torch.isinf(bias[0, 1:]).all() and torch.isfinite(bias[-1]).all()
    assert "attn_bias_for_masking" not in model.state_dict() and "lvl_1L" not in model.state_dict()


def test_cond_dropout_only_in_training():
    model = tiny_var(cond_drop_rate=1.0)
    x = torch.randn(2, model.L - 1, 8)
    labels = torch.tensor([1, 2])
    null = torch.tensor([5, 5])
    with torch.no_grad():
        eval_logits = model(labels, x)
        model.train()
        dropped = model(labels, x)
        model.eval()
        null_logits = model(null, x)
    torch.testing.assert_close(dropped, null_logits)
    assert not torch.allclose(eval_logits, null_logits)


def test_text_cond_dropout_uses_learned_null_prompt():
    enc = tiny_text_encoder()
    model = tiny_var(conditioning="text", text_embed_dim=32, text_cross_attn=True, cond_drop_rate=1.0)
    x = torch.randn(2, model.L - 1, 8)
    with torch.no_grad():
        cond = model.text_condition(*enc.encode(["a photo of a red circle", "a photo of a blue star"]))
        kept = model(None, x, cond=cond)
        model.train()
        dropped = model(None, x, cond=cond)
        model.eval()
        null = model(None, x, cond=model.null_condition(2))
    torch.testing.assert_close(dropped, null)  # padded null context attends to its single token only
    assert not torch.allclose(kept, null)


def test_official_layout_d16_and_d36_shared_aln():
    path = LAYOUT_DIR / "var_official.json"
    if not path.is_file():
        pytest.skip(f"official checkpoint layouts not found at {path}")
    layouts = json.loads(path.read_text())
    for name, key in (("var-d16", "var_d16"), ("var-d36", "var_d36")):
        with torch.device("meta"):
            model = create_var(name)
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        official = {k: shape for k, (shape, _dtype) in layouts[key].items()
                    if k not in RECOMPUTED and not k.endswith("zero_k_bias")}
        assert ours == official, name
    assert VAR_SIZES["var-d36"]["shared_aln"] and not VAR_SIZES["var-d16"]["shared_aln"]
    assert VAR_SIZES["var-d20"]["embed_dim"] == 1280 and VAR_SIZES["var-d30"]["num_heads"] == 30


def test_create_var_unknown_size():
    with pytest.raises(UserError, match="var-d16"):
        create_var("var-d17")


def _official_like_state_dict(model: VAR) -> dict:
    sd = dict(model.state_dict())
    sd["lvl_1L"] = model.lvl_1L.clone()
    sd["attn_bias_for_masking"] = model.attn_bias_for_masking.clone()
    for i in range(len(model.blocks)):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(model.C)
    return sd


def test_load_official_infers_config_and_round_trips():
    model = tiny_var(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    sd = _official_like_state_dict(model)
    loaded = load_official_var({"trainer": {"var_wo_ddp": sd}})
    assert loaded.config.depth == 2 and loaded.config.num_heads == 2 and loaded.config.num_classes == 5
    assert tuple(loaded.config.patch_nums) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_official_reports_missing_and_unexpected_keys():
    model = tiny_var(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    sd = _official_like_state_dict(model)
    del sd["blocks.1.ffn.fc2.bias"]
    sd["blocks.0.attn.extra_bias"] = torch.zeros(3)
    with pytest.raises(UserError) as err:
        load_official_var(sd)
    msg = str(err.value)
    assert "missing key(s): blocks.1.ffn.fc2.bias" in msg and "unexpected key(s): blocks.0.attn.extra_bias" in msg
    with pytest.raises(UserError, match="not found"):
        load_official_var("/nonexistent/var_d16.pth")


def test_text_encoder_unknown_word_error_and_tokens():
    enc = tiny_text_encoder()
    with pytest.raises(UserError) as err:
        enc.tokenize(["a photo of a red circle", "a photo of a dog and a cat"])
    msg = str(err.value)
    assert msg.startswith("unknown word(s) 'dog', 'cat' in prompt 'a photo of a dog and a cat'; this model knows: ")
    assert "circle" in msg and "purple" in msg
    ids, mask = enc.tokenize(["A photo of a Red circle.", ""])
    assert ids.shape == (2, 6) and mask.sum(1).tolist() == [6, 1]
    pooled, tokens = enc(ids, mask)
    assert pooled.shape == (2, 32) and tokens.shape == (2, 6, 32) and tokens[1, 1:].abs().sum() == 0


def test_text_encoder_sees_word_order_from_the_start():
    # Words and positions start at the same scale: with N(0, 1) word embeddings (the embedding layer's default) the
    # positions were drowned out and swapping two colour words left every token as it was (cosine 0.999998).
    torch.manual_seed(0)
    enc = ShapesTextEncoder(PROMPT_VOCABULARY, embed_dim=192, depth=2, num_heads=4).eval()
    assert enc.token_embed.weight.std() < 0.03 and enc.token_embed.weight[0].abs().sum() == 0
    with torch.no_grad():
        _, tokens, _ = enc.encode(["a photo of a red circle and a blue square",
                                   "a photo of a blue circle and a red square"])
    assert torch.nn.functional.cosine_similarity(tokens[0, 5], tokens[1, 5], dim=0) < 0.999


def test_word_mixing_starts_as_the_identity_and_binds_words_to_their_neighbours():
    torch.manual_seed(0)
    plain = ShapesTextEncoder(PROMPT_VOCABULARY, embed_dim=32, depth=1, num_heads=2).eval()
    mixed = ShapesTextEncoder(PROMPT_VOCABULARY, embed_dim=32, depth=1, num_heads=2, word_mixing=3).eval()
    assert set(mixed.state_dict()) - set(plain.state_dict()) == {
        f"word_mixer.{name}.{kind}" for name in ("conv", "proj") for kind in ("weight", "bias")}
    mixed.load_state_dict({**mixed.state_dict(), **plain.state_dict()})
    swapped = ["a photo of a red circle and a blue square", "a photo of a blue circle and a red square"]
    with torch.no_grad():
        for a, b in zip(plain.encode(swapped), mixed.encode(swapped)):
            assert torch.equal(a, b)  # the new block's projection starts at zero
        torch.nn.init.normal_(mixed.word_mixer.proj.weight, std=0.2)
        _, tokens, _ = mixed.encode(swapped)
        _, plain_tokens, _ = plain.encode(swapped)
        # "circle" (word 5) now carries the colour word before it; padding of a shorter prompt never leaks in
        cosine = torch.nn.functional.cosine_similarity
        assert cosine(tokens[0, 5], tokens[1, 5], dim=0) < cosine(plain_tokens[0, 5], plain_tokens[1, 5], dim=0)
        _, batched, _ = mixed.encode(["a photo of a red circle", "a photo of a red circle left of a blue square"])
        _, alone, _ = mixed.encode(["a photo of a red circle"])
        torch.testing.assert_close(batched[0, :6], alone[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(UserError, match="odd kernel size"):
        ShapesTextEncoder(PROMPT_VOCABULARY, embed_dim=32, depth=1, num_heads=2, word_mixing=2)


def test_class_and_text_misuse_errors():
    with pytest.raises(UserError, match="text-conditional"):
        tiny_var(conditioning="text", text_embed_dim=32).class_condition(torch.tensor([1]))
    with pytest.raises(UserError, match="class-conditional"):
        tiny_var().text_condition(torch.zeros(1, 32))
    with pytest.raises(UserError, match="text_embed_dim"):
        VAR(conditioning="text", depth=1, embed_dim=64, num_heads=1)


def test_per_image_random_streams_do_not_depend_on_the_batch(monkeypatch):
    """What vgen guarantees across batch sizes: each image draws the same random numbers from its own generator, and
    given the same tokens the model's logits for it agree to float rounding. Pixel identity is not asserted: a batched
    matmul may round differently from a single-row one (CPU kernels are chosen by shape), and one flipped token
    changes the rest of the image."""
    import vgen.samplers.logits as logits_module

    draws = []
    real_uniform = logits_module.per_sample_uniform

    def recording_uniform(shape_B, generators, device):
        noise = real_uniform(shape_B, generators, device)
        draws.append(noise.clone())
        return noise

    monkeypatch.setattr(logits_module, "per_sample_uniform", recording_uniform)
    model, vq = tiny_var(), tiny_vqvae()
    sampling = TokenSampling(top_k=16, top_p=0.9)
    labels = torch.tensor([0, 2, 4])
    with torch.no_grad():
        batch = generate_next_scale(model, vq.quantize, model.class_condition(labels), 3, guidance_scale=1.5,
                                    sampling=sampling, keep_logits=True,
                                    generators=[torch.Generator().manual_seed(7 + i) for i in range(3)])
        batch_draws, draws[:] = list(draws), []
        # image 1 alone, teacher-forced with the tokens it got in the batch
        one = generate_next_scale(model, vq.quantize, model.class_condition(labels[1:2]), 1, guidance_scale=1.5,
                                  sampling=sampling, keep_logits=True, generators=[torch.Generator().manual_seed(8)],
                                  forced_idx_Bl=[idx[1:2] for idx in batch.idx_Bl])
    assert len(draws) == len(batch_draws) == len(PATCH_NUMS)
    for si, pn in enumerate(PATCH_NUMS):
        assert batch_draws[si].shape == (3, pn * pn) and draws[si].shape == (1, pn * pn)
        assert torch.equal(draws[si][0], batch_draws[si][1])
        assert not torch.equal(batch_draws[si][0], batch_draws[si][1])  # each image has its own stream
        torch.testing.assert_close(one.logits_BlV[si][0], batch.logits_BlV[si][1], atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(tmp_path):
    model = tiny_var(conditioning="text", text_embed_dim=32, text_cross_attn=True)
    model.save_pretrained(tmp_path / "transformer")
    loaded = VAR.from_pretrained(tmp_path / "transformer").eval()
    assert loaded.config.text_cross_attn and loaded.config.patch_nums == [1, 2, 3, 4]
    x = torch.randn(1, model.L - 1, 8)
    cond = model.null_condition(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(None, x, cond=loaded.null_condition(1)), model(None, x, cond=cond))


def test_state_dict_mismatch_names_missing_unexpected_and_reshaped_keys():
    from vgen.checkpoints import state_dict_mismatch

    expected = {"a": torch.zeros(2), "b": torch.zeros(3, 4), "c": torch.zeros(1)}
    assert state_dict_mismatch(expected, {k: v.clone() for k, v in expected.items()}) == ""
    saved = {"a": torch.zeros(2), "b": torch.zeros(4, 3), "d": torch.zeros(1), "e": torch.zeros(1)}
    assert state_dict_mismatch(expected, saved, limit=1) == (
        "missing key(s): c; unexpected key(s): d ... (2 in all); other shape(s), saved vs expected: b (4, 3) vs (3, 4)"
    )
