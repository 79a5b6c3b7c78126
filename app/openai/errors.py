"""OpenAI-shaped errors: the exceptions services raise and the JSON body clients see.

Errors must survive the NATS hop, where the runtime carries only (type name, message,
status), and the status only of a ServiceError. So every exception here is a
ServiceError that keeps its message in `str(exc)` and its HTTP status in `exc.status`,
and `error_from_remote` rebuilds the client-facing error from those three values
alone (the `param` of a RequestError does not cross; its message names the parameter).
"""

from __future__ import annotations

from typing import Any

import msgspec

from app.runtime.errors import (
    CallTimeoutError,
    ConnectError,
    InstanceGoneError,
    NoInstancesError,
    RemoteError,
    ServiceError,
)


class OpenAIError(ServiceError):
    """An error with an OpenAI error body; `status` is the HTTP status it maps to."""

    status: int = 500
    error_type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return msgspec.json.encode(self.body())

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class RequestError(OpenAIError):
    """Something wrong with the request the client sent (400 unless told otherwise)."""

    status = 400
    error_type = "invalid_request_error"
    code = None

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message, param=param, status=status)


class ModelNotFoundError(OpenAIError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, *, message: str | None = None) -> None:
        super().__init__(message or f"The model `{model}` does not exist.", param="model")


class ServiceUnavailableError(OpenAIError):
    """No worker can take the request now; the client should retry later."""

    status = 503
    error_type = "service_unavailable_error"
    code = "service_unavailable"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class OverloadedError(OpenAIError):
    """Too many requests in flight; the client should back off."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class InternalError(OpenAIError):
    """A bug or an unexpected failure inside Tandem; never the client's fault."""


class PayloadTooLargeError(OpenAIError):
    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


# Runtime failures that mean "no worker can take this now", raised locally or, by
# type name only, inside a RemoteError from the Processor.
_UNAVAILABLE = (NoInstancesError, InstanceGoneError, CallTimeoutError, ConnectError)
_UNAVAILABLE_TYPE_NAMES = frozenset(t.__name__ for t in _UNAVAILABLE)


def error_from_remote(type_name: str, message: str, status: int | None) -> OpenAIError:
    """Rebuild a client-facing error from what crossed the wire."""
    if type_name in _UNAVAILABLE_TYPE_NAMES:
        return ServiceUnavailableError(message)
    if type_name == "ModelNotFoundError" or status == 404:
        return ModelNotFoundError("", message=message)
    if status == 429:
        return OverloadedError(message)
    if status == 503:
        return ServiceUnavailableError(message)
    if status is not None and 400 <= status < 500:
        return RequestError(message, status=status)
    # A bug on the far side: its message describes internals, not the request.
    return InternalError("internal error")


def to_openai_error(exc: BaseException) -> OpenAIError:
    """Map any exception a backend raised to the error the client gets.

    Local OpenAIErrors pass through, runtime errors are rebuilt, anything else is a bug
    and becomes a 500 whose message leaks no internals.
    """
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RemoteError):
        return error_from_remote(exc.type_name, exc.message, exc.status)
    if isinstance(exc, _UNAVAILABLE):
        return ServiceUnavailableError(str(exc) or "no worker is available")
    if isinstance(exc, ServiceError):
        return error_from_remote(type(exc).__name__, exc.message, exc.status)
    return InternalError("internal error")
