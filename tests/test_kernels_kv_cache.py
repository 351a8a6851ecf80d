"""The one KV-cache protocol (vgen.kv_cache): full (per-row lengths, tentative steps), sink + rolling window,
compressed; attention against a float64 oracle, commit / rollback / truncate / select, and the kernels."""

import re
from pathlib import Path

import pytest
import torch
from vgen.kernels import segment_scores

from vgen.errors import UserError
from vgen.kv_cache import CompressedKVCache, FullKVCache, SinkWindowKVCache, make_kv_cache

B, H, D = 2, 4, 16


def _chunk(L, seed, dtype=torch.float32, batch=B):
    """q, k, v of L new tokens, head-major (batch, H, L, D)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, H, L, D, generator=g).to(dtype) for _ in range(3))


def _dense_oracle(q, keys, values, causal=False):
    """Float64 SDPA per head over explicit key lists ``keys[h]``, ``values[h]``: (B, L_h, D) (causal: the last
    ``Lq`` keys are the causal chunk)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h, (kh, vh) in enumerate(zip(keys, values)):
        lq, lk = q.shape[2], kh.shape[1]
        mask = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq
        out[:, h] = torch.nn.functional.scaled_dot_product_attention(
            q[:, h].double(), kh.double(), vh.double(), attn_mask=mask
        )
    return out


def _per_head(x):
    return [x[:, h] for h in range(x.shape[1])]


