"""`Runtime`: one per process, the only door to NATS and etcd (see docs/internals.md §1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

import etcd3aio
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

from app.node import node_address
from app.protocol.names import event_subject
from app.runtime.connect import NatsLink, connect_etcd, connect_nats
from app.runtime.discovery import Discovery
from app.runtime.events import EventSubscription
from app.runtime.requests import EndpointClient, Handler, ReplyRouter, ServedEndpoint, instance_record
from app.runtime.wire import encoder
from app.runtime.workqueue import QueueState, WorkQueue, queue_state
from app.settings import RuntimeSettings

log = logging.getLogger(__name__)


_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _check_name(kind: str, name: str) -> None:
    # Names become NATS subject tokens and etcd key segments.
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} must be letters, digits, '_' or '-'")


class Runtime:
    def __init__(
        self,
        settings: RuntimeSettings,
        nc: NatsClient,
        etcd: etcd3aio.Etcd3Client,
        discovery: Discovery,
        link: NatsLink | None = None,
    ) -> None:
        self.settings = settings
        self.namespace = settings.namespace
        self.host = node_address(settings.nats_urls()[0])
        self.discovery = discovery
        self._nc = nc
        self._etcd = etcd
        self._link = link or NatsLink()
        self._replies = ReplyRouter(nc, self._link)
        self._served: list[ServedEndpoint] = []
        self._clients: dict[tuple[str, str], EndpointClient] = {}
        self._subscriptions: list[EventSubscription[Any]] = []
        self._queues: list[WorkQueue] = []
        self._closed = False

    @classmethod
    async def connect(cls, settings: RuntimeSettings | None = None) -> Runtime:
        """Connect to NATS and etcd (retrying up to `connect_timeout_s`), take a lease."""
        settings = settings or RuntimeSettings()
        link = NatsLink()
        nats_task = asyncio.create_task(connect_nats(settings, link))
        etcd_task = asyncio.create_task(connect_etcd(settings))
        try:
            nc, etcd = await asyncio.gather(nats_task, etcd_task)
        except BaseException:
            await _close_connected(nats_task, etcd_task)
            raise
        discovery = Discovery(etcd, settings.namespace, settings.lease_ttl_s)
        try:
            await discovery.start()
            runtime = cls(settings, nc, etcd, discovery, link)
            await runtime._replies.start()
        except BaseException:
            await _close_connected(nats_task, etcd_task)
            raise
        log.info("runtime up: namespace=%s instance=%s host=%s", runtime.namespace, runtime.instance_id, runtime.host)
        return runtime

    @property
    def instance_id(self) -> str:
        return format(self.discovery.lease_id, "x")

    # --- requests -----------------------------------------------------------------------

    async def serve_endpoint(
        self,
        service: str,
        endpoint: str,
        handler: Handler,
        metadata: dict[str, Any] | None = None,
        request_type: Any = None,
    ) -> ServedEndpoint:
        _check_name("service", service)
        _check_name("endpoint", endpoint)
        record = instance_record(self.namespace, service, endpoint, self.instance_id, self.host, metadata or {})
        served = ServedEndpoint(self._nc, self.discovery, record, handler, request_type)
        await served.start()
        self._served.append(served)
        return served

    def client(self, service: str, endpoint: str) -> EndpointClient:
        """The (shared) client of one endpoint; its instance watch starts on first use."""
        key = (service, endpoint)
        client = self._clients.get(key)
        if client is None:
            _check_name("service", service)
            _check_name("endpoint", endpoint)
            client = EndpointClient(
                self._nc,
                self._link,
                self._replies,
                lambda: self.discovery.watch_instances(service, endpoint),
                service,
                endpoint,
                ack_timeout_s=self.settings.request_ack_timeout_s,
                suspect_for_s=float(self.settings.lease_ttl_s),
                outage_wait_s=self.settings.outage_wait_s,
            )
            self._clients[key] = client
        return client

    # --- events -------------------------------------------------------------------------

    async def publish(self, topic: str, event: Any) -> None:
        await self._nc.publish(event_subject(self.namespace, topic), encoder.encode(event))

    async def subscribe(
        self, topic: str, event_type: Any = None, on_event: Callable[[Any], Any] | None = None
    ) -> EventSubscription[Any]:
        """Events of `topic` (NATS wildcards allowed), decoded to `event_type` (None: builtins):
        iterate the subscription, or have each event handed to `on_event` as it arrives."""
        sub: EventSubscription[Any] = EventSubscription(
            self._nc, event_subject(self.namespace, topic), event_type, on_event
        )
        await sub.start()
        self._subscriptions.append(sub)
        return sub

    # --- work queue ---------------------------------------------------------------------

    async def work_queue(self, name: str, ack_wait_s: float = 30.0) -> WorkQueue:
        _check_name("queue", name)
        queue = WorkQueue(self._nc, self.namespace, name, ack_wait_s)
        await queue.start()
        self._queues.append(queue)
        return queue

    @property
    def max_payload(self) -> int:
        """The largest message the NATS server takes, as its INFO told this connection: a
        request, a job or an event larger than it is refused."""
        return int(self._nc.max_payload)

    async def queue_state(self, name: str) -> QueueState | None:
        """A work queue's stream and consumers, read without opening it (None: nobody has)."""
        return await queue_state(self._nc, self.namespace, name)

    # --- lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        """Stop serving (draining in-flight calls), revoke the lease, drain NATS."""
        if self._closed:
            return
        self._closed = True
        for served in self._served:
            await served.stop()
        for sub in self._subscriptions:
            await sub.close()
        for queue in self._queues:
            with contextlib.suppress(NatsError):
                await queue.close()
        await self._replies.close()
        await self.discovery.close()
        await self._etcd.close()
        with contextlib.suppress(NatsError):
            await self._nc.drain()
        log.info("runtime closed: instance=%s", self.instance_id)

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _close_connected(nats_task: asyncio.Task[NatsClient], etcd_task: asyncio.Task[etcd3aio.Etcd3Client]) -> None:
    """Close whichever connection did open when the other failed."""
    for task in (nats_task, etcd_task):
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            continue
        if task.cancelled() or task.exception() is not None:
            continue
        with contextlib.suppress(Exception):
            await task.result().close()
