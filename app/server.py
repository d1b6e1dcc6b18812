"""The app factory: builds the FastAPI app, its state and its engines from one Settings.

Nothing loads at import time. Engines load in the background after startup, so
`/health` answers at once and `/health/ready` turns 200 when every engine has loaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from app.default_model import DEFAULT_MODEL_ID, default_model_path
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.middleware import RequestContextMiddleware
from app.routes import router
from app.scheduler import AdmissionLimits, Scheduler
from app.serving import ChatService
from app.settings import EngineSpec, Settings
from engines.base import Engine
from engines.model_files import describe_model, read_manifest
from engines.registry import build_engine

log = logging.getLogger(__name__)

EngineBuilder = Callable[[EngineSpec, str], Engine]  # (spec, resolved model path) -> engine


@dataclass
class EngineRecord:
    """One configured engine and how its loading went."""

    spec: EngineSpec
    model_id: str
    model_path: str
    name: str
    engine: Engine
    status: str = "loading"  # loading | ready | failed
    error: str | None = None


@dataclass
class AppState:
    settings: Settings
    scheduler: Scheduler
    metrics: Metrics
    chat: ChatService
    engines: list[EngineRecord] = field(default_factory=list)

    @property
    def is_loaded(self) -> bool:
        return bool(self.engines) and all(record.status == "ready" for record in self.engines)


def resolve_model(spec: EngineSpec) -> tuple[str, str, EngineSpec]:
    """(model path, model id, spec) for a spec; the embedded default when no model is given.

    A directory made by `lowbit prepare` carries a manifest naming its engine and device;
    those replace the defaults (a device list given explicitly still wins).
    """
    if spec.model is None:
        return str(default_model_path()), spec.model_id or DEFAULT_MODEL_ID, spec
    description = describe_model(spec.model)
    manifest = read_manifest(description.path)
    if manifest:
        updates = {"engine": manifest.get("engine", spec.engine)}
        if "device" not in spec.model_fields_set and manifest.get("device"):
            updates["device"] = (manifest["device"],)
        spec = spec.model_copy(update=updates)
    return description.path, spec.model_id or description.name, spec


def default_engine_builder(settings: Settings) -> EngineBuilder:
    def build(spec: EngineSpec, model_path: str) -> Engine:
        options = {
            "pipeline": settings.openvino_pipeline,
            "kv_cache_size_gb": settings.kv_cache_size_gb,
            "max_num_seqs": settings.max_running_requests,
            "npu_max_prompt_len": settings.npu_max_prompt_len,
            "npu_min_response_len": settings.npu_min_response_len,
            "cache_dir": settings.cache_dir,
            "num_workers": settings.onnxruntime_workers,
            "quantization": None if settings.native_quantization == "none" else settings.native_quantization,
            "prefix_caching": settings.native_prefix_caching,
            "quantize_lm_head": settings.native_quantize_lm_head,
            "run_ahead": None if settings.native_run_ahead else False,  # None: on a GPU only
        }
        return build_engine(spec.engine, model_path, spec.device, options)

    return build


def create_app(settings: Settings, engine_builder: EngineBuilder | None = None) -> FastAPI:
    builder = engine_builder or default_engine_builder(settings)
    metrics = Metrics()
    scheduler = Scheduler(
        AdmissionLimits(
            max_running=settings.max_running_requests,
            max_waiting=settings.max_waiting_requests,
            priority_aging_s=settings.priority_aging_s,
            health_check_interval_s=settings.health_check_interval_s,
        ),
        observer=metrics,
    )
    state = AppState(settings, scheduler, metrics, ChatService(scheduler, metrics, settings.log_prompts))
    # Resolve every model before serving: a wrong path fails here, with a clear message.
    for index, spec in enumerate(settings.engine_specs()):
        model_path, model_id, spec = resolve_model(spec)
        name = f"{spec.engine}-{'/'.join(spec.device)}-{index}"
        state.engines.append(EngineRecord(spec, model_id, model_path, name, builder(spec, model_path)))
        scheduler.expect_model(model_id)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_load_engines(state), name="load-engines")
        app.state.loading = loading
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await scheduler.drain(timeout_s=0)
            for record in state.engines:
                if record.status == "ready":
                    await asyncio.to_thread(record.engine.stop)

    app = FastAPI(title="lowbit", version=_version(), lifespan=lifespan)
    app.state.lowbit = state
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    app.include_router(router)
    return app


async def _load_engines(state: AppState) -> None:
    """Load engines one after another (they compete for the same cores and memory)."""
    for record in state.engines:
        try:
            await asyncio.to_thread(record.engine.start)
        except Exception as error:  # noqa: BLE001 - a failed engine is reported, not fatal
            record.status, record.error = "failed", f"{type(error).__name__}: {error}"
            log.error("engine %s failed to load: %s", record.name, record.error)
            state.scheduler.engine_failed_to_load(record.model_id, record.name, record.error)
            continue
        info = record.engine.info
        record.status = "ready"
        state.scheduler.add_engine(record.model_id, record.name, record.engine)
        state.metrics.engine_loaded(record.model_id, info, record.engine.kv_cache_usage)
        log.info("engine %s ready: model %s on %s (%s)", record.name, record.model_id, info.device,
                 info.quantization, extra={"fields": {"event": "engine_ready", "engine_instance": record.name,
                                                      "device": info.device, "model": record.model_id}})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:
        return "0+unknown"
