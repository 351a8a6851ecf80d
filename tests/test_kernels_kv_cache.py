"""KV cache objects: full, sink + rolling window (ring), compressed; one interface over the kernels."""

import re
from pathlib import Path

import pytest
import torch
from vgen.kernels import segment_scores

from vgen.errors import UserError
from vgen.kv_cache import CompressedKVCache, FullKVCache, SinkWindowKVCache, make_kv_cache

B, H, D = 2, 4, 16


def _chunk(L, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, L, H, D, generator=g).to(dtype) for _ in range(3))  # q, k, v


def _dense_oracle(q, keys, values, causal=False):
    """Float64 SDPA per head over explicit key lists ``keys[h]``, ``values[h]``: ``[B, L_h, D]`` (causal:
    bottom-right aligned, i.e. the last ``Lq`` keys are the causal chunk)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h, (kh, vh) in enumerate(zip(keys, values)):
        lq, lk = q.shape[1], kh.shape[1]
        mask = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq
        out[:, :, h] = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, h].double(), kh.double(), vh.double(), attn_mask=mask
        )
    return out


def test_full_cache_attends_history_and_current_chunk():
    cache = FullKVCache(batch=B, heads=H, head_dim=D, capacity=40, chunk_capacity=8)
    chunks = [_chunk(8, s) for s in range(3)]
    for _, k, v in chunks[:2]:
        cache.append(k, v)
    q, k, v = chunks[2]
    out = cache.attend(q, k, v, causal=True)
    keys = torch.cat([c[1] for c in chunks], 1)
    values = torch.cat([c[2] for c in chunks], 1)
    want = _dense_oracle(q, [keys[:, :, h] for h in range(H)], [values[:, :, h] for h in range(H)], causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [16] * H
    with pytest.raises(UserError, match="holds 40 tokens"):
        for _ in range(4):
            cache.append(k, v)


def test_sink_window_ring_wraps_into_two_segments():
    cache = SinkWindowKVCache(sink_tokens=3, window_tokens=10, batch=B, heads=H, head_dim=D, chunk_capacity=6)
    chunks = [_chunk(6, s) for s in range(5)]
    seen_k, seen_v = [], []
    for _, k, v in chunks[:4]:  # 24 tokens: 3 to the sink, 21 through a ring of 10
        cache.append(k, v)
        seen_k.append(k)
        seen_v.append(v)
    start, length = cache.history_table()
    # ring slots written: 3+6+6+6 = 21 tokens after the sink -> ptr 21 % 10 = 1, oldest piece rows 4..12
    assert start[0].tolist() == [0, 4, 3] and length[0].tolist() == [3, 9, 1]
    all_k, all_v = torch.cat(seen_k, 1), torch.cat(seen_v, 1)
    kept = list(range(3)) + list(range(14, 24))  # sink + the 10 most recent tokens, in time order
    q, k, v = chunks[4]
    out = cache.attend(q, k, v)
    keys = torch.cat([all_k[:, kept], k], 1)
    values = torch.cat([all_v[:, kept], v], 1)
    want = _dense_oracle(q, [keys[:, :, h] for h in range(H)], [values[:, :, h] for h in range(H)])
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)


def test_sink_window_chunk_longer_than_window():
    cache = SinkWindowKVCache(sink_tokens=2, window_tokens=4, batch=1, heads=1, head_dim=D, chunk_capacity=9)
    k = torch.arange(9.0).view(1, 9, 1, 1).expand(1, 9, 1, D).contiguous()
    cache.append(k, k)
    start, length = cache.history_table()
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(start[0].tolist(), length[0].tolist())])
    assert cache.k[0, 0, rows, 0].tolist() == [0, 1, 5, 6, 7, 8]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compressed_keep_everything_equals_full_exactly(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    kwargs = {"batch": B, "heads": H, "head_dim": D, "capacity": 48, "chunk_capacity": 8, "backend": backend}
    full, compressed = FullKVCache(**kwargs), CompressedKVCache(**kwargs)
    for step in range(3):
        q, k, v = _chunk(8, step)
        for cache in (full, compressed):
            cache.append(k, v)
        everything = [torch.arange(int(n)) for n in compressed.lengths]
        compressed.compact(everything)
    q, k, v = _chunk(8, 99)
    a, lse_a = full.attend(q, k, v, causal=True, return_lse=True)
    b, lse_b = compressed.attend(q, k, v, causal=True, return_lse=True)
    assert torch.equal(a, b) and torch.equal(lse_a, lse_b)


def test_compressed_per_head_keep_matches_selected_tokens():
    cache = CompressedKVCache(batch=B, heads=H, head_dim=D, capacity=30, chunk_capacity=5)
    history = [_chunk(5, s) for s in range(4)]
    for _, k, v in history:
        cache.append(k, v)
    all_k = torch.cat([c[1] for c in history], 1)
    all_v = torch.cat([c[2] for c in history], 1)
    keep = [torch.tensor([0, 1, 19]), torch.arange(20), torch.tensor([7]), torch.tensor([], dtype=torch.long)]
    cache.compact(keep)
    assert cache.lengths.tolist() == [3, 20, 1, 0]
    _, k, v = _chunk(5, 10)
    cache.append(k, v)  # heads continue from different rows
    all_k, all_v = torch.cat([all_k, k], 1), torch.cat([all_v, v], 1)
    keep = [torch.cat([x, torch.arange(20, 25)]) for x in keep]
    q = _chunk(3, 11)[0]
    out = cache.attend(q)
    want = _dense_oracle(q, [all_k[:, keep[h], h] for h in range(H)], [all_v[:, keep[h], h] for h in range(H)])
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)


def test_compressed_group_keep_and_validation():
    cache = CompressedKVCache(batch=1, heads=4, head_dim=D, capacity=12, chunk_capacity=4)
    k = torch.randn(1, 6, 4, D)
    cache.append(k, k)
    cache.compact(torch.tensor([[0, 5, -1], [1, 2, 3]]))  # heads 0-1 share list 0, heads 2-3 list 1
    assert cache.lengths.tolist() == [2, 2, 3, 3]
    assert torch.equal(cache.k[0, 1, :2], k[0, [0, 5], 1])
    assert torch.equal(cache.v[0, 3, :3], k[0, [1, 2, 3], 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.compact([torch.tensor([1, 0])] * 4)
    with pytest.raises(ValueError, match="past the history"):
        cache.compact([torch.tensor([2])] * 4)  # heads 0-1 hold 2 tokens
    with pytest.raises(ValueError, match="dividing"):
        cache.compact([torch.tensor([0])] * 3)
    with pytest.raises(ValueError, match="keeps its own tokens"):
        FullKVCache(batch=1, heads=4, head_dim=D, capacity=4, chunk_capacity=4).compact([torch.tensor([0])] * 4)


def test_forcing_kv_selection_flow():
    """Score the chunk's frames with kernel 3, keep the most-changed segments, compact with kernel 2."""
    T, seg = 8, 4  # tokens per frame, tokens per segment
    cache = CompressedKVCache(batch=1, heads=2, head_dim=D, capacity=5 * T, chunk_capacity=3 * T)
    frames = torch.randn(1, 1, 2, D).repeat(1, 4 * T, 1, 1)  # 4 identical frames ...
    frames[:, T + seg : 2 * T] = torch.randn(1, seg, 2, D)  # ... except the 2nd half of frame 1
    cache.append(frames, frames)
    scores = segment_scores(cache.k.transpose(1, 2), T, seg, num_frames=4)  # [1, 3, 2]
    assert scores[0].argmin().item() == 1  # frame 0 -> 1, second segment changed
    changed = scores[0].flatten().topk(1, largest=False).indices.item()
    f, s = divmod(changed, scores.shape[-1])
    keep = torch.cat([torch.arange(f * T + s * seg, f * T + (s + 1) * seg), torch.arange(3 * T, 4 * T)])
    cache.compact([keep, keep])
    assert cache.lengths.tolist() == [seg + T] * 2
    assert torch.equal(cache.k[0, 0, : seg + T], frames[0, keep, 0])


def test_make_kv_cache_by_name():
    cache = make_kv_cache("sink_window", sink_tokens=1, window_tokens=2, batch=1, heads=1, head_dim=D,
                          chunk_capacity=2)
    assert isinstance(cache, SinkWindowKVCache)
    with pytest.raises(UserError, match="unknown KV cache 'ring'"):
        make_kv_cache("ring")


def test_kernels_readme_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "kernels" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "kernels/README.md lost its Python example"
    for block in blocks:
        exec(compile(block, "kernels/README.md", "exec"), {})  # noqa: S102 - our own README
