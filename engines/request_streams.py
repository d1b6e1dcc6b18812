"""Hand chunks from an engine's own thread to per-request asyncio queues.

Engines whose runtime blocks (OpenVINO, ONNX Runtime) run it on one thread they own.
That thread must never touch asyncio objects directly; it collects what one step produced
and delivers it with a single `call_soon_threadsafe`, so the event loop wakes once per
step rather than once per token per request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable

from engines.base import GenerationChunk

Delivery = tuple[str, "GenerationChunk | BaseException"]


class RequestStreams:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def open(self, request_id: str) -> asyncio.Queue:
        """Called on the event loop: create the queue this request's chunks arrive in."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        return queue

    def close(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def deliver(self, deliveries: Iterable[Delivery]) -> None:
        """Called on the engine thread: push chunks (or an exception) to their requests."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        with self._lock:
            for request_id, item in deliveries:
                target = self._queues.get(request_id)
                if target is not None:  # the consumer may have gone already
                    by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop was closed during shutdown
                pass

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            request_ids = list(self._queues)
        self.deliver((request_id, error) for request_id in request_ids)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


async def iterate_queue(queue: asyncio.Queue) -> AsyncIterator[GenerationChunk]:
    """Yield chunks until the one with a finish reason; re-raise a delivered exception."""
    while True:
        item = await queue.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


async def stream_request(streams: RequestStreams, request_id: str, submit: Callable[[], None],
                         abort: Callable[[str], None]) -> AsyncIterator[GenerationChunk]:
    """The engine side of `Engine.generate` for engines that run on their own thread or process.

    Opens the request's queue, hands the request over with `submit`, yields its chunks, and
    if the reader stops before the last chunk (disconnect, deadline, failure), aborts it.
    Callers nest this in their own generator with `contextlib.aclosing`, so that the abort
    happens when they are closed, not when this generator is garbage-collected.
    """
    chunks = streams.open(request_id)
    finished = False
    try:
        submit()
        async for chunk in iterate_queue(chunks):
            finished = chunk.finish_reason is not None
            yield chunk
    finally:
        streams.close(request_id)
        if not finished:
            abort(request_id)
