"""Video caches by config (full, sink + rolling window, Forcing-KV), the Forcing-KV keep policy and head profiles."""

import json

import pytest
import torch

from vgen.errors import UserError
from vgen.kv_cache import CompressedKVCache, FullKVCache
from vgen.models.forcing_kv import (
    PROFILE_FILE,
    ForcingKVPolicy,
    HeadProfile,
    load_head_profile,
    model_fingerprint,
    profile_heads,
)
from vgen.models.video_cache import VideoCacheConfig

from test_video_model import text_condition, tiny_model


def _rollout(model, spec, blocks, batch=1, seed=0, max_frames=None):
    """Generate-like rollout on random blocks: each block is attended (denoising pass) then committed clean."""
    g = torch.Generator().manual_seed(seed)
    cond = text_condition(model, batch)
    state = model.start(cond, spec, max_frames=max_frames or blocks * model.frames_per_block)
    outs, sizes = [], []
    for _ in range(blocks):
        x = torch.randn(batch, *model.block_shape, generator=g)
        outs.append(model.block_velocity(x, torch.full((batch,), 0.7), state))
        model.commit_block(x, state)
        sizes.append((state.cache.nbytes, state.cache.history_nbytes))
    return outs, sizes, state


def _profile(model, static):
    """A profile with the given static heads per layer."""
    scores = [[0.9 if h in static[layer] else 0.1 for h in range(model.num_heads)] for layer in range(len(static))]
    return HeadProfile(scores, fingerprint=model_fingerprint(model))


@pytest.mark.parametrize("backend", ["kernels", "sdpa"])
def test_keep_everything_forcing_kv_equals_the_full_cache(backend):
    """Forcing-KV whose recent window covers the whole video drops nothing: every velocity equals the full cache's,
    bit for bit on the same kernel (fp32), to rounding against SDPA."""
    model = tiny_model()
    profile = _profile(model, [{0}, {1}])
    full = VideoCacheConfig("full", backend=backend)
    keep_all = VideoCacheConfig("forcing_kv", sink_frames=1, recent_frames=8, head_profile=profile)
    with torch.no_grad():
        a, _, _ = _rollout(model, full, 4, batch=2)
        b, _, state = _rollout(model, keep_all, 4, batch=2)
    assert isinstance(state.cache, CompressedKVCache)
    for x, y in zip(a, b):
        if backend == "kernels":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_forcing_kv_keeps_sink_recent_and_most_changed_segments():
    """Static heads keep sink + recent frames; dynamic heads also keep the segments whose keys change most between
    consecutive frames, chosen here on hand-made keys."""

    class Shapes:  # what the policy reads of a model
        tokens_per_frame, frames_per_block, num_heads, blocks = 4, 2, 2, [None]

    model = Shapes()
    profile = HeadProfile([[0.9, 0.1]])  # head 0 static, head 1 dynamic
    spec = VideoCacheConfig("forcing_kv", sink_frames=1, recent_frames=1, segments_per_frame=2, dynamic_segments=1)
    profile.check_model = lambda model: None
    policy = ForcingKVPolicy(profile, spec, model)
    T, D = 4, 16
    cache = CompressedKVCache(batch=1, heads=2, head_dim=D, capacity=policy.max_history_tokens() + 2 * T,
                              chunk_capacity=2 * T)
    base = torch.randn(1, 2, 1, D)
    frames = [base.repeat(1, 1, T, 1).clone() for _ in range(4)]  # 4 frames, identical keys ...
    frames[2][:, :, 2:] = torch.randn(1, 2, 2, D)  # ... except the 2nd segment (tokens 2-3) of frame 2
    for block in range(2):
        kv = torch.cat(frames[2 * block : 2 * block + 2], 2)
        cache.attend(0, kv, kv, kv)
        cache.commit()
        policy.after_commit(cache, 2 * block, 2)
    # after block 1 (frames 2, 3): sink = frame 0, recent = frame 3; candidates frames 1, 2 scored into 2, 3
    assert cache.head_lengths(0).tolist() == [2 * T, 2 * T + 2]
    assert policy.layouts[0][True] == [(0, 0, T), (3, 0, T)]
    # frame 1 -> 2 changes in segment 1 and so does 2 -> 3; the lowest similarity wins (one of those two)
    dynamic_layout = policy.layouts[0][False]
    assert dynamic_layout[0] == (0, 0, T) and dynamic_layout[-1] == (3, 0, T)
    assert dynamic_layout[1] in [(1, 2, 2), (2, 2, 2)]
    frame, first, n = dynamic_layout[1]
    torch.testing.assert_close(cache.k[0][0, 1, T : T + n], frames[frame][0, 1, first : first + n])


