"""Benchmark of the compressed-KV-cache kernels against torch on the same work (``vgen bench kernels``).

Shapes default to Wan-1.3B at 480P: 12 heads of 128, 1560 tokens per latent frame, a 3-frame query chunk, caches
of 5 to 21 frames (the current chunk included). Measured, each against a baseline run in the same process:

* kernel 1 (:func:`vgen.kernels.segment_attention`) TFLOP/s vs ``scaled_dot_product_attention`` with the cuDNN
  and FLASH backends, on one contiguous segment and on a sink + wrapped ring + chunk table of equal length;
* a compressed cache (static heads keep ``--kept-frames`` frames, the other heads one more, as Forcing-KV) vs
  full-cache SDPA, and vs Forcing-KV's two SDPA calls on contiguous head groups;
* kernels 2 and 3 in GB/s vs the device's copy bandwidth (``Tensor.copy_``).

Times are medians over CUDA events with the L2 cache flushed before each call. The result is one JSON object on
stdout (and optionally a Markdown table). Without a CUDA device nothing is measured: the JSON says so, lists the
planned cases, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", type=int, default=12, help="attention heads (Wan-1.3B: 12)")
    parser.add_argument("--head-dim", type=int, default=128, choices=[32, 64, 128], help="head dimension")
    parser.add_argument("--frame-tokens", type=int, default=1560, help="tokens per latent frame (480P: 1560)")
    parser.add_argument("--chunk-frames", type=int, default=3, help="latent frames per query chunk")
    parser.add_argument("--cache-frames", default="5,9,13,17,21",
                        help="comma-separated cache sizes in latent frames, current chunk included")
    parser.add_argument("--kept-frames", type=int, default=5,
                        help="frames a static head keeps in the compressed cache (dynamic heads keep one more)")
    parser.add_argument("--static-heads", type=int, default=5, help="heads that are static in the compressed case")
    parser.add_argument("--compact-frames", type=int, default=2, help="frames of rows gathered by the compaction")
    parser.add_argument("--score-frames", type=int, default=4, help="frames in the segment-scoring chain")
    parser.add_argument("--segment-tokens", type=int, default=260, help="tokens per scored segment (1560 / 6)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before each measurement")
    parser.add_argument("--rep", type=int, default=30, help="timed calls per measurement (median reported)")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    parser.add_argument("--markdown", default=None, help="also write a Markdown table to this file")


def _cache_frames(args) -> list[int]:
    from vgen.errors import UserError

    try:
        frames = [int(x) for x in str(args.cache_frames).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--cache-frames must be comma-separated integers, got {args.cache_frames!r}") from None
    if not frames or min(frames) <= args.chunk_frames:
        raise UserError(f"--cache-frames must all exceed --chunk-frames={args.chunk_frames}, got {frames}")
    if args.kept_frames + 1 > max(frames) or args.kept_frames <= args.chunk_frames:
        raise UserError(f"--kept-frames must lie in ({args.chunk_frames}, {max(frames) - 1}], got {args.kept_frames}")
    if not 0 <= args.static_heads <= args.heads:
        raise UserError(f"--static-heads must lie in [0, {args.heads}], got {args.static_heads}")
    return frames


def attention_flops(heads: int, q_len: int, k_len: int, head_dim: int, batch: int = 1) -> int:
    """Non-causal attention FLOPs: two matmuls of ``2 * Lq * Lk * D`` each, per head."""
    return 4 * batch * heads * q_len * k_len * head_dim


def plan(args) -> dict:
    """The cases the benchmark measures, with their work (FLOPs, bytes); pure arithmetic, no device needed."""
    frames = _cache_frames(args)
    T, H, D = args.frame_tokens, args.heads, args.head_dim
    es = 2  # bytes per element, bf16 and fp16
    lq = args.chunk_frames * T
    kept = [args.kept_frames] * args.static_heads + [args.kept_frames + 1] * (H - args.static_heads)
    return {
        "attention": [{"cache_frames": f, "q_len": lq, "k_len": f * T, "flops": attention_flops(H, lq, f * T, D)}
                      for f in frames],
        "compressed": {
            "full_cache_frames": max(frames),
            "kept_frames_per_head": kept,
            "flops": sum(attention_flops(1, lq, n * T, D) for n in kept),
            "full_flops": attention_flops(H, lq, max(frames) * T, D),
        },
        "compaction": {"rows_per_head": args.compact_frames * T, "source_rows": max(frames) * T,
                       "bytes": 2 * 2 * H * args.compact_frames * T * D * es},  # K and V, read + write
        "scores": {"frames": args.score_frames, "heads": H - args.static_heads, "segment_tokens": args.segment_tokens,
                   "bytes": args.score_frames * T * (H - args.static_heads) * D * es},  # each frame once
    }


class _Timer:
    """Median milliseconds of a CUDA callable, L2 flushed before each call."""

    def __init__(self, warmup: int, rep: int):
        import torch

        self.warmup, self.rep = warmup, rep
        self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> float:
        import torch

        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.rep)]
        for start, end in zip(starts, ends):
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
        return times[len(times) // 2]


def _sdpa_ms(timer, q, k, v, backend_name: str):
    """SDPA time on ``[B, H, L, D]`` inputs with one backend forced, or None when that backend refuses."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    try:
        with sdpa_kernel([backend]):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    except RuntimeError:
        return None


