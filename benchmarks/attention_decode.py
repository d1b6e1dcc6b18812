"""The decode-attention kernel's time per call (rope, cache write and attention) for tile / warp / stage choices.

SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64) and Llama-3-8B (32, 8, 128) heads, at
batch 1, 8 and 64, contexts of 256, 2,048 and 8,192 tokens (not 8,192 at batch 64); each timing
replays a CUDA graph of 16 calls (one per layer's cache) and takes the median. The first figure
of each row is the current default (`attention_kernels.decode_tile`, and up to
`context_splits` chunks of context per sequence and KV head), beside it the same tile with the
context in one chunk. One command:

    python benchmarks/attention_decode.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.int4_kernels import graph_time_ms  # noqa: E402
from engines.native import attention_kernels  # noqa: E402
from engines.native.attention_kernels import rope_cache_and_decode_attention  # noqa: E402

HEADS = {"smollm2-135m": (9, 3, 64), "llama-3-8b": (32, 8, 128)}
BLOCK_SIZE = 16
LAYERS = 16


def main() -> None:
    tiles = list(itertools.product([64, 128, 256], [4, 8], [1, 2, 3]))
    print(f"{torch.cuda.get_device_name()}: decode attention, us per call (median)")
    cases = itertools.product(HEADS.items(), (1, 8, 64), (256, 2048, 8192))
    for (shape, (heads, kv_heads, head_dim)), batch, context in cases:
        if batch * context > 64 * 2048:
            continue
        blocks_per_seq = context // BLOCK_SIZE
        caches = [(torch.randn(batch * blocks_per_seq + 1, BLOCK_SIZE, kv_heads, head_dim, device="cuda",
                               dtype=torch.bfloat16),) * 2 for _ in range(LAYERS)]
        tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, blocks_per_seq)
        lengths = torch.full((batch,), context, device="cuda", dtype=torch.long)
        qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
        angles = torch.rand(batch, head_dim // 2, device="cuda") * 100
        cos, sin = angles.cos(), angles.sin()
        slots = tables[:, -1] * BLOCK_SIZE + BLOCK_SIZE - 1  # each sequence's last position
        default = attention_kernels.decode_tile(batch * kv_heads, head_dim, qkv.device)
        times = []
        for tile, warps, stages in [default] + [c for c in tiles if c != default]:
            try:
                ms = graph_time_ms([lambda k=k, v=v: rope_cache_and_decode_attention(
                    qkv, cos, sin, slots, k, v, tables, lengths, heads, head_dim ** -0.5, (tile, warps, stages))
                    for k, v in caches])
            except Exception as error:  # noqa: BLE001 - a config that does not fit
                print(f"  tile {tile} warps {warps} stages {stages}: failed ({type(error).__name__})")
                continue
            times.append((ms * 1000, tile, warps, stages))
        best = sorted(times)[:3]
        unsplit = graph_time_ms([lambda k=k, v=v: rope_cache_and_decode_attention(
            qkv, cos, sin, slots, k, v, tables, lengths, heads, head_dim ** -0.5, default, splits=1)
            for k, v in caches]) * 1000
        splits = attention_kernels.context_splits(batch * kv_heads, qkv.device)
        print(f"{shape:>13} batch {batch:>2} context {context:>4}: default {times[0][0]:6.1f} us (up to {splits} "
              f"chunks; one chunk: {unsplit:.1f} us); best "
              + ", ".join(f"tile {t} warps {w} stages {s}: {us:.1f} us" for us, t, w, s in best))
        del caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
