"""One stream on the default model: the HTTP server against the engine called directly.

Both run in the same session, alternating round by round (the engine in this process,
the server in a subprocess, each idle while the other runs), and the medians are
compared. Goal: served decode tokens/s >= 95% of direct.

    .venv/bin/python benchmarks/serving_overhead.py [--rounds 7] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

from common import Server, median, timed_stream  # noqa: I001 - sets sys.path for app/engines

from app.default_model import DEFAULT_MODEL_ID, default_model_path
from engines.base import GenerationRequest, SamplingParams
from engines.openvino_engine import OpenVINOEngine, OpenVINOOptions

MESSAGES = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper."}]


async def direct_round(engine: OpenVINOEngine, prompt_ids: tuple[int, ...], max_tokens: int, index: int):
    sent = time.perf_counter()
    times, count = [], 0
    request = GenerationRequest(f"direct-{index}", prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0))
    async for chunk in engine.generate(request):
        if chunk.token_ids:
            times.append(time.perf_counter())
            count += len(chunk.token_ids)
    return times[0] - sent, (count - 1) / (times[-1] - times[0]), count


async def served_round(client: httpx.AsyncClient, max_tokens: int):
    timing = await timed_stream(client, {"model": DEFAULT_MODEL_ID, "messages": MESSAGES,
                                         "temperature": 0, "max_tokens": max_tokens})
    return timing.ttft_s, timing.decode_tokens_per_s, timing.completion_tokens


async def main(rounds: int, max_tokens: int) -> None:
    engine = OpenVINOEngine(default_model_path(), OpenVINOOptions(devices=("CPU",)))
    engine.start()
    prompt_ids = tuple(engine.tokenizer.encode(engine.tokenizer.apply_chat_template(MESSAGES)))
    direct, served = [], []
    with Server({"LOWBIT_DEVICE": "CPU"}) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            await served_round(client, 8)  # warm both up
            await direct_round(engine, prompt_ids, 8, -1)
            for index in range(rounds):
                direct.append(await direct_round(engine, prompt_ids, max_tokens, index))
                served.append(await served_round(client, max_tokens))
    engine.stop()

    d_ttft, d_rate = median([r[0] for r in direct]), median([r[1] for r in direct])
    s_ttft, s_rate = median([r[0] for r in served]), median([r[1] for r in served])
    print(f"default model {DEFAULT_MODEL_ID}, 1 stream, greedy, {direct[0][2]} tokens "
          f"(served: {served[0][2]}), {rounds} alternating rounds, medians")
    print(f"{'path':<10}{'decode tok/s':>14}{'TTFT ms':>10}")
    print(f"{'direct':<10}{d_rate:>14.1f}{d_ttft * 1000:>10.1f}")
    print(f"{'served':<10}{s_rate:>14.1f}{s_ttft * 1000:>10.1f}")
    print(f"served/direct decode: {s_rate / d_rate:.3f} (goal >= 0.95); "
          f"TTFT overhead: {(s_ttft - d_ttft) * 1000:+.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=128)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.max_tokens))
