"""OpenAI's `n` > 1 end to end, on mocker workers: several choices per request, chat and
completions, streamed and not, through the official `openai` client.

Real NATS and etcd, `tandem serve graphs.disagg_router:Frontend` under supervisord (the
Frontend with its Processor pipeline, a KV-aware Router, two decode VllmWorkers with
conditional disaggregation, a PrefillWorker, the Processor service), and a second Frontend
with `embed-processor: false`, which asks the Processor service over NATS. The mocker's
tokens are a function of the prompt and the seed, so a seeded choice i is the one choice of
the same request with seed + i (vLLM's parallel sampling: app/engines/choices.py).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from bench.harness.load import WORDS
from testbed.graphs import ServedGraph
from tests.e2e.graph_helpers import thin_frontend

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
N = 3
MAX_TOKENS = 12
BLOCK_SIZE = 16
WORKERS = 2
# Prompts with more uncached tokens than this are prefilled by the PrefillWorker.
MAX_LOCAL_PREFILL = 400
SEED = 1234
SAMPLING: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0.8, "extra_body": {"ignore_eos": True}}


def _config(tiny_model: Path, metrics_port: int) -> dict[str, Any]:
    mocker = {"engine": "mocker", "vocab-size": 3000, "eos-token-id": 2, "block-size": BLOCK_SIZE}
    return {
        "Common": {"model": str(tiny_model), "served-model-name": MODEL, "max-model-len": 2048},
        # A Router process (embed-router: false): the thin Frontend's Processor calls it.
        "Frontend": {"served-model-name": MODEL, "embed-router": False},
        "Processor": {"common-configs": ["model", "max-model-len"]},
        "Router": {"policy": "kv", "block-size": BLOCK_SIZE, "common-configs": ["model"]},
        "VllmWorker": {
            **mocker,
            "remote-prefill": True,
            "conditional-disagg": True,
            "max-local-prefill-length": MAX_LOCAL_PREFILL,
            "metrics-port": metrics_port,
            "ServiceArgs": {"workers": WORKERS},
            "common-configs": ["model", "served-model-name", "max-model-len"],
        },
        "PrefillWorker": {**mocker, "common-configs": ["model", "served-model-name", "max-model-len"]},
    }


@pytest.fixture(scope="module")
async def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
async def frontends(
    tiny_model: Path,
    metrics_port: int,
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    etcd_server: EtcdServer,
) -> AsyncIterator[dict[str, ServedGraph]]:
    """{"embedded": the graph's Frontend, "thin": a Frontend with embed-processor: false}."""
    workdir = tmp_path_factory.mktemp("choices")
    config = _config(tiny_model, metrics_port)
    graph = "graphs.disagg_router:Frontend"
    async with ServedGraph(graph, config, workdir, nats_server.url, etcd_server.url) as served:
        await served.wait_ready(WORKERS, routers=1, processors=1, prefill_workers=1, timeout=180)
        async with thin_frontend(graph, config, workdir, served) as thin:
            yield {"embedded": served, "thin": thin}


def _client(graph: ServedGraph) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{graph.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _prompt(name: str, words: int = 40) -> str:
    return " ".join(random.Random(name).choices(WORDS, k=words))


def _chat(name: str, words: int = 40) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": _prompt(name, words)}]


async def _one_choice_texts(
    client: openai.AsyncOpenAI, messages: list[ChatCompletionMessageParam], seeds: range
) -> list[str]:
    """The text of a one-choice request with each seed."""
    texts = []
    for seed in seeds:
        completion = await client.chat.completions.create(model=MODEL, messages=messages, seed=seed, **SAMPLING)
        (choice,) = completion.choices
        texts.append(choice.message.content or "")
    return texts


@pytest.mark.parametrize("frontend", ["embedded", "thin"])
async def test_chat_n_gives_n_choices_streamed_and_not(frontends: dict[str, ServedGraph], frontend: str) -> None:
    messages = _chat(f"chat-{frontend}")
    async with _client(frontends[frontend]) as client:
        whole = await client.chat.completions.create(model=MODEL, messages=messages, n=N, seed=SEED, **SAMPLING)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            n=N,
            seed=SEED,
            stream=True,
            stream_options={"include_usage": True},
            **SAMPLING,
        )
        chunks = [chunk async for chunk in stream]
        alone = await _one_choice_texts(client, messages, range(SEED, SEED + N))
    assert [choice.index for choice in whole.choices] == list(range(N))
    texts = [choice.message.content for choice in whole.choices]
    # vLLM's seeds: choice i samples with seed + i, as a request of its own would.
    assert texts == alone and len(set(texts)) == N
    assert [choice.finish_reason for choice in whole.choices] == ["length"] * N
    assert whole.usage is not None and whole.usage.completion_tokens == N * MAX_TOKENS
    prompt_tokens = whole.usage.prompt_tokens
    assert whole.usage.total_tokens == prompt_tokens + N * MAX_TOKENS

    # Streamed: every choice's role first, then the choices' chunks, reassembled by index.
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:N]] == [(i, "assistant") for i in range(N)]
    streamed = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        for index in range(N)
    ]
    assert streamed == texts
    finishes = [
        (c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert sorted(finishes) == [(i, "length") for i in range(N)]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, N * MAX_TOKENS)


@pytest.mark.parametrize("frontend", ["embedded", "thin"])
async def test_completions_n_gives_n_choices_streamed_and_not(frontends: dict[str, ServedGraph], frontend: str) -> None:
    prompt = _prompt(f"completion-{frontend}")
    async with _client(frontends[frontend]) as client:
        whole = await client.completions.create(model=MODEL, prompt=prompt, n=N, seed=SEED, logprobs=1, **SAMPLING)
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, n=N, seed=SEED, stream=True, stream_options={"include_usage": True}, **SAMPLING
        )
        chunks = [chunk async for chunk in stream]
    assert [choice.index for choice in whole.choices] == list(range(N))
    texts = [choice.text for choice in whole.choices]
    assert len(set(texts)) == N
    for choice in whole.choices:
        # Each choice's own logprobs, its text offsets from 0.
        assert choice.logprobs is not None and choice.logprobs.text_offset is not None
        assert len(choice.logprobs.text_offset) == MAX_TOKENS and choice.logprobs.text_offset[0] == 0
    assert whole.usage is not None and whole.usage.completion_tokens == N * MAX_TOKENS
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(N)]
    assert streamed == texts
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == N * MAX_TOKENS


