"""The real server on the real default model, driven by the official `openai` client."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.blackbox.conftest import MODEL, chat_prompt, count_tokens
from tests.prom import total

pytestmark = pytest.mark.blackbox

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_non_streaming_answer_with_usage_from_the_models_tokenizer(server, tokenizer):
    completion = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    choice = completion.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens == count_tokens(tokenizer, chat_prompt(tokenizer, QUESTION))
    # Greedy text re-encodes to the same tokens, plus the end-of-sequence token.
    assert completion.usage.completion_tokens == count_tokens(tokenizer, choice.message.content) + 1
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.id.startswith("chatcmpl-") and completion.model == MODEL


def test_streaming_with_include_usage(server, tokenizer):
    stream = server.client().chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == count_tokens(tokenizer, chat_prompt(tokenizer, QUESTION))
    reference = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert text == reference.choices[0].message.content  # streamed and whole answers agree


def test_stop_string_cuts_before_it(server):
    completion = server.client().chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, stop=["Paris"])
    content = completion.choices[0].message.content
    assert "Paris" not in content and content.startswith("The capital of France is")
    assert completion.choices[0].finish_reason == "stop"


def test_max_tokens_ends_in_length_with_exact_count(server):
    completion = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        temperature=0, max_tokens=7)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 7


def test_seeded_sampling_is_reproducible(server):
    def sample() -> str:
        return server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
            temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, extra_body={"top_k": 40},
            presence_penalty=0.5, frequency_penalty=0.5).choices[0].message.content

    assert sample() == sample()


def test_eight_concurrent_streams_all_complete(server):
    async def one(client: openai.AsyncOpenAI, index: int) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me a fact about the number {index}."}],
            temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def all_of_them():
        client = server.async_client()
        return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = asyncio.run(all_of_them())
    assert len(results) == 8
    for text, completion_tokens in results:
        assert text and 0 < completion_tokens <= 24


@pytest.mark.parametrize("kwargs, error_type, status", [
    ({"temperature": 5}, openai.BadRequestError, 400),
    ({"n": 2}, openai.BadRequestError, 400),
    ({"model": "no-such-model"}, openai.NotFoundError, 404),
    ({"max_tokens": 100_000}, openai.BadRequestError, 400),
    ({"messages": []}, openai.BadRequestError, 400),
])
def test_bad_inputs_get_openai_errors(server, kwargs, error_type, status):
    arguments = {"model": MODEL, "messages": QUESTION, **kwargs}
    with pytest.raises(error_type) as raised:
        server.client().chat.completions.create(**arguments)
    assert raised.value.status_code == status
    assert set(raised.value.body) >= {"message", "type", "param", "code"}


def test_context_length_and_body_size_errors(server):
    too_long = server.client().chat.completions.with_raw_response
    with pytest.raises(openai.BadRequestError) as raised:
        too_long.create(model=MODEL, messages=QUESTION, max_tokens=100_000)
    assert raised.value.code == "context_length_exceeded"
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=huge, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    garbage = httpx.post(f"{server.base_url}/v1/chat/completions", content=b"{",
                         headers={"content-type": "application/json"})
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "invalid_json"


def test_npu_to_cpu_fallback_is_observed_and_reported(server):
    # There is no NPU on this machine: the NPU attempt fails and the CPU takes over.
    ready = httpx.get(f"{server.base_url}/health/ready").json()
    engine = ready["engines"][0]
    assert engine["device"] == "CPU"
    tried = engine["devices_tried"]
    assert [t["device"] for t in tried] == ["NPU", "CPU"]
    assert tried[0]["error"] and tried[1]["error"] is None
    models = server.client().models.list().data
    assert models[0].id == MODEL and models[0].model_extra["device"] == "CPU"
    metrics = server.metrics()
    assert total(metrics, "lowbit_device_fallback_total", from_device="NPU", to_device="CPU") == 1
    assert total(metrics, "lowbit_engine_info", device="CPU", engine="openvino") == 1
    warnings = [r for r in server.log_records() if r.get("level") == "warning" and "NPU" in r["message"]]
    assert warnings, "the reason the NPU failed must be logged"
