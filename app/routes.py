"""HTTP routes: thin. Parse, hand to the chat service, format the response."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from app.errors import ApiError, from_scheduler_error, from_validation_error, invalid_request, parse_json_body
from app.protocol import ChatCompletionRequest, ModelCard, ModelList
from app.scheduler_errors import SchedulerError

router = APIRouter()


def get_state(request: Request):
    return request.app.state.lowbit


State = Annotated[object, Depends(get_state)]  # app.server.AppState (imported lazily: no cycle)


def _request_timeout(header: str | None, default_s: float, max_s: float) -> float:
    if header is None:
        return default_s
    try:
        value = float(header)
    except ValueError:
        raise invalid_request("X-Request-Timeout must be a number of seconds", "X-Request-Timeout") from None
    if not value > 0:
        raise invalid_request("X-Request-Timeout must be positive", "X-Request-Timeout")
    return min(value, max_s)


def _disconnect_waiter(request: Request):
    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait_for_disconnect


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State,
                           x_request_timeout: Annotated[str | None, Header()] = None):
    settings = state.settings
    timeout_s = _request_timeout(x_request_timeout, settings.request_timeout_s, settings.max_request_timeout_s)
    try:
        body = ChatCompletionRequest.model_validate(parse_json_body(await request.body()))
    except ValidationError as error:
        raise from_validation_error(error) from None
    prepared = state.chat.prepare(body, request.state.request_id, timeout_s)
    try:
        handle = state.chat.submit(prepared)
    except SchedulerError as error:
        raise from_scheduler_error(error) from None
    if prepared.stream:
        return StreamingResponse(
            state.chat.stream(prepared, handle, _disconnect_waiter(request)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    completion = await state.chat.complete(prepared, handle, _disconnect_waiter(request))
    if completion is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    return JSONResponse(completion.model_dump())


@router.get("/v1/models")
async def list_models(state: State) -> ModelList:
    cards = []
    for record in state.engines:
        info = record.engine.info if record.status == "ready" else None
        if any(card.id == record.model_id for card in cards):
            continue
        cards.append(ModelCard(
            id=record.model_id, created=int(time.time()),
            engine=record.spec.engine, device=info.device if info else None,
            quantization=info.quantization if info else None,
            context_length=info.context_length if info else None,
        ))
    return ModelList(data=cards)


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(state: State) -> JSONResponse:
    engines = [{
        "name": record.name,
        "model": record.model_id,
        "engine": record.spec.engine,
        "status": record.status,
        "error": record.error,
        "device": record.engine.info.device if record.status == "ready" else None,
        "devices_tried": [
            {"device": a.device, "error": a.error}
            for a in (record.engine.info.device_attempts if record.status == "ready" else ())
        ],
    } for record in state.engines]
    if state.scheduler.is_draining:
        status = "draining"
    elif not state.is_loaded:
        status = "failed" if any(r.status == "failed" for r in state.engines) else "loading"
    elif state.scheduler.is_overloaded:
        status = "overloaded"
    else:
        status = "ready"
    code = 200 if status == "ready" else 503
    return JSONResponse({"status": status, "engines": engines}, status_code=code)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["router", "ApiError"]
