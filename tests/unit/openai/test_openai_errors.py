import pytest

from app.engines.base import EngineDeadError
from app.errors import (
    ErrorCode,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    NoWorkerError,
    OverloadedError,
    PayloadTooLargeError,
    TandemError,
    UnauthorizedError,
    UnavailableError,
    WorkerUnavailableError,
    error_for_code,
)
from app.openai.errors import to_client_error
from app.runtime.errors import CallTimeoutError, ConnectError, InstanceGoneError, NoInstancesError
from app.runtime.wire import ErrorBody, encoder, error_decoder


def _over_the_wire(error: TandemError) -> TandemError:
    """What the caller of a callee that raised `error` gets (app/runtime/requests.py)."""
    body = error_decoder.decode(encoder.encode(ErrorBody(error.code, error.message)))
    return error_for_code(body.code, body.message)


@pytest.mark.parametrize(
    ("error", "status", "error_type", "code"),
    [
        (InvalidRequestError("prompt too long"), 400, "invalid_request_error", None),
        (UnauthorizedError("no key"), 401, "invalid_request_error", "invalid_api_key"),
        (ModelNotFoundError("no such model"), 404, "invalid_request_error", "model_not_found"),
        (PayloadTooLargeError("too big"), 413, "invalid_request_error", "payload_too_large"),
        (OverloadedError("busy"), 429, "rate_limit_error", "rate_limit_exceeded"),
        (UnavailableError("no workers"), 503, "service_unavailable_error", "service_unavailable"),
        (NoWorkerError("no worker serves tiny"), 503, "service_unavailable_error", "service_unavailable"),
        (WorkerUnavailableError("its engine died"), 503, "service_unavailable_error", "service_unavailable"),
        (InternalError("the engine failed"), 500, "server_error", "internal_error"),
    ],
)
def test_each_code_keeps_its_status_and_message_across_the_hop(error, status, error_type, code) -> None:
    rebuilt = _over_the_wire(error)
    assert type(rebuilt) is type(error) or isinstance(error, type(rebuilt))  # NoWorkerError arrives as UnavailableError
    for seen in (to_client_error(error), to_client_error(rebuilt)):
        assert (seen.status, seen.message, seen.error_type, seen.code) == (status, error.message, error_type, code)


def test_engine_and_runtime_failures_are_unavailable_and_say_when_to_retry() -> None:
    for exc in (
        NoInstancesError("no VllmWorker"),
        InstanceGoneError("left"),
        ConnectError("no NATS"),
        CallTimeoutError("slow"),
        EngineDeadError("engine core died"),
    ):
        error = to_client_error(exc)
        assert error.status == 503 and error.code == "service_unavailable"
        assert error.headers() == {"Retry-After": "1"}
    # A worker that cannot serve is the one kind the request pipeline re-routes.
    assert isinstance(EngineDeadError("x"), WorkerUnavailableError)
    assert isinstance(InstanceGoneError("x"), WorkerUnavailableError)
    assert not isinstance(NoInstancesError("x"), WorkerUnavailableError)


def test_body_shape_names_the_parameter() -> None:
    assert to_client_error(InvalidRequestError("bad", param="n")).body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }
    assert to_client_error(OverloadedError("busy", retry_after_s=3)).headers() == {"Retry-After": "3"}


def test_bugs_are_500s_that_leak_nothing() -> None:
    error = to_client_error(KeyError("secret internals"))
    assert error.status == 500 and error.is_internal
    assert "secret" not in error.message


def test_an_unknown_code_from_a_newer_peer_is_internal() -> None:
    assert isinstance(error_for_code("something_new", "?"), InternalError)
    assert {c.value for c in ErrorCode} >= {"invalid_request", "unavailable", "worker_unavailable", "internal"}
