"""VllmEngine on the real vLLM CPU engine, with the tiny local model.

One engine serves the whole module. The reference outputs come from vLLM's own offline
`LLM` in a subprocess that finishes before that engine starts: two engines at once on
two cores would each crawl unless pinned.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from vllm.sampling_params import RequestOutputKind

from app.engines.vllm import VllmEngine, sampling_params_for
from app.errors import InvalidRequestError
from app.protocol import (
    BlockStored,
    EngineOutput,
    KvEventBatch,
    ModelInfo,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)

pytestmark = pytest.mark.e2e

BLOCK_SIZE = 32  # the CPU attention backend needs a multiple of 32
ENGINE_ARGS = {
    "block_size": BLOCK_SIZE,
    "max_model_len": 4096,
    "enforce_eager": True,
    "dtype": "float32",
    "enable_prefix_caching": True,
}
MAX_TOKENS = 12
SEEDED: dict[str, Any] = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 1234}


def prompt_ids(seed: int, length: int) -> list[int]:
    """Token ids no other test uses (a distinct seed), so no test hits another's cache."""
    rng = random.Random(seed)
    return [rng.randrange(10, 2990) for _ in range(length)]


GREEDY_PROMPTS = [prompt_ids(1, 7), prompt_ids(2, 3 * BLOCK_SIZE + 5)]

