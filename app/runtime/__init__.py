"""The runtime planes (discovery on etcd, requests and events on NATS, work queue on
JetStream) behind one small API: the only package that imports `nats` and `etcd3aio`."""

from app.runtime.discovery import ETCD_ERRORS
from app.runtime.errors import (
    CallTimeoutError,
    ConnectError,
    ConnectionLostError,
    FramesLostError,
    InstanceGoneError,
    NatsUnavailableError,
    NoInstancesError,
)
from app.runtime.events import EventSubscription
from app.runtime.requests import EndpointClient, RequestContext, ServedEndpoint
from app.runtime.runtime import Runtime
from app.runtime.workqueue import ConsumerState, Job, QueueSettings, QueueState, WorkQueue, queue_settings

__all__ = [
    "ETCD_ERRORS",
    "CallTimeoutError",
    "ConnectError",
    "ConnectionLostError",
    "ConsumerState",
    "EndpointClient",
    "EventSubscription",
    "FramesLostError",
    "InstanceGoneError",
    "Job",
    "NatsUnavailableError",
    "NoInstancesError",
    "QueueSettings",
    "QueueState",
    "RequestContext",
    "Runtime",
    "ServedEndpoint",
    "WorkQueue",
    "queue_settings",
]
