"""Timing on the GPU for the benchmark scripts: CUDA events around graph replays, median."""

from __future__ import annotations

import statistics

import torch


def median_replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 15) -> float:
    """Median GPU time of one replay of a captured graph (events on the stream, so no host gaps)."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
