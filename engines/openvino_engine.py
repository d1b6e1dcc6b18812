"""OpenVINO GenAI engine: tries each device in preference order (NPU first by default).

On CPU and GPU one `ContinuousBatchingPipeline` serves every request: a single thread adds
requests and calls `step()`, and each request reads its new tokens from its own handle.
(Two threads calling `LLMPipeline.generate` on one pipeline fail, and its streamer serves
one prompt at a time, so continuous batching is the only way to share a model.) An NPU
compiles a static-shape `LLMPipeline` and runs one request at a time; the same thread
drives it through a streamer that can cancel.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from engines.base import (
    DeviceAttempt,
    Engine,
    EngineError,
    EngineInfo,
    EngineNotReady,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
)
from engines.model_files import describe_model
from engines.request_streams import RequestStreams, iterate_queue

log = logging.getLogger(__name__)

_KV_USAGE_REFRESH_S = 0.5  # get_metrics() is not free; sample it twice a second


@dataclass(frozen=True)
class OpenVINOOptions:
    devices: tuple[str, ...] = ("NPU", "CPU")
    # "auto": a single-request LLMPipeline on NPU, continuous batching elsewhere.
    pipeline: str = "auto"
    kv_cache_size_gb: float = 1.0
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    npu_max_prompt_len: int = 1024
    npu_min_response_len: int = 256
    cache_dir: str | None = None


class OpenVINOTokenizer:
    """Adapts `openvino_genai.Tokenizer` (the model's own, from GGUF or IR) to `Tokenizer`."""

    def __init__(self, ov_tokenizer) -> None:
        self._tokenizer = ov_tokenizer
        self.eos_token_ids = frozenset({int(ov_tokenizer.get_eos_token_id())})

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        # The chat template already writes every special token the model expects.
        encoded = self._tokenizer.encode(text, add_special_tokens=False)
        return encoded.input_ids.data[0].tolist()

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _generation_config(ov_genai, sampling: SamplingParams, eos_token_id: int):
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = sampling.max_tokens
    config.eos_token_id = eos_token_id
    if sampling.stop_token_ids:
        config.stop_token_ids = set(sampling.stop_token_ids)
    config.presence_penalty = sampling.presence_penalty
    config.frequency_penalty = sampling.frequency_penalty
    if sampling.is_greedy:
        config.do_sample = False
    else:
        config.do_sample = True
        config.temperature = sampling.temperature
        config.top_p = sampling.top_p
        if sampling.top_k > 0:
            config.top_k = sampling.top_k
        # OpenVINO's default seed is 0 for every request; unseeded requests must differ.
        config.rng_seed = sampling.seed if sampling.seed is not None else random.getrandbits(31)
    return config


class OpenVINOEngine(Engine):
    kind = "openvino"

    def __init__(self, model_path: str | Path, options: OpenVINOOptions = OpenVINOOptions()):
        self._model_path = str(model_path)
        self._options = options
        self._info: EngineInfo | None = None
        self._tokenizer: OpenVINOTokenizer | None = None
        self._streams = RequestStreams()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._healthy = False
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
        attempts: list[DeviceAttempt] = []
        for device in self._options.devices:
            single = self._is_single_request(device)
            started = time.perf_counter()
            try:
                pipeline = self._load(ov_genai, device, single)
            except Exception as error:  # noqa: BLE001 - any load failure means "next device"
                reason = f"{type(error).__name__}: {error}".strip()
                log.warning("openvino: device %s failed to load %s: %s", device, self._model_path, reason)
                attempts.append(DeviceAttempt(device, reason))
                continue
            log.info("openvino: loaded %s on %s in %.1f s", self._model_path, device,
                     time.perf_counter() - started)
            attempts.append(DeviceAttempt(device))
            context_length = description.context_length
            if single and device.upper().startswith("NPU"):
                context_length = self._options.npu_max_prompt_len + self._options.npu_min_response_len
            self._tokenizer = OpenVINOTokenizer(pipeline.get_tokenizer())
            self._info = EngineInfo(
                engine=self.kind,
                device=device,
                model_path=self._model_path,
                context_length=context_length,
                quantization=description.quantization,
                max_concurrency=1 if single else self._options.max_num_seqs,
                device_attempts=tuple(attempts),
            )
            runner = self._run_single if single else self._run_continuous
            self._thread = threading.Thread(
                target=self._guarded, args=(runner, ov_genai, pipeline),
                name=f"openvino-{device}", daemon=True,
            )
            self._healthy = True
            self._thread.start()
            return
        tried = "; ".join(f"{a.device}: {a.error}" for a in attempts)
        raise EngineError(self.kind, f"no device could load {self._model_path} ({tried})")

    def stop(self) -> None:
        if self._thread is not None:
            self._commands.put(("stop", None))
            self._thread.join(timeout=30)
            self._thread = None
        self._healthy = False
        self._streams.fail_all(EngineNotReady(self.kind, "engine stopped"))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self._healthy:
            raise EngineNotReady(self.kind, "engine is not running")
        chunks = self._streams.open(request.request_id)
        self._commands.put(("add", request))
        finished = False
        try:
            async for chunk in iterate_queue(chunks):
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            self._streams.close(request.request_id)
            if not finished:  # the caller stopped reading (disconnect, timeout) or we failed
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def is_healthy(self) -> bool:
        return self._healthy

    def kv_cache_usage(self) -> float | None:
        return self._kv_cache_usage

    # --- loading ---------------------------------------------------------------------

    def _is_single_request(self, device: str) -> bool:
        if self._options.pipeline == "auto":
            return device.upper().startswith("NPU")
        return self._options.pipeline == "single"

    def _load(self, ov_genai, device: str, single: bool):
        properties: dict[str, object] = {}
        if self._options.cache_dir:
            properties["CACHE_DIR"] = self._options.cache_dir
        if single:
            if device.upper().startswith("NPU"):
                # The NPU compiles static shapes: the prompt and KV-cache sizes are fixed here.
                properties["MAX_PROMPT_LEN"] = self._options.npu_max_prompt_len
                properties["MIN_RESPONSE_LEN"] = self._options.npu_min_response_len
            return ov_genai.LLMPipeline(self._model_path, device, **properties)
        scheduler = ov_genai.SchedulerConfig()
        scheduler.cache_size = max(1, int(round(self._options.kv_cache_size_gb)))
        scheduler.max_num_seqs = self._options.max_num_seqs
        scheduler.max_num_batched_tokens = self._options.max_num_batched_tokens
        scheduler.enable_prefix_caching = self._options.enable_prefix_caching
        scheduler.dynamic_split_fuse = True
        return ov_genai.ContinuousBatchingPipeline(self._model_path, scheduler, device, properties)

    # --- the engine thread -----------------------------------------------------------

    def _guarded(self, runner, ov_genai, pipeline) -> None:
        try:
            runner(ov_genai, pipeline)
        except Exception as error:  # noqa: BLE001 - the thread must report, never vanish
            log.exception("openvino: engine thread failed")
            self._healthy = False
            self._streams.fail_all(EngineError(self.kind, f"{type(error).__name__}: {error}"))

    def _run_continuous(self, ov_genai, pipeline) -> None:
        import openvino as ov

        eos = int(pipeline.get_tokenizer().get_eos_token_id())
        handles: dict[str, object] = {}
        numeric_ids: dict[str, int] = {}
        next_numeric_id = 0
        last_kv_sample = 0.0
        running = ov_genai.GenerationStatus.RUNNING
        # A cancelled request gives its KV blocks back only on the next step(), so step
        # once more after a cancel even when nothing else is running.
        cancelled_since_step = False
        while True:
            # Block while idle; otherwise take whatever arrived since the last step.
            idle = not handles and not cancelled_since_step
            commands = [self._commands.get()] if idle else []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command, payload in commands:
                if command == "stop":
                    for handle in handles.values():
                        handle.cancel()
                    if handles:
                        pipeline.step()
                    return
                if command == "add":
                    request: GenerationRequest = payload
                    input_ids = _ids_tensor(ov, request.prompt_token_ids)
                    config = _generation_config(ov_genai, request.sampling, eos)
                    handles[request.request_id] = pipeline.add_request(next_numeric_id, input_ids, config)
                    numeric_ids[request.request_id] = next_numeric_id
                    next_numeric_id += 1
                elif command == "abort" and payload in handles:
                    handles.pop(payload).cancel()
                    numeric_ids.pop(payload, None)
                    cancelled_since_step = True
            if not handles and not cancelled_since_step:
                continue

            try:
                cancelled_since_step = False
                pipeline.step()
            except Exception as error:  # noqa: BLE001
                failure = EngineError(self.kind, f"step failed: {type(error).__name__}: {error}")
                log.exception("openvino: step failed; failing %d requests", len(handles))
                self._streams.deliver((rid, failure) for rid in handles)
                for handle in handles.values():
                    handle.cancel()
                handles.clear()
                self._healthy = False
                continue

            deliveries = []
            for request_id, handle in list(handles.items()):
                status = handle.get_status()
                token_ids: list[int] = []
                reason = None
                while handle.can_read():
                    for output in handle.read().values():
                        token_ids.extend(output.generated_ids)
                        reason = output.finish_reason
                if status == running:
                    if token_ids:
                        deliveries.append((request_id, GenerationChunk(tuple(token_ids))))
                    continue
                finish = FinishReason.LENGTH if reason == ov_genai.GenerationFinishReason.LENGTH \
                    else FinishReason.STOP
                if status != ov_genai.GenerationStatus.FINISHED:  # dropped or cancelled inside
                    finish = FinishReason.ABORT
                deliveries.append((request_id, GenerationChunk(tuple(token_ids), finish)))
                del handles[request_id]
                numeric_ids.pop(request_id, None)
            self._streams.deliver(deliveries)

            now = time.monotonic()
            if now - last_kv_sample > _KV_USAGE_REFRESH_S:
                last_kv_sample = now
                self._kv_cache_usage = float(pipeline.get_metrics().cache_usage) / 100.0

    def _run_single(self, ov_genai, pipeline) -> None:
        import openvino as ov

        eos = int(pipeline.get_tokenizer().get_eos_token_id())
        state = _SingleRunnerState()
        while not state.stopping:
            if not state.waiting:
                state.take(*self._commands.get())
            state.drain(self._commands)
            if state.stopping or not state.waiting:
                continue
            request = state.waiting.pop(0)
            if request.request_id in state.aborted:
                state.aborted.discard(request.request_id)
                continue
            streamer = _make_streamer(ov_genai, self, request.request_id, state)
            config = _generation_config(ov_genai, request.sampling, eos)
            inputs = ov_genai.TokenizedInputs(_ids_tensor(ov, request.prompt_token_ids),
                                              _ids_tensor(ov, [1] * len(request.prompt_token_ids)))
            pipeline.generate(inputs, config, streamer)
            if request.request_id in state.aborted:
                state.aborted.discard(request.request_id)
                finish = FinishReason.ABORT
            elif streamer.last_token == eos or streamer.count < request.sampling.max_tokens:
                finish = FinishReason.STOP
            else:
                finish = FinishReason.LENGTH
            self._streams.deliver([(request.request_id, GenerationChunk((), finish))])


class _SingleRunnerState:
    """Commands seen by the single-request runner, also while a generation is running."""

    def __init__(self) -> None:
        self.waiting: list[GenerationRequest] = []
        self.aborted: set[str] = set()
        self.stopping = False

    def take(self, command: str, payload) -> None:
        if command == "add":
            self.waiting.append(payload)
        elif command == "abort":
            self.aborted.add(payload)
        elif command == "stop":
            self.stopping = True

    def drain(self, commands: queue.SimpleQueue) -> None:
        while True:
            try:
                self.take(*commands.get_nowait())
            except queue.Empty:
                return


def _ids_tensor(ov, token_ids: Sequence[int]):
    import numpy as np

    return ov.Tensor(np.asarray([token_ids], dtype=np.int64))


def _make_streamer(ov_genai, engine: OpenVINOEngine, request_id: str, state: _SingleRunnerState):
    """A streamer that forwards each token and cancels the generation when aborted.

    OpenVINO only logs an exception raised in a streamer and goes on generating, so
    `write` never raises; it picks up aborts by draining the engine's command queue.
    """

    class Streamer(ov_genai.StreamerBase):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0
            self.last_token: int | None = None

        def write(self, token):
            try:
                tokens = [int(token)] if isinstance(token, int) else [int(t) for t in token]
                self.count += len(tokens)
                if tokens:
                    self.last_token = tokens[-1]
                state.drain(engine._commands)
                if state.stopping or request_id in state.aborted:
                    return ov_genai.StreamingStatus.CANCEL
                engine._streams.deliver([(request_id, GenerationChunk(tuple(tokens)))])
            except Exception:  # noqa: BLE001
                log.exception("openvino: streamer failed")
                return ov_genai.StreamingStatus.CANCEL
            return ov_genai.StreamingStatus.RUNNING

        def end(self) -> None:
            pass

    return Streamer()