_REFERENCE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if __name__ == "__main__":
        model, engine_args, prompts, max_tokens, seeded, out = json.loads(sys.argv[1])
        llm = LLM(model=model, **engine_args)
        greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        sampled = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **seeded)
        result = {}
        for name, params in (("greedy", greedy), ("seeded", sampled)):
            result[name] = [
                list(llm.generate(TokensPrompt(prompt_token_ids=p), params)[0].outputs[0].token_ids)
                for p in prompts
            ]
        with open(out, "w") as f:
            json.dump(result, f)
    """
)


@pytest.fixture(scope="module")
def reference_outputs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[int]]]:
    workdir = tmp_path_factory.mktemp("vllm-reference")
    script = workdir / "reference.py"
    script.write_text(_REFERENCE_SCRIPT)
    out = workdir / "outputs.json"
    argument = json.dumps([str(tiny_model), ENGINE_ARGS, GREEDY_PROMPTS, MAX_TOKENS, SEEDED, str(out)])
    process = subprocess.Popen(
        [sys.executable, str(script), argument], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        log, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.decode(errors="replace")[-4000:]
    return json.loads(out.read_text())


class EngineUnderTest:
    def __init__(self, engine: VllmEngine, info: ModelInfo, batches: list[KvEventBatch]) -> None:
        self.engine = engine
        self.info = info
        self.batches = batches


@pytest.fixture(scope="module")
async def vllm(tiny_model: Path, reference_outputs: dict) -> AsyncIterator[EngineUnderTest]:
    batches: list[KvEventBatch] = []
    engine = VllmEngine.from_config({"model": str(tiny_model), **ENGINE_ARGS})
    try:
        info = await engine.start("worker-a", batches.append)
        yield EngineUnderTest(engine, info, batches)
    finally:
        await engine.stop()


def make_request(
    token_ids: list[int], max_tokens: int = MAX_TOKENS, request_id: str = "r", **sampling: Any
) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=request_id,
        model="tiny-llama",
        token_ids=token_ids,
        sampling=SamplingOptions(**{"temperature": 0.0, **sampling}),
        stop=StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )


async def collect(engine: VllmEngine, request: PreprocessedRequest) -> list[EngineOutput]:
    return [output async for output in engine.generate(request)]


def generated(outputs: list[EngineOutput]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


async def eventually(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_model_info_and_capacity(vllm: EngineUnderTest, tiny_model: Path) -> None:
    assert vllm.info == ModelInfo(
        name="tiny-llama", max_model_len=4096, block_size=BLOCK_SIZE, model_path=str(tiny_model)
    )
    stats = vllm.engine.stats()
    assert stats.kv_total_blocks > 0
    assert (stats.running, stats.waiting, stats.kv_used_blocks) == (0, 0, 0)


async def test_greedy_and_seeded_output_match_offline_vllm(vllm: EngineUnderTest, reference_outputs: dict) -> None:
    for index, prompt in enumerate(GREEDY_PROMPTS):
        greedy = await collect(vllm.engine, make_request(prompt, request_id=f"greedy-{index}"))
        assert generated(greedy) == reference_outputs["greedy"][index]
        seeded = await collect(vllm.engine, make_request(prompt, request_id=f"seeded-{index}", **SEEDED))
        assert generated(seeded) == reference_outputs["seeded"][index]


async def test_stream_carries_metadata_and_logprobs(vllm: EngineUnderTest) -> None:
    prompt = prompt_ids(3, 20)
    outputs = await collect(vllm.engine, make_request(prompt, request_id="meta", logprobs=3))
    first, last = outputs[0], outputs[-1]
    assert first.num_prompt_tokens == len(prompt)
    assert first.num_cached_tokens == 0
    assert all(output.worker_id == "worker-a" for output in outputs)
    assert last.finish_reason == "length"
    assert all(output.finish_reason is None for output in outputs[:-1])
    assert len(generated(outputs)) == MAX_TOKENS
    for output in outputs:
        assert output.logprobs is not None and output.top_logprobs is not None
        assert len(output.logprobs) == len(output.top_logprobs) == len(output.token_ids)
        for token, chosen, top in zip(output.token_ids, output.logprobs, output.top_logprobs, strict=True):
            assert len(top) == 3
            assert [alt.logprob for alt in top] == sorted((alt.logprob for alt in top), reverse=True)
            # Greedy: the chosen token is the most likely one.
            assert (top[0].token_id, top[0].logprob) == (token, pytest.approx(chosen))
            assert chosen <= 0.0


async def test_stop_token_ends_generation(vllm: EngineUnderTest) -> None:
    prompt = prompt_ids(4, 10)
    free_run = generated(await collect(vllm.engine, make_request(prompt, request_id="free")))
    stop_token = free_run[4]
    request = make_request(prompt, request_id="stopped")
    request.stop.stop_token_ids = [stop_token]
    outputs = await collect(vllm.engine, request)
    tokens = generated(outputs)
    assert outputs[-1].finish_reason == "stop"
    assert len(tokens) < MAX_TOKENS
    assert tokens == free_run[: len(tokens)]
    assert tokens[-1] == stop_token


@pytest.mark.parametrize("how", ["close", "cancel"])
async def test_abandoned_stream_is_aborted_in_the_engine(vllm: EngineUnderTest, how: str) -> None:
    long_prompt = prompt_ids(10 if how == "close" else 11, 20 * BLOCK_SIZE)
    stream = vllm.engine.generate(make_request(long_prompt, max_tokens=3000, request_id=f"abandoned-{how}"))
    if how == "close":
        for _ in range(3):
            await anext(stream)
        assert vllm.engine.stats().running == 1
        await stream.aclose()
    else:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert vllm.engine.stats().running == 0

    # The engine core itself dropped the request: while a short one streams, its scheduler
    # sees one request and holds far fewer blocks than the 20-block prompt needed.
    short = vllm.engine.generate(
        make_request(prompt_ids(12 if how == "close" else 13, 8), max_tokens=8, request_id=f"after-{how}")
    )
    outputs = [await anext(short), await anext(short)]
    during = vllm.engine.stats()
    outputs += [output async for output in short]
    assert during.running == 1
    assert 0 < during.kv_used_blocks < 20
    assert outputs[-1].finish_reason == "length"
    assert len(generated(outputs)) == 8


async def test_kv_events_describe_the_prompt_blocks(vllm: EngineUnderTest) -> None:
    prompt = prompt_ids(20, 3 * BLOCK_SIZE + 7)
    first_block = prompt[:BLOCK_SIZE]
    await collect(vllm.engine, make_request(prompt, max_tokens=1, request_id="events"))

    def stored_from_prompt() -> list[BlockStored]:
        stored = [event for batch in vllm.batches for event in batch.events if isinstance(event, BlockStored)]
        start = next((i for i, event in enumerate(stored) if event.token_ids[:BLOCK_SIZE] == first_block), None)
        return [] if start is None else stored[start:]

    await eventually(lambda: sum(len(e.block_hashes) for e in stored_from_prompt()) >= 3)
    events = stored_from_prompt()
    assert events[0].parent_block_hash is None
    tokens = [token for event in events for token in event.token_ids]
    hashes = [block_hash for event in events for block_hash in event.block_hashes]
    assert tokens[: 3 * BLOCK_SIZE] == prompt[: 3 * BLOCK_SIZE]
    assert len(tokens) == len(hashes) * BLOCK_SIZE
    assert all(batch.worker_id == "worker-a" and batch.block_size == BLOCK_SIZE for batch in vllm.batches)
    sequence = [batch.seq for batch in vllm.batches]
    assert sequence == list(range(sequence[0], sequence[0] + len(sequence)))


async def test_prefix_cache_hits_on_repeated_prompt(vllm: EngineUnderTest) -> None:
    prompt = prompt_ids(30, 4 * BLOCK_SIZE + 3)
    first = await collect(vllm.engine, make_request(prompt, max_tokens=2, request_id="cache-1"))
    hits_before = vllm.engine.stats().prefix_cache_hits
    second = await collect(vllm.engine, make_request(prompt, max_tokens=2, request_id="cache-2"))
    assert first[0].num_cached_tokens == 0
    cached = second[0].num_cached_tokens
    assert cached is not None and cached >= 4 * BLOCK_SIZE
    await eventually(lambda: vllm.engine.stats().prefix_cache_hits >= hits_before + 4 * BLOCK_SIZE)
    assert vllm.engine.stats().prefix_cache_queries >= vllm.engine.stats().prefix_cache_hits


async def test_prompt_beyond_max_model_len_is_the_callers_error(vllm: EngineUnderTest) -> None:
    request = make_request(prompt_ids(40, 4097), request_id="too-long")
    with pytest.raises(InvalidRequestError, match="maximum context length") as caught:
        await collect(vllm.engine, request)
    assert caught.value.status == 400
    assert vllm.engine.stats().running == 0


def test_sampling_params_follow_the_request() -> None:
    request = PreprocessedRequest(
        request_id="p",
        model="tiny-llama",
        token_ids=[5, 6],
        sampling=SamplingOptions(
            temperature=0.7, top_p=0.8, top_k=0, seed=9, presence_penalty=0.5, frequency_penalty=-0.5, logprobs=2
        ),
        stop=StopConditions(max_tokens=30, min_tokens=3, stop_token_ids=[7], ignore_eos=True),
        kv_transfer_params={"do_remote_decode": True},
    )
    params = sampling_params_for(request)
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.7, 0.8, 0, 9)
    assert (params.presence_penalty, params.frequency_penalty, params.logprobs) == (0.5, -0.5, 2)
    assert (params.max_tokens, params.min_tokens, params.stop_token_ids, params.ignore_eos) == (30, 3, [7], True)
    assert params.output_kind == RequestOutputKind.DELTA
    assert params.extra_args == {"kv_transfer_params": {"do_remote_decode": True}}
    assert not params.stop
