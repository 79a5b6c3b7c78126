"""The mocker engine: deterministic tokens, stop conditions, prefix cache, KV events, timing."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from app.engines import engine_arg_names
from app.engines.mocker import MockerEngine
from app.protocol import BlockRemoved, EngineOutput, KvEventBatch, PreprocessedRequest, SamplingOptions, StopConditions
from app.router.index import KvIndex

_ids = iter(range(1_000_000))


def request(tokens: list[int], max_tokens: int = 8, **stop: Any) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"req-{next(_ids)}",
        model="mocker",
        token_ids=tokens,
        sampling=SamplingOptions(),
        stop=StopConditions(max_tokens=max_tokens, **stop),
    )


def tokens_of(outputs: list[EngineOutput]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


class Mocker:
    """A started mocker that records its KV event batches; stopped on exit."""

    def __init__(self, worker_id: str = "w", **config: Any) -> None:
        self.engine = MockerEngine.from_config({"speedup_ratio": 1e6, **config})
        self.worker_id = worker_id
        self.batches: list[KvEventBatch] = []

    async def __aenter__(self) -> Mocker:
        await self.engine.start(self.worker_id, self.batches.append)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.stop()

    async def run(self, req: PreprocessedRequest) -> list[EngineOutput]:
        return [output async for output in self.engine.generate(req)]


async def test_tokens_are_deterministic_per_prompt_and_seed() -> None:
    async with Mocker() as m:
        first = tokens_of(await m.run(request([1, 2, 3], max_tokens=12)))
        again = tokens_of(await m.run(request([1, 2, 3], max_tokens=12)))
        other = tokens_of(await m.run(request([1, 2, 4], max_tokens=12)))
        seeded = request([1, 2, 3], max_tokens=12)
        seeded.sampling = SamplingOptions(seed=5)
        reseeded = tokens_of(await m.run(seeded))
    assert first == again and len(first) == 12
    assert first != other and first != reseeded


async def test_a_request_continued_from_its_output_yields_the_rest_of_it() -> None:
    """What request migration relies on: the prompt plus the first k tokens, asked for the
    remaining ones, gives the unbroken run's remaining tokens (seeded or not)."""
    for seed in (None, 11):
        async with Mocker() as m:
            whole = request([5, 6, 7, 8], max_tokens=20, ignore_eos=True)
            whole.sampling = SamplingOptions(seed=seed)
            unbroken = tokens_of(await m.run(whole))
            rest = request([5, 6, 7, 8, *unbroken[:7]], max_tokens=13, ignore_eos=True)
            rest.sampling = SamplingOptions(seed=seed)
            continued = tokens_of(await m.run(rest))
        assert continued == unbroken[7:]


async def test_a_reader_slower_than_the_engine_gets_every_token_and_the_finish() -> None:
    async with Mocker(speedup_ratio=10) as m:  # ~1 ms a step: a few outputs, the last held
        outputs = []
        async for output in m.engine.generate(request([1, 2, 3], max_tokens=100, ignore_eos=True)):
            outputs.append(output)
            await asyncio.sleep(0.05)  # the request finishes while this output is held
    assert len(tokens_of(outputs)) == 100 and outputs[-1].finish_reason == "length"
    assert len(outputs) > 1, "the engine finished before the first output was read: nothing was held"


async def test_stop_conditions() -> None:
    prompt = [5, 6, 7, 8]
    async with Mocker(eos_token_id=-1) as m:
        free = tokens_of(await m.run(request(prompt, max_tokens=20)))
    eos = free[5]
    async with Mocker(eos_token_id=eos) as m:
        by_eos = await m.run(request(prompt, max_tokens=20))
        ignoring = await m.run(request(prompt, max_tokens=20, ignore_eos=True))
        by_stop_id = await m.run(request(prompt, max_tokens=20, ignore_eos=True, stop_token_ids=[free[2]]))
        by_length = await m.run(request(prompt, max_tokens=3))
    assert tokens_of(by_eos) == free[: free.index(eos) + 1] and by_eos[-1].finish_reason == "stop"
    assert tokens_of(ignoring) == free and ignoring[-1].finish_reason == "length"
    assert tokens_of(by_stop_id) == free[: free.index(free[2]) + 1] and by_stop_id[-1].finish_reason == "stop"
    assert tokens_of(by_length) == free[:3] and by_length[-1].finish_reason == "length"
    assert all(output.finish_reason is None for output in by_length[:-1])


