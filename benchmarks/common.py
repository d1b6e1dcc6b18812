"""Shared pieces of the benchmark scripts: a server subprocess and a streaming client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`lowbit serve` in a subprocess on a free loopback port."""

    def __init__(self, env: dict[str, str]):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"], cwd=ROOT,
            env={**os.environ, "LOWBIT_PORT": str(self.port), "LOWBIT_LOG_LEVEL": "warning", **env},
            stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log.name}")
            try:
                if httpx.get(f"{self.base_url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class StreamTiming:
    status: int = 0
    sent_at: float = 0.0
    headers_at: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per content chunk
    completion_tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.sent_at if self.token_times else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        if len(self.token_times) < 2 or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / (self.token_times[-1] - self.token_times[0])


async def timed_stream(client: httpx.AsyncClient, body: dict) -> StreamTiming:
    timing = StreamTiming(sent_at=time.perf_counter())
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=request) as response:
        timing.status = response.status_code
        timing.headers_at = time.perf_counter()
        if response.status_code != 200:
            await response.aread()
            return timing
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                timing.completion_tokens = event["usage"]["completion_tokens"]
            if any(choice["delta"].get("content") for choice in event.get("choices", [])):
                timing.token_times.append(time.perf_counter())
    return timing


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]
