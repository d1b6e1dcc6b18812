"""How fast the INT4 weights of one Llama-3-8B layer can merely be read, next to the INT4 matmul.

A Triton kernel that only loads the packed words (and xors them, so the loads stay) in the
tensor-core kernel's own pattern (per step a [rows, words] tile: 64-byte pieces of many weight
rows, K split over programs) and in contiguous blocks, over a sweep of tile sizes, splits,
warps and stages; the best of each is the floor a matmul in Triton could reach on this GPU.
Timed like benchmarks/int4_kernels.py (a CUDA graph cycling over 8 copies of the weights). One
command:

    python benchmarks/int4_read_floor.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.int4_kernels import LAYER, graph_time_ms, make_weights  # noqa: E402
from engines.native.int4_kernels import int4_matmul  # noqa: E402


@triton.jit
def _read_kernel(q_ptr, out_ptr, stride_q, steps, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                 CONTIGUOUS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    bits = tl.zeros((BLOCK_N, WORDS), tl.int32)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for step in range(steps):
        if CONTIGUOUS:  # each program's steps are consecutive blocks of the buffer
            base = ((pid_n * tl.num_programs(1) + pid_k) * steps + step) * (BLOCK_N * WORDS)
            pointers = q_ptr + base + tl.arange(0, BLOCK_N)[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
        else:  # the matmul's pattern: WORDS words of each of BLOCK_N rows
            pointers = (q_ptr + rows[:, None] * stride_q + (pid_k * steps + step) * WORDS
                        + tl.arange(0, WORDS)[None, :])
        bits ^= tl.load(pointers, eviction_policy="evict_first")
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tl.sum(tl.sum(bits, axis=1), axis=0))


def read_weights(qweight: torch.Tensor, out: torch.Tensor, block_n: int, split: int, contiguous: bool, warps: int,
                 stages: int, words: int) -> None:
    n, row_words = qweight.shape
    _read_kernel[(n // block_n, split)](qweight, out, qweight.stride(0), row_words // words // split,
                                        BLOCK_N=block_n, WORDS=words, CONTIGUOUS=contiguous, num_warps=warps,
                                        num_stages=stages)


def main() -> None:
    out = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
    print(f"{torch.cuda.get_device_name()}: reading one layer's INT4 words (no scales) vs the INT4 matmul at 1 row")
    print(f"{'matmul':>8} {'MB':>6} {'matmul us':>10} {'read us':>8} {'read GB/s':>10}  best read (contiguous: us)")
    for name, n, k, gated in LAYER:
        dense, quantized = make_weights(n, k)
        del dense  # only the INT4 copies are read
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        matmul_ms = graph_time_ms([lambda w=w: int4_matmul(x, w, gated=gated) for w in quantized])
        megabytes = quantized[0].qweight.numel() * 4 / 1e6
        best: dict[bool, tuple[float, str]] = {}
        best_piece: dict[int, float] = {}  # the strided pattern by bytes read per row and step
        for block_n, split, contiguous, warps, stages, words in itertools.product(
                (64, 256), (1, 2, 4, 8, 16), (False, True), (4, 8), (2, 4), (16, 32, 64)):
            if (n // block_n) * split > 4096 or (k // 8) // words % split:
                continue
            ms = graph_time_ms([lambda w=w: read_weights(w.qweight, out, block_n, split, contiguous, warps, stages,
                                                         words) for w in quantized])
            if not contiguous:
                best_piece[words * 4] = min(ms, best_piece.get(words * 4, float("inf")))
            if contiguous not in best or ms < best[contiguous][0]:
                best[contiguous] = (ms, f"{block_n} rows x {words} words, split {split}, {warps} warps, "
                                        f"{stages} stages")
        strided_ms, strided = best[False]
        print(f"{name:>8} {megabytes:6.1f} {matmul_ms * 1000:10.1f} {strided_ms * 1000:8.1f} "
              f"{megabytes / strided_ms:10.0f}  {strided} (contiguous: {best[True][0] * 1000:.1f}; by bytes per row "
              f"and step: " + ", ".join(f"{size} B {ms * 1000:.1f}" for size, ms in sorted(best_piece.items())) + ")")
        del quantized
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
