"""Black-box fixtures: the real `lowbit serve` process on the real default model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from app.default_model import DEFAULT_MODEL_ID, default_model_path

MODEL = DEFAULT_MODEL_ID


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A `lowbit serve` subprocess on a free loopback port, logging JSON lines to a file."""

    def __init__(self, log_dir: Path, name: str, env: dict[str, str] | None = None, args: list[str] = ()):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        environment = {**os.environ, "LOWBIT_PORT": str(self.port), **(env or {})}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", *args],
            env=environment, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                response = httpx.get(f"{self.base_url}/health/ready", timeout=2)
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log_path.read_text()[-3000:]}")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=5).text

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return records

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def server(server_logs):
    """The default configuration: the embedded model, devices NPU then CPU."""
    process = ServerProcess(server_logs, "default")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def tokenizer():
    """The model's own tokenizer, loaded independently of the server."""
    import openvino_genai

    pipeline = openvino_genai.LLMPipeline(str(default_model_path()), "CPU")
    return pipeline.get_tokenizer()


def count_tokens(tokenizer, text: str) -> int:
    return int(tokenizer.encode(text, add_special_tokens=False).input_ids.data.shape[1])


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@pytest.fixture(scope="session")
def small_server(server_logs):
    """CPU only, 2 running + 2 waiting requests: easy to fill."""
    process = ServerProcess(server_logs, "small", env={
        "LOWBIT_DEVICE": "CPU", "LOWBIT_MAX_RUNNING_REQUESTS": "2", "LOWBIT_MAX_WAITING_REQUESTS": "2"})
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


async def stream_chat(client: httpx.AsyncClient, body: dict, on_first_token=None) -> dict:
    """POST a streaming chat; return status, text, finish reason, usage and whether [DONE] came."""
    result = {"status": None, "text": "", "finish_reason": None, "usage": None, "done": False, "error": None}
    async with client.stream("POST", "/v1/chat/completions",
                             json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        result["status"] = response.status_code
        result["headers"] = response.headers
        if response.status_code != 200:
            result["error"] = json.loads(await response.aread())["error"]
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                result["done"] = True
                continue
            event = json.loads(payload)
            if "error" in event:
                result["error"] = event["error"]
                continue
            if event.get("usage"):
                result["usage"] = event["usage"]
            for choice in event.get("choices", []):
                content = choice["delta"].get("content")
                if content:
                    if not result["text"] and on_first_token:
                        on_first_token()
                    result["text"] += content
                result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
    return result