# -- full cache ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "kernels"])
def test_full_cache_attends_history_and_current_chunk(backend):
    cache = FullKVCache(batch=B, heads=H, head_dim=D, capacity=24, num_layers=2, backend=backend)
    chunks = [_chunk(8, s) for s in range(3)]
    for _, k, v in chunks[:2]:
        for layer in range(2):
            cache.attend(layer, k, k, v)
        cache.commit()
    q, k, v = chunks[2]
    out = cache.attend(1, q, k, v, causal=True)
    keys = torch.cat([c[1] for c in chunks], 2)
    values = torch.cat([c[2] for c in chunks], 2)
    want = _dense_oracle(q, _per_head(keys), _per_head(values), causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [16] * H and cache.seq_len == 16
    cache.rollback()
    with pytest.raises(UserError, match="holds 24 tokens"):
        cache.attend(0, *_chunk(9, 5))


def test_preallocated_steps_equal_concatenation_exactly():
    """Scale-by-scale (VAR) use: each step sees exactly what a cache grown by torch.cat would hold."""
    cache = FullKVCache(batch=B, heads=H, head_dim=D, capacity=1 + 4 + 9)
    seen_k, seen_v = [], []
    for step, n in enumerate((1, 4, 9)):
        q, k, v = _chunk(n, step)
        seen_k.append(k)
        seen_v.append(v)
        out = cache.attend(0, q, k, v)
        want = torch.nn.functional.scaled_dot_product_attention(q, torch.cat(seen_k, 2), torch.cat(seen_v, 2))
        assert torch.equal(out, want)
        cache.commit()
    assert torch.equal(cache.k[0, :, :, :14], torch.cat(seen_k, 2))


def test_step_protocol_errors():
    cache = FullKVCache(batch=B, heads=H, head_dim=D, capacity=16, num_layers=2)
    q, k, v = _chunk(2, 0)
    cache.attend(0, q, k, v)
    with pytest.raises(ValueError, match="not committed"):
        cache.attend(0, q, k, v)  # layer 0 twice in one step
    with pytest.raises(ValueError, match="not committed"):
        cache.attend(1, *_chunk(3, 1))  # another step size
    cache.commit([1, 2])
    assert cache.lengths_B.tolist() == [1, 2]
    with pytest.raises(ValueError, match="nothing to commit"):
        cache.commit()
    with pytest.raises(ValueError, match="keep_B needs 2 counts"):
        cache.attend(0, q, k, v)
        cache.commit([3, 0])
    with pytest.raises(ValueError, match=r"k and v must be \(B=2, H=4"):
        cache.rollback()
        cache.attend(0, q, k[:, :2], v[:, :2])


@pytest.mark.parametrize("backend", ["sdpa", "kernels"])
def test_per_row_commit_and_truncate_leave_other_rows_untouched(backend):
    """Rows accept different numbers of drafted tokens; every later step equals a per-row cache built from exactly
    the accepted tokens, and a row's rollback never changes another row's keys or attention."""
    batch = 3
    cache = FullKVCache(batch=batch, heads=H, head_dim=D, capacity=20, backend=backend)
    cache.k.fill_(float("nan"))  # storage is allocated uninitialised: masked reads must never see what it held
    cache.v.fill_(float("nan"))
    rows = [[] for _ in range(batch)]  # what each row should hold: list of (k, v) (H, 1, D) tokens

    def step(n, seed, keep):
        q, k, v = _chunk(n, seed, batch=batch)
        out = cache.attend(0, q, k, v, causal=True)
        for b in range(batch):  # the oracle: this row's accepted history plus the whole step, causal
            hist_k = torch.cat([t[0] for t in rows[b]] + [k[b]], 1) if rows[b] else k[b]
            hist_v = torch.cat([t[1] for t in rows[b]] + [v[b]], 1) if rows[b] else v[b]
            want = _dense_oracle(q[b : b + 1], _per_head(hist_k[None]), _per_head(hist_v[None]), causal=True)
            torch.testing.assert_close(out[b : b + 1].double(), want, atol=1e-5, rtol=0)
        cache.commit(keep)
        for b in range(batch):
            rows[b] += [(k[b, :, j : j + 1], v[b, :, j : j + 1]) for j in range(keep[b])]

    step(4, 0, [4, 4, 4])
    step(4, 1, [1, 4, 0])  # rows now differ: 5, 8, 4
    assert cache.lengths_B.tolist() == [5, 8, 4]
    before = cache.k[0, 1, :, :8].clone()
    step(3, 2, [3, 0, 2])
    assert torch.equal(cache.k[0, 1, :, :8], before)  # row 1 kept nothing new: its history is unchanged
    cache.truncate(torch.tensor([6, 8, 100]))  # roll back committed tokens of row 0 only
    rows[0] = rows[0][:6]
    assert cache.lengths_B.tolist() == [6, 8, 6]
    step(2, 3, [2, 2, 2])
    cache.select(torch.tensor([2, 0]))
    assert cache.lengths_B.tolist() == [8, 8] and cache.batch == 2


def test_clone_is_independent():
    cache = FullKVCache(batch=1, heads=H, head_dim=D, capacity=8)
    q, k, v = _chunk(2, 0, batch=1)
    cache.attend(0, q, k, v)
    cache.commit()
    copy = cache.clone()
    cache.attend(0, q, k * 0, v * 0)
    cache.commit()
    assert copy.seq_len == 2 and cache.seq_len == 4
    out = copy.attend(0, q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2))
    torch.testing.assert_close(out, want)


# -- sink + rolling window -------------------------------------------------------------------------------------------


def test_sink_window_ring_wraps_into_two_segments():
    cache = SinkWindowKVCache(sink_tokens=3, window_tokens=10, batch=B, heads=H, head_dim=D, chunk_capacity=6)
    chunks = [_chunk(6, s) for s in range(5)]
    seen_k, seen_v = [], []
    for q, k, v in chunks[:4]:  # 24 tokens: 3 to the sink, 21 through a ring of 10
        cache.attend(0, q, k, v)
        cache.commit()
        seen_k.append(k)
        seen_v.append(v)
    start, length = cache.history_table()
    # ring slots written: 3+6+6+6 = 21 tokens after the sink -> ptr 21 % 10 = 1, oldest piece rows 4..12
    assert start[0].tolist() == [0, 4, 3] and length[0].tolist() == [3, 9, 1]
    all_k, all_v = torch.cat(seen_k, 2), torch.cat(seen_v, 2)
    kept = list(range(3)) + list(range(14, 24))  # sink + the 10 most recent tokens, in time order
    q, k, v = chunks[4]
    out = cache.attend(0, q, k, v, store=False)
    keys = torch.cat([all_k[:, :, kept], k], 2)
    values = torch.cat([all_v[:, :, kept], v], 2)
    torch.testing.assert_close(out.double(), _dense_oracle(q, _per_head(keys), _per_head(values)), atol=1e-5,
                               rtol=0)


