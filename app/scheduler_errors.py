"""Why the scheduler refused or ended a request. The HTTP layer maps each to a status."""

from __future__ import annotations


class SchedulerError(Exception):
    """Base of every error the scheduler raises to the serving layer."""


class ModelNotFound(SchedulerError):
    def __init__(self, model_id: str, available: list[str]):
        super().__init__(f"The model '{model_id}' does not exist. Available: {', '.join(available) or 'none'}")
        self.model_id = model_id


class NotReady(SchedulerError):
    """No engine for the model is in rotation (still loading, or all failed)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(SchedulerError):
    """Every engine for the model has its running and waiting slots full."""

    def __init__(self, model_id: str, retry_after_s: float):
        super().__init__(
            f"The server is overloaded serving '{model_id}': its queue is full. "
            f"Retry after {retry_after_s:.0f} s."
        )
        self.retry_after_s = retry_after_s


class Draining(SchedulerError):
    """The server is shutting down and admits nothing new."""

    def __init__(self, retry_after_s: float):
        super().__init__("The server is shutting down and accepts no new requests.")
        self.retry_after_s = retry_after_s


class RequestTimedOut(SchedulerError):
    def __init__(self, timeout_s: float, queued: bool):
        where = "while waiting in the queue" if queued else "while generating"
        super().__init__(f"The request exceeded its deadline of {timeout_s:g} s {where}.")
        self.timeout_s = timeout_s
        self.queued = queued


class EngineFailed(SchedulerError):
    """An engine failed and no other engine could take the request over."""

    def __init__(self, engine_name: str, detail: str, after_output: bool):
        when = "after sending output" if after_output else "before sending output"
        super().__init__(f"Engine '{engine_name}' failed {when}: {detail}")
        self.engine_name = engine_name
        self.after_output = after_output


class ShutDown(SchedulerError):
    """The drain timeout passed and the request was aborted."""

    def __init__(self) -> None:
        super().__init__("The server shut down before the request finished (drain timeout reached).")
