"""OpenAI wire models for the chat completions API (fields in OpenAI's order).

Only this module knows the JSON shape. `ChatCompletionRequest` validates what clients
send; `ChatCompletionRequest.to_sampling_params` is the one place the wire format
becomes the engine's sampling parameters.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engines.base import SamplingParams

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who wrote the message")
    content: str | list[TextContentPart] | None = Field(description="Text, or a list of text parts")
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_role(self) -> str:
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: Annotated[list[ChatMessage], Field(min_length=1, description="The conversation so far")]
    model: str = Field(description="Model id, as listed by GET /v1/models")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; a non-empty map is refused")
    logprobs: bool = Field(False, description="Not supported; true is refused")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate")
    n: int = Field(1, ge=1, description="Only 1 is supported")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: dict | None = Field(None, description='Only {"type": "text"}; JSON modes are refused')
    seed: int | None = Field(None, description="Makes sampling reproducible for this request")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_SEQUENCES} stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    tool_choice: str | dict | None = Field(None, description='Only "none" (tools are not supported)')
    tools: list[dict] | None = Field(None, description="Not supported; a non-empty list is refused")
    top_logprobs: int | None = Field(None, description="Not supported (needs logprobs)")
    functions: list[dict] | None = Field(None, description="Deprecated form of tools; refused")
    function_call: str | dict | None = Field(None, description='Deprecated form of tool_choice; only "none"')
    user: str | None = Field(None, description="End-user id; accepted and ignored")
    # --- extensions (as in vLLM) ---
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens; 0 or -1 disables")
    priority: int = Field(0, description="Lower runs first when requests wait")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(stop == "" for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.n != 1:
            raise ValueError("n > 1 is not supported; send one request per completion")
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        # Each of these would change the answer; ignoring them would hand the client something
        # other than what it asked for, so they are refused rather than dropped.
        if self.tools or self.functions:
            raise ValueError("tools are not supported")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise ValueError("tool_choice is not supported (tools are not supported)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.top_logprobs:
            raise ValueError("top_logprobs is not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError(f"response_format {self.response_format.get('type')!r} is not supported; "
                             "only 'text' is")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.template_role(), "content": m.text()} for m in self.messages]

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


# --- responses ----------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lowbit"
    # lowbit extensions: where the model runs.
    engine: str | None = None
    device: str | None = None
    quantization: str | None = None
    context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
