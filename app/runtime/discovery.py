"""Discovery plane on etcd: the process lease, records attached to it, watch-fed views.

One lease per process (TTL `lease_ttl_s`), kept alive by a task. Every record this
process registers hangs on that lease, so a crashed process's records vanish within the
TTL and a clean `revoke()` removes them at once. If etcd loses the lease (an outage
longer than the TTL), the keep-alive task grants it again under the same ID and puts the
records back, so the process keeps its instance id.

The keep-alive and every watch are essential: a process whose lease is not kept, or whose
view of the fleet stopped changing, would stay registered while it misroutes or vanishes.
Each task that ends on an unexpected error calls the failure handler (`on_failure`; the
service runner's `ServiceContext.fail`), which takes the process out and ends it non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import Any, Generic, TypeVar

import etcd3aio
import grpc.aio
import msgspec

from app.aio import cancel_and_wait, end_on_exit
from app.protocol import InstanceRecord, ModelRecord, ProcessRecord, names
from app.runtime.connect import etcd_service
from app.runtime.wire import decoder_for, encoder

log = logging.getLogger(__name__)

_EVENT_DELETE = 1  # mvccpb.Event.EventType.DELETE
_RPC_TIMEOUT_S = 5.0
_RETRY_S = 0.5
# What an etcd call raises when etcd is slow, restarting or gone: a caller that can look again catches these.
ETCD_ERRORS = (etcd3aio.EtcdError, grpc.aio.AioRpcError, asyncio.TimeoutError, OSError)

T = TypeVar("T")
_NONE: frozenset[str] = frozenset()


def _no_failure_handler(reason: str) -> None:
    pass


def _prefix_end(prefix: bytes) -> bytes:
    return etcd3aio.prefix_range_end(prefix)


class PrefixWatch(Generic[T]):
    """A live `dict` of every key under a prefix (key suffix -> decoded value), fed by a watch.

    Survives etcd restarts (etcd3aio resumes the watch from the next revision) and
    compactions (a full reload).
    """

    def __init__(
        self,
        client: etcd3aio.Etcd3Client,
        prefix: str,
        value_type: Any = None,
        fail: Callable[[str], None] = _no_failure_handler,
    ) -> None:
        self._client = client
        self._fail = fail
        self._prefix = prefix.encode()
        self._decoder = decoder_for(value_type)
        self.items: dict[str, T] = {}
        self._listeners: list[Callable[[str, T | None], None]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, listener: Callable[[str, T | None], None]) -> None:
        """`listener(key, value)` runs on every change; value None means the key was deleted."""
        self._listeners.append(listener)

    async def start(self) -> None:
        revision = await self._load()
        task = asyncio.create_task(self._run(revision), name=f"etcd-watch:{self._prefix.decode()}")
        self._task = end_on_exit(task, self._fail)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():  # one that ended was reported
            await cancel_and_wait(self._task)
        self._task = None

    async def wait_until(self, predicate: Callable[[dict[str, T]], bool], timeout: float | None) -> bool:
        """Wait until `predicate(self.items)` holds; False if it still does not after `timeout`
        (None: no limit)."""
        async with asyncio.timeout(timeout):
            while not predicate(self.items):
                self._changed.clear()
                await self._changed.wait()
        return True

    def _decode(self, value: bytes) -> T | None:
        try:
            return self._decoder.decode(value)
        except msgspec.DecodeError:
            log.warning("etcd: undecodable value under %s ignored", self._prefix.decode())
            return None

    async def _load(self) -> int:
        resp = await etcd_service(self._client.kv).get(self._prefix, _prefix_end(self._prefix), timeout=_RPC_TIMEOUT_S)
        fresh: dict[str, T] = {}
        for kv in resp.kvs:
            value = self._decode(kv.value)
            if value is not None:
                fresh[kv.key[len(self._prefix) :].decode()] = value
        for key in self.items.keys() - fresh.keys():
            self._apply(key, None)
        for key, value in fresh.items():
            if self.items.get(key) != value:
                self._apply(key, value)
        return resp.header.revision

    def _apply(self, key: str, value: T | None) -> None:
        if value is None:
            if self.items.pop(key, None) is None:
                return
        else:
            self.items[key] = value
        for listener in self._listeners:
            try:
                listener(key, value)
            except Exception:
                # One listener's bug must not stop the watch for the others (nor end every
                # process of the fleet that reads the same record): logged, and the next
                # change is delivered as usual.
                log.exception("etcd: a listener of %s failed on %s", self._prefix.decode(), key)
        self._changed.set()

    async def _run(self, revision: int) -> None:
        while True:
            try:
                watch = etcd_service(self._client.watch).watch(
                    self._prefix, _prefix_end(self._prefix), start_revision=revision + 1
                )
                async for resp in watch:
                    if resp.compact_revision > 0 or resp.canceled:
                        break  # events were lost: reload below
                    for event in resp.events:
                        key = event.kv.key[len(self._prefix) :].decode()
                        value = None if event.type == _EVENT_DELETE else self._decode(event.kv.value)
                        self._apply(key, value)
                    revision = max(revision, resp.header.revision)
            except ETCD_ERRORS as exc:
                log.warning("etcd watch on %s failed (%s); reloading", self._prefix.decode(), exc)
                await asyncio.sleep(_RETRY_S)
            revision = await self._reload_until_ok()

    async def _reload_until_ok(self) -> int:
        while True:
            try:
                return await self._load()
            except ETCD_ERRORS as exc:
                log.warning("etcd reload of %s failed (%s); retrying", self._prefix.decode(), exc)
                await asyncio.sleep(_RETRY_S)


class ModelsWatch:
    """Live `.models`: model name -> the records of the instances serving it; and
    `instances(name)`, the ids of those instances, kept as the records come and go so that
    whoever picks a worker filters by model at the cost of a set lookup."""

    def __init__(self, watch: PrefixWatch[ModelRecord]) -> None:
        self._watch = watch
        self._instances: dict[str, set[str]] = {}
        self._indexed: dict[str, ModelRecord] = {}  # by the watch's key, to unindex a deleted one
        for key, record in watch.items.items():
            self._index(key, record)
        # No await since the watch loaded: no change can have slipped between the two.
        watch.add_listener(self._index)

    @property
    def models(self) -> dict[str, list[ModelRecord]]:
        return _group_models(self._watch.items.values())

    def instances(self, model: str) -> AbstractSet[str]:
        """The instances that registered `model` (live: do not keep it, copy it)."""
        return self._instances.get(model, _NONE)

    def serving(self, model: str, instance_ids: Iterable[str]) -> list[str]:
        """Those of `instance_ids` that serve `model`; all of them for "" (a request that
        names no model, from a caller older than routing by model)."""
        if not model:
            return list(instance_ids)
        serving = self.instances(model)
        return [instance for instance in instance_ids if instance in serving]

    def _index(self, key: str, record: ModelRecord | None) -> None:
        old = self._indexed.pop(key, None)
        if old is not None:
            serving = self._instances[old.name]
            serving.discard(old.instance_id)
            if not serving:
                del self._instances[old.name]
        if record is not None:
            self._indexed[key] = record
            self._instances.setdefault(record.name, set()).add(record.instance_id)

    async def wait_until(
        self, predicate: Callable[[dict[str, list[ModelRecord]]], bool], timeout: float | None
    ) -> bool:
        return await self._watch.wait_until(lambda _: predicate(self.models), timeout)

    async def close(self) -> None:
        await self._watch.close()


class TunablesWatch:
    """Live `.values`: tunable key -> value."""

    def __init__(self, watch: PrefixWatch[Any]) -> None:
        self._watch = watch

    @property
    def values(self) -> dict[str, Any]:
        return self._watch.items

    def add_listener(self, listener: Callable[[str, Any], None]) -> None:
        """`listener(key, value)` on every change; value None means the key was deleted."""
        self._watch.add_listener(listener)

    async def wait_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        return await self._watch.wait_until(predicate, timeout)

    async def close(self) -> None:
        await self._watch.close()


def _group_models(records: Any) -> dict[str, list[ModelRecord]]:
    grouped: dict[str, list[ModelRecord]] = {}
    for record in records:
        grouped.setdefault(record.name, []).append(record)
    return grouped


class Discovery:
    """This process's view of etcd: its lease and records, models, tunables, instance watches."""

    def __init__(self, client: etcd3aio.Etcd3Client, namespace: str, lease_ttl_s: int) -> None:
        self._client = client
        self._namespace = namespace
        self._ttl = lease_ttl_s
        self.lease_id = 0
        self._owned: dict[bytes, bytes] = {}
        self._keepalive_task: asyncio.Task[None] | None = None
        self._fail: Callable[[str], None] = _no_failure_handler
        self._watches: weakref.WeakSet[PrefixWatch[Any]] = weakref.WeakSet()

    # --- lease --------------------------------------------------------------------------

    async def start(self) -> None:
        grant = await etcd_service(self._client.lease).grant(self._ttl, timeout=_RPC_TIMEOUT_S)
        self.lease_id = grant.ID
        keepalive = asyncio.create_task(self._keepalive_loop(), name="etcd-lease-keepalive")
        self._keepalive_task = end_on_exit(keepalive, lambda reason: self._fail(reason))

    def on_failure(self, fail: Callable[[str], None]) -> None:
        """`fail(reason)` runs when the keep-alive or a watch ends on an unexpected error
        (unset: end_on_exit's CRITICAL log line is all there is)."""
        self._fail = fail

    async def close(self) -> None:
        """Stop watches and keep-alive, then revoke the lease: every record of ours vanishes at once."""
        for watch in list(self._watches):
            await watch.close()
        if self._keepalive_task is not None and not self._keepalive_task.done():
            await cancel_and_wait(self._keepalive_task)
        try:
            await etcd_service(self._client.lease).revoke(self.lease_id, timeout=_RPC_TIMEOUT_S)
        except ETCD_ERRORS as exc:
            log.warning("etcd: lease revoke failed (%s); records expire within %ds", exc, self._ttl)
        self._owned.clear()

    async def _keepalive_once(self) -> int:
        call = etcd_service(self._client.lease).keep_alive(self.lease_id)
        try:
            async with asyncio.timeout(_RPC_TIMEOUT_S):
                async for resp in call:
                    return resp.TTL
        finally:
            call.cancel()
        return 0

    async def _keepalive_loop(self) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ttl = await self._keepalive_once()
                if ttl <= 0:
                    log.warning("etcd: lease %x lost; granting it again and re-registering", self.lease_id)
                    await self._restore_lease()
                interval = self._ttl / 3
            except ETCD_ERRORS as exc:
                # Retry quickly: the lease may be close to expiry while etcd was unreachable.
                log.warning("etcd: lease keep-alive failed (%s); retrying", exc)
                interval = _RETRY_S

    async def _restore_lease(self) -> None:
        await etcd_service(self._client.lease).grant(self._ttl, lease_id=self.lease_id, timeout=_RPC_TIMEOUT_S)
        for key, value in list(self._owned.items()):
            await etcd_service(self._client.kv).put(key, value, lease=self.lease_id, timeout=_RPC_TIMEOUT_S)

    async def register(self, key: str, value: Any) -> None:
        """Put a record attached to the process lease (restored if the lease is ever lost)."""
        raw_key, raw_value = key.encode(), encoder.encode(value)
        self._owned[raw_key] = raw_value
        try:
            await etcd_service(self._client.kv).put(raw_key, raw_value, lease=self.lease_id, timeout=_RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            # The lease expires whenever this process blocks its event loop past the TTL
            # (a large model's engine start does). The record is owned already, so
            # restoring the lease puts it back with every other one.
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.warning("etcd: lease %x lost while registering; granting it again", self.lease_id)
            await self._restore_lease()

    async def deregister(self, key: str) -> None:
        raw_key = key.encode()
        self._owned.pop(raw_key, None)
        await etcd_service(self._client.kv).delete(raw_key, timeout=_RPC_TIMEOUT_S)

    # --- keys ---------------------------------------------------------------------------

    def instance_key(self, service: str, endpoint: str, instance_id: str) -> str:
        return names.instance_key(self._namespace, service, endpoint, instance_id)

    async def _start_watch(self, prefix: str, value_type: Any) -> PrefixWatch[Any]:
        watch: PrefixWatch[Any] = PrefixWatch(self._client, prefix, value_type, lambda reason: self._fail(reason))
        await watch.start()
        self._watches.add(watch)
        return watch

    async def watch_instances(self, service: str, endpoint: str) -> PrefixWatch[InstanceRecord]:
        """Live instance records of one endpoint, keyed by instance id."""
        return await self._start_watch(names.instances_prefix(self._namespace, service, endpoint), InstanceRecord)

    async def _list(self, prefix: str, value_type: Any) -> list[Any]:
        raw = prefix.encode()
        resp = await etcd_service(self._client.kv).get(raw, _prefix_end(raw), timeout=_RPC_TIMEOUT_S)
        decoder = decoder_for(value_type)
        values = []
        for kv in resp.kvs:
            try:
                values.append(decoder.decode(kv.value))
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("etcd: undecodable value at %s ignored", kv.key.decode(errors="replace"))
        return values

    async def list_instances(self) -> list[InstanceRecord]:
        """Every instance record of the namespace, all services and endpoints (one read)."""
        return await self._list(names.all_instances_prefix(self._namespace), InstanceRecord)

    # --- processes (what `tandem status` lists) ------------------------------------------

    async def register_process(self, record: ProcessRecord) -> None:
        await self.register(names.process_key(self._namespace, record.instance_id), record)

    async def list_processes(self) -> list[ProcessRecord]:
        return await self._list(names.processes_prefix(self._namespace), ProcessRecord)

    # --- models -------------------------------------------------------------------------

    async def register_model(self, record: ModelRecord) -> None:
        await self.register(names.model_key(self._namespace, record.name, record.instance_id), record)

    async def deregister_model(self, record: ModelRecord) -> None:
        await self.deregister(names.model_key(self._namespace, record.name, record.instance_id))

    async def list_models(self) -> dict[str, list[ModelRecord]]:
        prefix = names.models_prefix(self._namespace).encode()
        resp = await etcd_service(self._client.kv).get(prefix, _prefix_end(prefix), timeout=_RPC_TIMEOUT_S)
        decoder = decoder_for(ModelRecord)
        return _group_models(decoder.decode(kv.value) for kv in resp.kvs)

    async def watch_models(self) -> ModelsWatch:
        return ModelsWatch(await self._start_watch(names.models_prefix(self._namespace), ModelRecord))

    # --- tunables (no lease: they outlive processes) -------------------------------------

    async def put_tunable(self, key: str, value: Any) -> None:
        raw_key = names.tunable_key(self._namespace, key)
        await etcd_service(self._client.kv).put(raw_key, encoder.encode(value), timeout=_RPC_TIMEOUT_S)

    async def delete_tunable(self, key: str) -> None:
        await etcd_service(self._client.kv).delete(names.tunable_key(self._namespace, key), timeout=_RPC_TIMEOUT_S)

    async def get_tunable(self, key: str, default: Any = None) -> Any:
        resp = await etcd_service(self._client.kv).get(names.tunable_key(self._namespace, key), timeout=_RPC_TIMEOUT_S)
        if not resp.kvs:
            return default
        return decoder_for(None).decode(resp.kvs[0].value)

    async def watch_tunables(self) -> TunablesWatch:
        return TunablesWatch(await self._start_watch(names.tunables_prefix(self._namespace), None))
