"""Engines whose runtime runs in worker processes (parent side).

OpenVINO's pipeline step and ONNX Runtime GenAI's token step both hold the GIL while they
compute, so they cannot share a process with the HTTP event loop (or with each other)
without slowing it. Such an engine starts one or more `python -m <worker module>`
processes, sends them requests over a pipe and reads token batches back on a thread.

The wire protocol (the worker modules implement the child side):
  child -> parent: ("loaded", device, attempts, single) | ("load_failed", attempts)
                   ("tokens", [(request_id, token_ids, finish or None), ...])
                   ("failed", [request_id, ...], message) | ("kv", usage_fraction)
  parent -> child: ("add", GenerationRequest) | ("abort", request_id) | ("stop",)
"""

from __future__ import annotations

import abc
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from multiprocessing.connection import Connection

from engines.base import (
    DeviceAttempt,
    LoadingEngine,
    EngineError,
    EngineInfo,
    EngineNotReady,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    Tokenizer,
)
from engines.request_streams import RequestStreams, stream_request

log = logging.getLogger(__name__)

_LOAD_TIMEOUT_S = 900  # compiling for an NPU can take minutes
_STOP_TIMEOUT_S = 30


class WorkerProcess:
    """One worker process and the two pipes to it.

    Started as a fresh interpreter (`python -m module`) rather than with multiprocessing's
    spawn, which would re-run the caller's main module in the child.
    """

    def __init__(self, module: str, model_path: str, options: dict):
        commands_read, commands_write = os.pipe()
        outputs_read, outputs_write = os.pipe()
        argv = [sys.executable, "-m", module, str(commands_read), str(outputs_write), model_path, json.dumps(options)]
        self.process = subprocess.Popen(argv, pass_fds=(commands_read, outputs_write))
        os.close(commands_read)  # the child's ends: closing ours lets EOF reach each side
        os.close(outputs_write)
        self.commands = Connection(commands_write, readable=False)
        self.outputs = Connection(outputs_read, writable=False)
        self._send_lock = threading.Lock()
        self.in_flight: set[str] = set()  # requests sent to this worker and not finished

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def send(self, command: tuple) -> None:
        with self._send_lock:
            self.commands.send(command)

    def wait_loaded(self) -> tuple:
        if not self.outputs.poll(_LOAD_TIMEOUT_S):
            raise TimeoutError(f"the worker did not load within {_LOAD_TIMEOUT_S} s")
        try:
            return self.outputs.recv()
        except EOFError:
            raise EngineError("worker", f"the worker exited while loading (code {self.process.wait()})") from None

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


def worker_options(options) -> dict:
    """An options dataclass as JSON-safe values for the worker's command line."""
    import dataclasses

    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(options).items()}


