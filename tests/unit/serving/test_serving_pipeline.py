"""The request pipeline with each worker picker, on in-memory fakes of the runtime's clients
(no NATS, no etcd) and the tiny model's real tokenizer."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest

from app.errors import (
    InvalidRequestError,
    NoWorkerError,
    UnavailableError,
    WorkerUnavailableError,
    WrongModelError,
    error_for_code,
)
from app.openai.schema import CompletionRequest, parse_request
from app.protocol import EngineOutput, PlacementEvent, PreprocessedRequest, RouteDecision, RouteRequest, names
from app.router.placements import PLACEMENT_WINDOW_S
from app.runtime import NoInstancesError
from app.serving import PipelineConfig, ReplicaPicker, RequestPipeline, RouterServicePicker, SpreadPicker, WorkerPicker
from tests.unit.serving.fleet_models import FakeModels

MODEL = "tiny-llama"


class FakeEndpointClient(ABC):
    """What the runtime's clients of one endpoint share: its live instances, watched or waited for."""

    endpoint: str  # "Service/endpoint", as NoInstancesError names it

    @abstractmethod
    def instance_ids(self) -> list[str]: ...

    async def watch(self) -> list[str]:
        return self.instance_ids()

    def suspects(self) -> list[str]:
        return []

    async def wait_for_instances(self, timeout: float = 30.0) -> list[Any]:
        if not self.instance_ids():
            raise NoInstancesError(f"no instance of {self.endpoint} appeared within {timeout:g}s")
        return []


class FakeWorkers(FakeEndpointClient):
    """The workers' `generate` client: each live worker answers with its fixed tokens, or
    fails before its first output with the error given for it."""

    endpoint = f"{names.VLLM_WORKER}/{names.GENERATE}"

    def __init__(self, tokens: dict[str, list[int]], failing: dict[str, Exception] | None = None) -> None:
        self.tokens = tokens
        self.failing = failing or {}
        self.calls: list[str] = []
        self.suspected: list[str] = []  # as the runtime's client marks workers that did not answer

    def instance_ids(self) -> list[str]:
        return sorted(self.tokens)

    def suspects(self) -> list[str]:
        return list(self.suspected)

    async def stream(self, request: PreprocessedRequest, target: str, **_: Any) -> AsyncIterator[EngineOutput]:
        self.calls.append(target)
        if target in self.failing:
            raise self.failing[target]
        tokens = self.tokens[target]
        yield EngineOutput(token_ids=tokens[:1], num_prompt_tokens=len(request.token_ids), worker_id=target)
        yield EngineOutput(token_ids=tokens[1:], finish_reason="length")


class FakeRouterClient(FakeEndpointClient):
    """The Router's `route` client: decides by a function of the request, records the requests."""

    endpoint = f"{names.ROUTER}/{names.ROUTE}"

    def __init__(self, decide: Any, live: bool = True) -> None:
        self.decide = decide
        self.live = live
        self.requests: list[RouteRequest] = []

    def instance_ids(self) -> list[str]:
        return ["router-1"] if self.live else []

    async def call(self, request: RouteRequest, **_: Any) -> RouteDecision:
        self.requests.append(request)
        return RouteDecision(worker_id=self.decide(request))


class FakeRuntime:
    instance_id = "frontend-1"

    def __init__(self) -> None:
        self.published: list[tuple[str, list[PlacementEvent]]] = []

    async def publish(self, topic: str, events: list[PlacementEvent]) -> None:
        self.published.append((topic, events))


class FakeReplica:
    """A router replica: picks the first live worker not excluded, records the accounting."""

    def __init__(self, workers: FakeWorkers) -> None:
        self.workers = workers
        self.accounting: list[tuple[str, str]] = []
        self.models: list[str] = []  # the model each route asked for

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def route(
        self, request_id: str, token_ids: list[int], exclude: Sequence[str] = (), model: str = ""
    ) -> RouteDecision:
        self.models.append(model)
        live = [w for w in self.workers.instance_ids() if w not in exclude]
        if not live:
            raise NoWorkerError("no worker")
        self.accounting.append(("routed", live[0]))
        return RouteDecision(worker_id=live[0])

    def on_prefill_done(self, request_id: str) -> None:
        self.accounting.append(("prefill_done", request_id))

    def on_finished(self, request_id: str) -> None:
        self.accounting.append(("finished", request_id))