def _measure(args, planned: dict, *, device: str = "cuda", timer=None, copy_bytes: int = 256 * 1024 * 1024) -> dict:
    """Run every planned case. ``device``/``timer``/``copy_bytes`` exist so tests can drive this on CPU."""
    import torch
    from vgen.kernels import compact_kv, segment_attention, segment_scores

    dtype = getattr(torch, DTYPES[args.dtype])
    T, H, D, dev = args.frame_tokens, args.heads, args.head_dim, device
    lq = args.chunk_frames * T
    timer = timer or _Timer(args.warmup, args.rep)
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype, generator=gen)
    tflops = lambda flops, ms: round(flops / (ms * 1e-3) / 1e12, 1) if ms else None

    q_bhld = rnd(1, H, lq, D)
    q = q_bhld.transpose(1, 2)  # [B, Lq, H, D] view
    k_max = max(row["k_len"] for row in planned["attention"])
    pool_k, pool_v = rnd(1, H, k_max, D), rnd(1, H, k_max, D)  # head-major pools [B, H, N, D]
    kview, vview = pool_k.transpose(1, 2), pool_v.transpose(1, 2)
    ints = {"dtype": torch.int32, "device": dev}

    attention = []
    for row in planned["attention"]:
        lk = row["k_len"]
        kk, vv = pool_k[:, :, :lk], pool_v[:, :, :lk]
        one = (torch.zeros(H, 1, **ints), torch.full((H, 1), lk, **ints))
        hist = lk - lq  # sink (1 frame) + ring wrapped in the middle + chunk: same keys, 4 segments
        ring = hist - T
        ptr = ring // 2
        table = (torch.tensor([0, T + ptr, T, hist], **ints).expand(H, 4).contiguous(),
                 torch.tensor([T, ring - ptr, ptr, lq], **ints).expand(H, 4).contiguous())
        out = segment_attention(q, kview, vview, *one)
        ref = torch.nn.functional.scaled_dot_product_attention(q_bhld, kk, vv).transpose(1, 2)
        ms = {
            "sdpa_cudnn": _sdpa_ms(timer, q_bhld, kk, vv, "CUDNN_ATTENTION"),
            "sdpa_flash": _sdpa_ms(timer, q_bhld, kk, vv, "FLASH_ATTENTION"),
            "kernel1_one_segment": timer(lambda one=one: segment_attention(q, kview, vview, *one)),
            "kernel1_sink_ring_chunk": timer(lambda table=table: segment_attention(q, kview, vview, *table)),
        }
        best_sdpa = min(t for t in (ms["sdpa_cudnn"], ms["sdpa_flash"]) if t) if (ms["sdpa_cudnn"] or
                                                                                  ms["sdpa_flash"]) else None
        attention.append({
            **row,
            "ms": {name: round(t, 4) if t else None for name, t in ms.items()},
            "tflops": {name: tflops(row["flops"], t) for name, t in ms.items()},
            "kernel1_vs_best_sdpa": round(best_sdpa / ms["kernel1_one_segment"], 3) if best_sdpa else None,
            "max_abs_err_vs_sdpa": float((out.float() - ref.float()).abs().max()),
        })

    comp = planned["compressed"]
    kept_len = torch.tensor(comp["kept_frames_per_head"], **ints) * T
    hist_len = kept_len - lq
    # history rows at the start of each head's pool, the chunk at the end: two segments per head
    table = (torch.stack([torch.zeros(H, **ints), torch.full((H,), k_max - lq, **ints)], 1),
             torch.stack([hist_len, torch.full((H,), lq, **ints)], 1))
    ms_comp = timer(lambda: segment_attention(q, kview, vview, *table))
    largest = attention[-1]["ms"]
    full_sdpa = min((t for t in (largest["sdpa_cudnn"], largest["sdpa_flash"]) if t), default=None)
    groups = [(0, args.static_heads), (args.static_heads, H)]  # Forcing-KV: one SDPA call per contiguous group
    group_inputs = [(q_bhld[:, a:b].contiguous(), pool_k[:, a:b, : int(kept_len[a])].contiguous(),
                     pool_v[:, a:b, : int(kept_len[a])].contiguous()) for a, b in groups if b > a]

    def two_sdpa():
        for gq, gk, gv in group_inputs:
            torch.nn.functional.scaled_dot_product_attention(gq, gk, gv)

    ms_two = timer(two_sdpa)
    compressed = {
        **comp,
        "ms": {"kernel1_compressed": round(ms_comp, 4), "sdpa_two_groups": round(ms_two, 4),
               "full_cache_best_sdpa": round(full_sdpa, 4) if full_sdpa else None,
               "full_cache_kernel1": largest["kernel1_one_segment"]},
        "tflops_kernel1": tflops(comp["flops"], ms_comp),
        "speedup_vs_full_cache_sdpa": round(full_sdpa / ms_comp, 2) if full_sdpa else None,
    }

    # kernel 2: gather compact_frames frames' worth of random rows per head out of the largest cache, K and V
    m = planned["compaction"]["rows_per_head"]
    index = torch.sort(torch.rand(H, k_max, device=dev, generator=gen).argsort(1)[:, :m], 1).values.to(torch.int32)
    dst_k, dst_v = torch.empty(1, H, m, D, device=dev, dtype=dtype), torch.empty(1, H, m, D, device=dev, dtype=dtype)
    nbytes = planned["compaction"]["bytes"]
    ms_gather = timer(lambda: compact_kv(kview, vview, index, dst_k.transpose(1, 2), dst_v.transpose(1, 2)))
    rows = index.long()[None, :, :, None].expand(1, H, m, D)
    ms_torch_gather = timer(lambda: (torch.gather(pool_k, 2, rows), torch.gather(pool_v, 2, rows)))
    copy_src = torch.empty(copy_bytes, dtype=torch.int8, device=dev)
    copy_dst = torch.empty_like(copy_src)
    copy_gbs = 2 * copy_src.numel() / (timer(lambda: copy_dst.copy_(copy_src)) * 1e-3) / 1e9
    gbs = lambda b, t: round(b / (t * 1e-3) / 1e9, 1)
    compaction = {**planned["compaction"], "ms": round(ms_gather, 4), "gbs": gbs(nbytes, ms_gather),
                  "torch_gather_gbs": gbs(nbytes, ms_torch_gather),
                  "fraction_of_copy": round(nbytes / (ms_gather * 1e-3) / 1e9 / copy_gbs, 3)}

    sc = planned["scores"]
    heads = torch.arange(args.static_heads, H, **ints)
    ms_scores = timer(lambda: segment_scores(kview, T, sc["segment_tokens"], num_frames=sc["frames"], heads=heads))
    scores = {**sc, "ms": round(ms_scores, 4), "gbs": gbs(sc["bytes"], ms_scores),
              "fraction_of_copy": round(sc["bytes"] / (ms_scores * 1e-3) / 1e9 / copy_gbs, 3)}

    ratios = [r["kernel1_vs_best_sdpa"] for r in attention if r["kernel1_vs_best_sdpa"]]
    speedup = compressed["speedup_vs_full_cache_sdpa"]
    return {
        "attention": attention,
        "compressed": compressed,
        "compaction": compaction,
        "scores": scores,
        "copy_gbs": round(copy_gbs, 1),
        "targets": {
            "kernel1_at_least_90pct_of_best_sdpa": min(ratios) >= 0.9 if ratios else None,
            "compressed_at_least_3x_faster_than_full_cache_sdpa": speedup >= 3.0 if speedup else None,
            "compaction_at_least_70pct_of_copy": compaction["fraction_of_copy"] >= 0.7,
            "scores_at_least_70pct_of_copy": scores["fraction_of_copy"] >= 0.7,
        },
    }


