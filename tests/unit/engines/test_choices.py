"""A request's n choices as n engine requests (app/engines/choices.py), on an in-memory engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import msgspec
import pytest

from app.engines.choices import child_request, generate_choices
from app.engines.mocker import MockerEngine
from app.protocol import EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions

PROMPT = [5, 6, 7]


def _request(n: int, seed: int | None = None, kv_transfer_params: dict | None = None) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="r",
        model="m",
        token_ids=PROMPT,
        sampling=SamplingOptions(temperature=0.8, seed=seed),
        stop=StopConditions(max_tokens=8),
        kv_transfer_params=kv_transfer_params,
        n=n,
    )


class FakeEngine:
    """Each request yields `lengths[choice]` one-token outputs (3 by default), as engines do:
    the prompt's counts on the first, a finish reason on the last. Choice 0's first output
    waits for `gate`; the request of choice `fail_choice` fails after its first output."""

    def __init__(self, lengths: dict[int, int] | None = None, fail_choice: int | None = None) -> None:
        self.lengths = lengths or {}
        self.fail_choice = fail_choice
        self.gate = asyncio.Event()
        self.gate.set()
        self.requests: list[PreprocessedRequest] = []
        self.log: list[str] = []
        self.ended: dict[str, str] = {}  # request id -> "finished" | "aborted"

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        choice = int(request.request_id.split("_")[0])
        self.requests.append(request)
        self.log.append(f"start {choice}")
        try:
            if choice == 0:
                await self.gate.wait()
            length = self.lengths.get(choice, 3)
            for position in range(length):
                await asyncio.sleep(0)
                output = EngineOutput(token_ids=[100 * choice + position], worker_id="w")
                if position == 0:
                    output.num_prompt_tokens = len(request.token_ids)
                    # The children find choice 0's prompt in the prefix cache.
                    output.num_cached_tokens = 0 if choice == 0 else len(request.token_ids)
                if position == length - 1:
                    output.finish_reason = "length"
                self.log.append(f"output {choice}")
                yield output
                if choice == self.fail_choice:
                    raise RuntimeError(f"choice {choice} failed")
            self.ended[request.request_id] = "finished"
        finally:
            self.ended.setdefault(request.request_id, "aborted")


async def _all(outputs: AsyncGenerator[EngineOutput, None]) -> list[EngineOutput]:
    async with contextlib.aclosing(outputs):
        return [output async for output in outputs]


def test_child_requests_are_vllms_parallel_sampling_children() -> None:
    seeded = _request(3, seed=41, kv_transfer_params={"do_remote_prefill": True})
    children = [child_request(seeded, index) for index in range(3)]
    assert [child.request_id for child in children] == ["0_r", "1_r", "2_r"]
    assert [child.sampling.seed for child in children] == [41, 42, 43]
    assert all(child.n == 1 and child.sampling.temperature == 0.8 for child in children)
    assert all(child.token_ids == PROMPT and child.stop == seeded.stop for child in children)
    # The remote prefill's KV is choice 0's to take; the others find it in the prefix cache.
    assert [child.kv_transfer_params for child in children] == [{"do_remote_prefill": True}, None, None]
    assert [child_request(_request(2), index).sampling.seed for index in range(2)] == [None, None]


async def test_the_other_choices_start_after_choice_0s_first_output() -> None:
    engine = FakeEngine()
    engine.gate.clear()
    merged = asyncio.ensure_future(_all(generate_choices(engine.generate, _request(3))))
    for _ in range(20):
        await asyncio.sleep(0)
    # Choice 0 is prefilling: nothing else runs yet, or it would prefill the prompt again.
    assert engine.log == ["start 0"]
    engine.gate.set()
    outputs = await merged
    assert engine.log[:2] == ["start 0", "output 0"]
    assert sorted(engine.log[2:4]) == ["start 1", "start 2"]
    assert [request.request_id for request in engine.requests] == ["0_r", "1_r", "2_r"]
    assert len(outputs) == 9


async def test_the_merged_stream_tags_each_output_and_ends_after_every_choice() -> None:
    engine = FakeEngine(lengths={0: 2, 1: 5, 2: 1})
    outputs = await _all(generate_choices(engine.generate, _request(3)))
    by_choice = {index: [o for o in outputs if o.index == index] for index in range(3)}
    assert {index: [o.token_ids[0] for o in out] for index, out in by_choice.items()} == {
        0: [0, 1],
        1: [100, 101, 102, 103, 104],
        2: [200],
    }
    # Each choice's finish reason is its last output's, under its index.
    assert all(out[-1].finish_reason == "length" for out in by_choice.values())
    assert all(o.finish_reason is None for out in by_choice.values() for o in out[:-1])
    # The prompt's counts once, from choice 0's first output, which comes first.
    assert outputs[0].index == 0 and (outputs[0].num_prompt_tokens, outputs[0].num_cached_tokens) == (3, 0)
    assert all(o.num_prompt_tokens is None and o.num_cached_tokens is None for o in outputs[1:])
    assert engine.ended == {"0_r": "finished", "1_r": "finished", "2_r": "finished"}


async def test_closing_the_merged_stream_aborts_every_choice() -> None:
    engine = FakeEngine(lengths={0: 50, 1: 50, 2: 50})
    outputs = generate_choices(engine.generate, _request(3))
    seen = [await anext(outputs) for _ in range(4)]
    assert len(engine.requests) == 3 and {o.index for o in seen} >= {0}
    await outputs.aclose()
    assert engine.ended == {"0_r": "aborted", "1_r": "aborted", "2_r": "aborted"}


async def test_closing_before_the_others_ran_aborts_choice_0_too() -> None:
    engine = FakeEngine(lengths={0: 50})
    outputs = generate_choices(engine.generate, _request(2))
    first = await anext(outputs)
    assert first.index == 0
    # Closed while no other choice has taken a step yet.
    await outputs.aclose()
    assert engine.ended.get("0_r") == "aborted"
    assert engine.ended.get("1_r") in (None, "aborted")


async def test_a_failing_choice_fails_the_request_and_aborts_the_others() -> None:
    engine = FakeEngine(lengths={0: 50, 1: 50, 2: 50}, fail_choice=1)
    with pytest.raises(RuntimeError, match="choice 1 failed"):
        await _all(generate_choices(engine.generate, _request(3)))
    assert engine.ended == {"0_r": "aborted", "1_r": "aborted", "2_r": "aborted"}


async def test_choice_0_failing_before_its_first_output_starts_no_other() -> None:
    class Refusing(FakeEngine):
        async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
            self.requests.append(request)
            raise ValueError("bad request")
            yield EngineOutput()

    engine = Refusing()
    with pytest.raises(ValueError, match="bad request"):
        await _all(generate_choices(engine.generate, _request(3)))
    assert [request.request_id for request in engine.requests] == ["0_r"]


async def test_on_the_mocker_the_choices_share_the_prompt_and_sample_with_their_seeds() -> None:
    engine = MockerEngine.from_config({"speedup_ratio": 1e6, "block_size": 4})
    await engine.start("w")
    try:
        prompt = list(range(10, 43))  # 33 tokens: 8 whole blocks, the last token computed anyway
        request = msgspec.structs.replace(_request(3, seed=9), token_ids=prompt)
        outputs = await _all(generate_choices(engine.generate, request))
        hits = engine.stats().prefix_cache_hits
        alone = []
        for seed in (9, 10, 11):
            one = msgspec.structs.replace(_request(1, seed=seed), token_ids=prompt, request_id=f"alone-{seed}")
            alone.append([token for output in await _all(engine.generate(one)) for token in output.token_ids])
    finally:
        await engine.stop()
    tokens = [
        [token for output in outputs if output.index == index for token in output.token_ids] for index in range(3)
    ]
    # Choice i is the request with seed + i; the three differ.
    assert tokens == alone and len({tuple(choice) for choice in tokens}) == 3
    # Choices 1 and 2 found choice 0's prompt in the prefix cache, all but its last token.
    assert hits == 2 * 32
