import pytest

from app.openai.errors import (
    InternalError,
    OverloadedError,
    RequestError,
    ServiceUnavailableError,
    error_from_remote,
    to_openai_error,
)
from app.runtime.errors import NoInstancesError, RemoteError, ServiceError


def _over_the_wire(exc: Exception) -> RemoteError:
    """What the runtime turns a callee's exception into (app/runtime/requests.py)."""
    status = exc.status if isinstance(exc, ServiceError) else 500
    return RemoteError(type(exc).__name__, str(exc), status)


@pytest.mark.parametrize(
    "original",
    [RequestError("prompt too long", param="messages"), OverloadedError("busy"), ServiceUnavailableError("no workers")],
)
def test_errors_survive_the_nats_hop(original) -> None:
    rebuilt = to_openai_error(_over_the_wire(original))
    assert (rebuilt.status, rebuilt.message, rebuilt.error_type) == (original.status, original.message, original.error_type)
    assert rebuilt.headers() == original.headers()


def test_no_worker_is_503_with_retry_after_locally_and_remotely() -> None:
    for exc in (NoInstancesError("no VllmWorker"), _over_the_wire(NoInstancesError("no VllmWorker"))):
        error = to_openai_error(exc)
        assert error.status == 503 and error.code == "service_unavailable"
        assert error.headers() == {"Retry-After": "1"}
    assert error_from_remote("InstanceGoneError", "gone", 500).status == 503


def test_body_shape() -> None:
    assert RequestError("bad", param="n").body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }


def test_bugs_are_500s_that_leak_nothing() -> None:
    for exc in (KeyError("secret internals"), _over_the_wire(KeyError("secret internals"))):
        error = to_openai_error(exc)
        assert isinstance(error, InternalError) and error.status == 500
        assert "secret" not in error.message
