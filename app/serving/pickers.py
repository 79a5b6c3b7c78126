"""How the request pipeline picks a worker: one interface, one implementation per layout.

Chosen once, when the pipeline is built, from the deployment (`create_picker`):

- `ReplicaPicker`: a router replica in this process (the Frontend's, by default in a graph
  with a Router: `FrontendConfig.routes_in_process`);
- `RouterServicePicker`: the graph's Router service, over NATS;
- `SpreadPicker`: a graph without a router (graphs.agg, graphs.disagg): round-robin or random.

Every picker chooses among the workers of the request's model (`PreprocessedRequest.model`)
only: a namespace may hold workers of several models (two graphs, a rolling upgrade).

A picker never falls back to another: a graph whose Router has no live instance answers
503 naming the Router, rather than spreading requests blind and publishing no placements.
Each pick returns a `Placement`, on which the pipeline reports the request's first token
and its end, so that whoever routed it accounts for the load it adds.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from app.errors import NoWorkerError, UnavailableError
from app.protocol import PlacementEvent, PlacementKind, PreprocessedRequest, RouteDecision, RouteRequest, names
from app.router.placements import PlacementPublisher
from app.runtime import EndpointClient, Runtime

log = logging.getLogger(__name__)

# How long a pick waits for what it needs to appear (a Router instance, the embedded
# router's start): covers a restart under supervisord, not a fleet that is not there.
START_WAIT_S = 5.0
# An embedded router replica that failed to start tries again after this, doubling to the
# most: etcd or NATS away for a moment must not leave the Frontend without routing.
_RESTART_FIRST_S, _RESTART_MOST_S = 0.5, 10.0

Spread = Literal["round-robin", "random"]


class Placement:
    """Where one request went; the pipeline says when its prefill is done and when it ends.

    The hooks do nothing here: a picker that accounts for load subclasses it."""

    def __init__(self, decision: RouteDecision) -> None:
        self.decision = decision

    @property
    def worker_id(self) -> str:
        return self.decision.worker_id

    def prefill_done(self) -> None:
        """The first output arrived: the prompt's blocks now sit in the worker's KV cache."""

    def finished(self) -> None:
        """The request ended (whichever way): its blocks no longer count as the worker's load."""


class WorkerPicker(abc.ABC):
    """Picks the worker for each request; see the module docstring for the implementations."""

    async def start(self) -> None:  # noqa: B027 - most pickers need nothing started
        pass

    @abc.abstractmethod
    async def pick(self, request: PreprocessedRequest, exclude: Sequence[str]) -> Placement:
        """A live worker for the request, none of `exclude` (workers that failed it before its
        first token); NoWorkerError (503) when there is none."""

    async def close(self) -> None:  # noqa: B027
        pass

    def is_ready(self) -> bool:
        """Whether it can pick at all now (the Frontend's /health): a router replica that has
        not started yet cannot."""
        return True


class ModelInstances(Protocol):
    """Which instances serve which model: the runtime's `ModelsWatch` (app/runtime/discovery.py)."""

    def serving(self, model: str, instance_ids: Iterable[str]) -> list[str]: ...
    async def close(self) -> None: ...


class ModelsSource(Protocol):
    """Where a picker gets its `ModelInstances`: the runtime's `Discovery`."""

    async def watch_models(self) -> ModelInstances: ...


def _no_worker_of(model: str, exclude: Sequence[str]) -> NoWorkerError:
    """The 503 for a request that no live worker of its model can take."""
    of_model = f" model `{model}`" if model else ""
    but = " but those that failed it" if exclude else ""
    return NoWorkerError(f"no {names.VLLM_WORKER} is serving{of_model}{but}")


class SpreadPicker(WorkerPicker):
    """No router: spread over the live workers of the request's model, round-robin or at random."""

    def __init__(self, workers: EndpointClient, spread: Spread, discovery: ModelsSource) -> None:
        self._workers = workers
        self._spread = spread
        self._discovery = discovery
        self._models: ModelInstances | None = None
        self._turn = itertools.count()

    async def start(self) -> None:
        self._models = await self._discovery.watch_models()

    async def pick(self, request: PreprocessedRequest, exclude: Sequence[str]) -> Placement:
        assert self._models is not None, "pick before start()"
        serving = self._models.serving(request.model, self._workers.instance_ids())
        workers = [worker for worker in serving if worker not in exclude]
        if not workers:
            raise _no_worker_of(request.model, exclude)
        chosen = random.choice(workers) if self._spread == "random" else workers[next(self._turn) % len(workers)]
        return Placement(RouteDecision(worker_id=chosen))  # spread: nobody accounts for load

    async def close(self) -> None:
        if self._models is not None:
            await self._models.close()


class _Published(Placement):
    def __init__(self, decision: RouteDecision, request_id: str, source: str, publisher: PlacementPublisher) -> None:
        super().__init__(decision)
        self._request_id = request_id
        self._source = source
        self._publisher = publisher

    def _publish(self, kind: PlacementKind) -> None:
        self._publisher.publish(
            PlacementEvent(router_id=self._source, request_id=self._request_id, worker_id=self.worker_id, kind=kind)
        )

    def prefill_done(self) -> None:
        self._publish("prefill_done")

    def finished(self) -> None:
        self._publish("finished")


