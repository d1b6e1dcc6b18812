"""The HTTP API's shape and errors, through ASGI with the deterministic fake engine."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import MODEL, make_client, wait_ready
from tests.fakes import CharTokenizer, FakeEngine
from tests.prom import total

REPLY = "Hello from the fake engine."


def chat(**overrides) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    body.update(overrides)
    return body


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def expected_prompt_tokens(messages: list[dict]) -> int:
    tokenizer = CharTokenizer()
    return len(tokenizer.encode(tokenizer.apply_chat_template(messages)))


def test_non_streaming_completion_has_openai_shape_and_usage(client):
    response = client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = expected_prompt_tokens([{"role": "user", "content": "Hi"}])
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": len(REPLY) + 1,
                             "total_tokens": prompt + len(REPLY) + 1}


def test_streaming_sends_role_first_finish_last_then_usage_and_done(client):
    with client.stream("POST", "/v1/chat/completions",
                       json=chat(stream=True, stream_options={"include_usage": True})) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == REPLY
    finish = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(REPLY) + 1


def test_streaming_without_include_usage_sends_no_usage(client):
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert all("usage" not in c for c in events[:-1])


def test_max_tokens_ends_with_length(client):
    body = client.post("/v1/chat/completions", json=chat(max_tokens=5)).json()
    assert body["choices"][0]["message"]["content"] == REPLY[:5]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_max_completion_tokens_is_honoured(client):
    body = client.post("/v1/chat/completions", json=chat(max_completion_tokens=3)).json()
    assert body["usage"]["completion_tokens"] == 3


def test_stop_string_cuts_the_answer_and_aborts_the_engine(client, engine):
    body = client.post("/v1/chat/completions", json=chat(stop=[" fake", "zzz"])).json()
    assert body["choices"][0]["message"]["content"] == "Hello from the"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len("Hello from the fake")
    assert engine.aborted, "the engine must stop generating after a stop string"


def test_streamed_stop_string_never_leaks_a_partial_match(client):
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True, stop="engine")) as response:
        events = sse_events(response)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"])
    assert text == "Hello from the fake "


def test_content_parts_and_system_messages_reach_the_template(client, engine):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    body = client.post("/v1/chat/completions", json=chat(messages=messages)).json()
    expected = expected_prompt_tokens([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi there"}])
    assert body["usage"]["prompt_tokens"] == expected


def test_request_id_is_accepted_echoed_and_used_in_the_completion_id(client):
    response = client.post("/v1/chat/completions", json=chat(), headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["id"] == "chatcmpl-abc-123"
    generated = client.post("/v1/chat/completions", json=chat())
    assert len(generated.headers["x-request-id"]) >= 16


@pytest.mark.parametrize("overrides, param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, None),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"logprobs": True}, None),
    ({"response_format": {"type": "json_object"}}, None),
    ({"logit_bias": {"42": 5}}, None),
    ({"top_logprobs": 3}, None),
    ({"tool_choice": "auto"}, None),
    ({"functions": [{"name": "f"}]}, None),
])
def test_invalid_parameters_get_400_in_openai_shape(client, overrides, param):
    response = client.post("/v1/chat/completions", json=chat(**overrides))
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


def test_missing_model_field_is_400_not_422(client):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_invalid_json_is_400(client):
    response = client.post("/v1/chat/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_unknown_model_is_404_model_not_found(client):
    response = client.post("/v1/chat/completions", json=chat(model="nope"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_prompt_plus_max_tokens_beyond_context_is_context_length_exceeded(client, engine):
    response = client.post("/v1/chat/completions", json=chat(max_tokens=engine.context_length))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    long_prompt = chat(messages=[{"role": "user", "content": "x" * engine.context_length}])
    assert client.post("/v1/chat/completions", json=long_prompt).json()["error"]["code"] == \
        "context_length_exceeded"


def test_default_max_tokens_is_the_rest_of_the_context(engine):
    engine.reply = "y" * 1000  # longer than the context allows
    with make_client(engine) as client:
        wait_ready(client)
        body = client.post("/v1/chat/completions", json=chat()).json()
    prompt = body["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == engine.context_length - prompt
    assert body["choices"][0]["finish_reason"] == "length"


def test_oversized_body_is_413(engine):
    with make_client(engine, max_body_bytes=1000) as client:
        wait_ready(client)
        response = client.post("/v1/chat/completions",
                               json=chat(messages=[{"role": "user", "content": "x" * 5000}]))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unknown_route_and_wrong_method_are_openai_shaped(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = client.get("/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_bad_request_timeout_header_is_400(client):
    response = client.post("/v1/chat/completions", json=chat(), headers={"X-Request-Timeout": "soon"})
    assert response.status_code == 400


def test_models_lists_the_model_with_its_device(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    card = body["data"][0]
    assert card["id"] == MODEL and card["object"] == "model"
    assert card["device"] == "FAKE"


def test_readiness_is_503_until_the_engine_has_loaded():
    class SlowEngine(FakeEngine):
        def start(self) -> None:
            import time
            time.sleep(0.5)
            super().start()

    with make_client(SlowEngine()) as client:
        assert client.get("/health").status_code == 200
        early = client.get("/health/ready")
        assert early.status_code == 503 and early.json()["status"] == "loading"
        not_ready = client.post("/v1/chat/completions", json=chat())
        assert not_ready.status_code == 503 and "Retry-After" in not_ready.headers
        wait_ready(client)
        assert client.get("/health/ready").json()["status"] == "ready"


def test_failed_engine_load_is_reported_by_readiness():
    class BrokenEngine(FakeEngine):
        def start(self) -> None:
            raise RuntimeError("no device could load it")

    with make_client(BrokenEngine()) as client:
        import time
        time.sleep(0.2)
        ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "failed"
    assert "no device could load it" in ready.json()["engines"][0]["error"]


def test_metrics_count_requests_tokens_and_ttft(client):
    usage = client.post("/v1/chat/completions", json=chat(max_tokens=4)).json()["usage"]
    text = client.get("/metrics").text
    labels = {"model": MODEL, "engine": "fake", "device": "FAKE"}
    assert total(text, "lowbit_requests_total", outcome="success", finish_reason="length", **labels) == 1
    assert total(text, "lowbit_generation_tokens_total", **labels) == usage["completion_tokens"]
    assert total(text, "lowbit_prompt_tokens_total", **labels) == usage["prompt_tokens"]
    assert total(text, "lowbit_time_to_first_token_seconds_count", **labels) == 1


def test_user_field_and_unknown_extra_fields_are_accepted(client):
    response = client.post("/v1/chat/completions", json=chat(user="alice", metadata={"x": 1}, top_k=5, seed=3))
    assert response.status_code == 200
    defaults = chat(response_format={"type": "text"}, tool_choice="none", logit_bias={}, top_logprobs=0)
    assert client.post("/v1/chat/completions", json=defaults).status_code == 200


def test_sampling_fields_reach_the_engine(engine):
    seen = []

    class RecordingEngine(FakeEngine):
        async def generate(self, request):
            seen.append(request.sampling)
            async for chunk in super().generate(request):
                yield chunk

    with make_client(RecordingEngine()) as client:
        wait_ready(client)
        client.post("/v1/chat/completions", json=chat(
            temperature=0.7, top_p=0.9, top_k=40, seed=11, presence_penalty=0.5, frequency_penalty=-0.5,
            max_completion_tokens=9))
    (sampling,) = seen
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.7, 0.9, 40, 11)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.max_tokens) == (0.5, -0.5, 9)


def test_penalties_are_refused_where_the_engine_cannot_apply_them():
    from dataclasses import replace

    class NoPenalties(FakeEngine):
        @property
        def info(self):
            return replace(super().info, supports_penalties=False)

    with make_client(NoPenalties()) as client:
        wait_ready(client)
        refused = client.post("/v1/chat/completions", json=chat(presence_penalty=0.5))
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "presence_penalty"
        assert refused.json()["error"]["code"] == "unsupported_parameter"
        assert client.post("/v1/chat/completions", json=chat(frequency_penalty=0.0)).status_code == 200
