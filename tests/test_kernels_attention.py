"""Segment attention (kernel 1): Triton under the interpreter vs the PyTorch reference vs a float64 loop oracle."""

import math

import pytest
import torch
import vgen.kernels.attention as sa_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vgen.kernels import segment_attention, segment_attention_reference, segment_rows

needs_interpreter = pytest.mark.usefixtures("triton_interpreter")



def loop_attention(q, k, v, starts, lengths, causal=False):
    """Oracle written differently from the reference: per (batch, head) ``torch.cat`` of the segments, float64.

    ``starts``/``lengths`` are nested lists ``[H][S]``. Returns ``out [B, Lq, H, D]`` float64 and ``lse [B, H, Lq]``.
    """
    B, Lq, H, D = q.shape
    out = torch.zeros(B, Lq, H, D, dtype=torch.float64)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            rows = [torch.arange(s, s + n) for s, n in zip(starts[h], lengths[h])]
            rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
            keys, values = k[b, rows, h].double(), v[b, rows, h].double()
            total = len(rows)
            for i in range(Lq):
                limit = i + total - Lq if causal else total - 1
                if limit < 0 or total == 0:
                    continue
                s = q[b, i, h].double() @ keys[: limit + 1].T / math.sqrt(D)
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, i, h] = torch.softmax(s, 0) @ values[: limit + 1]
    return out, lse


TOL = {torch.float32: 2e-5, torch.float16: 3e-3}

# Per-head segment tables (starts, lengths) over a 64-row pool, each [H=3][S=4]; the Triton tiles are 16 wide.
EDGE_TABLES = {
    "tails": ([[0, 20, 40, 0], [3, 0, 0, 0], [50, 0, 0, 0]], [[17, 3, 19, 0], [33, 0, 0, 0], [14, 0, 0, 0]]),
    "empty_and_single": ([[5, 9, 9, 63], [0, 7, 7, 7], [1, 2, 3, 4]], [[0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]),
    # sink 0..7, ring rows 8..39 wrapped at 21 (oldest piece 29..39, newest 8..28), chunk at 48..63
    "sink_ring_chunk": ([[0, 29, 8, 48]] * 3, [[8, 11, 21, 16]] * 3),
    "head_without_keys": ([[0, 0, 0, 0], [10, 30, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [4, 30, 0, 0], [64, 0, 0, 0]]),
}


def _inputs(B, Lq, H, D, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g).to(dtype)
    k = torch.randn(B, N, H, D, generator=g).to(dtype)
    v = torch.randn(B, N, H, D, generator=g).to(dtype)
    return q, k, v


def _table(name):
    starts, lengths = EDGE_TABLES[name]
    return torch.tensor(starts, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32)


def test_segment_rows_expands_tables():
    rows, valid = segment_rows(torch.tensor([[5, 9, 20]]), torch.tensor([[2, 0, 3]]))
    assert rows.tolist() == [[5, 6, 20, 21, 22]]
    assert valid.all()
    rows, valid = segment_rows(torch.tensor([[0, 7], [3, 0]]), torch.tensor([[1, 1], [0, 0]]))
    assert valid.tolist() == [[True, True], [False, False]]
    assert rows[0].tolist() == [0, 7]


@pytest.mark.parametrize("name", list(EDGE_TABLES))
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_float64_loop(name, causal):
    q, k, v = _inputs(2, 20, 3, 32, 64, torch.float32)
    starts, lengths = EDGE_TABLES[name]
    out, lse = segment_attention_reference(q, k, v, *_table(name), causal=causal)
    want_out, want_lse = loop_attention(q, k, v, starts, lengths, causal=causal)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0), want_lse.nan_to_num(neginf=0), atol=1e-5, rtol=0)


def test_reference_matches_sdpa_on_one_segment():
    q, k, v = _inputs(1, 12, 2, 16, 40, torch.float32)
    out = segment_attention_reference(q, k, v, torch.tensor([[0], [0]]), torch.tensor([[40], [40]]))[0]
    want = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(EDGE_TABLES))
