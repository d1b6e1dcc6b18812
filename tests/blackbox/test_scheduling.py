"""Scheduling under load, disconnects, several engines and shutdown, on the real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from tests.blackbox.conftest import MODEL, ServerProcess, stream_chat
from tests.prom import total

pytestmark = pytest.mark.blackbox

STORY = [{"role": "user", "content": "Write a very long story about a dragon who learns to count."}]


def test_sixteen_concurrent_streams_complete_with_correct_usage(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            bodies = [{"model": MODEL, "temperature": 0, "max_tokens": 20,
                       "messages": [{"role": "user", "content": f"Give me fact number {i} about cats."}]}
                      for i in range(16)]
            return await asyncio.gather(*(stream_chat(client, body) for body in bodies))

    for result in asyncio.run(run()):
        assert result["status"] == 200 and result["done"] and result["finish_reason"] in ("stop", "length")
        assert 0 < result["usage"]["completion_tokens"] <= 20
        assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]


def test_burst_five_times_capacity_gets_only_200_and_429(small_server):
    capacity = 4  # 2 running + 2 waiting
    before = small_server.metrics()

    async def one(client: httpx.AsyncClient, index: int) -> httpx.Response:
        return await client.post("/v1/chat/completions", json={
            "model": MODEL, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": f"Say something about the number {index}."}]})

    async def run():
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(5 * capacity)))

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= capacity and statuses.count(429) > 0
    for response in responses:
        body = response.json()
        if response.status_code == 200:
            choice = body["choices"][0]
            assert choice["finish_reason"] in ("stop", "length") and choice["message"]["content"]
            assert body["usage"]["completion_tokens"] <= 16
        else:
            assert body["error"]["type"] == "server_overloaded"
            assert int(response.headers["Retry-After"]) >= 1
    after = small_server.metrics()
    rejected = total(after, "lowbit_request_rejected_total", reason="queue_full") - \
        total(before, "lowbit_request_rejected_total", reason="queue_full")
    assert rejected == statuses.count(429)


def test_client_disconnect_frees_the_slot_for_the_next_queued_request(small_server):
    before = small_server.metrics()

    async def run():
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=120) as client:
            long_body = {"model": MODEL, "temperature": 0, "max_tokens": 4000, "messages": STORY}
            # Fill both running slots with long streams; a third request has to wait.
            streams = [client.stream("POST", "/v1/chat/completions", json={**long_body, "stream": True})
                       for _ in range(2)]
            opened = [await s.__aenter__() for s in streams]
            # Keep the line iterators referenced: a collected iterator closes its response.
            readers = [response.aiter_lines() for response in opened]
            for lines in readers:
                for _ in range(4):
                    await lines.__anext__()
            started = {}
            waiting = asyncio.ensure_future(stream_chat(
                client, {"model": MODEL, "temperature": 0, "max_tokens": 8, "messages": STORY},
                on_first_token=lambda: started.setdefault("at", time.monotonic())))
            await asyncio.sleep(0.5)
            assert "at" not in started, "the third request should be queued"
            disconnected_at = time.monotonic()
            await streams[0].__aexit__(None, None, None)  # the client goes away
            result = await waiting
            await streams[1].__aexit__(None, None, None)
            return result, started["at"] - disconnected_at

    result, seconds_to_start = asyncio.run(run())
    assert result["status"] == 200 and result["done"] and result["finish_reason"] == "length"
    print(f"disconnect -> queued request's first token: {seconds_to_start * 1000:.0f} ms")
    assert seconds_to_start < 5  # the long stream alone would have run for ~50 s
    time.sleep(0.5)
    after = small_server.metrics()
    aborted = total(after, "lowbit_request_aborted_total", reason="client_disconnect") - \
        total(before, "lowbit_request_aborted_total", reason="client_disconnect")
    assert aborted == 2
    assert total(after, "lowbit_num_requests_running") == 0
    assert total(after, "lowbit_num_requests_waiting") == 0


def test_non_streaming_disconnect_aborts_generation(small_server):
    before = small_server.metrics()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{small_server.base_url}/v1/chat/completions", timeout=1.0, json={
            "model": MODEL, "temperature": 0, "max_tokens": 4000, "messages": STORY})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = small_server.metrics()
        if total(after, "lowbit_num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert total(after, "lowbit_num_requests_running") == 0
    cancelled = total(after, "lowbit_requests_total", outcome="cancelled") - \
        total(before, "lowbit_requests_total", outcome="cancelled")
    assert cancelled == 1


def in_rotation(process: ServerProcess) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels["instance"]: sample.value
            for family in text_string_to_metric_families(process.metrics())
            for sample in family.samples if sample.name == "lowbit_engine_in_rotation"}


def test_two_engines_share_traffic_and_survive_one_crashing(server_logs):
    engines = json.dumps([{"device": "CPU"}, {"device": "CPU"}])
    process = ServerProcess(server_logs, "two-engines", env={
        "LOWBIT_ENGINES": engines, "LOWBIT_MAX_RUNNING_REQUESTS": "2", "LOWBIT_KV_CACHE_SIZE_GB": "1",
        "LOWBIT_HEALTH_CHECK_INTERVAL_S": "0.5"})
    body = {"model": MODEL, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "Tell me about the number 7."}]}

    async def burst(count: int):
        async with httpx.AsyncClient(base_url=process.base_url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(count)))

    try:
        ready = process.wait_ready()
        assert len(ready["engines"]) == 2
        assert all(r.status_code == 200 for r in asyncio.run(burst(8)))
        served_by = {r["engine_instance"] for r in process.log_records() if r.get("event") == "request_finished"}
        assert served_by == {"openvino-CPU-0", "openvino-CPU-1"}

        # One engine's worker process dies: requests move to the other one invisibly.
        workers = subprocess.run(["pgrep", "-P", str(process.process.pid), "-f", "openvino_worker"],
                                 capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[0]), signal.SIGKILL)
        time.sleep(0.5)
        responses = asyncio.run(burst(6))
        assert [r.status_code for r in responses] == [200] * 6
        assert all(r.json()["choices"][0]["message"]["content"] for r in responses)
        metrics = process.metrics()
        assert total(metrics, "lowbit_engine_fallback_total") >= 1
        # The failed engine left rotation, gets a new worker, and comes back.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and min(in_rotation(process).values()) == 0:
            time.sleep(0.5)
        assert in_rotation(process) == {"openvino-CPU-0": 1.0, "openvino-CPU-1": 1.0}
    finally:
        process.stop()


def test_sigterm_drains_in_flight_requests_then_exits_zero(server_logs):
    process = ServerProcess(server_logs, "drain", env={"LOWBIT_DEVICE": "CPU", "LOWBIT_DRAIN_TIMEOUT_S": "60"})
    process.wait_ready()

    async def run():
        async with httpx.AsyncClient(base_url=process.base_url, timeout=120) as client:
            first_tokens = asyncio.Event()
            seen = []

            def mark():
                seen.append(1)
                if len(seen) == 4:
                    first_tokens.set()

            body = {"model": MODEL, "temperature": 0, "max_tokens": 48, "messages": STORY}
            in_flight = [asyncio.ensure_future(stream_chat(client, body, on_first_token=mark)) for _ in range(4)]
            await asyncio.wait_for(first_tokens.wait(), timeout=60)
            process.process.send_signal(15)  # SIGTERM
            await asyncio.sleep(0.3)
            refused = await client.post("/v1/chat/completions", json=body)
            readiness = await client.get("/health/ready")
            return await asyncio.gather(*in_flight), refused, readiness

    results, refused, readiness = asyncio.run(run())
    for result in results:
        assert result["status"] == 200 and result["done"] and result["error"] is None
        assert result["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 48
    assert refused.status_code == 503 and refused.headers.get("Retry-After")
    assert refused.json()["error"]["code"] == "shutting_down"
    assert readiness.status_code == 503 and readiness.json()["status"] == "draining"
    assert process.process.wait(timeout=60) == 0
    process.stop()
