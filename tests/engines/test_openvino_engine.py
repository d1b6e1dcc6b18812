"""What is particular to the OpenVINO engine, on the real default model, through the engine interface.

Both pipelines are covered on the CPU: continuous batching (CPU/GPU) and the
single-request pipeline that an NPU uses (its NPU properties cannot be exercised here).
Behaviour every engine shares (reproducible greedy output, exact max_tokens, closing a
stream, concurrency, stop strings, usage) is in test_conformance.py, which runs both.
"""

from __future__ import annotations

import asyncio

import pytest

from app.default_model import default_model_path
from engines.base import FinishReason, GenerationRequest, SamplingParams
from engines.openvino_engine import OpenVINOEngine, OpenVINOOptions

STORY = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]


@pytest.fixture(scope="module", params=["continuous", "single"])
def engine(request):
    engine = OpenVINOEngine(default_model_path(), OpenVINOOptions(devices=("CPU",), pipeline=request.param))
    engine.start()
    yield engine
    engine.stop()


def prompt(engine: OpenVINOEngine, messages=STORY) -> tuple[int, ...]:
    return tuple(engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages)))


async def run(engine, request_id: str, max_tokens: int, **sampling) -> tuple[list[int], FinishReason]:
    tokens, finish = [], None
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    async for chunk in engine.generate(GenerationRequest(request_id, prompt(engine), params)):
        tokens.extend(chunk.token_ids)
        finish = chunk.finish_reason
    return tokens, finish


async def test_reports_the_device_and_the_failed_devices(engine):
    assert engine.info.device == "CPU"
    assert engine.info.max_concurrency == (1 if engine._options.pipeline == "single" else 32)
    assert engine.is_healthy()


async def test_seeded_sampling_is_reproducible(engine):
    first, _ = await run(engine, "s1", 16, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    second, _ = await run(engine, "s2", 16, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    assert first == second


async def test_stops_at_end_of_sequence(engine):
    tokens, finish = await run(engine, "eos", 200)
    if finish == FinishReason.STOP:
        assert tokens[-1] in engine.tokenizer.eos_token_ids
    else:  # a story longer than 200 tokens: then it must have been cut by the limit
        assert len(tokens) == 200


async def test_a_killed_worker_fails_requests_then_comes_back(engine):
    import os
    import signal

    os.kill(engine.worker_pids[0], signal.SIGKILL)
    for _ in range(100):
        if not engine.is_healthy():
            break
        await asyncio.sleep(0.05)
    assert not engine.is_healthy()
    for _ in range(600):
        if engine.is_healthy():
            break
        await asyncio.sleep(0.1)
    assert engine.is_healthy()
    tokens, _ = await run(engine, "revived", 4)
    assert len(tokens) == 4
