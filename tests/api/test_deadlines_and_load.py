"""Deadlines, overload and request logs through the real app with the fake engine."""

from __future__ import annotations

import json
import logging
import threading
import time

from tests.api.conftest import MODEL, make_client, wait_ready
from tests.fakes import FakeEngine


def chat(**overrides) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, **overrides}


def test_deadline_on_a_whole_answer_is_a_408_timeout_error():
    with make_client(FakeEngine(token_delay_s=0.05)) as client:
        wait_ready(client)
        response = client.post("/v1/chat/completions", json=chat(), headers={"X-Request-Timeout": "0.2"})
    assert response.status_code == 408
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("timeout", "request_timeout")


def test_deadline_on_a_stream_sends_an_error_event_then_done():
    with make_client(FakeEngine(token_delay_s=0.05)) as client:
        wait_ready(client)
        with client.stream("POST", "/v1/chat/completions", json=chat(stream=True),
                           headers={"X-Request-Timeout": "0.2"}) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["code"] == "request_timeout"
    assert any('"content"' in line for line in lines[1:-2])  # some text came before the deadline


def test_the_server_default_deadline_applies_without_the_header():
    with make_client(FakeEngine(token_delay_s=0.05), request_timeout_s=0.2) as client:
        wait_ready(client)
        assert client.post("/v1/chat/completions", json=chat()).status_code == 408


def test_readiness_reports_overload_and_429_carries_retry_after():
    engine = FakeEngine(token_delay_s=0.05, reply="x" * 40)
    with make_client(engine, max_running_requests=1, max_waiting_requests=0) as client:
        wait_ready(client)
        busy = threading.Thread(target=client.post, args=("/v1/chat/completions",), kwargs={"json": chat()})
        busy.start()
        deadline = time.monotonic() + 5
        while not engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
        ready = client.get("/health/ready")
        refused = client.post("/v1/chat/completions", json=chat())
        busy.join()
        after = client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "overloaded"
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "server_overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    assert after.status_code == 200


def request_log_lines(caplog) -> list[dict]:
    return [record.fields for record in caplog.records
            if record.name == "lowbit.requests" and hasattr(record, "fields")]


def test_request_log_line_has_the_fields_but_no_text_by_default(caplog):
    caplog.set_level(logging.INFO, logger="lowbit.requests")
    with make_client(FakeEngine()) as client:
        wait_ready(client)
        client.post("/v1/chat/completions", json=chat(), headers={"X-Request-Id": "log-1"})
    (line,) = request_log_lines(caplog)
    assert line["request_id"] == "log-1" and line["outcome"] == "success"
    assert {"model", "engine", "device", "prompt_tokens", "generated_tokens", "queue_time_s",
            "ttft_s", "total_time_s"} <= set(line)
    assert "prompt" not in line and "completion" not in line


def test_request_log_includes_text_when_asked(caplog):
    caplog.set_level(logging.INFO, logger="lowbit.requests")
    with make_client(FakeEngine(), log_prompts=True) as client:
        wait_ready(client)
        client.post("/v1/chat/completions", json=chat())
    (line,) = request_log_lines(caplog)
    assert line["prompt"] == "<user>Hi<assistant>"
    assert line["completion"] == "Hello from the fake engine."
