"""Request migration in the pipeline: a worker that fails mid-stream is replaced by another,
which is asked for the rest; the client's stream goes on without a gap or a repeat.

The fake workers "decode" a fixed continuation of whatever prompt they get: token
`prompt[-1] + 1`, then the next, so that a continuation is right only if it was asked
for with the tokens already sent appended to the prompt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app.engines.base import EngineDeadError
from app.errors import WorkerUnavailableError
from app.openai.schema import CompletionRequest, parse_request
from app.protocol import EngineOutput, PreprocessedRequest, names
from app.runtime import FramesLostError, InstanceGoneError
from app.serving import PipelineConfig, RequestPipeline, SpreadPicker
from tests.unit.serving.fleet_models import FakeModels

MODEL = "tiny-llama"
FIRST_TOKEN = 1000


class CountingWorkers:
    """Workers that count on from their prompt's last token (the first output's from
    FIRST_TOKEN); `dies_after[w] = (k, error)` fails worker w's stream after k tokens."""

    endpoint = f"{names.VLLM_WORKER}/{names.GENERATE}"

    def __init__(self, ids: list[str], dies_after: dict[str, tuple[int, Exception]] | None = None) -> None:
        self.ids = ids
        self.dies_after = dies_after or {}
        self.requests: list[tuple[str, PreprocessedRequest]] = []

    def instance_ids(self) -> list[str]:
        return list(self.ids)

    async def watch(self) -> list[str]:
        return self.ids

    def suspects(self) -> list[str]:
        return []

    async def wait_for_instances(self, timeout: float = 30.0) -> list[Any]:
        return []

    async def stream(self, request: PreprocessedRequest, target: str, **_: Any) -> AsyncIterator[EngineOutput]:
        self.requests.append((target, request))
        first = len(self.requests) == 1
        next_token = FIRST_TOKEN if first else request.token_ids[-1] + 1
        for i in range(request.stop.max_tokens):
            death = self.dies_after.get(target)
            if death is not None and i == death[0]:
                self.ids.remove(target)  # it left discovery
                raise death[1]
            output = EngineOutput(token_ids=[next_token + i])
            if i == 0:
                output.num_prompt_tokens = len(request.token_ids)
                output.num_cached_tokens = 0
                output.worker_id = target
            if i == request.stop.max_tokens - 1:
                output.finish_reason = "length"
            yield output


async def _pipeline(tiny_model: Path, workers: CountingWorkers, **config: Any) -> RequestPipeline:
    registry = CollectorRegistry()
    picker = SpreadPicker(workers, "round-robin", FakeModels())  # type: ignore[arg-type]
    pipeline = RequestPipeline(PipelineConfig(model=str(tiny_model), **config), picker, workers, registry)  # type: ignore[arg-type]
    pipeline.registry = registry  # type: ignore[attr-defined]  # for the test to read
    await pipeline.start()
    return pipeline


async def _completion(pipeline: RequestPipeline, **fields: Any) -> list:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "temperature": 0, **fields}
    return [item async for item in pipeline.generate(parse_request(CompletionRequest, body), "r1")]


def _expected_text(pipeline: RequestPipeline, count: int) -> str:
    tokenizer = pipeline._preprocessor.tokenizer  # type: ignore[union-attr]
    return str(tokenizer.decode(list(range(FIRST_TOKEN, FIRST_TOKEN + count))))


@pytest.mark.parametrize(
    "error",
    [InstanceGoneError("w1 left"), EngineDeadError("engine died"), FramesLostError("frame 4 came where 3 was due")],
)
async def test_a_stream_whose_worker_dies_goes_on_on_another_without_gap_or_repeat(
    tiny_model: Path, error: Exception
) -> None:
    workers = CountingWorkers(["w1", "w2"], dies_after={"w1": (3, error)})
    pipeline = await _pipeline(tiny_model, workers)
    items = await _completion(pipeline)
    assert "".join(item.text for item in items) == _expected_text(pipeline, 8)
    assert items[-1].finish_reason == "length" and items[-1].completion_tokens == 8
    (first_target, first), (second_target, rest) = workers.requests
    assert (first_target, second_target) == ("w1", "w2")
    # The rest: the prompt and the three tokens sent, five more to go, a request id of its own.
    assert rest.token_ids == [*first.token_ids, 1000, 1001, 1002]
    assert rest.stop.max_tokens == 5 and rest.request_id == "r1-m1"
    # The prompt's count is the original's, not the continuation's longer prompt.
    assert items[-1].prompt_tokens == len(first.token_ids)
    assert items[0].worker_id == "w1"
    registry = pipeline.registry  # type: ignore[attr-defined]
    assert registry.get_sample_value("tandem_request_migrations_total", {"cause": type(error).__name__}) == 1


async def test_with_migration_off_the_failure_reaches_the_caller(tiny_model: Path) -> None:
    workers = CountingWorkers(["w1", "w2"], dies_after={"w1": (3, InstanceGoneError("w1 left"))})
    pipeline = await _pipeline(tiny_model, workers, migration_limit=0)
    with pytest.raises(WorkerUnavailableError):
        await _completion(pipeline)
    assert [target for target, _ in workers.requests] == ["w1"]


async def test_a_request_moves_at_most_migration_limit_times(tiny_model: Path) -> None:
    gone = InstanceGoneError("left")
    workers = CountingWorkers(["w1", "w2", "w3", "w4"], dies_after={w: (2, gone) for w in ("w1", "w2", "w3")})
    pipeline = await _pipeline(tiny_model, workers, migration_limit=2)
    with pytest.raises(InstanceGoneError):
        await _completion(pipeline)
    # The first worker, then two more (each of which died too); never a fourth.
    targets = [target for target, _ in workers.requests]
    assert len(targets) == 3 and len(set(targets)) == 3 and "w4" not in targets


async def test_a_worker_that_aborts_its_requests_hands_them_on(tiny_model: Path) -> None:
    class Aborting(CountingWorkers):
        async def stream(self, request: PreprocessedRequest, target: str, **kw: Any) -> AsyncIterator[EngineOutput]:
            async for output in super().stream(request, target, **kw):
                if target == "w1" and len(output.token_ids) and output.token_ids[0] == FIRST_TOKEN + 1:
                    output.finish_reason = "abort"  # a draining worker's end
                    yield output
                    return
                yield output

    workers = Aborting(["w1", "w2"])
    pipeline = await _pipeline(tiny_model, workers)
    items = await _completion(pipeline)
    assert "".join(item.text for item in items) == _expected_text(pipeline, 8)
    assert all(item.finish_reason != "abort" for item in items)


async def test_constrained_and_multi_choice_requests_are_not_migrated(tiny_model: Path) -> None:
    for fields in ({"structured_outputs": {"regex": "[a-z]+"}}, {"n": 2, "temperature": 1.0}):
        workers = CountingWorkers(["w1", "w2"], dies_after={"w1": (2, InstanceGoneError("w1 left"))})
        pipeline = await _pipeline(tiny_model, workers)
        with pytest.raises(InstanceGoneError):
            await _completion(pipeline, **fields)
