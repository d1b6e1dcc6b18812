"""The native engine behind lowbit's Engine interface: one thread runs schedule -> model -> postprocess.

It loads a Hugging Face checkpoint directory (safetensors) or a GGUF, which it converts once
into a checkpoint next to a cache directory (the same conversion `lowbit prepare` uses).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence as Seq
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from engines.base import (
    DeviceAttempt,
    LoadingEngine,
    EngineError,
    EngineInfo,
    EngineNotReady,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    RequestFailed,
)
from engines.byte_level_decoder import CHECK_TEXT, ByteLevelDecoder, checked_decoder
from engines.native.block_manager import BlockManager
from engines.native.scheduler import Scheduler, SchedulerConfig
from engines.native.sequence import Sequence
from engines.native.step_loop import NAN_FAILURE, StepFailed, StepLoop
from engines.request_streams import RequestStreams, stream_request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeOptions:
    device: str = "cpu"  # "cuda" on a GPU
    dtype: str | None = None  # default: float32 on the CPU, bfloat16 on a GPU
    block_size: int = 16
    kv_cache_tokens: int = 32768
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    cache_dir: str | None = None  # where a GGUF's converted checkpoint goes
    quantization: str | None = None  # "int4": RTN-quantize a dense checkpoint's linear layers at load
    prefix_caching: bool = True  # share the KV blocks of prompt prefixes seen before
    quantize_lm_head: bool = False  # also RTN-quantize the LM head to INT4 (faster decode, some accuracy)
    # Launch a greedy decode step before the host has read the previous one's tokens (step_loop.py).
    # None: on CUDA only (on the CPU a step "launched" is a step computed, so each token would
    # reach its stream one step late).
    run_ahead: bool | None = None


NAN_MESSAGE = ("the model's logits for this request hold a NaN, so no token can be chosen (broken weights, "
               "or activations that overflowed); the request is failed rather than answered with arbitrary tokens")


class HFTokenizer:
    """A checkpoint's Hugging Face tokenizer as lowbit's Tokenizer."""

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.eos_token_ids = frozenset({int(self._tokenizer.eos_token_id)})
        self._fast = checked_decoder(
            ByteLevelDecoder.from_tokenizer_json(directory), self.encode(CHECK_TEXT) + sorted(self.eos_token_ids),
            lambda windows: [self._tokenizer.decode(w, skip_special_tokens=True) for w in windows])

    def apply_chat_template(self, messages: Seq[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, token_ids: Seq[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(token_ids)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)


class NativeEngine(LoadingEngine):
    kind = "native"

    def __init__(self, model_path: str | Path, options: NativeOptions = NativeOptions()):
        self._model_path = Path(model_path)
        self._options = options
        self._info: EngineInfo | None = None
        self._tokenizer: HFTokenizer | None = None
        self._streams = RequestStreams()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._healthy = False
        self._scheduler: Scheduler | None = None
        self._runner = None  # the ModelRunner, once started (torch: imported by start())

    def start(self) -> None:
        from engines.native.model_runner import ModelRunner, RunnerConfig

        checkpoint = self._checkpoint()
        options = self._options
        dtype = options.dtype or ("float32" if options.device == "cpu" else "bfloat16")
        runner = ModelRunner(RunnerConfig(options.device, dtype, options.block_size, options.kv_cache_tokens,
                                          quantize=options.quantization,
                                          quantize_lm_head=options.quantize_lm_head), checkpoint)
        self._runner = runner
        self._tokenizer = HFTokenizer(checkpoint)
        if runner.device.type == "cuda":  # kernels compile and graphs capture only there
            log.info("native engine: compiling kernels and capturing CUDA graphs for up to %d sequences",
                     options.max_num_seqs)
            started = time.perf_counter()
            captured = runner.warm_up(options.max_num_seqs)
            log.info("native engine: warmed up in %.1f s (decode graphs for batch sizes %s)",
                     time.perf_counter() - started, captured)
        self._scheduler = Scheduler(SchedulerConfig(options.max_num_seqs, options.max_num_batched_tokens),
                                    BlockManager(runner.num_blocks, options.block_size, options.prefix_caching))
        self._info = EngineInfo(
            engine=self.kind, device=options.device.upper(), model_path=str(self._model_path),
            context_length=runner.model_config.max_position_embeddings, quantization=runner.weight_format(),
            max_concurrency=options.max_num_seqs, device_attempts=(DeviceAttempt(options.device.upper()),))
        self._healthy = True
        run_ahead = options.run_ahead if options.run_ahead is not None else runner.device.type == "cuda"
        steps = StepLoop(self._scheduler, runner, self._tokenizer.eos_token_ids, run_ahead)
        self._thread = threading.Thread(target=self._loop, args=(steps,), name="native-engine", daemon=True)
        self._thread.start()

    def _checkpoint(self) -> Path:
        if self._model_path.is_dir():
            return self._model_path
        from engines.prepare.checkpoint import describe_source, to_checkpoint

        cache = Path(self._options.cache_dir or Path.home() / ".cache" / "lowbit")
        cache.mkdir(parents=True, exist_ok=True)
        return to_checkpoint(describe_source(self._model_path), cache)

    def stop(self) -> None:
        if self._thread is not None:
            self._commands.put(("stop", None))
            self._thread.join(timeout=30)
            self._thread = None
        self._healthy = False
        self._streams.fail_all(EngineNotReady(self.kind, "engine stopped"))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self._healthy:
            raise EngineNotReady(self.kind, "the native engine is not running")
        def submit() -> None:
            self._commands.put(("add", request))

        async with aclosing(stream_request(self._streams, request.request_id, submit, self.abort)) as chunks:
            async for chunk in chunks:
                yield chunk

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def is_healthy(self) -> bool:
        return self._healthy

    def kv_cache_usage(self) -> float | None:
        scheduler = self._scheduler
        if scheduler is None:
            return None
        manager = scheduler.block_manager
        return 1.0 - manager.num_free_blocks / manager.num_blocks

    # --- the engine thread ----------------------------------------------------------------------

    def _loop(self, steps: StepLoop) -> None:
        scheduler = steps.scheduler
        while True:
            commands = [self._commands.get()] if steps.is_idle else []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command, payload in commands:
                if command == "stop":
                    return
                if command == "add":
                    seq = Sequence(payload.request_id, list(payload.prompt_token_ids), payload.sampling)
                    try:
                        scheduler.add(seq)
                    except ValueError as error:
                        self._streams.deliver([(seq.seq_id, EngineError(self.kind, str(error)))])
                elif command == "abort" and scheduler.abort(payload) is not None:
                    steps.runner.sampler.forget(payload)
            if steps.is_idle:
                continue
            try:
                results = steps.step(may_run_ahead=self._commands.empty())
            except StepFailed as failure:  # fail these requests, keep serving
                log.error("native: step failed", exc_info=failure.__cause__)
                for seq in failure.seqs:
                    scheduler.abort(seq.seq_id)
                self._streams.deliver((seq.seq_id, EngineError(self.kind, f"step failed: {failure}"))
                                      for seq in failure.seqs)
                continue
            deliveries = []
            for seq, token, reason in results:
                if reason == NAN_FAILURE:
                    log.error("native: request %s failed: NaN in its logits", seq.seq_id)
                    deliveries.append((seq.seq_id, RequestFailed(self.kind, NAN_MESSAGE)))
                else:
                    deliveries.append((seq.seq_id, GenerationChunk((token,), FinishReason(reason) if reason else None)))
                if reason:
                    steps.runner.sampler.forget(seq.seq_id)
            self._streams.deliver(deliveries)
