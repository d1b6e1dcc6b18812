"""The engine interface every backend implements, and the types that cross it.

The server hands an engine one validated, frozen `GenerationRequest` (prompt already
templated and tokenized) and reads back `GenerationChunk`s of new token ids. Text
(detokenizing, stop strings) and the wire format stay on the HTTP side, so every engine
behaves the same way there. Nothing here imports a heavy runtime, FastAPI or `app/`.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence or a stop token id
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # aborted by the caller (cancel, timeout, drain)


class EngineError(RuntimeError):
    """The engine failed while serving a request (not the request's fault)."""

    def __init__(self, engine_name: str, message: str):
        super().__init__(f"{engine_name}: {message}")
        self.engine_name = engine_name


class EngineNotReady(EngineError):
    """The engine has not loaded (yet) or has been stopped."""


class RequestFailed(EngineError):
    """The engine could not answer this one request (its logits held a NaN, say) but serves the
    others: it is not taken out of rotation."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. `temperature == 0` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request, ready for an engine. Built only by the server's validation."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class GenerationChunk:
    """Tokens produced since the previous chunk; the last chunk has `finish_reason` set."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class DeviceAttempt:
    """One device an engine tried while loading, and why it was not used (if it wasn't)."""

    device: str
    error: str | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves and where; filled in by `start()`."""

    engine: str  # engine kind, e.g. "openvino"
    device: str  # the device actually in use, e.g. "CPU"
    model_path: str
    context_length: int  # prompt + generated tokens must fit in this
    quantization: str  # e.g. "gguf-q4_1", "int4-asym-g128", "bf16"
    max_concurrency: int  # requests the engine runs at once (1 on an NPU)
    device_attempts: tuple[DeviceAttempt, ...] = field(default_factory=tuple)
    supports_penalties: bool = True  # presence and frequency penalties (the server refuses them otherwise)


class Tokenizer(Protocol):
    """The model's own tokenizer and chat template, as the engine loaded them."""

    eos_token_ids: frozenset[int]

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class Engine(abc.ABC):
    """A loaded model on one device that generates for many requests.

    Lifecycle: `start()` (blocking; loads the model, may take seconds), then any number of
    `generate()` calls from the event loop, then `stop()`. An engine that batches does so
    inside; callers may have many `generate()` iterators open at once.
    """

    @property
    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """Name, device in use, context length; valid after `start()`."""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer; valid after `start()`."""

    @abc.abstractmethod
    def start(self) -> None:
        """Load the model (blocking). Raises EngineError if no device could load it."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Abort everything in flight and release the model."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream chunks for one request. Closing the iterator early aborts the request."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop generating for `request_id` and free its resources; idempotent."""

    @abc.abstractmethod
    def is_healthy(self) -> bool:
        """False once the engine has failed in a way that needs a restart or re-check."""

    def kv_cache_usage(self) -> float | None:
        """Fraction of KV-cache memory in use, if the engine can tell."""
        return None


class LoadingEngine(Engine):
    """An engine whose `start()` sets `_info` and `_tokenizer`; until then both raise EngineNotReady."""

    kind: str
    _info: EngineInfo | None = None
    _tokenizer: Tokenizer | None = None

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineNotReady(self.kind, "not started")
        return self._info

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise EngineNotReady(self.kind, "not started")
        return self._tokenizer