async def test_repeated_prompt_hits_the_prefix_cache() -> None:
    prompt = list(range(100, 150))  # 50 tokens: 3 full blocks of 16 can be reused
    async with Mocker(block_size=16) as m:
        cold = await m.run(request(prompt))
        warm = await m.run(request([*prompt, 1, 2, 3]))
        stats = m.engine.stats()
    assert (cold[0].num_prompt_tokens, cold[0].num_cached_tokens) == (50, 0)
    assert warm[0].num_cached_tokens == 48
    assert (stats.prefix_cache_hits, stats.prefix_cache_queries) == (48, 103)
    assert (stats.kv_used_blocks, stats.running, stats.waiting) == (0, 0, 0)


async def test_kv_events_let_the_router_predict_each_engines_cache() -> None:
    shared = list(range(64))
    warmup = [shared + [i] * 20 for i in range(4)] + [list(range(500, 540))]
    index = KvIndex(8)
    async with Mocker("a", block_size=8, seed=1) as a, Mocker("b", block_size=8, seed=2) as b:
        await asyncio.gather(*(m.run(request(p, max_tokens=17)) for m, p in zip([a, b, a, b, a], warmup, strict=True)))
        for batch in a.batches + b.batches:
            index.apply_batch(batch)
        assert index.seq_gaps == 0 and index.orphan_blocks == 0
        queries = [shared + [9] * 3, warmup[1] + [0] * 30, warmup[4], list(range(900, 950))]
        for prompt in queries:
            predicted = index.find_matches_for_tokens(prompt)
            for m in (a, b):
                outputs = await m.run(request(prompt))
                expected = min(predicted.get(m.worker_id, 0), (len(prompt) - 1) // 8) * 8
                assert outputs[0].num_cached_tokens == expected, (m.worker_id, prompt)
        assert index.find_matches_for_tokens(warmup[4]) == {"a": 5}


async def test_eviction_emits_removals_the_index_follows() -> None:
    index = KvIndex(4)
    async with Mocker(block_size=4, num_gpu_blocks=16, max_model_len=64) as m:
        first = list(range(1000, 1040))
        await m.run(request(first, max_tokens=4))
        for i in range(4):
            await m.run(request([i] * 40, max_tokens=4))
        for batch in m.batches:
            index.apply_batch(batch)
        removed = [e for batch in m.batches for e in batch.events if isinstance(e, BlockRemoved)]
        assert removed
        assert index.worker_blocks("w") <= 16
        assert index.find_matches_for_tokens(first) == {}
        assert (await m.run(request(first)))[0].num_cached_tokens == 0


async def test_abort_frees_the_requests_blocks() -> None:
    async with Mocker(block_size=4, speedup_ratio=50.0) as m:
        stream = m.engine.generate(request(list(range(64)), max_tokens=10_000))
        await anext(stream)
        assert m.engine.stats().running == 1 and m.engine.stats().kv_used_blocks >= 16
        await stream.aclose()
        assert (m.engine.stats().running, m.engine.stats().kv_used_blocks) == (0, 0)


async def test_memory_pressure_preempts_and_everything_still_completes(caplog: pytest.LogCaptureFixture) -> None:
    prompts = [[i] * 30 for i in range(12)]
    async with Mocker(block_size=4, enable_prefix_caching=False) as roomy:
        solo = [tokens_of(await roomy.run(request(p, max_tokens=20))) for p in prompts]
    # Steps of about 2 ms, each slept on its own: every step's running set is observed.
    async with Mocker(block_size=4, num_gpu_blocks=40, max_model_len=160, max_num_seqs=4, speedup_ratio=4.0) as tight:
        running_seen = []

        async def observed(p: list[int]) -> list[int]:
            outputs = []
            async for output in tight.engine.generate(request(p, max_tokens=20)):
                running_seen.append(tight.engine.stats().running)
                outputs.append(output)
            return tokens_of(outputs)

        with caplog.at_level(logging.DEBUG, logger="app.engines.mocker"):
            crowded = await asyncio.gather(*(observed(p) for p in prompts))
    assert crowded == solo
    assert max(running_seen) == 4  # max_num_seqs
    assert "preempted" in caplog.text  # 4 x 13 blocks don't fit in 40


async def test_speedup_ratio_scales_step_time() -> None:
    async def elapsed(speedup: float) -> float:
        async with Mocker(speedup_ratio=speedup, decode_base_ms=8.0) as m:
            started = time.perf_counter()
            await m.run(request([1, 2, 3], max_tokens=40))
            return time.perf_counter() - started

    assert await elapsed(1.0) >= 0.3  # 40 decode steps of 8 ms
    assert await elapsed(1e6) < 0.1


async def test_steps_shorter_than_a_millisecond_reach_the_caller_in_batches() -> None:
    """At a large speedup the engine runs ahead of its caller, and each output carries the
    tokens made since the last one; at real speed every step is slept, one token each."""
    async with Mocker(speedup_ratio=1e6) as fast:
        batched = await fast.run(request([1, 2, 3], max_tokens=64))
    async with Mocker(speedup_ratio=4.0, decode_base_ms=8.0) as real:
        stepped = await real.run(request([1, 2, 3], max_tokens=8))
    assert len(tokens_of(batched)) == 64 and len(batched) < 16
    assert [len(output.token_ids) for output in stepped] == [1] * 8
    assert tokens_of(stepped) == tokens_of(batched)[:8]  # the same tokens, however they are grouped


async def test_time_to_first_token_grows_with_prompt_length() -> None:
    async def ttft(length: int) -> float:
        async with Mocker(speedup_ratio=10.0, prefill_ms_per_token=0.5, max_model_len=4096) as m:
            started = time.perf_counter()
            stream = m.engine.generate(request(list(range(length)), max_tokens=5))
            await anext(stream)
            waited = time.perf_counter() - started
            await stream.aclose()
            return waited

    short, long = await ttft(50), await ttft(2000)
    # Prefill alone: (5 + 0.5 * 50) / 10 = 3 ms against (5 + 0.5 * 2000) / 10 = 100.5 ms.
    assert long >= 0.1 and long > short + 0.05


def test_config_keys_are_validated_by_name() -> None:
    assert {"block_size", "num_gpu_blocks", "speedup_ratio", "served_model_name"} <= engine_arg_names("mocker")
    with pytest.raises(ValueError, match="unknown key 'num_gpu_blokcs'"):
        MockerEngine.from_config({"num_gpu_blokcs": 10})
    with pytest.raises(ValueError, match="max_model_len 4096 does not fit"):
        MockerEngine.from_config({"num_gpu_blocks": 10, "block_size": 16, "max_model_len": 4096})
    assert MockerEngine.from_config({"max-num-seqs": 3}).config.max_num_seqs == 3


# --- disaggregated serving: the prefill and decode roles -----------------------------------


def prefill_job(tokens: list[int]) -> PreprocessedRequest:
    """What a PrefillWorker sends its engine (app.disagg.prefill.prefill_request)."""
    req = request(tokens, max_tokens=1)
    req.kv_transfer_params = {"do_remote_decode": True}
    return req


async def ttft_and_tokens(m: Mocker, req: PreprocessedRequest) -> tuple[float, list[int]]:
    started = time.perf_counter()
    outputs = []
    first_at = 0.0
    async for output in m.engine.generate(req):
        first_at = first_at or time.perf_counter()
        outputs.append(output)
    return first_at - started, tokens_of(outputs)


async def test_prefill_role_answers_with_the_kv_it_holds_until_the_lease_ends() -> None:
    prompt = list(range(100, 150))  # 50 tokens: 4 blocks of 16
    # Lease 0.3 s of wall time at this speedup.
    async with Mocker("prefill-0", kv_lease_s=0.3e6) as m:
        outputs = await m.run(prefill_job(prompt))
        params = outputs[-1].kv_transfer_params
        held = m.engine.stats().kv_used_blocks
        await asyncio.sleep(0.5)
        after_lease = m.engine.stats().kv_used_blocks
        aggregated = tokens_of(await m.run(request(prompt, max_tokens=1)))
    assert tokens_of(outputs) == aggregated and outputs[-1].finish_reason == "length"
    assert params is not None and params["do_remote_prefill"] is True and params["num_tokens"] == 50
    assert params["remote_engine_id"] == "prefill-0" and len(params["remote_block_ids"]) == 4
    assert (held, after_lease) == (4, 0)


async def test_decode_role_pulls_the_kv_instead_of_prefilling() -> None:
    prompt = list(range(1000, 1400))  # 400 tokens
    # Prefilling it here: 5 + 1 * 400 = 405 ms. Pulling 399 tokens of 1 MB at 2 GB/s: 200 ms.
    timing: dict[str, Any] = {
        "speedup_ratio": 1.0,
        "prefill_ms_per_token": 1.0,
        "kv_bytes_per_token": 1_000_000,
        "kv_transfer_gb_per_s": 2.0,
        "max_model_len": 4096,
    }
    async with Mocker("prefill-0") as prefill:
        params = (await prefill.run(prefill_job(prompt)))[-1].kv_transfer_params
    disagg = request(prompt, max_tokens=8, ignore_eos=True)
    disagg.kv_transfer_params = params
    async with Mocker("decode-0", **timing) as decode:
        assert decode.engine.transfer_seconds(399) == pytest.approx(0.1995)
        pulled_ttft, pulled = await ttft_and_tokens(decode, disagg)
    async with Mocker("aggregated", **timing) as agg:
        local_ttft, local = await ttft_and_tokens(agg, request(prompt, max_tokens=8, ignore_eos=True))
    assert pulled == local  # same prompt, same tokens, whichever engine computed the KV
    assert local_ttft >= 0.4
    # The transfer plus one decode-shaped step (~8 ms), no prefill step.
    assert 0.195 <= pulled_ttft < 0.32


async def test_speedup_ratio_scales_the_transfer_time() -> None:
    prompt = list(range(2000, 2401))  # 401 tokens: 400 to pull
    params = {"do_remote_prefill": True, "num_tokens": len(prompt)}
    timing: dict[str, Any] = {"kv_bytes_per_token": 1_000_000, "kv_transfer_gb_per_s": 1.0, "max_model_len": 4096}

    async def ttft(speedup: float) -> float:
        req = request(prompt, max_tokens=2)
        req.kv_transfer_params = params
        async with Mocker(**timing, speedup_ratio=speedup) as m:
            return (await ttft_and_tokens(m, req))[0]

    slow, fast = await ttft(1.0), await ttft(4.0)  # 400 ms against 100 ms
    assert slow >= 0.4 and 0.1 <= fast < 0.25


async def test_decode_role_pulls_only_what_its_own_cache_lacks() -> None:
    prompt = list(range(3000, 3400))
    timing: dict[str, Any] = {
        "speedup_ratio": 1.0,
        "prefill_ms_per_token": 0.0,
        "kv_bytes_per_token": 1_000_000,
        "kv_transfer_gb_per_s": 1.0,
        "max_model_len": 4096,
    }
    async with Mocker(**timing) as m:
        await m.run(request(prompt, max_tokens=1))  # caches 24 of its 25 blocks
        req = request(prompt, max_tokens=1)
        req.kv_transfer_params = {"do_remote_prefill": True, "num_tokens": len(prompt)}
        waited, _ = await ttft_and_tokens(m, req)
    # 399 - 384 cached = 15 tokens: 15 ms, not 399 ms.
    assert waited < 0.15


async def test_kv_transfer_params_it_cannot_serve_are_refused() -> None:
    async with Mocker() as m:
        unknown = request([1, 2, 3])
        unknown.kv_transfer_params = {"remote_host": "10.0.0.1"}
        with pytest.raises(ValueError, match="cannot serve"):
            await m.run(unknown)
        wrong_length = request([1, 2, 3])
        wrong_length.kv_transfer_params = {"do_remote_prefill": True, "num_tokens": 7}
        with pytest.raises(ValueError, match="hold 7 tokens"):
            await m.run(wrong_length)


async def test_a_failed_kv_pull_is_recomputed_locally_and_counted() -> None:
    prompt = list(range(5000, 5300))
    params = {"do_remote_prefill": True, "num_tokens": len(prompt)}
    timing: dict[str, Any] = {"kv_bytes_per_token": 1000, "max_model_len": 4096}

    async def decode(failure_rate: float) -> tuple[list[int], Any]:
        req = request(prompt, max_tokens=8, ignore_eos=True)
        req.kv_transfer_params = params
        async with Mocker(**timing, kv_transfer_failure_rate=failure_rate) as m:
            tokens = tokens_of(await m.run(req))
            return tokens, m.engine.stats()

    pulled, pulled_stats = await decode(0.0)
    recomputed, failed_stats = await decode(1.0)
    # The client sees the same answer; only the engine's counters tell the pull failed.
    assert recomputed == pulled and len(pulled) == 8
    assert (pulled_stats.kv_transfer_failures, pulled_stats.external_kv_prompt_tokens) == (0, len(prompt) - 1)
    assert pulled_stats.kv_transfer_bytes == (len(prompt) - 1) * 1000
    assert (failed_stats.kv_transfer_failures, failed_stats.external_kv_prompt_tokens) == (1, 0)
    # The prompt was computed here instead: every prompt token was looked up in the cache
    # once and prefilled.
    assert failed_stats.kv_transfer_bytes == 0
