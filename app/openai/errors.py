"""What a client sees of an error: the OpenAI error body, status and headers for each code.

The errors themselves are app.errors' (the same classes on every hop); this module only
renders them. Anything that is not a `TandemError` is a bug: a 500 "internal error"
whose body names nothing inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from pydantic import BaseModel

from app.errors import ErrorCode, InternalError, TandemError

# code -> (OpenAI's error `type`, its `code` field)
_OPENAI_NAMES: dict[ErrorCode, tuple[str, str | None]] = {
    ErrorCode.INVALID_REQUEST: ("invalid_request_error", None),
    ErrorCode.UNAUTHORIZED: ("invalid_request_error", "invalid_api_key"),
    ErrorCode.MODEL_NOT_FOUND: ("invalid_request_error", "model_not_found"),
    ErrorCode.PAYLOAD_TOO_LARGE: ("invalid_request_error", "payload_too_large"),
    ErrorCode.OVERLOADED: ("rate_limit_error", "rate_limit_exceeded"),
    ErrorCode.UNAVAILABLE: ("service_unavailable_error", "service_unavailable"),
    ErrorCode.WORKER_UNAVAILABLE: ("service_unavailable_error", "service_unavailable"),
    ErrorCode.TIMEOUT: ("timeout_error", "request_timeout"),
    ErrorCode.INTERNAL: ("server_error", "internal_error"),
}

_json = msgspec.json.Encoder()


@dataclass(frozen=True)
class ClientError:
    """One error as the HTTP answer shows it."""

    status: int
    message: str
    error_type: str
    code: str | None
    param: str | None = None
    retry_after_s: int | None = None

    @property
    def is_internal(self) -> bool:
        """A failure inside Tandem (logged with its traceback), not a refusal."""
        return self.error_type == "server_error"

    @property
    def kind(self) -> str:
        """The label of the Frontend's error counter."""
        return self.code or self.error_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return _json.encode(self.body())

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def to_client_error(exc: BaseException) -> ClientError:
    """The answer for any exception a request ended with."""
    error = exc if isinstance(exc, TandemError) else InternalError("internal error")
    error_type, code = _OPENAI_NAMES[error.code]
    return ClientError(error.status, error.message, error_type, code, error.param, error.retry_after_s)


class _ErrorFields(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """`ClientError.body()`'s shape, for the OpenAPI document."""

    error: _ErrorFields
