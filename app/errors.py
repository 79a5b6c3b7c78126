"""Errors with stable codes, shared by every hop (Frontend, Processor, Router, workers).

An error a user can cause, or that says the fleet cannot take a request now, is a
`TandemError`: a stable `code`, the HTTP `status` it maps to, and a message written for
the client. The runtime's error frame carries (code, message, param) across NATS and
`error_for_code` rebuilds the same class on the caller's side, so a worker's 400 reaches
the client as that 400 through any number of hops, and a caller can `except` the class it
means. Any other exception is a failure inside Tandem: logged where it happened, with the
request id, and what travels on is an `InternalError` whose message names nothing inside.

The base layer: imports nothing of Tandem.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    # No API key, or not one of the Frontend's (only the Frontend raises it: it never crosses a hop).
    UNAUTHORIZED = "unauthorized"
    MODEL_NOT_FOUND = "model_not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    OVERLOADED = "overloaded"
    # Nothing can take the request now (no worker serves the model, a service is down).
    UNAVAILABLE = "unavailable"
    # The chosen worker cannot serve it (its engine died, it left); another one may.
    WORKER_UNAVAILABLE = "worker_unavailable"
    # The request did not finish within the Frontend's `request-timeout-s`.
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class TandemError(Exception):
    """Base of every error with a code; `message` is what the client may read.

    `code`, `message` and `param` (the request field at fault) cross a hop;
    `retry_after_s` serves the HTTP answer of the process that raised it, and `status`
    overrides the code's status only for errors of the HTTP layer itself (a 405).
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    status: int = 500
    retry_after_s: int | None = None

    def __init__(
        self, message: str, *, param: str | None = None, retry_after_s: int | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s
        if status is not None:
            self.status = status


class InvalidRequestError(TandemError):
    """The request itself is wrong (a bad field, a prompt past the model's length, ...)."""

    code = ErrorCode.INVALID_REQUEST
    status = 400


class UnauthorizedError(TandemError):
    """The request bears no API key, or one the Frontend does not know; the message says which, never more."""

    code = ErrorCode.UNAUTHORIZED
    status = 401


class ModelNotFoundError(TandemError):
    code = ErrorCode.MODEL_NOT_FOUND
    status = 404


class PayloadTooLargeError(TandemError):
    code = ErrorCode.PAYLOAD_TOO_LARGE
    status = 413


class OverloadedError(TandemError):
    """Too many requests in flight: the client should back off and retry."""

    code = ErrorCode.OVERLOADED
    status = 429
    retry_after_s = 1


class UnavailableError(TandemError):
    """Nothing can serve the request now: the client should retry later."""

    code = ErrorCode.UNAVAILABLE
    status = 503
    retry_after_s = 1


class NoWorkerError(UnavailableError):
    """No worker (of the model, or none but those that already failed the request) can take it."""


class WorkerUnavailableError(TandemError):
    """The worker a request went to cannot serve it; the request pipeline picks another."""

    code = ErrorCode.WORKER_UNAVAILABLE
    status = 503
    retry_after_s = 1
    # False where the link to the worker failed, not the worker: it may serve the rest.
    worker_at_fault = True


class WrongModelError(WorkerUnavailableError):
    """The request reached a worker of another model (its caller's view of the models was
    stale, or it predates routing by model). It travels as `worker_unavailable`, which every
    caller, an older one too, answers by routing the request to another worker."""


class RequestTimeoutError(TandemError):
    """A request outlived the Frontend's request timeout: it was ended, its engine work cancelled."""

    code = ErrorCode.TIMEOUT
    status = 504


class InternalError(TandemError):
    """A bug or an unexpected failure inside Tandem; never the client's fault."""


_BY_CODE: dict[str, type[TandemError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        UnauthorizedError,
        ModelNotFoundError,
        PayloadTooLargeError,
        OverloadedError,
        UnavailableError,
        WorkerUnavailableError,
        RequestTimeoutError,
        InternalError,
    )
}


def error_for_code(code: str, message: str, param: str | None = None) -> TandemError:
    """The error a callee raised, rebuilt from what crossed the wire (an unknown code: internal)."""
    return _BY_CODE.get(code, InternalError)(message, param=param)
