"""The W4A16 matmul's achieved bandwidth next to bf16 matmul (cuBLAS), on Llama-3-8B's layer shapes.

Effective GB/s = bytes the matmul must move (weights with scales and zero points, activations
in, results out) / median time. Each timing replays a CUDA graph of 8 calls that cycle over 8
copies of the weights (more than the L2 cache holds), so neither launch gaps nor cache hits
flatter the figure. The weights are laid out as a loaded model keeps them (scales and zero points
group by group, words tile by tile; `--row-major-scales`, `--row-major-words`: as in files).
`--sweep` also tries tile configurations and prints the best per row count
(what `int4_kernels.GEMV_CONFIG`, `DOT_CONFIGS` and `WGMMA_SHAPES` hold). One command:

    python benchmarks/int4_kernels.py [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_timing import median_replay_ms  # noqa: E402
from engines.native.int4_kernels import (SKINNY_MAX_ROWS, SKINNY_ROWS, WGMMA_MAX_ROWS, DotConfig,  # noqa: E402
                                         GemvConfig, WgmmaConfig, int4_matmul, kernel_config, skinny_config)
from engines.native.quantization import group_size_for, quantize_rtn  # noqa: E402

# (name, N, K, gated) for one decoder layer.
LAYERS = {"llama-3-8b": [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 28672, 4096, True),
                         ("down", 4096, 14336, False)],
          "smollm2-135m": [("qkv", 960, 576, False), ("o", 576, 576, False), ("gate_up", 3072, 576, True),
                           ("down", 576, 1536, False)]}
LAYER = LAYERS["llama-3-8b"]
COPIES = 8


def graph_time_ms(calls) -> float:
    """Median time of one call, from replays of a graph holding all `calls` once each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_replay_ms(graph) / len(calls)


ROW_MAJOR_SCALES = False  # --row-major-scales: as in files, not as loaded models keep them
ROW_MAJOR_WORDS = False  # --row-major-words: as in files, not tile by tile as loaded models keep them