async def _pipeline(tiny_model: Path, picker: WorkerPicker, workers: FakeWorkers) -> RequestPipeline:
    pipeline = RequestPipeline(PipelineConfig(model=str(tiny_model)), picker, workers)  # type: ignore[arg-type]
    await pipeline.start()
    return pipeline


async def _complete(pipeline: RequestPipeline, request_id: str = "r1") -> tuple[str, str | None]:
    """(text, worker id of the first item) of a completion of 'hello'."""
    request = parse_request(CompletionRequest, {"model": MODEL, "prompt": "hello", "max_tokens": 4})
    items = [item async for item in pipeline.generate(request, request_id)]
    return "".join(item.text for item in items), items[0].worker_id


async def test_spreading_takes_the_workers_in_turn_and_accounts_nothing(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [100, 101], "w2": [200, 201]})
    pipeline = await _pipeline(tiny_model, SpreadPicker(workers, "round-robin", FakeModels()), workers)  # type: ignore[arg-type]
    seen = [(await _complete(pipeline, f"r{i}"))[1] for i in range(4)]
    assert seen == ["w1", "w2", "w1", "w2"]


async def test_a_worker_that_fails_before_its_first_token_is_replaced(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [100, 101], "w2": [200, 201]}, failing={"w1": WorkerUnavailableError("engine died")})
    pipeline = await _pipeline(tiny_model, SpreadPicker(workers, "round-robin", FakeModels()), workers)  # type: ignore[arg-type]
    text, worker = await _complete(pipeline)
    assert worker == "w2" and workers.calls == ["w1", "w2"]
    assert text  # w2's tokens, detokenized


async def test_a_bad_request_is_not_retried_elsewhere(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [1], "w2": [2]}, failing={"w1": InvalidRequestError("prompt too long")})
    pipeline = await _pipeline(tiny_model, SpreadPicker(workers, "round-robin", FakeModels()), workers)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="prompt too long"):
        await _complete(pipeline)
    assert workers.calls == ["w1"]


async def test_when_every_worker_failed_the_request_gets_no_worker(tiny_model: Path) -> None:
    dead = WorkerUnavailableError("engine died")
    workers = FakeWorkers({"w1": [1], "w2": [2]}, failing={"w1": dead, "w2": dead})
    pipeline = await _pipeline(tiny_model, SpreadPicker(workers, "random", FakeModels()), workers)  # type: ignore[arg-type]
    with pytest.raises(NoWorkerError):
        await _complete(pipeline)
    assert sorted(workers.calls) == ["w1", "w2"]


async def test_the_router_service_decides_hears_of_failures_and_gets_the_placements(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [100, 101], "w2": [200, 201]}, failing={"w2": WorkerUnavailableError("left")})
    router = FakeRouterClient(lambda request: "w2" if "w2" not in request.exclude else "w1")
    runtime = FakeRuntime()
    picker = RouterServicePicker(runtime, router)  # type: ignore[arg-type]
    pipeline = await _pipeline(tiny_model, picker, workers)
    _, worker = await _complete(pipeline, "r9")
    assert worker == "w1"
    assert [r.exclude for r in router.requests] == [[], ["w2"]]
    assert [r.model for r in router.requests] == [MODEL, MODEL]  # the Router routes among its workers
    await _drain_publishes()
    events = [
        (e.worker_id, e.kind) for topic, batch in runtime.published for e in batch if topic == names.PLACEMENT_TOPIC
    ]
    # The failed attempt's placement is closed too, so that no Router counts it as load.
    assert events == [("w2", "finished"), ("w1", "prefill_done"), ("w1", "finished")]
    assert {e.router_id for _, batch in runtime.published for e in batch} == {"processor-frontend-1"}


async def test_a_graph_whose_router_is_down_answers_503_naming_it_and_never_spreads(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [1, 2]})
    picker = RouterServicePicker(FakeRuntime(), FakeRouterClient(lambda r: "w1", live=False))  # type: ignore[arg-type]
    pipeline = await _pipeline(tiny_model, picker, workers)
    with pytest.raises(UnavailableError, match=names.ROUTER) as caught:
        await _complete(pipeline)
    assert caught.value.status == 503
    assert workers.calls == []


