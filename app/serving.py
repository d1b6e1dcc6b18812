"""Chat completions: prompt from the model's chat template, then a scheduled run, then the wire.

`ChatService.prepare` validates and tokenizes (errors here are the client's: 4xx);
`complete` and `stream` consume the scheduler's chunks through `TextOutput` and format
a `chat.completion` or SSE `chat.completion.chunk`s. Every admitted request ends in
exactly one `Metrics.request_finished` call and one log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from app.errors import ApiError, from_scheduler_error, invalid_request
from app.metrics import Metrics, slot_labels
from app.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from app.scheduler import RequestHandle, Scheduler
from app.scheduler_errors import RequestTimedOut, SchedulerError
from app.text_output import TextDelta, TextOutput
from engines.base import GenerationRequest, Tokenizer

log = logging.getLogger("lowbit.requests")


@dataclass(frozen=True)
class PreparedChat:
    """A validated chat request, tokenized and ready to schedule."""

    request_id: str
    model_id: str
    created: int
    generation: GenerationRequest
    stop_strings: tuple[str, ...]
    stream: bool
    include_usage: bool
    priority: int
    timeout_s: float
    tokenizer: Tokenizer
    prompt_text: str

    @property
    def response_id(self) -> str:
        return f"chatcmpl-{self.request_id}"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.generation.prompt_token_ids)


class ChatService:
    def __init__(self, scheduler: Scheduler, metrics: Metrics, log_prompts: bool = False):
        self._scheduler = scheduler
        self._metrics = metrics
        self._log_prompts = log_prompts

    def prepare(self, body: ChatCompletionRequest, request_id: str, timeout_s: float) -> PreparedChat:
        try:  # refuse cheaply (429, 503) before templating and tokenizing
            self._scheduler.check_admission(body.model)
        except SchedulerError as error:
            raise from_scheduler_error(error) from None
        slot = self._any_loaded_slot(body.model)
        tokenizer = slot.engine.tokenizer
        engines = [s.engine.info for s in self._scheduler.slots() if s.model_id == body.model]
        context_length = min(info.context_length for info in engines)
        if not all(info.supports_penalties for info in engines):
            for name in ("presence_penalty", "frequency_penalty"):
                if getattr(body, name):
                    raise invalid_request(f"{name} is not supported by the {engines[0].engine} engine "
                                          f"serving '{body.model}'", name, "unsupported_parameter")
        try:
            prompt = tokenizer.apply_chat_template(body.template_messages())
        except Exception as error:  # noqa: BLE001 - a template may reject a conversation
            raise invalid_request(f"The chat template rejected these messages: {error}", "messages") from None
        prompt_ids = tuple(tokenizer.encode(prompt))
        max_tokens = body.requested_max_tokens
        if max_tokens is None:
            max_tokens = context_length - len(prompt_ids)
        if len(prompt_ids) + max(max_tokens, 1) > context_length:
            raise ApiError(
                400,
                f"This model's maximum context length is {context_length} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, {max_tokens} in "
                "the completion). Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded",
            )
        return PreparedChat(
            request_id=request_id,
            model_id=body.model,
            created=int(time.time()),
            generation=GenerationRequest(request_id, prompt_ids, body.to_sampling_params(max_tokens)),
            stop_strings=body.stop_strings,
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            priority=body.priority,
            timeout_s=timeout_s,
            tokenizer=tokenizer,
            prompt_text=prompt,
        )

    def submit(self, prepared: PreparedChat) -> RequestHandle:
        return self._scheduler.submit(prepared.generation, prepared.model_id,
                                      prepared.priority, prepared.timeout_s)

    async def complete(self, prepared: PreparedChat, handle: RequestHandle,
                       wait_for_disconnect: Callable[[], Awaitable[None]]) -> ChatCompletion | None:
        """The whole answer; None if the client went away first (the run is aborted)."""
        run = _Run(self, prepared, handle)
        collect = asyncio.ensure_future(run.collect_text())
        disconnect = asyncio.ensure_future(wait_for_disconnect())
        try:
            await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
        if not collect.done():  # the client disconnected
            collect.cancel()
            await asyncio.gather(collect, return_exceptions=True)
            return None
        try:
            text = collect.result()
        except SchedulerError as error:
            raise from_scheduler_error(error) from None
        return ChatCompletion(
            id=prepared.response_id,
            created=prepared.created,
            model=prepared.model_id,
            choices=[Choice(message=AssistantMessage(content=text), finish_reason=run.output.finish_reason)],
            usage=run.usage(),
        )

    async def stream(self, prepared: PreparedChat, handle: RequestHandle,
                     wait_for_disconnect: Callable[[], Awaitable[None]]) -> AsyncIterator[str]:
        """SSE lines: role, content deltas, finish, optional usage, [DONE] (or an error event)."""
        run = _Run(self, prepared, handle)
        disconnect = asyncio.ensure_future(wait_for_disconnect())
        disconnect.add_done_callback(lambda task: task.cancelled() or handle.stop("client_disconnect"))
        usage_field = {"usage": None} if prepared.include_usage else {}
        try:
            yield _sse(self._chunk(prepared, Delta(role="assistant", content=""), None, **usage_field))
            try:
                async for delta in run.deltas():
                    if delta.text:
                        yield _sse(self._chunk(prepared, Delta(content=delta.text), None, **usage_field))
                    if delta.finish_reason:
                        yield _sse(self._chunk(prepared, Delta(), delta.finish_reason, **usage_field))
            except SchedulerError as error:
                yield _sse_raw(from_scheduler_error(error).to_json())
                yield "data: [DONE]\n\n"
                return
            if run.outcome != "success":
                return  # the client is gone
            if prepared.include_usage:
                yield _sse(ChatCompletionChunk(id=prepared.response_id, created=prepared.created,
                                               model=prepared.model_id, choices=[], usage=run.usage()))
            yield "data: [DONE]\n\n"
        finally:
            disconnect.cancel()

    # --- helpers ---------------------------------------------------------------------------

    def _any_loaded_slot(self, model_id: str):
        """A loaded engine of the model, for its tokenizer (check_admission ran first)."""
        return next(slot for slot in self._scheduler.slots() if slot.model_id == model_id)

    @staticmethod
    def _chunk(prepared: PreparedChat, delta: Delta, finish_reason: str | None, **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=prepared.response_id, created=prepared.created, model=prepared.model_id,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)], **extra)


def _sse(chunk: ChatCompletionChunk) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


def _sse_raw(json_text: str) -> str:
    return f"data: {json_text}\n\n"


class _Run:
    """One admitted request being read: text, token timing, outcome, and its final record."""

    def __init__(self, service: ChatService, prepared: PreparedChat, handle: RequestHandle):
        self._service = service
        self._prepared = prepared
        self._handle = handle
        self.output = TextOutput(prepared.tokenizer, prepared.stop_strings)
        self.outcome: str | None = None
        self._chunk_times: list[tuple[float, int]] = []
        self._text_parts: list[str] = []
        self._keep_text = service._log_prompts  # the completion is logged only when asked

    def usage(self) -> Usage:
        prompt = self._prepared.num_prompt_tokens
        completion = self.output.num_generated_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def collect_text(self) -> str:
        self._keep_text = True
        async for _ in self.deltas():
            pass
        return "".join(self._text_parts)

    async def deltas(self) -> AsyncIterator[TextDelta]:
        loop = asyncio.get_running_loop()
        try:
            async for chunk in self._handle:
                if chunk.token_ids:
                    self._chunk_times.append((loop.time(), len(chunk.token_ids)))
                    if self._handle.slot is not None:
                        self._service._metrics.tokens_streamed(slot_labels(self._handle.slot), len(chunk.token_ids))
                delta = self.output.push(chunk)
                if self._keep_text:
                    self._text_parts.append(delta.text)
                if delta.finish_reason is not None:
                    if chunk.finish_reason is None:
                        self._handle.stop("finished")  # a stop string ended it early
                    self.outcome = "success"
                    yield delta
                    return
                if delta.text:
                    yield delta
        except SchedulerError as error:
            self.outcome = "timeout" if isinstance(error, RequestTimedOut) else "error"
            raise
        finally:
            if self.outcome is None:  # the reader stopped: the client went away
                self.outcome = "cancelled"
                self._handle.stop("client_disconnect")
            self._record(loop.time())

    def _record(self, finished: float) -> None:
        handle, prepared = self._handle, self._prepared
        labels = slot_labels(handle.slot) if handle.slot is not None else (prepared.model_id, "", "")
        finish_reason = self.output.finish_reason or ""
        ticket = handle.ticket
        self._service._metrics.request_finished(
            labels, self.outcome or "error", finish_reason, prepared.num_prompt_tokens,
            self.output.num_generated_tokens, ticket.arrived, ticket.started, self._chunk_times, finished)
        fields = {
            "event": "request_finished",
            "request_id": prepared.request_id,
            "model": labels[0], "engine": labels[1], "device": labels[2],
            "engine_instance": handle.slot.name if handle.slot is not None else None,
            "outcome": self.outcome,
            "finish_reason": finish_reason or None,
            "stream": prepared.stream,
            "prompt_tokens": prepared.num_prompt_tokens,
            "generated_tokens": self.output.num_generated_tokens,
            "queue_time_s": _round(handle.queue_time_s),
            "ttft_s": _round(self._chunk_times[0][0] - ticket.arrived if self._chunk_times else None),
            "total_time_s": _round(finished - ticket.arrived),
        }
        if self._service._log_prompts:
            fields["prompt"] = prepared.prompt_text
            fields["completion"] = "".join(self._text_parts)
        log.info("request finished", extra={"fields": fields})


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
