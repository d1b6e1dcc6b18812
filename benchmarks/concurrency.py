"""Aggregate decode throughput at 1, 4, 8 and 16 concurrent streams, and a 5x burst.

Everything goes through the HTTP server on the default model (CPU). The burst runs
against a server limited to 8 running + 8 waiting requests and sends 5x that many at
once: it reports the share refused with 429 and the p99 admission latency (request sent
to response status received). Goal: 8 streams >= 4x one stream's aggregate rate.

    .venv/bin/python benchmarks/concurrency.py [--max-tokens 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

from common import Server, median, percentile, timed_stream  # noqa: I001

from app.default_model import DEFAULT_MODEL_ID


def body(index: int, max_tokens: int) -> dict:
    return {"model": DEFAULT_MODEL_ID, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Write a long essay about the history of city number {index}."}]}


async def aggregate_rate(client: httpx.AsyncClient, streams: int, max_tokens: int) -> float:
    """Output tokens per second over the wall time of `streams` concurrent requests."""
    started = time.perf_counter()
    timings = await asyncio.gather(*(timed_stream(client, body(i, max_tokens)) for i in range(streams)))
    elapsed = time.perf_counter() - started
    assert all(t.status == 200 for t in timings)
    return sum(t.completion_tokens for t in timings) / elapsed


async def burst(client: httpx.AsyncClient, requests: int, max_tokens: int):
    timings = await asyncio.gather(*(timed_stream(client, body(i, max_tokens)) for i in range(requests)))
    statuses = [t.status for t in timings]
    admission_ms = [(t.headers_at - t.sent_at) * 1000 for t in timings]
    return statuses, admission_ms


async def main(max_tokens: int, repeats: int) -> None:
    rates = {}
    with Server({"LOWBIT_DEVICE": "CPU", "LOWBIT_MAX_RUNNING_REQUESTS": "16"}) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
            await aggregate_rate(client, 2, 8)  # warm-up
            for streams in (1, 4, 8, 16):
                rates[streams] = median([await aggregate_rate(client, streams, max_tokens)
                                         for _ in range(repeats)])
    running, waiting = 8, 8
    with Server({"LOWBIT_DEVICE": "CPU", "LOWBIT_MAX_RUNNING_REQUESTS": str(running),
                 "LOWBIT_MAX_WAITING_REQUESTS": str(waiting)}) as server:
        limits = httpx.Limits(max_connections=1000)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as client:
            statuses, admission_ms = await burst(client, 5 * (running + waiting), max_tokens=32)

    print(f"default model {DEFAULT_MODEL_ID} on CPU, greedy, {max_tokens} tokens per stream, "
          f"median of {repeats}")
    print(f"{'streams':>8}{'aggregate tok/s':>17}{'x one stream':>14}")
    for streams, rate in rates.items():
        print(f"{streams:>8}{rate:>17.1f}{rate / rates[1]:>14.2f}")
    print(f"8 streams / 1 stream: {rates[8] / rates[1]:.2f}x (goal >= 4x)")
    others = sorted(set(statuses) - {200, 429})
    print(f"burst of {len(statuses)} requests at {running} running + {waiting} waiting: "
          f"{statuses.count(200)} x 200, {statuses.count(429)} x 429 ({statuses.count(429) / len(statuses):.0%}), "
          f"other statuses: {others or 'none'}")
    print(f"admission latency: p50 {percentile(admission_ms, 0.5):.1f} ms, p99 {percentile(admission_ms, 0.99):.1f} ms "
          f"(429s only: p99 {percentile([a for a, s in zip(admission_ms, statuses) if s == 429] or [0], 0.99):.1f} ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.max_tokens, arguments.repeats))