async def test_the_replica_in_process_accounts_for_each_placement(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [1, 2], "w2": [3, 4]}, failing={"w1": WorkerUnavailableError("engine died")})
    replica = FakeReplica(workers)
    pipeline = await _pipeline(tiny_model, ReplicaPicker(replica), workers)
    _, worker = await _complete(pipeline, "r5")
    assert worker == "w2"
    assert replica.models == [MODEL, MODEL]
    assert replica.accounting == [
        ("routed", "w1"),
        ("finished", "r5"),
        ("routed", "w2"),
        ("prefill_done", "r5"),
        ("finished", "r5"),
    ]


class FlakyReplica(FakeReplica):
    """A replica whose first starts fail (etcd or NATS away), as an embedded one's may."""

    def __init__(self, workers: FakeWorkers, failures: int) -> None:
        super().__init__(workers)
        self.failures = failures
        self.starts = self.closes = 0
        self.release = asyncio.Event()

    async def start(self) -> None:
        self.starts += 1
        if self.starts <= self.failures:
            if self.starts == self.failures:
                await self.release.wait()  # the test looks while it still fails
            raise ConnectionError("etcd unreachable")

    async def close(self) -> None:
        self.closes += 1


async def test_a_router_replica_that_fails_to_start_is_retried_and_unready_meanwhile(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [1, 2]})
    replica = FlakyReplica(workers, failures=3)
    picker = ReplicaPicker(replica, restart_first_s=0.01)
    pipeline = await _pipeline(tiny_model, picker, workers)
    async with asyncio.timeout(5):
        while replica.starts < 3:
            await asyncio.sleep(0.01)
    # Meanwhile /health says so (FleetBackend.is_ready), and a request gets 503 naming why.
    assert not pipeline.is_ready()
    with patch("app.serving.pickers.START_WAIT_S", 0.05), pytest.raises(NoWorkerError, match="etcd unreachable"):
        await _complete(pipeline)
    replica.release.set()
    async with asyncio.timeout(5):
        while not pipeline.is_ready():
            await asyncio.sleep(0.01)
    assert replica.starts == 4 and replica.closes == 3  # each failed start cleaned up first
    _, worker = await _complete(pipeline)
    assert worker == "w1"


async def test_a_worker_that_did_not_answer_lately_is_picked_only_when_no_other_is_left(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [1, 2], "w2": [3, 4]})
    replica = FakeReplica(workers)  # routes to the first live worker not excluded: w1
    pipeline = await _pipeline(tiny_model, ReplicaPicker(replica), workers)
    workers.suspected = ["w1"]  # its record outlives its crash
    assert (await _complete(pipeline, "r1"))[1] == "w2"
    assert workers.calls == ["w2"]  # no try on the dead one first
    del workers.tokens["w2"]
    assert (await _complete(pipeline, "r2"))[1] == "w1"  # the only one left: tried after all


async def test_spreading_takes_only_the_workers_of_the_requests_model(tiny_model: Path) -> None:
    workers = FakeWorkers({"a1": [1], "b1": [2], "a2": [3], "b2": [4]})
    models = FakeModels({"b1": "model-b", "b2": "model-b"})
    pipeline = await _pipeline(tiny_model, SpreadPicker(workers, "round-robin", models), workers)  # type: ignore[arg-type]
    seen = [(await _complete(pipeline, f"r{i}"))[1] for i in range(4)]
    assert seen == ["a1", "a2", "a1", "a2"]
    assert workers.calls == seen  # no worker of model-b was even asked


async def test_a_model_without_a_live_worker_gets_503_naming_it(tiny_model: Path) -> None:
    workers = FakeWorkers({"b1": [2]})
    models = FakeModels({"b1": "model-b"})
    pipeline = await _pipeline(tiny_model, SpreadPicker(workers, "random", models), workers)  # type: ignore[arg-type]
    started = asyncio.get_running_loop().time()
    with (
        patch("app.serving.pipeline.START_WAIT_S", 0.5),
        pytest.raises(NoWorkerError, match=f"no VllmWorker is serving model `{MODEL}`"),
    ):
        await _complete(pipeline)
    assert asyncio.get_running_loop().time() - started >= 0.5  # it looked again before giving up
    assert workers.calls == []


class LaggingRouter(FakeRouterClient):
    """The Router service whose view of the workers is empty for its first `empty_for` calls
    (etcd dropped every worker's records at once; they are being put back): it answers the
    code of NoWorkerError, as that crosses NATS."""

    def __init__(self, empty_for: int) -> None:
        super().__init__(lambda request: "w1")
        self.empty_for = empty_for

    async def call(self, request: RouteRequest, **kwargs: Any) -> RouteDecision:
        if len(self.requests) < self.empty_for:
            self.requests.append(request)
            refusal = NoWorkerError(f"no VllmWorker is serving model `{MODEL}`")
            raise error_for_code(refusal.code, refusal.message)
        return await super().call(request, **kwargs)


