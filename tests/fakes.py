"""A deterministic, fault-injecting engine for API-shape and scheduler tests only.

Its tokenizer maps one character to one token id (0 is end-of-sequence), so counts and
texts are easy to predict. The real engines are tested on the real model elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from engines.base import (
    DeviceAttempt,
    Engine,
    EngineError,
    EngineInfo,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    RequestFailed,
)

EOS = 0


class CharTokenizer:
    eos_token_ids = frozenset({EOS})

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in token_ids if i != EOS)


@dataclass
class Faults:
    """What the fake engine should do wrong, consumed as requests arrive."""

    fail_before_first_token: int = 0  # fail this many upcoming requests before any output
    fail_after_tokens: int | None = None  # fail every request after this many tokens
    unhealthy: bool = False  # is_healthy() answer while set
    only_the_request: bool = False  # the failures are RequestFailed (that request's, not the engine's)


@dataclass
class FakeEngine(Engine):
    reply: str = "Hello from the fake engine."
    token_delay_s: float = 0.0
    max_concurrency: int = 8
    context_length: int = 256
    device: str = "FAKE"
    faults: Faults = field(default_factory=Faults)
    started: list[str] = field(default_factory=list)  # request ids in the order they began
    aborted: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    is_started: bool = False

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("fake", self.device, "fake-model", self.context_length, "none",
                          self.max_concurrency, (DeviceAttempt(self.device),))

    @property
    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer()

    def start(self) -> None:
        self.is_started = True

    def stop(self) -> None:
        self.is_started = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.started.append(request.request_id)
        self.active.add(request.request_id)
        finished = False
        try:
            if self.faults.fail_before_first_token > 0:
                self.faults.fail_before_first_token -= 1
                await asyncio.sleep(0)
                raise EngineError("fake", "injected failure before the first token")
            tokens = [ord(c) for c in self.reply] + [EOS]
            limit = request.sampling.max_tokens
            for index, token in enumerate(tokens[:limit]):
                if self.faults.fail_after_tokens is not None and index == self.faults.fail_after_tokens:
                    failure = RequestFailed if self.faults.only_the_request else EngineError
                    raise failure("fake", "injected failure after output")
                await asyncio.sleep(self.token_delay_s)
                last = index == min(len(tokens), limit) - 1
                reason = None
                if last:
                    reason = FinishReason.STOP if token == EOS else FinishReason.LENGTH
                finished = last
                yield GenerationChunk((token,), reason)
        finally:
            self.active.discard(request.request_id)
            if not finished:
                self.aborted.append(request.request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def is_healthy(self) -> bool:
        return not self.faults.unhealthy
