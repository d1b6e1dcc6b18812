"""Admits, orders, routes and supervises requests across loaded engines.

Each engine in rotation ("slot") has a bounded set of running requests and a bounded
waiting list. `submit()` decides synchronously (so the HTTP layer can answer 429 or 503
before it starts a response), then one task per request drives it: wait for a turn,
stream from the engine, fall back to another engine if this one fails before any output,
and give the slot to the next waiting request when done. Nothing here imports FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from engines.base import (
    Engine,
    EngineError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    RequestFailed,
    SamplingParams,
)
from app.scheduler_errors import (
    Draining,
    EngineFailed,
    ModelNotFound,
    NotReady,
    Overloaded,
    RequestTimedOut,
    SchedulerError,
    ShutDown,
)

log = logging.getLogger(__name__)

_DEFAULT_STREAM_TOKENS_PER_S = 20.0  # per-request decode rate assumed before any is measured
_RATE_SMOOTHING = 0.2  # weight of the newest finished request in the moving average
_MAX_RETRY_AFTER_S = 120


@dataclass(frozen=True)
class AdmissionLimits:
    max_running: int = 16
    max_waiting: int = 64
    priority_aging_s: float = 5.0  # waiting this long improves priority by one
    health_check_interval_s: float = 5.0


class SchedulerObserver(Protocol):
    """Receives every scheduling decision at its boundary (the metrics module implements it)."""

    def request_rejected(self, model_id: str, reason: str) -> None: ...

    def request_admitted(self, slot: EngineSlot) -> None: ...

    def queue_changed(self, slot: EngineSlot) -> None: ...

    def request_started(self, slot: EngineSlot, queue_time_s: float) -> None: ...

    def engine_fallback(self, from_slot: EngineSlot, to_slot: EngineSlot) -> None: ...

    def request_aborted(self, slot: EngineSlot | None, reason: str) -> None: ...

    def rotation_changed(self, slot: EngineSlot) -> None: ...


class NullObserver:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@dataclass(eq=False)
class Ticket:
    """One accepted request as the scheduler tracks it."""

    request: GenerationRequest
    model_id: str
    priority: int
    timeout_s: float
    arrived: float  # loop time
    turn: asyncio.Future | None = None  # resolved when a running slot is granted
    started: float | None = None
    num_generated: int = 0

    @property
    def work_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + self.request.sampling.max_tokens

    def effective_priority(self, now: float, aging_s: float) -> float:
        return self.priority - (now - self.arrived) / aging_s


@dataclass(eq=False)
class EngineSlot:
    """A loaded engine in the scheduler's rotation, with its queue."""

    name: str  # unique, e.g. "openvino-CPU-0"
    model_id: str
    engine: Engine
    max_running: int
    max_waiting: int
    in_rotation: bool = True
    running: set[Ticket] = field(default_factory=set)
    waiting: list[Ticket] = field(default_factory=list)
    stream_tokens_per_s: float = _DEFAULT_STREAM_TOKENS_PER_S

    @property
    def has_room(self) -> bool:
        return len(self.running) < self.max_running or len(self.waiting) < self.max_waiting

    @property
    def outstanding_tokens(self) -> int:
        running = sum(t.work_tokens - t.num_generated for t in self.running)
        return running + sum(t.work_tokens for t in self.waiting)

    def seconds_until_a_slot_frees(self) -> float:
        """Time until the running request closest to done finishes, at the measured rate."""
        if len(self.running) < self.max_running:
            return 0.0
        remaining = min(t.request.sampling.max_tokens - t.num_generated for t in self.running)
        return max(remaining, 0) / self.stream_tokens_per_s