def test_sink_window_chunk_longer_than_window_and_flat_memory():
    cache = SinkWindowKVCache(sink_tokens=2, window_tokens=4, batch=1, heads=1, head_dim=D, chunk_capacity=9)
    k = torch.arange(9.0).view(1, 1, 9, 1).expand(1, 1, 9, D).contiguous()
    bytes_before = cache.nbytes
    cache.attend(0, k, k, k)
    cache.commit()
    start, length = cache.history_table()
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(start[0].tolist(), length[0].tolist())])
    assert cache.k[0][0, 0, rows, 0].tolist() == [0, 1, 5, 6, 7, 8]
    for _ in range(50):
        cache.attend(0, k, k, k)
        cache.commit()
    assert cache.nbytes == bytes_before and int(cache.lengths[0]) == 6
    with pytest.raises(ValueError, match="one history for every row"):
        two = SinkWindowKVCache(sink_tokens=1, window_tokens=4, batch=2, heads=1, head_dim=D, chunk_capacity=2)
        q = torch.zeros(2, 1, 2, D)
        two.attend(0, q, q, q)
        two.commit([1, 2])


# -- compressed (Forcing-KV) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compressed_keep_everything_equals_full_exactly(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    full = SinkWindowKVCache(sink_tokens=0, window_tokens=48, batch=B, heads=H, head_dim=D, chunk_capacity=8,
                             backend=backend)
    compressed = CompressedKVCache(batch=B, heads=H, head_dim=D, capacity=48, chunk_capacity=8, backend=backend)
    for step in range(3):
        q, k, v = _chunk(8, step)
        for cache in (full, compressed):
            cache.attend(0, q, k, v)
            cache.commit()
        everything = [torch.arange(int(n)) for n in compressed.head_lengths(0)]
        compressed.compact(0, everything)
    q, k, v = _chunk(8, 99)
    a, lse_a = full.attend(0, q, k, v, causal=True, return_lse=True, store=False)
    b, lse_b = compressed.attend(0, q, k, v, causal=True, return_lse=True, store=False)
    assert torch.equal(a, b) and torch.equal(lse_a, lse_b)


def test_compressed_keep_everything_equals_full_cache_attention():
    """The video model's compressed cache with nothing dropped gives the full cache's attention (fp32)."""
    full = FullKVCache(batch=B, heads=H, head_dim=D, capacity=40, num_layers=2, backend="kernels")
    compressed = CompressedKVCache(batch=B, heads=H, head_dim=D, capacity=40, chunk_capacity=8, num_layers=2)
    for step in range(4):
        q, k, v = _chunk(8, step)
        outs = []
        for cache in (full, compressed):
            outs.append([cache.attend(layer, q, k, v) for layer in range(2)])
            cache.commit()
        for layer in range(2):
            compressed.compact(layer, [torch.arange(int(n)) for n in compressed.head_lengths(layer)])
            torch.testing.assert_close(outs[0][layer], outs[1][layer], atol=1e-6, rtol=0)


def test_compressed_per_head_keep_matches_selected_tokens():
    cache = CompressedKVCache(batch=B, heads=H, head_dim=D, capacity=30, chunk_capacity=5, num_layers=2)
    history = [_chunk(5, s) for s in range(4)]
    for q, k, v in history:
        for layer in range(2):
            cache.attend(layer, q, k, v)
        cache.commit()
    all_k = torch.cat([c[1] for c in history], 2)
    all_v = torch.cat([c[2] for c in history], 2)
    keep = [torch.tensor([0, 1, 19]), torch.arange(20), torch.tensor([7]), torch.tensor([], dtype=torch.long)]
    cache.compact(1, keep)
    assert cache.head_lengths(1).tolist() == [3, 20, 1, 0] and cache.head_lengths(0).tolist() == [20] * H
    q, k, v = _chunk(5, 10)
    for layer in range(2):
        cache.attend(layer, q, k, v)
    cache.commit()  # heads of layer 1 continue from different rows
    all_k, all_v = torch.cat([all_k, k], 2), torch.cat([all_v, v], 2)
    keep = [torch.cat([x, torch.arange(20, 25)]) for x in keep]
    q = _chunk(3, 11)[0]
    out = cache.attend(1, q, None, None, store=False)
    want = _dense_oracle(q, [all_k[:, h, keep[h]] for h in range(H)], [all_v[:, h, keep[h]] for h in range(H)])
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)


