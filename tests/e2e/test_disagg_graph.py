"""Disaggregated serving on the real stack: `tandem serve graphs.disagg_router:Frontend` with
one decode VllmWorker (core 0) and one PrefillWorker (core 1), vLLM CPU engines exchanging
KV over NIXL (UCX on CPU), real NATS (the prefill work queue) and etcd (the live thresholds).

One decode and one prefill engine, not configs/cpu-tiny-disagg.yaml's two prefill workers:
on this 2-core machine a third engine shares a core and slows every test down.
The reference outputs come from vLLM's offline `LLM` on the same model (no KV transfer),
run before the graph starts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from transformers import AutoTokenizer

from app.cli import main as tandem_cli
from app.components.disagg import PREFILL_ACK_WAIT_S, PREFILL_QUEUE
from app.runtime import Runtime
from app.tunables import DISAGG_MAX_LOCAL_PREFILL_LENGTH, DISAGG_MAX_PREFILL_QUEUE_SIZE
from tests.e2e.graph_harness import ServedGraph
from tests.e2e.vllm_reference import vllm_greedy

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
MAX_TOKENS = 12
BLOCK_SIZE = 32
MAX_LOCAL_PREFILL = 64
REMOTE_PREFILL_TIMEOUT_S = 8
ENGINE_ARGS = {"block_size": BLOCK_SIZE, "max_model_len": 2048, "enforce_eager": True, "dtype": "float32"}
# recompute: a decode engine whose KV pull fails (its prefill worker died after answering)
# prefills the request itself instead of failing it.
KV_TRANSFER = {
    "kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu", "kv_load_failure_policy": "recompute",
}


def _long(topic: str) -> str:
    return " ".join(f"{topic}-{i}" for i in range(60))  # well past MAX_LOCAL_PREFILL tokens


LONG_PROMPTS = [_long("alpha"), _long("beta")]
SHORT_PROMPTS = ["The quick brown fox", "def fibonacci(n):"]
FLIP_PROMPT = _long("gamma")
KILL_PROMPTS = [_long(f"delta{i}") for i in range(3)]
ALL_PROMPTS = LONG_PROMPTS + SHORT_PROMPTS + [FLIP_PROMPT] + KILL_PROMPTS


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tokenizer, tmp_path_factory) -> dict[str, str]:
    """Prompt -> vLLM's own greedy completion, decoded as a client reads it."""
    prompt_ids = [list(tokenizer(prompt).input_ids) for prompt in ALL_PROMPTS]
    lengths = dict(zip(ALL_PROMPTS, map(len, prompt_ids), strict=True))
    assert all(lengths[p] > MAX_LOCAL_PREFILL for p in LONG_PROMPTS + [FLIP_PROMPT] + KILL_PROMPTS)
    assert all(lengths[p] <= MAX_LOCAL_PREFILL for p in SHORT_PROMPTS)
    outputs = vllm_greedy(tiny_model, ENGINE_ARGS, prompt_ids, MAX_TOKENS, tmp_path_factory.mktemp("disagg-reference"))
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    return dict(zip(ALL_PROMPTS, texts, strict=True))


@pytest.fixture(scope="module")
async def graph(tiny_model, reference, nats_server, etcd_server, tmp_path_factory) -> AsyncIterator[ServedGraph]:
    common = {
        "model": str(tiny_model), "served-model-name": MODEL, "block-size": BLOCK_SIZE, "max-model-len": 2048,
        "kv-transfer-config": KV_TRANSFER,
    }
    engine = {"engine": "vllm", "enforce-eager": True, "dtype": "float32"}
    shared = ["model", "served-model-name", "block-size", "max-model-len", "kv-transfer-config"]
    config = {
        "Common": common,
        "Frontend": {"served-model-name": MODEL},
        "Processor": {"common-configs": ["model", "block-size", "max-model-len"]},
        "Router": {"router": "kv", "common-configs": ["model", "block-size"]},
        "VllmWorker": {
            **engine,
            "cpu-omp-threads-bind": ["0"],
            "remote-prefill": True,
            "conditional-disagg": True,
            "max-local-prefill-length": MAX_LOCAL_PREFILL,
            "max-prefill-queue-size": 16,
            "remote-prefill-timeout-s": REMOTE_PREFILL_TIMEOUT_S,
            "ServiceArgs": {"workers": 1},
            "common-configs": shared,
        },
        "PrefillWorker": {**engine, "cpu-omp-threads-bind": ["1"], "ServiceArgs": {"workers": 1}, "common-configs": shared},
    }
    workdir = tmp_path_factory.mktemp("disagg")
    served = ServedGraph("graphs.disagg_router:Frontend", config, workdir, nats_server.url, etcd_server.url)
    served.start()
    try:
        await served.wait_ready(workers=1)
        async with await Runtime.connect(served.settings) as runtime:
            prefill = await runtime.discovery.watch_instances("PrefillWorker", "status")
            try:
                await prefill.wait_until(lambda items: len(items) >= 1, 240)
            except TimeoutError:
                raise AssertionError(f"no PrefillWorker serving:\n{served.log_tail()}") from None
            finally:
                await prefill.close()
        yield served
    finally:
        served.stop()


# The latest response to each prompt, for the header checks.
LAST_RESPONSE: dict[str, httpx.Response] = {}


async def _complete(graph: ServedGraph, prompt: str) -> tuple[str, str]:
    """(request id, text) of a greedy completion."""
    request_id = uuid.uuid4().hex
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        response = await http.post("/v1/completions", json=body, headers={"X-Request-Id": request_id})
    assert response.status_code == 200, response.text
    LAST_RESPONSE[prompt] = response
    return request_id, response.json()["choices"][0]["text"]