async def test_a_request_that_finds_no_worker_while_the_fleet_reregisters_waits_for_it(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [200, 201]})
    router = LaggingRouter(empty_for=3)
    pipeline = await _pipeline(tiny_model, RouterServicePicker(FakeRuntime(), router), workers)  # type: ignore[arg-type]
    text, worker = await _complete(pipeline)
    assert (worker, workers.calls, len(router.requests)) == ("w1", ["w1"], 4)
    assert text


async def test_a_router_that_never_sees_a_worker_answers_503_after_the_wait(tiny_model: Path) -> None:
    workers = FakeWorkers({"w1": [100, 101]})
    router = LaggingRouter(empty_for=10**6)
    pipeline = await _pipeline(tiny_model, RouterServicePicker(FakeRuntime(), router), workers)  # type: ignore[arg-type]
    with patch("app.serving.pipeline.START_WAIT_S", 0.5), pytest.raises(NoWorkerError, match="no VllmWorker") as caught:
        await _complete(pipeline)
    assert caught.value.status == 503 and 2 <= len(router.requests) <= 4
    assert workers.calls == []


async def test_a_worker_of_another_model_refuses_and_the_request_goes_to_one_of_its_model(tiny_model: Path) -> None:
    # The picker's view is stale (w1 was just redeployed with model-b): w1's refusal, as it
    # comes back over NATS (code and message only), re-routes the request before any token.
    refusal = WrongModelError("VllmWorker w1 serves model `model-b`, not `tiny-llama`")
    crossed = error_for_code(refusal.code, refusal.message)
    assert isinstance(crossed, WorkerUnavailableError)
    workers = FakeWorkers({"w1": [100, 101], "w2": [200, 201]}, failing={"w1": crossed})
    pipeline = await _pipeline(tiny_model, SpreadPicker(workers, "round-robin", FakeModels()), workers)  # type: ignore[arg-type]
    text, worker = await _complete(pipeline)
    assert (worker, workers.calls) == ("w2", ["w1", "w2"])
    assert text


async def _drain_publishes() -> None:
    await asyncio.sleep(2 * PLACEMENT_WINDOW_S)  # placements go out a window after the first
    for _ in range(3):
        await asyncio.sleep(0)


class ChoiceWorkers(FakeWorkers):
    """Each worker answers a request's n choices as its fan-out does (app/engines/choices.py):
    choice 0's first output first, then the choices' outputs interleaved, each tagged; choice
    i's tokens are `tokens[i]`."""

    def __init__(self, tokens: dict[str, list[int]]) -> None:
        super().__init__(tokens)
        self.requests: list[PreprocessedRequest] = []

    async def stream(self, request: PreprocessedRequest, target: str, **_: Any) -> AsyncIterator[EngineOutput]:
        self.calls.append(target)
        self.requests.append(request)
        tokens = self.tokens[target]
        yield EngineOutput(token_ids=[tokens[0]], num_prompt_tokens=len(request.token_ids), worker_id=target)
        for index in range(1, request.n):
            yield EngineOutput(token_ids=[tokens[index]], index=index)
        for index in range(request.n):
            yield EngineOutput(token_ids=[tokens[index]], index=index, finish_reason="length")


async def test_n_choices_come_back_per_index_from_one_worker(tiny_model: Path) -> None:
    workers = ChoiceWorkers({"w1": [1000, 1500, 2000]})
    pipeline = await _pipeline(tiny_model, SpreadPicker(workers, "round-robin", FakeModels()), workers)  # type: ignore[arg-type]
    fields = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "n": 3, "temperature": 0.5}
    items = [item async for item in pipeline.generate(parse_request(CompletionRequest, fields), "r7")]
    assert workers.calls == ["w1"] and workers.requests[0].n == 3
    assert items[0].worker_id == "w1" and items[0].index == 0
    # Each choice detokenized on its own: its text is its one token twice.
    texts = {index: "".join(item.text for item in items if item.index == index) for index in range(3)}
    assert len(set(texts.values())) == 3 and all(text[: len(text) // 2] * 2 == text for text in texts.values())
    assert [(item.index, item.completion_tokens) for item in items if item.finish_reason] == [(0, 2), (1, 2), (2, 2)]
