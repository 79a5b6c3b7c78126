"""Errors of the runtime planes, as callers see them: each is one of app.errors' codes.

An error a callee's handler raised reaches its caller rebuilt from its code
(`app.errors.error_for_code`), not as a runtime error.
"""

from __future__ import annotations

from app.errors import UnavailableError, WorkerUnavailableError


class ConnectError(UnavailableError):
    """NATS or etcd could not be reached within `connect_timeout_s`."""


class NoInstancesError(UnavailableError):
    """No live instance serves the endpoint (raised at once, never after a wait)."""


class InstanceGoneError(WorkerUnavailableError):
    """The chosen instance is not (or no longer) live: it left discovery or stopped answering."""


class ConnectionLostError(WorkerUnavailableError):
    """The NATS connection dropped during a call that had already streamed items, and the
    call could not be resumed (wire.py): NATS stayed away past `outage_wait_s`, or the callee
    no longer had the frames since (it restarted, its replay buffer overflowed, or it did not
    answer the resume). Not the callee's fault: a caller may go on with the same one."""

    worker_at_fault = False


class FramesLostError(WorkerUnavailableError):
    """Reply frames of a call went missing while the connection stayed up (a gap in their
    sequence numbers: NATS dropped them for a slow consumer, or the callee's reconnect buffer
    overflowed). What came before the gap reached the caller; a request pipeline continues
    the stream from there, with the same callee too: the link failed, not the callee."""

    worker_at_fault = False


class NatsUnavailableError(UnavailableError):
    """NATS did not come back within `outage_wait_s`: the call was not sent."""


class CallTimeoutError(UnavailableError, TimeoutError):
    """A call did not finish within the timeout the caller gave."""