def to_markdown(result: dict) -> str:
    """The measured tables for ``kernels/README.md``."""
    header = ("| cache frames | Lk | SDPA cuDNN TF/s | SDPA flash TF/s | kernel 1 TF/s | kernel 1, 4 segments TF/s "
              "| kernel 1 / best SDPA |")
    lines = [f"Device: {result['device']} (torch {result['torch']}, triton {result['triton']}, {result['dtype']})", "",
             header, "|---|---|---|---|---|---|---|"]
    for r in result["attention"]:
        t = r["tflops"]
        lines.append(f"| {r['cache_frames']} | {r['k_len']} | {t['sdpa_cudnn']} | {t['sdpa_flash']} | "
                     f"{t['kernel1_one_segment']} | {t['kernel1_sink_ring_chunk']} | {r['kernel1_vs_best_sdpa']} |")
    c = result["compressed"]
    lines += ["", "| compressed case | ms |", "|---|---|",
              f"| full cache ({c['full_cache_frames']} frames), best SDPA | {c['ms']['full_cache_best_sdpa']} |",
              f"| full cache ({c['full_cache_frames']} frames), kernel 1 | {c['ms']['full_cache_kernel1']} |",
              f"| kernel 1, kept frames per head {c['kept_frames_per_head']} | {c['ms']['kernel1_compressed']} |",
              f"| two SDPA calls on contiguous head groups | {c['ms']['sdpa_two_groups']} |",
              f"| speedup of compressed kernel 1 vs full-cache SDPA | {c['speedup_vs_full_cache_sdpa']}x |",
              "", f"| bandwidth kernel | GB/s | fraction of copy ({result['copy_gbs']} GB/s) |", "|---|---|---|",
              f"| compaction (kernel 2) | {result['compaction']['gbs']} | {result['compaction']['fraction_of_copy']} |",
              f"| torch.gather, same rows | {result['compaction']['torch_gather_gbs']} | |",
              f"| segment scores (kernel 3) | {result['scores']['gbs']} | {result['scores']['fraction_of_copy']} |"]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    """Plan, measure on CUDA if present, print JSON; 1 when nothing could be measured."""
    import torch

    planned = plan(args)
    config = {name: getattr(args, name) for name in ("heads", "head_dim", "frame_tokens", "chunk_frames",
                                                     "cache_frames", "kept_frames", "static_heads", "compact_frames",
                                                     "score_frames", "segment_tokens", "dtype", "warmup", "rep")}
    result = {"benchmark": "kernels", "config": config, "torch": torch.__version__}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    if not torch.cuda.is_available() or result["triton"] is None:
        why = "no CUDA device" if not torch.cuda.is_available() else "triton is not installed"
        result.update(status="skipped", reason=f"{why}: the kernel benchmark needs a CUDA GPU with triton; "
                      "nothing was measured", device=None, planned=planned)
        code = 1
    else:
        result.update(status="ok", device=torch.cuda.get_device_name(), dtype=args.dtype, **_measure(args, planned))
        code = 0
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if code:
        print(f"vgen bench kernels: {result['reason']}", file=sys.stderr)
    elif args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(result))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
