"""Errors of the runtime planes, as callers see them."""

from __future__ import annotations


class RuntimePlaneError(Exception):
    """Base of every error the runtime raises itself."""


class ConnectError(RuntimePlaneError):
    """NATS or etcd could not be reached within `connect_timeout_s`."""


class NoInstancesError(RuntimePlaneError):
    """No live instance serves the endpoint (raised at once, never after a wait)."""


class InstanceGoneError(RuntimePlaneError):
    """The chosen instance is not (or no longer) live: it left discovery or stopped answering."""


class CallTimeoutError(RuntimePlaneError, TimeoutError):
    """A call did not finish within the timeout the caller gave."""


class RemoteError(RuntimePlaneError):
    """The callee's handler raised; `type_name` and `message` are the callee's exception.

    `status` is the HTTP-ish status a `ServiceError` carried (500 for anything else).
    """

    def __init__(self, type_name: str, message: str, status: int = 500) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.status = status


class ServiceError(Exception):
    """Base for errors a handler raises on purpose; `status` survives the hop to the caller."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class PayloadTooLargeError(ServiceError):
    """A request is larger than the NATS server accepts in one message (its max_payload)."""

    status = 413
