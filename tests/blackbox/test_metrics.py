"""Metrics move exactly as requests do, and a real Prometheus can scrape and query them."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import time

import httpx
import pytest

from tests.blackbox.conftest import MODEL, free_port, stream_chat
from tests.prom import total

pytestmark = pytest.mark.blackbox


def labels_of(server) -> dict[str, str]:
    return {"model": MODEL, "engine": "openvino", "device": "CPU"}


def test_counters_and_histograms_match_the_usage_returned(small_server):
    labels = labels_of(small_server)
    before = small_server.metrics()

    async def run():
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=120) as client:
            plain = [await client.post("/v1/chat/completions", json={
                "model": MODEL, "temperature": 0, "max_tokens": 10 + i,
                "messages": [{"role": "user", "content": f"Tell me about the colour number {i}."}]})
                for i in range(3)]
            streamed = [await stream_chat(client, {
                "model": MODEL, "temperature": 0, "max_tokens": 12,
                "messages": [{"role": "user", "content": "Name three rivers."}]}) for _ in range(2)]
            unknown = await client.post("/v1/chat/completions", json={"model": "nope", "messages": [
                {"role": "user", "content": "hi"}]})
            return [r.json()["usage"] for r in plain] + [s["usage"] for s in streamed], unknown.status_code

    usages, unknown_status = asyncio.run(run())
    assert unknown_status == 404
    after = small_server.metrics()

    def delta(name: str, **extra) -> float:
        return total(after, name, **extra) - total(before, name, **extra)

    completion = sum(u["completion_tokens"] for u in usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    assert delta("lowbit_generation_tokens_total", **labels) == completion
    assert delta("lowbit_prompt_tokens_total", **labels) == prompt
    assert delta("lowbit_requests_total", outcome="success", **labels) == 5
    assert delta("lowbit_time_to_first_token_seconds_count", **labels) == 5  # one TTFT per request
    assert delta("lowbit_e2e_request_latency_seconds_count", **labels) == 5
    assert delta("lowbit_request_queue_time_seconds_count", **labels) == 5
    assert delta("lowbit_request_generation_tokens_sum", **labels) == completion
    assert delta("lowbit_request_prompt_tokens_sum", **labels) == prompt
    # One inter-token gap per token after each request's first.
    assert delta("lowbit_inter_token_latency_seconds_count", **labels) == completion - 5
    assert delta("lowbit_request_rejected_total", reason="model_not_found") == 1
    assert total(after, "lowbit_num_requests_running", **labels) == 0
    assert total(after, "lowbit_num_requests_waiting", **labels) == 0
    assert total(after, "lowbit_engine_info", quantization="gguf-q4_1", **labels) == 1
    assert total(after, "lowbit_generation_tokens_per_second", **labels) > 0
    kv = total(after, "lowbit_kv_cache_usage_ratio", **labels)
    assert 0 <= kv < 1


@pytest.fixture
def prometheus(server, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus (Debian package) is not installed; `make test` installs it")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: lowbit\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n")
    process = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base_url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(prometheus_url: str, promql: str) -> list[dict]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert response["status"] == "success", response
    return response["data"]["result"]


def test_a_real_prometheus_scrapes_lowbit_and_answers_promql(server, prometheus):
    ttft_p50 = "histogram_quantile(0.5, sum by (le) (rate(lowbit_time_to_first_token_seconds_bucket[30s])))"
    client = server.client()
    deadline = time.monotonic() + 60
    ttft = rate = []
    while time.monotonic() < deadline:
        # Keep traffic flowing across scrapes so that rates and the moving gauge are non-zero.
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                       temperature=0, max_tokens=8)
        ttft = query(prometheus, ttft_p50)
        rate = query(prometheus, "sum(lowbit_generation_tokens_per_second)")
        if ttft and rate and math.isfinite(float(ttft[0]["value"][1])) and float(rate[0]["value"][1]) > 0:
            break
        time.sleep(0.5)
    assert ttft and 0 < float(ttft[0]["value"][1]) < 60
    assert rate and float(rate[0]["value"][1]) > 0
    assert query(prometheus, 'up{job="lowbit"}')[0]["value"][1] == "1"
