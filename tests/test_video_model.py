"""Block-causal video transformer: 3-D RoPE, the block-causal mask, and teacher forcing equal to cached generation."""

import math

import pytest
import torch

from vgen.errors import UserError
from vgen.models.layers import apply_llama_rope, video_rope_3d, video_rope_frequencies
from vgen.models.video_ar import VIDEO_AR_SIZES, BlockCausalVideoTransformer, create_video_ar
from vgen.models.video_cache import VideoCacheConfig

TEXT_DIM = 16


def tiny_model(seed=0, frames_per_block=2, max_frames=8, **overrides):
    """A tiny random model whose zero-initialised AdaLN/head weights are perturbed, so every path matters."""
    torch.manual_seed(seed)
    kwargs = dict(latent_channels=4, latent_height=8, latent_width=8, patch_size=2,
                  frames_per_block=frames_per_block, max_frames=max_frames, text_embed_dim=TEXT_DIM)
    model = create_video_ar("video-ar-tiny", **{**kwargs, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def text_condition(model, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    pooled, tokens = torch.randn(batch, TEXT_DIM, generator=g), torch.randn(batch, 3, TEXT_DIM, generator=g)
    return model.text_condition(pooled, tokens, torch.tensor([[True, True, False]] * batch))


# -- 3-D RoPE ---------------------------------------------------------------------------------------------------------


def test_video_rope_splits_pairs_like_wan_and_rotates_by_position():
    f_t, f_h, f_w = video_rope_frequencies(128)
    assert (len(f_t), len(f_h), len(f_w)) == (22, 21, 21)  # Wan-1.3B: 44 / 42 / 42 channels
    f_t, f_h, f_w = video_rope_frequencies(32)
    assert (len(f_t), len(f_h), len(f_w)) == (6, 5, 5)
    frames, H, W, D = torch.tensor([3, 7]), 2, 3, 32
    table = video_rope_3d(frames, H, W, D)
    assert table.shape == (2 * H * W, D // 2, 2)
    # an independent complex-number restatement: pair j of token (f, r, c) turns by pos * freq_j
    x = torch.randn(1, 1, 2 * H * W, D)
    angles = []
    for f in frames.tolist():
        for r in range(H):
            for c in range(W):
                angles.append(torch.cat([f * f_t, r * f_h, c * f_w]))
    rot = torch.polar(torch.ones(2 * H * W, D // 2, dtype=torch.float64), torch.stack(angles))
    want = torch.view_as_real(torch.view_as_complex(x.double().reshape(1, 1, -1, D // 2, 2)) * rot).flatten(-2)
    torch.testing.assert_close(apply_llama_rope(x, table).double(), want, atol=1e-5, rtol=0)


def test_video_rope_scores_depend_only_on_the_frame_offset():
    D = 32
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(fq, fk):
        qr = apply_llama_rope(q, video_rope_3d([fq], 1, 1, D))
        kr = apply_llama_rope(k, video_rope_3d([fk], 1, 1, D))
        return float((qr * kr).sum())

    assert math.isclose(score(5, 2), score(40, 37), rel_tol=1e-4)
    assert not math.isclose(score(5, 2), score(5, 4), rel_tol=1e-3)


# -- the model --------------------------------------------------------------------------------------------------------


def test_block_causal_mask_sees_own_and_earlier_blocks():
    model = tiny_model()
    T = model.tokens_per_frame
    mask = model.block_causal_mask(6)  # blocks of 2 frames: frames {0,1}, {2,3}, {4,5}
    frame_of = torch.arange(6 * T) // T
    block_of = frame_of // 2
    assert torch.equal(mask, block_of[None, :] <= block_of[:, None])
    assert mask[T, 0] and mask[0, T] and not mask[0, 2 * T]  # frame 0 sees frame 1 (same block), not frame 2


@pytest.mark.parametrize("mode", ["full", "sink_window", "forcing_kv"])
def test_teacher_forcing_equals_block_by_block_cached_generation(mode):
    """The same noisy clip: one block-causal pass vs. block by block over the cache (each block's denoising pass,
    then its storing pass at the same times). Window / recent frames cover the whole clip, so nothing is dropped."""
    from vgen.models.forcing_kv import HeadProfile, model_fingerprint

    model = tiny_model()
    B, F_ = 2, 8
    cond = text_condition(model, B)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, F_, 4, 8, 8, generator=g)
    t_BF = torch.rand(B, F_ // 2, generator=g).repeat_interleave(2, 1)
    with torch.no_grad():
        want = model(x, t_BF, cond)
        profile = HeadProfile([[0.9, 0.1], [0.1, 0.9]], fingerprint=model_fingerprint(model))
        spec = VideoCacheConfig(mode, sink_frames=1, window_frames=F_, recent_frames=F_, head_profile=profile)
        state = model.start(cond, spec, max_frames=F_)
        got = []
        for b in range(F_ // 2):
            x_b, t_b = x[:, 2 * b : 2 * b + 2], t_BF[:, 2 * b]
            got.append(model.block_velocity(x_b, t_b, state))
            stored = model.encode_block(x_b, t_b, state)
            torch.testing.assert_close(stored, got[-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat(got, 1), want, atol=2e-5, rtol=0)
    assert state.frame == F_


def test_bad_clip_shapes_are_one_line_errors():
    model = tiny_model()
    cond = text_condition(model, 1)
    with pytest.raises(UserError, match="not a whole number of 2-frame blocks"):
        model(torch.zeros(1, 3, 4, 8, 8), torch.zeros(1, 3), cond)
    with pytest.raises(UserError, match=r"must be \(B, F, 4, 8, 8\)"):
        model(torch.zeros(1, 2, 3, 8, 8), torch.zeros(1, 2), cond)
    with pytest.raises(UserError, match="multiple of frames_per_block"):
        BlockCausalVideoTransformer(frames_per_block=3, max_frames=16)
    with pytest.raises(UserError, match="must be a multiple of the block size"):
        model.start(cond, VideoCacheConfig("full"), max_frames=7)
    with pytest.raises(UserError, match="unknown video model size"):
        create_video_ar("video-ar-xxl")
    with pytest.raises(UserError, match="unknown video cache mode 'ring'"):
        VideoCacheConfig("ring")
    assert set(VIDEO_AR_SIZES) >= {"video-ar-tiny", "video-ar-s"}


def test_full_cache_refuses_a_rollout_past_its_capacity():
    model = tiny_model()
    cond = text_condition(model, 1)
    state = model.start(cond, VideoCacheConfig("full"), max_frames=4)
    block = torch.zeros(1, 2, 4, 8, 8)
    for _ in range(2):
        model.commit_block(block, state)
    with pytest.raises(UserError, match="allocate a larger capacity"):
        model.block_velocity(block, torch.ones(1), state)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    again = BlockCausalVideoTransformer.from_pretrained(tmp_path).eval()
    cond = text_condition(model, 1)
    x, t = torch.randn(1, 4, 4, 8, 8), torch.full((1, 4), 0.5)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), again(x, t, text_condition(again, 1)))
