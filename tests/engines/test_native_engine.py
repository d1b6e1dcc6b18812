"""The native engine on the real default model, on the CPU (reference attention path)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("transformers", reason="needs `make install-prepare` (torch, transformers)")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from app.default_model import default_model_path  # noqa: E402
from engines.base import GenerationRequest, SamplingParams  # noqa: E402
from engines.native.engine import NativeEngine, NativeOptions  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "Write a short story about a fox who finds a key."}],
    [{"role": "system", "content": "You answer in detail."}, {"role": "user", "content": "Explain how tides work."}],
    [{"role": "user", "content": "List some good habits for learning a new language, with reasons."}],
]


@pytest.fixture(scope="module")
def checkpoint(artifacts_dir):
    from engines.prepare.checkpoint import describe_source, to_checkpoint

    work = artifacts_dir / ".work"
    work.mkdir(exist_ok=True)
    return to_checkpoint(describe_source(default_model_path()), work)


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = NativeEngine(checkpoint, NativeOptions(device="cpu", kv_cache_tokens=8192, block_size=16))
    engine.start()
    yield engine
    engine.stop()


def prompt_ids(engine, messages) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))


async def generate(engine, request_id: str, ids: list[int], max_tokens: int, **sampling) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    tokens = []
    async for chunk in engine.generate(GenerationRequest(request_id, tuple(ids), params)):
        tokens.extend(chunk.token_ids)
    return tokens


def test_greedy_output_equals_transformers_alone_and_batched(engine, checkpoint):
    reference = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    prompts = [prompt_ids(engine, messages) for messages in PROMPTS]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            output = reference.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
            expected.append(output[0, len(ids):].tolist())
    assert all(len(tokens) >= 32 for tokens in expected)  # long enough to mean something

    alone = [asyncio.run(generate(engine, f"alone-{i}", ids, 40)) for i, ids in enumerate(prompts)]

    async def batched():
        return await asyncio.gather(*(generate(engine, f"batch-{i}", ids, 40) for i, ids in enumerate(prompts)))

    assert alone == expected
    assert asyncio.run(batched()) == expected  # prompts of different lengths in one batch


def test_seeded_sampling_is_reproducible_inside_a_batch(engine):
    ids = prompt_ids(engine, PROMPTS[0])
    sampling = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 42}
    alone = asyncio.run(generate(engine, "seed-alone", ids, 16, **sampling))

    async def with_others():
        others = [generate(engine, f"other-{i}", prompt_ids(engine, PROMPTS[i]), 16, temperature=1.0)
                  for i in (1, 2)]
        return (await asyncio.gather(generate(engine, "seed-batch", ids, 16, **sampling), *others))[0]

    assert asyncio.run(with_others()) == alone


def test_kv_blocks_are_all_free_when_idle(engine):
    asyncio.run(generate(engine, "blocks", prompt_ids(engine, PROMPTS[0]), 8))
    assert engine.kv_cache_usage() == 0.0


def test_a_repeated_prompt_reuses_its_cached_prefix_and_answers_the_same(engine):
    ids = prompt_ids(engine, PROMPTS[1])
    manager = engine._scheduler.block_manager
    first = asyncio.run(generate(engine, "prefix-1", ids, 24))
    before = manager.num_cached_tokens
    second = asyncio.run(generate(engine, "prefix-2", ids, 24))
    assert second == first
    assert manager.num_cached_tokens - before == (len(ids) - 1) // 16 * 16  # every full block but the last token's