def test_compressed_group_keep_and_validation():
    cache = CompressedKVCache(batch=1, heads=4, head_dim=D, capacity=12, chunk_capacity=6)
    k = torch.randn(1, 4, 6, D)
    cache.attend(0, k, k, k)
    cache.commit()
    cache.compact(0, torch.tensor([[0, 5, -1], [1, 2, 3]]))  # heads 0-1 share list 0, heads 2-3 list 1
    assert cache.head_lengths(0).tolist() == [2, 2, 3, 3]
    assert torch.equal(cache.k[0][0, 1, :2], k[0, 1, [0, 5]])
    assert torch.equal(cache.v[0][0, 3, :3], k[0, 3, [1, 2, 3]])
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.compact(0, [torch.tensor([1, 0])] * 4)
    with pytest.raises(ValueError, match="past the history"):
        cache.compact(0, [torch.tensor([2])] * 4)  # heads 0-1 hold 2 tokens
    with pytest.raises(ValueError, match="dividing"):
        cache.compact(0, [torch.tensor([0])] * 3)
    with pytest.raises(ValueError, match="keeps its own tokens"):
        SinkWindowKVCache(sink_tokens=1, window_tokens=3, batch=1, heads=4, head_dim=D,
                          chunk_capacity=4).compact(0, [torch.tensor([0])] * 4)


def test_forcing_kv_selection_flow():
    """Score the chunk's frames with kernel 3, keep the most-changed segments, compact with kernel 2."""
    T, seg = 8, 4  # tokens per frame, tokens per segment
    cache = CompressedKVCache(batch=1, heads=2, head_dim=D, capacity=5 * T, chunk_capacity=4 * T)
    frames = torch.randn(1, 2, 1, D).repeat(1, 1, 4 * T, 1)  # 4 identical frames ...
    frames[:, :, T + seg : 2 * T] = torch.randn(1, 2, seg, D)  # ... except the 2nd half of frame 1
    cache.attend(0, frames, frames, frames)
    cache.commit()
    scores = segment_scores(cache.k[0].transpose(1, 2), T, seg, num_frames=4)  # (1, 3, 2)
    assert scores[0].argmin().item() == 1  # frame 0 -> 1, second segment changed
    changed = scores[0].flatten().topk(1, largest=False).indices.item()
    f, s = divmod(changed, scores.shape[-1])
    keep = torch.cat([torch.arange(f * T + s * seg, f * T + (s + 1) * seg), torch.arange(3 * T, 4 * T)])
    cache.compact(0, [keep, keep])
    assert cache.head_lengths(0).tolist() == [seg + T] * 2
    assert torch.equal(cache.k[0][0, 0, : seg + T], frames[0, 0, keep])


def test_make_kv_cache_by_name():
    cache = make_kv_cache("sink_window", sink_tokens=1, window_tokens=2, batch=1, heads=1, head_dim=D,
                          chunk_capacity=2)
    assert isinstance(cache, SinkWindowKVCache)
    assert isinstance(make_kv_cache("full", batch=1, heads=1, head_dim=D, capacity=4), FullKVCache)
    with pytest.raises(UserError, match="unknown KV cache 'ring'"):
        make_kv_cache("ring")


def test_kernels_readme_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "kernels" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "kernels/README.md lost its Python example"
    for block in blocks:
        exec(compile(block, "kernels/README.md", "exec"), {})  # noqa: S102 - our own README