def _unique_piece(text: str, others: list[str]) -> str:
    """A few characters from the middle of `text` found in none of `others`."""
    for length in (3, 4, 6, 8):
        for start in range(len(text) // 3, len(text) - length):
            piece = text[start : start + length]
            if piece.strip() == piece and piece.isprintable() and not any(piece in other for other in others):
                return piece
    raise AssertionError(f"no piece of {text!r} is unique")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stop_string_ends_one_choice_and_the_others_run_to_their_length(
    frontends: dict[str, ServedGraph], stream: bool
) -> None:
    messages = _chat(f"stop-{stream}")
    async with _client(frontends["embedded"]) as client:
        free = await client.chat.completions.create(model=MODEL, messages=messages, n=N, seed=SEED, **SAMPLING)
        texts = [choice.message.content or "" for choice in free.choices]
        stop = _unique_piece(texts[1], [texts[0], texts[2]])
        if stream:
            chunks = [
                chunk
                async for chunk in await client.chat.completions.create(
                    model=MODEL, messages=messages, n=N, seed=SEED, stop=[stop], stream=True, **SAMPLING
                )
            ]
            got = [
                "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == index)
                for index in range(N)
            ]
            reasons = [
                next(
                    c.choices[0].finish_reason for c in chunks if c.choices[0].index == i and c.choices[0].finish_reason
                )
                for i in range(N)
            ]
        else:
            stopped = await client.chat.completions.create(
                model=MODEL, messages=messages, n=N, seed=SEED, stop=[stop], **SAMPLING
            )
            got = [choice.message.content or "" for choice in stopped.choices]
            reasons = [choice.finish_reason for choice in stopped.choices]
    assert got == [texts[0], texts[1][: texts[1].index(stop)], texts[2]]
    assert reasons == ["length", "stop", "length"]


async def _prefix_cache_hits(metrics_port: int) -> float:
    """Prompt tokens the decode workers' engines served from their prefix caches, in all."""
    total = 0.0
    async with httpx.AsyncClient(timeout=10) as http:
        for replica in range(WORKERS):
            text = (await http.get(f"http://127.0.0.1:{metrics_port + replica}/metrics")).text
            for family in text_string_to_metric_families(text):
                if family.name == "tandem_worker_prefix_cache_hits":
                    total += sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    return total


async def test_the_choices_share_the_prompts_kv_on_the_worker_the_router_picked(
    frontends: dict[str, ServedGraph], metrics_port: int
) -> None:
    messages = _chat("shared-prefix", words=120)
    async with _client(frontends["embedded"]) as client:
        hits_before = await _prefix_cache_hits(metrics_port)
        first = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, n=N, seed=SEED, **SAMPLING
        )
        hits_after = await _prefix_cache_hits(metrics_port)
        again = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, n=2, seed=SEED, **SAMPLING
        )
    usage, again_usage = first.parse().usage, again.parse().usage
    assert usage is not None and again_usage is not None
    assert usage.prompt_tokens < MAX_LOCAL_PREFILL and "x-tandem-prefill-worker" not in first.headers
    # The prompt's cache hit is the request's, as choice 0 met it: none for a new prompt.
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    # Choices 1 and 2 started once choice 0 had computed the prompt: each found its whole
    # blocks cached (as vLLM, the last prompt token is computed again).
    cached_blocks = (usage.prompt_tokens - 1) // BLOCK_SIZE
    assert hits_after - hits_before == (N - 1) * cached_blocks * BLOCK_SIZE
    # KV routing: the same prompt again goes where its KV is, and finds it cached.
    assert again.headers["x-tandem-worker"] == first.headers["x-tandem-worker"]
    assert again_usage.prompt_tokens_details is not None
    assert again_usage.prompt_tokens_details.cached_tokens == cached_blocks * BLOCK_SIZE
    assert again_usage.completion_tokens == 2 * MAX_TOKENS


async def test_a_long_prompt_is_prefilled_remotely_once_for_all_its_choices(
    frontends: dict[str, ServedGraph],
) -> None:
    graph = frontends["embedded"]
    messages = _chat("long-prompt", words=400)
    jobs_before = await graph.prefill_jobs_done()
    async with _client(graph) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, n=N, seed=SEED, **SAMPLING
        )
        jobs = await graph.prefill_jobs_done() - jobs_before
        # Each choice alone (its prompt now cached where the router sends it: prefilled there).
        alone = await _one_choice_texts(client, messages, range(SEED, SEED + N))
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.prompt_tokens > MAX_LOCAL_PREFILL
    assert raw.headers["x-tandem-prefill-worker"]
    # One remote prefill for all the choices: the others found choice 0's KV cached.
    assert jobs == 1
    assert [choice.message.content for choice in completion.choices] == alone
    assert completion.usage.completion_tokens == N * MAX_TOKENS