@pytest.mark.parametrize("causal", [False, True])
def test_triton_matches_reference_edge_cases(dtype, name, causal):
    q, k, v = _inputs(2, 20, 3, 32, 64, dtype)
    out, lse = segment_attention(q, k, v, *_table(name), causal=causal, return_lse=True, backend="triton")
    ref_out, ref_lse = segment_attention_reference(q, k, v, *_table(name), causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[dtype], rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), atol=1e-4, rtol=0)
    if name == "head_without_keys":  # head 0 has no keys: zeros and -inf
        assert torch.all(out[:, :, 0] == 0) and torch.all(lse[:, 0] == float("-inf"))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_triton_head_dims_head_major_pool_batched_table(dtype, head_dim):
    """D in {32, 64, 128}; a head-major pool passed as a strided view; a per-batch segment table."""
    B, Lq, H, N = 2, 9, 2, 50
    q, _, _ = _inputs(B, Lq, H, head_dim, N, dtype, seed=head_dim)
    pool_k = torch.randn(B, H, N, head_dim).to(dtype)  # [B, H, N, D]
    pool_v = torch.randn(B, H, N, head_dim).to(dtype)
    k, v = pool_k.transpose(1, 2), pool_v.transpose(1, 2)
    starts = torch.tensor([[[0, 30], [4, 0]], [[10, 49], [0, 20]]], dtype=torch.int32)  # [B, H, S]
    lengths = torch.tensor([[[17, 20], [1, 0]], [[33, 1], [5, 30]]], dtype=torch.int32)
    out = segment_attention(q, k, v, starts, lengths, causal=True, backend="triton")
    ref = segment_attention_reference(q, k, v, starts, lengths, causal=True)[0]
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=0)
    # batch 1 differs from batch 0 only through its table: the kernel must not read batch 0's rows
    shared = segment_attention_reference(q, k, v, starts[0], lengths[0], causal=True)[0]
    assert (shared[1].float() - ref[1].float()).abs().max() > 1e-2


@needs_interpreter
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_triton_property_random_segment_tables(data):
    H = data.draw(st.integers(1, 3), label="H")
    S = data.draw(st.integers(1, 4), label="S")
    N = data.draw(st.integers(1, 70), label="N")
    Lq = data.draw(st.integers(1, 20), label="Lq")
    causal = data.draw(st.booleans(), label="causal")
    starts, lengths = [], []
    for _ in range(H):
        row_s, row_l = [], []
        for _ in range(S):
            s = data.draw(st.integers(0, N - 1))
            row_s.append(s)
            row_l.append(data.draw(st.integers(0, N - s)))
        starts.append(row_s)
        lengths.append(row_l)
    q, k, v = _inputs(1, Lq, H, 16, N, torch.float32, seed=data.draw(st.integers(0, 1000)))
    table = torch.tensor(starts, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32)
    out, lse = segment_attention(q, k, v, *table, causal=causal, return_lse=True, backend="triton")
    want_out, want_lse = loop_attention(q, k, v, starts, lengths, causal=causal)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    """backend='auto' on CPU must never reach the Triton path, even with the interpreter switched on."""

    def fail(*args, **kwargs):
        raise AssertionError("Triton path called on CPU with backend='auto'")

    monkeypatch.setattr(sa_module, "segment_attention_triton", fail)
    q, k, v = _inputs(1, 5, 2, 16, 12, torch.float32)
    table = torch.tensor([[0], [3]]), torch.tensor([[12], [4]])
    want = segment_attention_reference(q, k, v, *table)[0]
    for env in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", env)
        assert torch.equal(segment_attention(q, k, v, *table), want)


def test_dispatcher_errors_name_the_fix(monkeypatch):
    q, k, v = _inputs(1, 4, 1, 16, 8, torch.float32)
    table = torch.tensor([[0]]), torch.tensor([[8]])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        segment_attention(q, k, v, *table, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        segment_attention(q, k, v, *table, backend="cuda")
    with pytest.raises(ValueError, match="segment tables"):
        segment_attention(q, k, v, torch.tensor([[0, 1]]), torch.tensor([[8]]))


@needs_interpreter
def test_interpreter_refuses_bf16():
    q, k, v = _inputs(1, 4, 1, 16, 8, torch.bfloat16)
    with pytest.raises(RuntimeError, match="no bfloat16"):
        segment_attention(q, k, v, torch.tensor([[0]]), torch.tensor([[8]]), backend="triton")
    # the reference handles bf16 on CPU (computing in float32)
    out = segment_attention(q, k, v, torch.tensor([[0]]), torch.tensor([[8]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_table_gives_zeros_and_neg_inf(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    q, k, v = _inputs(1, 3, 2, 16, 5, torch.float32)
    empty = torch.zeros(2, 0, dtype=torch.int32)
    out, lse = segment_attention(q, k, v, empty, empty, return_lse=True, backend=backend)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
