"""Where one captured decode step's GPU time goes: kernel by kernel, from the profiler.

Captures the batch-1 (or `--batch`) decode graph of the native engine on random weights,
replays it under torch.profiler and prints each kernel's time per step, the sum, and the
replay's wall time (the difference is the gaps between kernels). One command:

    python benchmarks/profile_decode.py [--shape smollm2-135m] [--quantize int4] [--batch 1]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_timing import median_replay_ms  # noqa: E402
from benchmarks.native_gpu import run_batch  # noqa: E402
from engines.native.model_runner import ModelRunner, RunnerConfig  # noqa: E402


def profile(shape: str, quantize: str | None, batch: int, replays: int = 20) -> None:
    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, kv_cache_tokens=8192, quantize=quantize), shape=shape)
    run_batch(runner, batch, 128, 4)  # captures the graph
    bucket = next(size for size in sorted(runner._graphs) if size >= batch)
    graph, _ = runner._graphs[bucket]
    step_ms = median_replay_ms(graph, replays=30)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name].append(event.device_time)
    rows = sorted(((sum(times) / replays, len(times) / replays, name) for name, times in per_kernel.items()),
                  reverse=True)
    total = sum(us for us, _, _ in rows)
    launches = sum(count for _, count, _ in rows)
    print(f"\n{shape} {quantize or 'bf16'}, batch {batch}: replay {step_ms * 1000:.0f} us/step; kernels "
          f"{total:.0f} us in {launches:.0f} launches (gaps {step_ms * 1000 - total:.0f} us)")
    for us, count, name in rows[:14]:
        print(f"  {us:8.1f} us  {count:5.0f}x  {us / count:6.1f} us each  {name[:90]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--batch", type=int, default=1)
    arguments = parser.parse_args()
    profile(arguments.shape, arguments.quantize, arguments.batch)
