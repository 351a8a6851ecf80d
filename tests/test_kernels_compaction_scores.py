"""Compaction (kernel 2) and segment scoring (kernel 3): Triton under the interpreter vs the PyTorch references."""

import pytest
import torch
from vgen.kernels import compact_kv, compact_kv_reference, pad_index_lists, segment_scores, segment_scores_reference

needs_interpreter = pytest.mark.usefixtures("triton_interpreter")
DTYPES = [torch.float32, torch.float16]


def _pool(B, N, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, H, D, generator=g).to(dtype), torch.randn(B, N, H, D, generator=g).to(dtype)


def test_pad_index_lists():
    index = pad_index_lists([torch.tensor([4, 7]), [], torch.arange(3)])
    assert index.dtype == torch.int32
    assert index.tolist() == [[4, 7, -1], [-1, -1, -1], [0, 1, 2]]


def test_compaction_reference_matches_loop():
    B, N, H, D = 2, 30, 4, 8
    k, v = _pool(B, N, H, D, torch.float32)
    lists = [torch.tensor([0, 5, 29]), torch.arange(10, 20)]  # 2 groups of 2 heads
    k_dst, v_dst = torch.zeros(B, 12, H, D), torch.zeros(B, 12, H, D)
    compact_kv_reference(k, v, pad_index_lists(lists), k_dst, v_dst, dst_start=1)
    for h in range(H):
        rows = lists[h // 2]
        assert torch.equal(k_dst[:, 1 : 1 + len(rows), h], k[:, rows, h])
        assert torch.equal(v_dst[:, 1 : 1 + len(rows), h], v[:, rows, h])
        assert torch.all(k_dst[:, 1 + len(rows) :, h] == 0) and torch.all(k_dst[:, 0, h] == 0)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_compaction_triton_matches_reference(dtype, groups):
    B, N, H, D = 2, 45, 6, 40  # D not a power of two; 40 rows kept max: tiles of 16 with a tail
    k, v = _pool(B, N, H, D, dtype, seed=groups)
    g = torch.Generator().manual_seed(groups)
    lists = [torch.sort(torch.randperm(N, generator=g)[: int(torch.randint(0, 41, (1,), generator=g))]).values
             for _ in range(groups)]
    lists[0] = torch.tensor([N - 1])  # a single kept row, the last one
    index = pad_index_lists(lists)
    outs = []
    for backend in ("triton", "reference"):
        dst = torch.full((B, H, 48, D), 7.0).to(dtype)  # head-major destination, seen as [B, N, H, D]
        k_dst, v_dst = dst.clone().transpose(1, 2), dst.clone().transpose(1, 2)
        compact_kv(k, v, index, k_dst, v_dst, dst_start=3, backend=backend)
        outs.append((k_dst, v_dst))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][0][:, 3, 0], k[:, N - 1, 0])  # the single kept row of group 0
    assert torch.all(outs[0][0][:, 4:, 0] == 7)  # padding (-1) wrote nothing


def test_compaction_rejects_bad_shapes():
    k, v = _pool(1, 10, 4, 8, torch.float32)
    dst = torch.zeros(1, 10, 4, 8)
    with pytest.raises(ValueError, match="G dividing H=4"):
        compact_kv(k, v, torch.zeros(3, 2, dtype=torch.int32), dst, dst.clone())
    with pytest.raises(ValueError, match="out of range"):
        compact_kv(k, v, torch.tensor([[10]]), dst, dst.clone())
    with pytest.raises(ValueError, match="do not fit"):
        compact_kv(k, v, torch.tensor([[1, 2]]), dst, dst.clone(), dst_start=9)


def test_scores_reference_known_values():
    T, seg = 10, 4  # segments of 4, 4, 2 tokens
    frame0 = torch.randn(1, T, 2, 8)
    frame1 = frame0.clone()
    frame1[:, 8:] *= -3.0  # last segment flips sign: cosine -1
    frame1[:, 0] = torch.randn(1, 2, 8)  # one token of the first segment changes
    k = torch.cat([frame0, frame1])  # frames along the token axis: [1, 2T, 2, 8] after reshape below
    k = k.reshape(1, 2 * T, 2, 8)
    scores = segment_scores_reference(k, T, seg)
    x, y = frame0[0, 0].flatten(), frame1[0, 0].flatten()
    first = (torch.dot(x, y) / (x.norm() * y.norm()) + 3.0) / 4
    assert scores.shape == (1, 1, 3)
    torch.testing.assert_close(scores[0, 0], torch.stack([first, torch.tensor(1.0), torch.tensor(-1.0)]))


def test_scores_reference_heads_and_frame_starts():
    k = torch.randn(1, 30, 3, 4)
    k[:, 20:25, 1] = k[:, 0:5, 1]  # head 1: frame at row 20 repeats frame at row 0
    scores = segment_scores_reference(k, 5, 5, frame_starts=[0, 20], heads=[1])
    torch.testing.assert_close(scores, torch.ones(1, 1, 1))
    assert segment_scores_reference(k, 5, 5, frame_starts=[0, 20], heads=[0, 1]).item() < 0.99


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_triton_matches_reference(dtype):
    B, T, H, D = 2, 26, 5, 24
    k = torch.randn(B, 5 * T, H, D).to(dtype)
    for kwargs in ({"num_frames": 4}, {"frame_starts": [3 * T, T, 4 * T, 0], "heads": [4, 0, 2]}):
        got = segment_scores(k, T, 6, backend="triton", **kwargs)  # segments 6, 6, 6, 6, 2
        want = segment_scores_reference(k, T, 6, **kwargs)
        assert got.shape == want.shape == (B, len(kwargs.get("frame_starts", range(4))) - 1, 5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@needs_interpreter
def test_scores_triton_head_major_view():
    pool = torch.randn(1, 3, 40, 32)  # [B, H, N, D]
    k = pool.transpose(1, 2)
    got = segment_scores(k, 13, 13, num_frames=3, backend="triton")
    torch.testing.assert_close(got, segment_scores_reference(k, 13, 13, num_frames=3), atol=1e-5, rtol=0)