class RouterServicePicker(WorkerPicker):
    """Asks the graph's Router service; reports first tokens and ends on the placement topic,
    where every Router replica applies them (each names its source and skips its own)."""

    def __init__(self, runtime: Runtime, router: EndpointClient) -> None:
        self._router = router
        self._source = f"processor-{runtime.instance_id}"
        self._publisher = PlacementPublisher(lambda events: runtime.publish(names.PLACEMENT_TOPIC, events))

    async def start(self) -> None:
        await self._router.watch()

    async def pick(self, request: PreprocessedRequest, exclude: Sequence[str]) -> Placement:
        if not self._router.instance_ids():
            # NoInstancesError naming the Router after the wait: a 503 that says what is missing.
            await self._router.wait_for_instances(timeout=START_WAIT_S)
        wanted = RouteRequest(
            request_id=request.request_id, token_ids=request.token_ids, exclude=list(exclude), model=request.model
        )
        try:
            decision: RouteDecision = await self._router.call(
                wanted,
                response_type=RouteDecision,
                target="round_robin",
            )
        except UnavailableError as exc:
            if type(exc) is not UnavailableError:
                raise  # this side's own: no Router instance (NoInstancesError)
            # The Router's NoWorkerError crosses NATS as its code's class: made that again,
            # so that the pipeline treats "no worker" alike in every layout.
            raise NoWorkerError(exc.message, param=exc.param) from None
        log.debug(
            "%s: routed to %s (%d/%d blocks cached)",
            request.request_id,
            decision.worker_id,
            decision.overlap_blocks,
            decision.prompt_blocks,
        )
        return _Published(decision, request.request_id, self._source, self._publisher)

    async def close(self) -> None:
        await self._publisher.close()  # the last window's events (requests' ends) still go out


class RouterReplica(Protocol):
    """What `ReplicaPicker` needs of the router replica it runs (app.router.replica)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def route(
        self, request_id: str, token_ids: list[int], exclude: Sequence[str] = (), model: str = ""
    ) -> RouteDecision: ...
    def on_prefill_done(self, request_id: str) -> None: ...
    def on_finished(self, request_id: str) -> None: ...


class _ReplicaAccounted(Placement):
    def __init__(self, decision: RouteDecision, request_id: str, replica: RouterReplica) -> None:
        super().__init__(decision)
        self._request_id = request_id
        self._replica = replica

    def prefill_done(self) -> None:
        self._replica.on_prefill_done(self._request_id)

    def finished(self) -> None:
        self._replica.on_finished(self._request_id)


class ReplicaPicker(WorkerPicker):
    """A router replica in this process: no NATS round trip per request; the replica
    accounts for its placements and shares them with the other replicas itself."""

    def __init__(self, replica: RouterReplica, restart_first_s: float = _RESTART_FIRST_S) -> None:
        self._replica = replica
        self._restart_first_s = restart_first_s
        self._started: asyncio.Task[None] | None = None
        self._last_failure = ""

    async def start(self) -> None:
        # Without a block size in its config the replica learns it from the first worker's
        # model record: in the background, so that the Frontend serves /health meanwhile.
        self._started = asyncio.create_task(self._start_until_up(), name="router-replica-start")

    async def _start_until_up(self) -> None:
        """Start the replica, again after each failure (backing off), until it is up."""
        delay = self._restart_first_s
        while True:
            try:
                await self._replica.start()
                if self._last_failure:
                    log.info("the router replica started after all")
                return
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
                if failure != self._last_failure:  # once per kind of failure, not once a retry
                    log.error(
                        "the router replica could not start (%s); retrying every %gs at most", failure, _RESTART_MOST_S
                    )
                self._last_failure = failure
            # What a failed start left open (subscriptions, its metrics server) goes first.
            with contextlib.suppress(Exception):
                await self._replica.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_MOST_S)

    def is_ready(self) -> bool:
        return self._started is not None and self._started.done() and not self._started.cancelled()

    async def pick(self, request: PreprocessedRequest, exclude: Sequence[str]) -> Placement:
        assert self._started is not None, "pick before start()"
        if not self._started.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._started), START_WAIT_S)
            except TimeoutError:
                why = self._last_failure or "no worker's model record yet"
                raise NoWorkerError(f"the router has not started yet ({why})") from None
        decision = self._replica.route(request.request_id, request.token_ids, exclude, model=request.model)
        return _ReplicaAccounted(decision, request.request_id, self._replica)

    async def close(self) -> None:
        if self._started is not None:
            self._started.cancel()
            await asyncio.gather(self._started, return_exceptions=True)
            await self._replica.close()


def create_picker(
    runtime: Runtime,
    workers: EndpointClient,
    *,
    graph: frozenset[str],
    spread: Spread,
    replica: RouterReplica | None = None,
) -> WorkerPicker:
    """The picker for this deployment: the replica given, else the graph's Router, else spreading."""
    if replica is not None:
        return ReplicaPicker(replica)
    if names.ROUTER in graph:
        return RouterServicePicker(runtime, runtime.client(names.ROUTER, names.ROUTE))
    return SpreadPicker(workers, spread, runtime.discovery)
