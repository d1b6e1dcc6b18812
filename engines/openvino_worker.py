"""The OpenVINO GenAI pipeline, run in a process of its own.

`ContinuousBatchingPipeline.step()` holds the GIL for most of its run (measured: a
Python thread beside it ran at 30% speed with a core free), so the pipeline cannot share
a process with the HTTP event loop without slowing every response. This module is the
child side: it loads the model on the first device that works, then drives it, reading
commands from one pipe and writing token batches to another. `openvino_engine.py` is
the parent side.

Messages, child -> parent:
  ("loaded", device, attempts, single)   attempts: [(device, error or None), ...]
  ("load_failed", attempts)
  ("tokens", [(request_id, token_ids, finish_reason or None), ...])   one per step
  ("failed", [request_id, ...], message)  the step failed for these requests
  ("kv", usage_fraction)
Parent -> child: ("add", GenerationRequest), ("abort", request_id), ("stop",)
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection

from engines.base import FinishReason, GenerationRequest, SamplingParams
from engines.worker_inbox import CommandInbox

_KV_USAGE_REFRESH_S = 0.5  # get_metrics() is not free; report it twice a second


def main(argv: list[str]) -> None:
    """Entry point: `python -m engines.openvino_worker COMMANDS_FD OUTPUTS_FD MODEL OPTIONS_JSON`."""
    from engines.openvino_engine import OpenVINOOptions

    commands_fd, outputs_fd, model_path, options_json = argv
    options = json.loads(options_json)
    options["devices"] = tuple(options["devices"])
    worker_main(Connection(int(commands_fd), writable=False), Connection(int(outputs_fd), readable=False),
                model_path, OpenVINOOptions(**options))


def worker_main(commands: Connection, outputs: Connection, model_path: str, options) -> None:
    # The parent decides when this process ends (drain on SIGTERM, Ctrl-C in a terminal
    # reaches the whole process group): ignore both signals here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import openvino_genai as ov_genai

    attempts: list[tuple[str, str | None]] = []
    for device in options.devices:
        single = _is_single_request(options, device)
        try:
            pipeline = _load(ov_genai, model_path, options, device, single)
        except Exception as error:  # noqa: BLE001 - any load failure means "next device"
            attempts.append((device, f"{type(error).__name__}: {error}".strip()))
            continue
        attempts.append((device, None))
        outputs.send(("loaded", device, attempts, single))
        runner = _SingleRunner if single else _ContinuousRunner
        try:
            runner(ov_genai, pipeline, commands, outputs).run()
        except (EOFError, BrokenPipeError, KeyboardInterrupt):
            pass  # the parent went away
        return
    outputs.send(("load_failed", attempts))


def _is_single_request(options, device: str) -> bool:
    if options.pipeline == "auto":
        return device.upper().startswith("NPU")
    return options.pipeline == "single"


def _load(ov_genai, model_path: str, options, device: str, single: bool):
    properties: dict[str, object] = {}
    if options.cache_dir:
        properties["CACHE_DIR"] = options.cache_dir
    if single:
        if device.upper().startswith("NPU"):
            # The NPU compiles static shapes: the prompt and KV-cache sizes are fixed here.
            properties["MAX_PROMPT_LEN"] = options.npu_max_prompt_len
            properties["MIN_RESPONSE_LEN"] = options.npu_min_response_len
        return ov_genai.LLMPipeline(model_path, device, **properties)
    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = options.kv_cache_size_gb
    scheduler.max_num_seqs = options.max_num_seqs
    scheduler.max_num_batched_tokens = options.max_num_batched_tokens
    scheduler.enable_prefix_caching = options.enable_prefix_caching
    scheduler.dynamic_split_fuse = True
    return ov_genai.ContinuousBatchingPipeline(model_path, scheduler, device, properties)


def generation_config(ov_genai, sampling: SamplingParams, eos_token_id: int):
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


def _ids_tensor(token_ids: Sequence[int]):
    import numpy as np
    import openvino as ov

    return ov.Tensor(np.asarray([token_ids], dtype=np.int64))


class _ContinuousRunner:
    """Adds requests and steps one ContinuousBatchingPipeline; each request has a handle."""

    def __init__(self, ov_genai, pipeline, commands: Connection, outputs: Connection):
        self.ov_genai, self.pipeline = ov_genai, pipeline
        self.commands, self.outputs = commands, outputs
        self.eos = int(pipeline.get_tokenizer().get_eos_token_id())
        self.handles: dict[str, object] = {}
        self.next_numeric_id = 0
        # A cancelled request gives its KV blocks back only on the next step(), so step
        # once more after a cancel even when nothing else is running.
        self.cancelled_since_step = False

    def run(self) -> None:
        last_kv_report = 0.0
        while True:
            idle = not self.handles and not self.cancelled_since_step
            if idle:
                self.commands.poll(None)  # block until a command arrives
            while self.commands.poll(0):
                if not self._apply(self.commands.recv()):
                    return
            if not self.handles and not self.cancelled_since_step:
                continue
            self.cancelled_since_step = False
            try:
                self.pipeline.step()
            except Exception as error:  # noqa: BLE001
                self._fail_all(f"step failed: {type(error).__name__}: {error}")
                continue
            self.outputs.send(("tokens", self._collect()))
            now = time.monotonic()
            if now - last_kv_report > _KV_USAGE_REFRESH_S:
                last_kv_report = now
                self.outputs.send(("kv", float(self.pipeline.get_metrics().cache_usage) / 100.0))

    def _apply(self, command: tuple) -> bool:
        kind = command[0]
        if kind == "stop":
            for handle in self.handles.values():
                handle.cancel()
            if self.handles:
                self.pipeline.step()
            return False
        if kind == "add":
            request: GenerationRequest = command[1]
            config = generation_config(self.ov_genai, request.sampling, self.eos)
            self.handles[request.request_id] = self.pipeline.add_request(
                self.next_numeric_id, _ids_tensor(request.prompt_token_ids), config)
            self.next_numeric_id += 1
        elif kind == "abort" and command[1] in self.handles:
            self.handles.pop(command[1]).cancel()
            self.cancelled_since_step = True
        return True

    def _collect(self) -> list[tuple[str, tuple[int, ...], str | None]]:
        ov_genai = self.ov_genai
        batch = []
        for request_id, handle in list(self.handles.items()):
            status = handle.get_status()
            token_ids: list[int] = []
            reason = None
            while handle.can_read():
                for output in handle.read().values():
                    token_ids.extend(output.generated_ids)
                    reason = output.finish_reason
            if status == ov_genai.GenerationStatus.RUNNING:
                if token_ids:
                    batch.append((request_id, tuple(token_ids), None))
                continue
            if status != ov_genai.GenerationStatus.FINISHED:  # dropped or cancelled inside
                finish = FinishReason.ABORT
            elif reason == ov_genai.GenerationFinishReason.LENGTH:
                finish = FinishReason.LENGTH
            else:
                finish = FinishReason.STOP
            batch.append((request_id, tuple(token_ids), finish.value))
            del self.handles[request_id]
        return batch

    def _fail_all(self, message: str) -> None:
        self.outputs.send(("failed", list(self.handles), message + "\n" + traceback.format_exc(limit=3)))
        for handle in self.handles.values():
            handle.cancel()
        self.handles.clear()
        self.cancelled_since_step = True


class _SingleRunner:
    """One request at a time through LLMPipeline.generate (the NPU's way), streamed."""

    def __init__(self, ov_genai, pipeline, commands: Connection, outputs: Connection):
        self.ov_genai, self.pipeline = ov_genai, pipeline
        self.inbox = CommandInbox(commands)
        self.outputs = outputs
        self.eos = int(pipeline.get_tokenizer().get_eos_token_id())

    def run(self) -> None:
        while not self.inbox.stopping:
            self.inbox.take(block=not self.inbox.waiting)
            request = None if self.inbox.stopping else self.inbox.next_request()
            if request is not None:
                self._generate(request)

    def _generate(self, request: GenerationRequest) -> None:
        ov_genai = self.ov_genai
        runner = self

        class Streamer(ov_genai.StreamerBase):
            """Forwards each token; cancels when aborted. Never raises: OpenVINO would only log it."""

            def __init__(self) -> None:
                super().__init__()
                self.count, self.last_token = 0, None

            def write(self, token):
                try:
                    tokens = (int(token),) if isinstance(token, int) else tuple(int(t) for t in token)
                    self.count += len(tokens)
                    self.last_token = tokens[-1] if tokens else self.last_token
                    runner.inbox.take(block=False)
                    if runner.inbox.is_aborted(request.request_id):
                        return ov_genai.StreamingStatus.CANCEL
                    runner.outputs.send(("tokens", [(request.request_id, tokens, None)]))
                except Exception:  # noqa: BLE001
                    return ov_genai.StreamingStatus.CANCEL
                return ov_genai.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        streamer = Streamer()
        prompt = _ids_tensor(request.prompt_token_ids)
        inputs = ov_genai.TokenizedInputs(prompt, _ids_tensor([1] * len(request.prompt_token_ids)))
        try:
            self.pipeline.generate(inputs, generation_config(ov_genai, request.sampling, self.eos), streamer)
        except Exception as error:  # noqa: BLE001
            self.outputs.send(("failed", [request.request_id], f"{type(error).__name__}: {error}"))
            return
        if self.inbox.is_aborted(request.request_id):
            self.inbox.forget(request.request_id)
            finish = FinishReason.ABORT
        elif streamer.last_token == self.eos or streamer.count < request.sampling.max_tokens:
            finish = FinishReason.STOP
        else:
            finish = FinishReason.LENGTH
        self.outputs.send(("tokens", [(request.request_id, (), finish.value)]))


if __name__ == "__main__":
    main(sys.argv[1:])