def make_weights(n: int, k: int):
    generator = torch.Generator(device="cuda").manual_seed(n + k)
    dense = [torch.randn(n, k, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    quantized = [quantize_rtn(w) for w in dense]
    if not ROW_MAJOR_SCALES:
        quantized = [weight.group_major() for weight in quantized]
    if not ROW_MAJOR_WORDS:  # Int4Linear's layout (quantization.py); as it is where it does not apply
        quantized = [weight.tile() for weight in quantized]
    return dense, quantized


def int4_bytes(weight, rows: int, gated: bool) -> int:
    n, k = weight.shape
    return weight.nbytes() + rows * k * 2 + rows * (n // 2 if gated else n) * 2


def measure(rows_list, sweep: bool) -> None:
    results = {}  # (rows, name) -> (bf16 ms, int4 ms, bytes bf16, bytes int4)
    best_configs = {}  # rows -> {config: ms summed over the layer's matmuls}
    best_per_matmul = {}  # (rows, name) -> (ms, config)
    group = group_size_for(min(k for _, _, k, _ in LAYER))  # the smallest K sets the group (SmolLM2: 64)
    for name, n, k, gated in LAYER:
        dense, quantized = make_weights(n, k)
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            bf16_ms = graph_time_ms([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])
            int4_ms = graph_time_ms([lambda w=w: int4_matmul(x, w, gated=gated) for w in quantized])
            results[rows, name] = (bf16_ms, int4_ms, n * k * 2 + rows * (k + n) * 2,
                                   int4_bytes(quantized[0], rows, gated))
            if sweep:
                for config in candidate_configs(rows, quantized[0].group_size, n):
                    try:
                        ms = graph_time_ms([lambda w=w: int4_matmul(x, w, gated=gated, config=config)
                                            for w in quantized])
                    except Exception as error:  # noqa: BLE001 - a config that does not compile
                        print(f"config {config} failed: {type(error).__name__}: {str(error)[:200]}")
                        ms = float("inf")  # ranks last
                    best_configs.setdefault(rows, {}).setdefault(config, 0.0)
                    best_configs[rows][config] += ms
                    if ms < best_per_matmul.get((rows, name), (float("inf"),))[0]:
                        best_per_matmul[rows, name] = (ms, config)
        del dense, quantized
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: matmul effective GB/s (median), one layer's shapes")
    print(f"{'rows':>5} {'matmul':>8} {'N x K':>12} {'bf16 us':>8} {'bf16 GB/s':>10} {'int4 us':>8} "
          f"{'int4 GB/s':>10} {'int4 speedup':>13}")
    for (rows, name), (bf16_ms, int4_ms, bf16_bytes, q_bytes) in results.items():
        n, k = next((n, k) for layer, n, k, _ in LAYER if layer == name)
        print(f"{rows:>5} {name:>8} {f'{n}x{k}':>12} {bf16_ms * 1000:8.1f} {bf16_bytes / bf16_ms / 1e6:10.0f} "
              f"{int4_ms * 1000:8.1f} {q_bytes / int4_ms / 1e6:10.0f} {bf16_ms / int4_ms:12.2f}x")
    for rows in rows_list:
        bf16_total = sum(results[rows, name][0] for name, *_ in LAYER)
        int4_total = sum(results[rows, name][1] for name, *_ in LAYER)
        configs = "; ".join(f"{name} {kernel_config(rows, group, n)}" for name, n, _, _ in LAYER)
        print(f"rows {rows:>3}: one layer's four matmuls: bf16 {bf16_total * 1000:.0f} us, int4 {int4_total * 1000:.0f} us "
              f"({bf16_total / int4_total:.2f}x); int4 tile configs: {configs}")
    for rows, totals in best_configs.items():  # the current choice is per matmul (kernel_config's n)
        ranked = sorted(totals.items(), key=lambda item: item[1])[:5]
        current = sum(results[rows, name][1] for name, *_ in LAYER)
        print(f"sweep rows {rows:>3}: best single config " + "; ".join(f"{c} {t * 1000:.0f} us" for c, t in ranked)
              + f" (current per-matmul configs: {current * 1000:.0f} us)")
        for name, *_ in LAYER:
            ms, config = best_per_matmul[rows, name]
            print(f"sweep rows {rows:>3} {name:>8}: best {config} {ms * 1000:.1f} us "
                  f"(current {results[rows, name][1] * 1000:.1f} us)")


def candidate_configs(rows: int, group_size: int = 128, n: int | None = None):
    """The current choice first, then tiles for the GEMV (groups of 64, up to 4 rows), the skinny
    kernel (up to 16 rows) next to the tile kernel's former choices, or the tile kernel."""
    configs = [kernel_config(rows, group_size, n)]
    if group_size < 128 and rows <= 4:
        configs += [GemvConfig(*c) for c in itertools.product([4, 8, 16, 32], [1024], [1, 2, 4], [1])]
    elif group_size >= 128 and rows <= SKINNY_MAX_ROWS:
        configs += [skinny_config(block_n, per_sm, warps, waves)
                    for block_n, warps, per_sm, waves in [(64, 4, 4, 1), (64, 4, 8, 1), (128, 4, 2, 1), (128, 4, 4, 1),
                                                          (128, 4, 4, 2), (128, 8, 2, 1), (128, 8, 2, 2)]]
        configs += [DotConfig(16, 128, 528, 4, 3), DotConfig(16, 256, 264, 4, 3)]
    elif group_size >= 128:
        block_m = 16 if rows <= 16 else 64
        configs += [DotConfig(block_m, block_n, programs, warps, stages)
                    for block_n, programs, warps, stages in itertools.product([128, 256], [264, 528], [4, 8], [3])]
    if group_size >= 128 and SKINNY_ROWS < rows <= WGMMA_MAX_ROWS:  # 9-128 rows: Hopper's wgmma
        tiles = [(128, 8), (64, 4)] + ([(128, 4), (256, 8)] if rows <= 64 else [])  # wider ones spill at 128 rows
        configs += [WgmmaConfig(block_n, warps, programs, x_ahead) for (block_n, warps), programs, x_ahead
                    in itertools.product(tiles, [132, 264, 528], [1, 2])]
        configs += [WgmmaConfig(block_n, 8, programs, 1, ring)  # words through a shared-memory ring
                    for block_n, programs, ring in itertools.product([128, 256], [132, 264], [3, 4])]
    return list(dict.fromkeys(configs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also try tile configurations")
    parser.add_argument("--rows", default="1,4,16,64")
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(LAYERS))
    parser.add_argument("--row-major-scales", action="store_true",
                        help="scales and zeros row by row (as in files) rather than group by group (as models hold them)")
    parser.add_argument("--row-major-words", action="store_true",
                        help="words row by row (as in files) rather than tile by tile (as models hold them)")
    arguments = parser.parse_args()
    ROW_MAJOR_SCALES = arguments.row_major_scales
    ROW_MAJOR_WORDS = arguments.row_major_words
    LAYER[:] = LAYERS[arguments.model]
    measure([int(r) for r in arguments.rows.split(",")], arguments.sweep)