class RequestHandle:
    """What the serving layer holds for one admitted request: its chunks, and a way to stop it."""

    def __init__(self, ticket: Ticket):
        self.ticket = ticket
        self.slot: EngineSlot | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._stop_reason: str | None = None

    @property
    def request_id(self) -> str:
        return self.ticket.request.request_id

    @property
    def queue_time_s(self) -> float | None:
        return None if self.ticket.started is None else self.ticket.started - self.ticket.arrived

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GenerationChunk]:
        while True:
            event = await self._events.get()
            if event is None:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def stop(self, reason: str) -> None:
        """End the request early (client gone, stop string found); aborts the engine."""
        if self._task is not None and not self._task.done():
            self._stop_reason = reason
            self._task.cancel()


class Scheduler:
    def __init__(self, limits: AdmissionLimits, observer: SchedulerObserver | None = None):
        self._limits = limits
        self._observer = observer or NullObserver()
        self._slots: dict[str, list[EngineSlot]] = {}  # model id -> slots
        self._load_failures: dict[str, list[str]] = {}  # model id -> "engine: error" of engines that failed to load
        self._handles: set[RequestHandle] = set()
        self._health_tasks: set[asyncio.Task] = set()
        self._draining = False

    # --- configuration ---------------------------------------------------------------

    def expect_model(self, model_id: str) -> None:
        """Declare a model id configured to be served (it may still be loading)."""
        self._slots.setdefault(model_id, [])

    def engine_failed_to_load(self, model_id: str, name: str, error: str) -> None:
        """Record why an engine of `model_id` never came up: requests for it are told."""
        self._slots.setdefault(model_id, [])
        self._load_failures.setdefault(model_id, []).append(f"{name}: {error}")

    def add_engine(self, model_id: str, name: str, engine: Engine) -> EngineSlot:
        max_running = min(self._limits.max_running, engine.info.max_concurrency)
        slot = EngineSlot(name, model_id, engine, max_running, self._limits.max_waiting)
        self._slots.setdefault(model_id, []).append(slot)
        self._observer.rotation_changed(slot)
        return slot

    @property
    def model_ids(self) -> list[str]:
        return list(self._slots)

    def slots(self) -> list[EngineSlot]:
        return [slot for slots in self._slots.values() for slot in slots]

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def is_overloaded(self) -> bool:
        """True when some model has engines in rotation and none of them has room."""
        for slots in self._slots.values():
            live = [s for s in slots if s.in_rotation]
            if live and not any(s.has_room for s in live):
                return True
        return False

    @property
    def num_in_flight(self) -> int:
        return len(self._handles)

    # --- admission -------------------------------------------------------------------

    def check_admission(self, model_id: str) -> None:
        """Raise now what `submit` would raise, before the caller spends time tokenizing."""
        self._slots_with_room(model_id)

    def submit(self, request: GenerationRequest, model_id: str, priority: int = 0,
               timeout_s: float = 300.0) -> RequestHandle:
        """Admit a request or raise (ModelNotFound, NotReady, Overloaded, Draining)."""
        slot = min(self._slots_with_room(model_id), key=lambda s: s.outstanding_tokens)
        loop = asyncio.get_running_loop()
        ticket = Ticket(request, model_id, priority, timeout_s, arrived=loop.time())
        handle = RequestHandle(ticket)
        self._place(ticket, slot, handle)
        self._observer.request_admitted(slot)
        self._handles.add(handle)
        handle._task = loop.create_task(self._drive(handle), name=f"request-{request.request_id}")
        return handle

    def _slots_with_room(self, model_id: str) -> list[EngineSlot]:
        if model_id not in self._slots:
            self._observer.request_rejected(model_id, "model_not_found")
            raise ModelNotFound(model_id, self.model_ids)
        if self._draining:
            self._observer.request_rejected(model_id, "draining")
            raise Draining(retry_after_s=5)
        live = [s for s in self._slots[model_id] if s.in_rotation]
        if not live:
            self._observer.request_rejected(model_id, "not_ready")
            failures = self._load_failures.get(model_id)
            reason = f" Failed to load: {'; '.join(failures)}" if failures else ""
            raise NotReady(f"No engine serving '{model_id}' is ready yet.{reason}",
                           retry_after_s=self._limits.health_check_interval_s)
        with_room = [s for s in live if s.has_room]
        if not with_room:
            self._observer.request_rejected(model_id, "queue_full")
            retry_after = min(s.seconds_until_a_slot_frees() for s in live)
            raise Overloaded(model_id, min(max(1, math.ceil(retry_after)), _MAX_RETRY_AFTER_S))
        return with_room

    def _place(self, ticket: Ticket, slot: EngineSlot, handle: RequestHandle, force: bool = False) -> None:
        """Give the ticket a running place on `slot` now, or queue it there."""
        handle.slot = slot
        ticket.turn = asyncio.get_running_loop().create_future()
        if len(slot.running) < slot.max_running and not slot.waiting:
            self._start(ticket, slot)
        elif force:  # a fallback request was already accepted: it jumps the queue
            slot.waiting.insert(0, ticket)
        else:
            slot.waiting.append(ticket)
        self._observer.queue_changed(slot)

    def _start(self, ticket: Ticket, slot: EngineSlot) -> None:
        slot.running.add(ticket)
        now = asyncio.get_running_loop().time()
        if ticket.started is None:
            ticket.started = now
            self._observer.request_started(slot, now - ticket.arrived)
        if ticket.turn is not None and not ticket.turn.done():
            ticket.turn.set_result(None)

    def _release(self, ticket: Ticket, slot: EngineSlot) -> None:
        slot.running.discard(ticket)
        if ticket in slot.waiting:
            slot.waiting.remove(ticket)
        self._grant_next(slot)
        self._observer.queue_changed(slot)

    def _grant_next(self, slot: EngineSlot) -> None:
        now = asyncio.get_running_loop().time()
        while slot.waiting and len(slot.running) < slot.max_running:
            # Lowest effective priority first; ties keep arrival order (min is stable).
            best = min(slot.waiting, key=lambda t: t.effective_priority(now, self._limits.priority_aging_s))
            slot.waiting.remove(best)
            self._start(best, slot)

    # --- one request's life ------------------------------------------------------------

    async def _drive(self, handle: RequestHandle) -> None:
        ticket = handle.ticket
        loop = asyncio.get_running_loop()
        tried: list[EngineSlot] = []
        try:
            async with asyncio.timeout_at(ticket.arrived + ticket.timeout_s):
                while True:
                    slot = handle.slot
                    assert slot is not None
                    tried.append(slot)
                    await ticket.turn
                    try:
                        await self._stream(handle, slot, loop)
                        handle._events.put_nowait(None)
                        return
                    except EngineError as error:
                        next_slot = self._fall_back(handle, slot, tried, error)
                        if next_slot is None:
                            raise EngineFailed(slot.name, str(error), handle.ticket.num_generated > 0) from error
        except TimeoutError:
            self._observer.request_aborted(handle.slot, "timeout")
            handle._events.put_nowait(RequestTimedOut(ticket.timeout_s, queued=ticket.started is None))
        except asyncio.CancelledError:
            reason = handle._stop_reason or "shutdown"
            if reason != "finished":  # "finished": the serving layer found a stop string
                self._observer.request_aborted(handle.slot, reason)
            handle._events.put_nowait(ShutDown() if reason == "shutdown" else None)
        except SchedulerError as error:
            self._observer.request_aborted(handle.slot, "engine_error")
            handle._events.put_nowait(error)
        except Exception as error:  # noqa: BLE001 - an accepted request is always answered
            log.exception("scheduler: request %s failed unexpectedly", handle.request_id)
            handle._events.put_nowait(EngineFailed(getattr(handle.slot, "name", "?"), repr(error), False))
        finally:
            if handle.slot is not None:
                self._release(ticket, handle.slot)
            self._handles.discard(handle)

    async def _stream(self, handle: RequestHandle, slot: EngineSlot, loop: asyncio.AbstractEventLoop) -> None:
        ticket = handle.ticket
        first_token_at: float | None = None
        generated_here = 0
        async for chunk in slot.engine.generate(ticket.request):
            if chunk.finish_reason == FinishReason.ABORT:
                raise EngineError(slot.name, "the engine dropped the request")
            if chunk.token_ids and first_token_at is None:
                first_token_at = loop.time()
            ticket.num_generated += len(chunk.token_ids)
            generated_here += len(chunk.token_ids)
            handle._events.put_nowait(chunk)
        if first_token_at is not None and generated_here > 1:
            # Per-request decode rate, for Retry-After estimates.
            rate = (generated_here - 1) / max(loop.time() - first_token_at, 1e-6)
            slot.stream_tokens_per_s += _RATE_SMOOTHING * (rate - slot.stream_tokens_per_s)

    def _fall_back(self, handle: RequestHandle, failed: EngineSlot, tried: list[EngineSlot],
                   error: EngineError) -> EngineSlot | None:
        """Take the failed engine out of rotation (unless only this request failed); move the
        request if nothing was sent yet."""
        log.warning("scheduler: engine %s failed for request %s: %s", failed.name, handle.request_id, error)
        if not isinstance(error, RequestFailed):
            self._take_out_of_rotation(failed)
        if handle.ticket.num_generated > 0:
            return None  # the client has seen output; a silent retry would repeat or diverge
        candidates = [s for s in self._slots[failed.model_id] if s.in_rotation and s not in tried]
        if not candidates:
            return None
        target = min(candidates, key=lambda s: s.outstanding_tokens)
        self._observer.engine_fallback(failed, target)
        self._release(handle.ticket, failed)
        self._place(handle.ticket, target, handle, force=True)
        return target

    # --- engine health -------------------------------------------------------------------

    def _take_out_of_rotation(self, slot: EngineSlot) -> None:
        if not slot.in_rotation:
            return
        slot.in_rotation = False
        self._observer.rotation_changed(slot)
        task = asyncio.get_running_loop().create_task(self._recover(slot), name=f"health-{slot.name}")
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _recover(self, slot: EngineSlot) -> None:
        """Probe a failed engine with a one-token request until it answers, then rejoin."""
        probe_number = 0
        while not slot.in_rotation:
            await asyncio.sleep(self._limits.health_check_interval_s)
            probe_number += 1
            if await self._probe(slot, f"health-{slot.name}-{probe_number}"):
                log.info("scheduler: engine %s is healthy again; back in rotation", slot.name)
                slot.in_rotation = True
                self._observer.rotation_changed(slot)

    async def _probe(self, slot: EngineSlot, request_id: str) -> bool:
        if not slot.engine.is_healthy():
            return False
        eos = next(iter(slot.engine.tokenizer.eos_token_ids), 0)
        probe = GenerationRequest(request_id, (eos,), SamplingParams(max_tokens=1, temperature=0.0))
        try:
            async with asyncio.timeout(max(self._limits.health_check_interval_s, 5.0)):
                async for chunk in slot.engine.generate(probe):
                    if chunk.finish_reason == FinishReason.ABORT:
                        return False
            return True
        except (EngineError, TimeoutError) as error:
            log.info("scheduler: engine %s still failing: %s", slot.name, error)
            return False

    # --- shutdown ----------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting, let in-flight requests finish for `timeout_s`, abort the rest.

        Returns how many requests had to be aborted.
        """
        self._draining = True
        pending = [h._task for h in self._handles if h._task is not None]
        if pending:
            _, still_running = await asyncio.wait(pending, timeout=timeout_s)
        else:
            still_running = set()
        for task in still_running:
            task.cancel()  # _drive sees "shutdown" and answers the client with ShutDown
        if still_running:
            await asyncio.wait(still_running, timeout=5)
        for task in list(self._health_tasks):
            task.cancel()
        return len(still_running)
