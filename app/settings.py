"""All of lowbit's settings in one object, read once from flags and `LOWBIT_*` variables.

Precedence: `lowbit serve --flag` > environment variable > default. The object is frozen:
it is built once in the CLI (or a test) and passed explicitly, never mutated.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EngineKind = Literal["openvino", "onnxruntime", "native"]


def _split_list(value: object) -> object:
    """Accept `NPU,CPU` (and JSON lists) for list-valued settings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class EngineSpec(BaseModel):
    """One engine to load: a model served under an id, by an engine kind, on devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="GGUF file or model directory; None: the embedded default")
    model_id: str | None = Field(None, description="Name clients use in `model`; defaults to the model's name")
    engine: EngineKind = "openvino"
    device: tuple[str, ...] = ("NPU", "CPU")

    @field_validator("device", mode="before")
    @classmethod
    def _devices(cls, value: object) -> object:
        return _split_list(value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOWBIT_", frozen=True, extra="ignore")

    # --- what to serve --------------------------------------------------------------
    model: str | None = Field(None, description="GGUF file or OpenVINO model directory (default: embedded SmolLM2-135M-Instruct)")
    model_id: str | None = Field(None, description="Model name clients send; default: derived from the model")
    engine: EngineKind = Field("openvino", description="Engine kind for --model")
    device: Annotated[tuple[str, ...], NoDecode] = Field(("NPU", "CPU"), description="Ordered device preference, e.g. NPU,CPU")
    engines: Annotated[tuple[EngineSpec, ...], NoDecode] = Field(
        (), description='Several engines as JSON, e.g. [{"model": "a.gguf", "device": "CPU"}, ...]; overrides model/engine/device')

    # --- HTTP -------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Largest request body accepted (413 beyond)")

    # --- scheduling -------------------------------------------------------------------
    max_running_requests: int = Field(16, gt=0, description="Requests running at once per engine")
    max_waiting_requests: int = Field(64, ge=0, description="Requests queued per engine before 429")
    priority_aging_s: float = Field(5.0, gt=0, description="Seconds of waiting that improve a request's priority by one")
    request_timeout_s: float = Field(300.0, gt=0, description="Default deadline of a request")
    max_request_timeout_s: float = Field(1800.0, gt=0, description="Largest X-Request-Timeout honoured")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish")
    health_check_interval_s: float = Field(5.0, gt=0, description="How often a failed engine is re-checked")

    # --- OpenVINO -----------------------------------------------------------------------
    kv_cache_size_gb: int = Field(1, ge=1, description="KV cache per continuous-batching engine, whole GB")
    openvino_pipeline: Literal["auto", "continuous", "single"] = Field(
        "auto", description="auto: single-request pipeline on NPU, continuous batching elsewhere")
    npu_max_prompt_len: int = Field(1024, gt=0, description="NPU: longest prompt compiled for")
    npu_min_response_len: int = Field(256, gt=0, description="NPU: tokens reserved for the answer")
    cache_dir: str | None = Field(None, description="OpenVINO compiled-model cache directory")

    # --- ONNX Runtime GenAI ------------------------------------------------------------------
    onnxruntime_workers: int = Field(0, ge=0, description="Worker processes (one request each at a time); 0: one per core")

    # --- native engine ----------------------------------------------------------------------
    native_quantization: Literal["none", "int4"] = Field(
        "none", description="native: quantize a dense checkpoint's linear layers to INT4 (RTN) as it loads")
    native_prefix_caching: bool = Field(True, description="native: reuse the KV cache of prompt prefixes seen before")
    native_quantize_lm_head: bool = Field(
        False, description="native: also quantize the LM head to INT4 (RTN); it stays in bf16 otherwise")
    native_run_ahead: bool = Field(
        True, description="native, on a GPU: launch each greedy decode step before the last one's tokens are read")

    # --- logs -----------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")
    log_prompts: bool = Field(False, description="Include prompt and completion text in request logs")

    @field_validator("device", mode="before")
    @classmethod
    def _devices(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("engines", mode="before")
    @classmethod
    def _engines(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) and value.strip() else value or ()

    def engine_specs(self) -> tuple[EngineSpec, ...]:
        """The engines to load: `engines` if given, else one from model/engine/device."""
        if self.engines:
            return self.engines
        chosen = {name: getattr(self, name) for name in ("engine", "device") if name in self.model_fields_set}
        return (EngineSpec(model=self.model, model_id=self.model_id, **chosen),)