async def _prefill_status(graph: ServedGraph) -> dict[str, Any]:
    async with await Runtime.connect(graph.settings) as runtime:
        client = runtime.client("PrefillWorker", "status")
        await client.wait_for_instances(timeout=30)
        return await client.call({}, timeout=10)


def _decision(graph: ServedGraph, request_id: str) -> str:
    """The decode worker's logged decision for a request: local, remote or fallback."""
    for line in graph.log_path.read_text(errors="replace").splitlines():
        marker = f"request {request_id}: prefill "
        if marker in line:
            return line.split(marker, 1)[1].split(" ", 1)[0]
    raise AssertionError(f"no prefill decision logged for {request_id}:\n{graph.log_tail()}")


async def test_long_prompts_prefill_remotely_with_vllms_output(graph: ServedGraph, reference) -> None:
    before = (await _prefill_status(graph)).get("done", 0)
    for prompt in LONG_PROMPTS:
        request_id, text = await _complete(graph, prompt)
        assert text == reference[prompt]
        assert _decision(graph, request_id) == "remote"
    status = await _prefill_status(graph)
    assert status.get("done", 0) - before == len(LONG_PROMPTS)
    # The response names the prefill worker that served it.
    assert {LAST_RESPONSE[p].headers.get("x-tandem-prefill-worker") for p in LONG_PROMPTS} == {status["worker_id"]}
    # The decode engine's NIXL connector set up the pull from the prefill engine.
    assert "Transfer plan" in graph.log_path.read_text(errors="replace")


async def test_short_prompts_stay_local_with_vllms_output(graph: ServedGraph, reference) -> None:
    before = (await _prefill_status(graph)).get("done", 0)
    for prompt in SHORT_PROMPTS:
        request_id, text = await _complete(graph, prompt)
        assert text == reference[prompt]
        assert _decision(graph, request_id) == "local"
        assert "x-tandem-prefill-worker" not in LAST_RESPONSE[prompt].headers
    assert (await _prefill_status(graph)).get("done", 0) == before


async def test_disagg_set_flips_the_decision_live(graph: ServedGraph, reference, monkeypatch) -> None:
    # One call of the operator's command (in-process: with two vLLM engines keeping both
    # cores busy, a fresh Python process can take minutes to import); the rest through the API.
    for name in ("NATS_SERVER", "ETCD_ENDPOINTS", "TANDEM_NAMESPACE"):
        monkeypatch.setenv(name, graph.env[name])
    assert await asyncio.to_thread(tandem_cli, ["disagg", "set", "--max-local-prefill-length", "100000"]) == 0
    async with await Runtime.connect(graph.settings) as runtime:
        try:
            assert await runtime.discovery.get_tunable(DISAGG_MAX_LOCAL_PREFILL_LENGTH) == 100000
            await asyncio.sleep(0.5)  # the worker's tunables watch applies it
            request_id, text = await _complete(graph, FLIP_PROMPT)
            assert text == reference[FLIP_PROMPT]
            assert _decision(graph, request_id) == "local"

            await runtime.discovery.put_tunable(DISAGG_MAX_LOCAL_PREFILL_LENGTH, MAX_LOCAL_PREFILL)
            await runtime.discovery.put_tunable(DISAGG_MAX_PREFILL_QUEUE_SIZE, 0)  # "queue full": local
            await asyncio.sleep(0.5)
            request_id, _ = await _complete(graph, FLIP_PROMPT)
            assert _decision(graph, request_id) == "local"

            await runtime.discovery.delete_tunable(DISAGG_MAX_PREFILL_QUEUE_SIZE)  # back to the config's 16
            await asyncio.sleep(0.5)
            request_id, text = await _complete(graph, FLIP_PROMPT)
            assert text == reference[FLIP_PROMPT]
            assert _decision(graph, request_id) == "remote"
        finally:
            for key in (DISAGG_MAX_LOCAL_PREFILL_LENGTH, DISAGG_MAX_PREFILL_QUEUE_SIZE):
                await runtime.discovery.delete_tunable(key)


def _prefill_worker_process(graph: ServedGraph) -> psutil.Process:
    assert graph.process is not None
    for child in psutil.Process(graph.process.pid).children(recursive=True):
        if any("prefill_worker:PrefillWorker" in part for part in child.cmdline()):
            return child
    raise AssertionError("no PrefillWorker process under tandem serve")


async def test_sigkill_of_the_prefill_worker_loses_no_request(graph: ServedGraph, reference) -> None:
    # The worker's whole process group: a dead node takes its engine core with it.
    group = os.getpgid(_prefill_worker_process(graph).pid)
    os.killpg(group, signal.SIGSTOP)  # frozen, so that the jobs are still queued when it dies
    requests = [asyncio.create_task(_complete(graph, prompt)) for prompt in KILL_PROMPTS]
    try:
        async with await Runtime.connect(graph.settings) as runtime:
            queue = await runtime.work_queue(PREFILL_QUEUE, ack_wait_s=PREFILL_ACK_WAIT_S)
            async with asyncio.timeout(30):
                while await queue.depth() < len(KILL_PROMPTS):
                    await asyncio.sleep(0.1)
    finally:
        os.killpg(group, signal.SIGKILL)
    results = await asyncio.gather(*requests)
    for prompt, (request_id, text) in zip(KILL_PROMPTS, results, strict=True):
        assert text == reference[prompt]
        assert _decision(graph, request_id) == "fallback"