@pytest.mark.parametrize("mode", ["sink_window", "forcing_kv"])
def test_rolling_cache_memory_stays_flat_over_a_long_rollout(mode):
    model = tiny_model()
    spec = VideoCacheConfig(mode, sink_frames=1, window_frames=3, recent_frames=1, segments_per_frame=2,
                            head_profile=_profile(model, [{0}, set()]))
    with torch.no_grad():
        _, sizes, _ = _rollout(model, spec, 24)  # 48 frames, 6x the training length
        _, full_sizes, _ = _rollout(model, VideoCacheConfig("full"), 24)
    allocated = {s[0] for s in sizes}
    assert len(allocated) == 1  # nothing is ever re-allocated
    history = [s[1] for s in sizes]
    assert max(history[4:]) == min(history[4:])  # bounded and constant once the window is full
    assert full_sizes[-1][1] == 24 * full_sizes[0][1]  # the full cache grows with every block
    assert history[-1] < 0.2 * full_sizes[-1][1]


def test_forcing_kv_cache_is_over_80_percent_smaller_than_full_at_the_training_length():
    model = tiny_model(frames_per_block=2, max_frames=16)
    spec = VideoCacheConfig("forcing_kv", sink_frames=1, recent_frames=1, head_profile=_profile(model, [{0}, {1}]))
    with torch.no_grad():
        _, sizes, _ = _rollout(model, spec, 8)
        _, full_sizes, _ = _rollout(model, VideoCacheConfig("full"), 8)
    assert sizes[-1][1] <= 0.2 * full_sizes[-1][1]


def test_head_profile_is_deterministic_and_round_trips(tmp_path):
    model = tiny_model(max_frames=8)
    clips = torch.randn(3, 8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = text_condition(model, 3)

    def run():
        return profile_heads(model, clips, cond, generator=torch.Generator().manual_seed(5), batch_size=2)

    a, b = run(), run()
    assert a.scores == b.scores and len(a.scores) == 2 and len(a.scores[0]) == 2
    assert all(0.0 < s <= 1.0 for layer in a.scores for s in layer)
    assert a.recent_frames == 3 and a.fingerprint == model_fingerprint(model)
    path = a.save(tmp_path)
    assert path.name == PROFILE_FILE
    data = json.loads(path.read_text())
    assert sorted(data["layers"][0]["static_head"] + data["layers"][0]["dynamic_head"]) == [0, 1]
    again = load_head_profile(tmp_path)
    assert again.static_mask().tolist() == a.static_mask().tolist()
    again.check_model(model)
    c = profile_heads(model, clips, cond, generator=torch.Generator().manual_seed(6))
    assert c.scores != a.scores  # the noise matters: the test above is not vacuous


def test_a_profile_of_another_model_is_refused_in_one_line(tmp_path):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    profile = _profile(other, [{0}, {1}])
    spec = VideoCacheConfig("forcing_kv", head_profile=profile)
    with pytest.raises(UserError, match="made for another model") as err:
        model.start(text_condition(model, 1), spec)
    assert "\n" not in str(err.value)
    wide = HeadProfile([[0.9, 0.1, 0.5]] * 2, fingerprint=model_fingerprint(model))
    with pytest.raises(UserError, match="covers 2 layers x 3 heads"):
        model.start(text_condition(model, 1), VideoCacheConfig("forcing_kv", head_profile=wide))
    with pytest.raises(UserError, match="needs a head profile"):
        model.start(text_condition(model, 1), VideoCacheConfig("forcing_kv"))
    (tmp_path / PROFILE_FILE).write_text('{"layers": 3}')
    with pytest.raises(UserError, match="is not a head profile"):
        load_head_profile(tmp_path)
    with pytest.raises(UserError, match="head profile not found"):
        load_head_profile(tmp_path / "missing.json")


def test_history_nbytes_counts_the_committed_keys_and_values():
    cache = FullKVCache(batch=2, heads=3, head_dim=8, capacity=10, num_layers=2)
    x = torch.zeros(2, 3, 4, 8)
    for layer in range(2):
        cache.attend(layer, x, x, x)
    assert cache.history_nbytes == 0  # a tentative step is not history
    cache.commit([4, 1])  # rows differ: 4 + 1 tokens, 3 heads, 2 layers, keys and values, 8 floats each
    assert cache.history_nbytes == (4 + 1) * 3 * 2 * 2 * 8 * 4


def test_full_cache_lets_gradients_flow_through_a_step_that_later_steps_overwrite():
    """Self forcing backpropagates through one denoising pass over the cache while later passes keep writing to it:
    the gradient equals the one of plain attention over a copied history."""
    cache = FullKVCache(batch=1, heads=2, head_dim=8, capacity=12)
    history = torch.randn(1, 2, 4, 8)
    cache.attend(0, history, history, history)
    cache.commit()
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    out = cache.attend(0, q, k, v, store=False)
    with torch.no_grad():  # the next pass writes over the rows the step used
        cache.attend(0, *(torch.zeros(1, 2, 4, 8) for _ in range(3)))
        cache.commit()
    out.square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q2, torch.cat([history, k2], 2),
                                                            torch.cat([history, v2], 2))
    want.square().sum().backward()
    for got, ref in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(got.grad, ref.grad)
    assert not cache.k.requires_grad and cache.seq_len == 8
