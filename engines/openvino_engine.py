"""OpenVINO GenAI engine: tries each device in preference order (NPU first by default).

On CPU and GPU one `ContinuousBatchingPipeline` serves every request (two threads calling
`LLMPipeline.generate` on one pipeline fail, and its streamer serves one prompt at a
time, so continuous batching is the way to share a model). An NPU compiles a
static-shape `LLMPipeline` and runs one request at a time.

The pipeline lives in a worker process (`openvino_worker.py`) because it holds the GIL
while it steps. This process keeps the model's tokenizer (OpenVINO reads it straight from
the GGUF or IR) and a reader thread that hands each step's tokens to the waiting
requests. If the worker dies, the engine reports unhealthy, fails what was in flight,
and starts a new worker in the background.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from engines.base import (
    DeviceAttempt,
    Engine,
    EngineError,
    EngineInfo,
    EngineNotReady,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
)
from engines.byte_level_decoder import ByteLevelDecoder
from engines.model_files import describe_model
from engines.request_streams import RequestStreams, iterate_queue

log = logging.getLogger(__name__)

_LOAD_TIMEOUT_S = 900  # compiling for an NPU can take minutes
_STOP_TIMEOUT_S = 30


@dataclass(frozen=True)
class OpenVINOOptions:
    devices: tuple[str, ...] = ("NPU", "CPU")
    # "auto": a single-request LLMPipeline on NPU, continuous batching elsewhere.
    pipeline: str = "auto"
    kv_cache_size_gb: int = 1
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    npu_max_prompt_len: int = 1024
    npu_min_response_len: int = 256
    cache_dir: str | None = None


_DECODER_CHECK_TEXT = (
    "Grüße aus Köln! naïve café, 東京 and emoji 🚀🙂. def f(x):\n    return x ** 2  # ok\n"
    "  The quick brown fox, 1234567890 -- “quotes” and ‘more’.")


class OpenVINOTokenizer:
    """Adapts `openvino_genai.Tokenizer` (the model's own, from GGUF or IR) to `Tokenizer`."""

    def __init__(self, ov_tokenizer, model_path: str | None = None) -> None:
        self._tokenizer = ov_tokenizer
        self.eos_token_ids = frozenset({int(ov_tokenizer.get_eos_token_id())})
        self._fast_decoder = self._checked_fast_decoder(model_path) if model_path else None

    def _checked_fast_decoder(self, model_path: str):
        """A byte-table decoder, if one can be built and agrees with OpenVINO on every window."""
        decoder = ByteLevelDecoder.from_gguf(model_path)
        if decoder is None:
            return None
        ids = self.encode(_DECODER_CHECK_TEXT) + sorted(self.eos_token_ids)
        windows = [ids[start:end] for start in range(0, len(ids), 3) for end in range(start + 1, min(start + 9, len(ids) + 1))]
        expected = self._tokenizer.decode(windows, skip_special_tokens=True)
        if [decoder.decode(window) for window in windows] != list(expected):
            log.warning("openvino: the byte-level decoder disagrees with OpenVINO's; using OpenVINO's")
            return None
        return decoder

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        # The chat template already writes every special token the model expects.
        encoded = self._tokenizer.encode(text, add_special_tokens=False)
        return encoded.input_ids.data[0].tolist()

    def decode(self, token_ids: Sequence[int]) -> str:
        if self._fast_decoder is not None:
            return self._fast_decoder.decode(token_ids)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)


class _Worker:
    """One worker process (`python -m engines.openvino_worker`) and the two pipes to it.

    Started as a fresh interpreter rather than with multiprocessing's spawn, which would
    re-run the caller's main module in the child.
    """

    def __init__(self, model_path: str, options: OpenVINOOptions):
        commands_read, commands_write = os.pipe()
        outputs_read, outputs_write = os.pipe()
        argv = [sys.executable, "-m", "engines.openvino_worker", str(commands_read), str(outputs_write),
                model_path, json.dumps(dataclasses.asdict(options))]
        self.process = subprocess.Popen(argv, pass_fds=(commands_read, outputs_write))
        os.close(commands_read)  # the child's ends: closing ours lets EOF reach each side
        os.close(outputs_write)
        self.commands = Connection(commands_write, readable=False)
        self.outputs = Connection(outputs_read, writable=False)
        self._send_lock = threading.Lock()

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def send(self, command: tuple) -> None:
        with self._send_lock:
            self.commands.send(command)

    def wait_loaded(self) -> tuple:
        if not self.outputs.poll(_LOAD_TIMEOUT_S):
            raise TimeoutError(f"the OpenVINO worker did not load within {_LOAD_TIMEOUT_S} s")
        try:
            return self.outputs.recv()
        except EOFError:
            raise EngineError("openvino", f"the worker exited while loading (code {self.process.wait()})") from None

    def stop(self) -> None:
        try:
            self.send(("stop",))
        except (OSError, EOFError):
            pass
        try:
            self.process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.commands.close()
        self.outputs.close()