class ProcessEngine(LoadingEngine):
    """The shared parent side: start, route requests to workers, read tokens, restart."""

    kind: str = "process"
    worker_module: str = ""

    def __init__(self, model_path, num_workers: int = 1):
        self._model_path = str(model_path)
        self._num_workers = num_workers
        self._info: EngineInfo | None = None
        self._tokenizer: Tokenizer | None = None
        self._streams = RequestStreams()
        self._workers: list[WorkerProcess] = []
        self._assigned: dict[str, WorkerProcess] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._kv_cache_usage: float | None = None

    # --- what a concrete engine provides ---------------------------------------------------

    @abc.abstractmethod
    def _worker_options(self) -> dict:
        """JSON-safe options for the worker's command line."""

    @abc.abstractmethod
    def _load_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, loaded in this process (while the workers load)."""

    @abc.abstractmethod
    def _engine_info(self, device: str, attempts: tuple[DeviceAttempt, ...], single: bool) -> EngineInfo:
        """Describe the loaded engine from the first worker's "loaded" message."""

    # --- interface -------------------------------------------------------------------------

    def start(self) -> None:
        workers = [WorkerProcess(self.worker_module, self._model_path, self._worker_options())
                   for _ in range(self._num_workers)]
        try:
            self._tokenizer = self._load_tokenizer()
            messages = [worker.wait_loaded() for worker in workers]
        except BaseException:
            for worker in workers:
                worker.stop()
            raise
        first = messages[0]
        attempts = tuple(DeviceAttempt(device, error) for device, error in first[-1 if first[0] == "load_failed" else 2])
        for attempt in attempts:
            if attempt.error:
                log.warning("%s: device %s failed to load %s: %s", self.kind, attempt.device,
                            self._model_path, attempt.error)
        if any(message[0] != "loaded" for message in messages):
            for worker in workers:
                worker.stop()
            tried = "; ".join(f"{a.device}: {a.error}" for a in attempts if a.error) or str(messages)
            raise EngineError(self.kind, f"no device could load {self._model_path} ({tried})")
        _, device, _, single = first
        log.info("%s: loaded %s on %s (%d worker process(es))", self.kind, self._model_path, device, len(workers))
        self._info = self._engine_info(device, attempts, single)
        for worker in workers:
            self._attach(worker)

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()
        self._streams.fail_all(EngineNotReady(self.kind, "engine stopped"))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        def submit() -> None:
            worker = self._assign(request.request_id)
            try:
                worker.send(("add", request))
            except (OSError, EOFError) as error:
                raise EngineError(self.kind, f"the worker process is gone: {error}") from None

        try:
            async with aclosing(stream_request(self._streams, request.request_id, submit, self.abort)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._release(request.request_id)  # after the abort above, which needs the assignment

    def abort(self, request_id: str) -> None:
        worker = self._assigned.get(request_id)
        if worker is not None:
            try:
                worker.send(("abort", request_id))
            except (OSError, EOFError):
                pass

    def is_healthy(self) -> bool:
        return bool(self._workers) and len(self._workers) == self._num_workers

    def kv_cache_usage(self) -> float | None:
        return self._kv_cache_usage

    @property
    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    # --- routing --------------------------------------------------------------------------------

    def _assign(self, request_id: str) -> WorkerProcess:
        with self._lock:
            if not self._workers:
                raise EngineNotReady(self.kind, "no worker process is running")
            worker = min(self._workers, key=lambda w: len(w.in_flight))  # least busy
            worker.in_flight.add(request_id)
            self._assigned[request_id] = worker
            return worker

    def _release(self, request_id: str) -> None:
        with self._lock:
            worker = self._assigned.pop(request_id, None)
            if worker is not None:
                worker.in_flight.discard(request_id)

    # --- the workers' output --------------------------------------------------------------------

    def _attach(self, worker: WorkerProcess) -> None:
        with self._lock:
            self._workers.append(worker)
        threading.Thread(target=self._read_outputs, args=(worker,), name=f"{self.kind}-reader", daemon=True).start()

    def _read_outputs(self, worker: WorkerProcess) -> None:
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
                    log.error("%s: worker failed %d request(s): %s", self.kind, len(message[1]), message[2])
                    error = EngineError(self.kind, message[2].splitlines()[0])
                    self._streams.deliver((request_id, error) for request_id in message[1])
        except (EOFError, OSError):
            pass
        with self._lock:
            if self._stopping or worker not in self._workers:
                return
            self._workers.remove(worker)
            lost = list(worker.in_flight)
        log.error("%s: a worker process exited (code %s); restarting it", self.kind, worker.exitcode)
        self._streams.deliver((request_id, EngineError(self.kind, "the worker process died")) for request_id in lost)
        self._restart()

    def _restart(self) -> None:
        worker = WorkerProcess(self.worker_module, self._model_path, self._worker_options())
        try:
            message = worker.wait_loaded()
        except (EngineError, TimeoutError) as error:
            message = ("load_failed", str(error))
        if message[0] != "loaded" or self._stopping:
            log.error("%s: restarting a worker failed: %s", self.kind, message)
            worker.stop()
            return
        log.info("%s: worker restarted on %s", self.kind, message[1])
        self._attach(worker)
