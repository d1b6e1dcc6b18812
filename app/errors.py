"""The one place where failures become HTTP statuses and OpenAI-shaped error bodies.

Every error leaves as `{"error": {"message", "type", "param", "code"}}`; FastAPI's 422
body and Starlette's plain-text 404/405 never reach a client, and an unexpected
exception becomes a 500 with a generic message (the traceback goes to the log only).
"""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.protocol import ErrorBody, ErrorResponse
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


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
        self.retry_after_s = retry_after_s

    def to_response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=headers)

    def to_json(self) -> str:
        return self.body.model_dump_json()


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def from_validation_error(error: ValidationError | RequestValidationError) -> ApiError:
    """A 400 naming the first offending field, in OpenAI's dotted `param` style."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if param:
        message = f"{message} (parameter '{param}')"
    return invalid_request(message, param=param, code="invalid_value")


def from_scheduler_error(error: SchedulerError) -> ApiError:
    message = str(error)
    if isinstance(error, ModelNotFound):
        return ApiError(404, message, "invalid_request_error", "model", "model_not_found")
    if isinstance(error, Overloaded):
        return ApiError(429, message, "server_overloaded", None, "queue_full", error.retry_after_s)
    if isinstance(error, (Draining, ShutDown)):
        return ApiError(503, message, "service_unavailable", None, "shutting_down",
                        getattr(error, "retry_after_s", None))
    if isinstance(error, NotReady):
        return ApiError(503, message, "service_unavailable", None, "engine_not_ready", error.retry_after_s)
    if isinstance(error, RequestTimedOut):
        return ApiError(408, message, "timeout", None, "request_timeout")
    if isinstance(error, EngineFailed):
        return ApiError(500, message, "engine_error", None, "engine_failed")
    return ApiError(500, message, "server_error")


def parse_json_body(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid_request(f"The request body is not valid JSON: {error}", code="invalid_json") from None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.to_response()

    @app.exception_handler(SchedulerError)
    async def _scheduler_error(_: Request, error: SchedulerError) -> JSONResponse:
        return from_scheduler_error(error).to_response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return from_validation_error(error).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return ApiError(error.status_code, str(error.detail), kind).to_response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ApiError(500, "Internal server error.", "server_error").to_response()