class OpenVINOEngine(Engine):
    kind = "openvino"

    def __init__(self, model_path, options: OpenVINOOptions = OpenVINOOptions()):
        self._model_path = str(model_path)
        self._options = options
        self._info: EngineInfo | None = None
        self._tokenizer: OpenVINOTokenizer | None = None
        self._streams = RequestStreams()
        self._worker: _Worker | None = None
        self._healthy = False
        self._stopping = False
        self._kv_cache_usage: float | None = None

    # --- interface -------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineNotReady(self.kind, "not started")
        return self._info

    @property
    def tokenizer(self) -> OpenVINOTokenizer:
        if self._tokenizer is None:
            raise EngineNotReady(self.kind, "not started")
        return self._tokenizer

    def start(self) -> None:
        import openvino_genai as ov_genai  # heavy runtime: imported only by this engine

        description = describe_model(self._model_path)
        worker = _Worker(self._model_path, self._options)
        self._tokenizer = OpenVINOTokenizer(ov_genai.Tokenizer(self._model_path), self._model_path)  # while the worker loads
        message = worker.wait_loaded()
        attempts = tuple(DeviceAttempt(device, error) for device, error in message[-1 if message[0] == "load_failed" else 2])
        for attempt in attempts:
            if attempt.error:
                log.warning("openvino: device %s failed to load %s: %s", attempt.device, self._model_path, attempt.error)
        if message[0] != "loaded":
            worker.stop()
            tried = "; ".join(f"{a.device}: {a.error}" for a in attempts)
            raise EngineError(self.kind, f"no device could load {self._model_path} ({tried})")
        _, device, _, single = message
        log.info("openvino: loaded %s on %s", self._model_path, device)
        context_length = description.context_length
        if single and device.upper().startswith("NPU"):
            context_length = self._options.npu_max_prompt_len + self._options.npu_min_response_len
        self._info = EngineInfo(
            engine=self.kind, device=device, model_path=self._model_path,
            context_length=context_length, quantization=description.quantization,
            max_concurrency=1 if single else self._options.max_num_seqs, device_attempts=attempts)
        self._attach(worker)

    def stop(self) -> None:
        self._stopping = True
        self._healthy = False
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        self._streams.fail_all(EngineNotReady(self.kind, "engine stopped"))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self._healthy or self._worker is None:
            raise EngineNotReady(self.kind, "the OpenVINO worker is not running")
        chunks = self._streams.open(request.request_id)
        finished = False
        try:
            try:
                self._worker.send(("add", request))
            except (OSError, EOFError) as error:
                raise EngineError(self.kind, f"the OpenVINO worker is gone: {error}") from None
            async for chunk in iterate_queue(chunks):
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            self._streams.close(request.request_id)
            if not finished:  # the caller stopped reading (disconnect, timeout) or we failed
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        worker = self._worker
        if worker is not None:
            try:
                worker.send(("abort", request_id))
            except (OSError, EOFError):
                pass

    def is_healthy(self) -> bool:
        return self._healthy

    def kv_cache_usage(self) -> float | None:
        return self._kv_cache_usage

    @property
    def worker_pid(self) -> int | None:
        return self._worker.process.pid if self._worker is not None else None

    # --- the worker's output -------------------------------------------------------------

    def _attach(self, worker: _Worker) -> None:
        self._worker = worker
        self._healthy = True
        threading.Thread(target=self._read_outputs, args=(worker,), name="openvino-reader", daemon=True).start()

    def _read_outputs(self, worker: _Worker) -> None:
        """Runs on its own thread: blocking reads release the GIL."""
        try:
            while True:
                message = worker.outputs.recv()
                kind = message[0]
                if kind == "tokens":
                    self._streams.deliver(
                        (request_id, GenerationChunk(token_ids, FinishReason(finish) if finish else None))
                        for request_id, token_ids, finish in message[1])
                elif kind == "kv":
                    self._kv_cache_usage = message[1]
                elif kind == "failed":
                    log.error("openvino: worker failed %d request(s): %s", len(message[1]), message[2])
                    error = EngineError(self.kind, message[2].splitlines()[0])
                    self._streams.deliver((request_id, error) for request_id in message[1])
        except (EOFError, OSError):
            pass
        if self._stopping or self._worker is not worker:
            return
        log.error("openvino: the worker process exited (code %s); restarting it", worker.exitcode)
        self._healthy = False
        self._streams.fail_all(EngineError(self.kind, "the OpenVINO worker process died"))
        self._restart()

    def _restart(self) -> None:
        worker = _Worker(self._model_path, self._options)
        message = worker.wait_loaded()
        if message[0] != "loaded" or self._stopping:
            log.error("openvino: restarting the worker failed: %s", message)
            worker.stop()
            return
        log.info("openvino: worker restarted on %s", message[1])
        self._attach(worker)
