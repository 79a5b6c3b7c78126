"""Disaggregated serving on the real stack: `tandem serve graphs.disagg_router:Frontend` with
the shipped configs/cpu-tiny-disagg.yaml and a second PrefillWorker: one decode VllmWorker
(core 0) and two PrefillWorkers (both on core 1), three vLLM CPU engines exchanging KV over
NIXL (UCX on CPU), real NATS (the prefill work queue) and etcd (the live thresholds).

One graph serves the whole module. The reference outputs come from vLLM's offline `LLM`
on the same model (no KV transfer), run before the graph starts. Where a prompt was
prefilled is read three ways: the decode worker's logged decision, the response's
X-Tandem-Prefill-Worker header, and the decode engine's own count of prompt tokens whose
KV it pulled from another engine (vLLM's external_kv_transfer source, served by the
worker as tandem_worker_external_kv_prompt_tokens on its metrics port). That the pull
succeeded is read off the bytes NIXL moved (tandem_worker_kv_transfer_bytes): the
config's `kv_load_failure_policy: recompute` would otherwise hide a failed pull behind a
correct text. Every prompt's reference output differs from every other's, so KV handed
to the wrong one of two concurrent requests shows in its text.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from app.cli import main as tandem_cli
from app.disagg.tunables import MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE
from app.launch.ports import free_port
from app.protocol import PREFILL_ACK_WAIT_S, names
from app.runtime import Runtime
from testbed.graphs import TANDEM, ServedGraph
from tests.e2e.graph_helpers import (
    StatusWatch,
    Stream,
    engine_core_of,
    of_service,
    prefill_decision,
    read_stream,
    running,
    status_until,
    tandem_status,
)
from tests.e2e.prefill_queue import PrefillQueueSpy
from tests.e2e.vllm_reference import vllm_greedy

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cpu-tiny-disagg.yaml"
MODEL = "tiny-llama"
MAX_TOKENS = 12
PREFILL_WORKERS = 2
# A job held by a killed PrefillWorker is redelivered one ack wait after the worker last
# marked it in progress (at most half an ack wait before the kill), and must be prefilled
# by the other one before its decode worker gives up and prefills locally.
REMOTE_PREFILL_TIMEOUT_S = 3 * PREFILL_ACK_WAIT_S
SHIPPED = yaml.safe_load(CONFIG.read_text())
BLOCK_SIZE = SHIPPED["Common"]["block-size"]
MAX_LOCAL_PREFILL = SHIPPED["VllmWorker"]["max-local-prefill-length"]
# The reference runs the engine as the shipped config does (its dtype included).
ENGINE_ARGS = {
    "block_size": BLOCK_SIZE,
    "max_model_len": SHIPPED["Common"]["max-model-len"],
    "enforce_eager": True,
    "dtype": SHIPPED["Common"]["dtype"],
}
KV_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}[SHIPPED["Common"]["dtype"]]


def _long(topic: str) -> str:
    return " ".join(f"{topic}-{i}" for i in range(60))  # well past MAX_LOCAL_PREFILL tokens


# Each long prompt starts differently: no prefix cache on the decode engine helps it.
LONG_PROMPTS = [_long(topic) for topic in ("alpha", "beta", "epsilon", "zeta")]
SHORT_PROMPTS = ["The quick brown fox", "def fibonacci(n):"]
FLIP_PROMPT = _long("gamma")
KILL_PROMPTS = [_long(f"delta{i}") for i in range(3)]
LATE_PROMPT = _long("omega")
# Short prompts (prefilled locally) whose streams outlast a few `tandem status` polls.
LOAD_STREAMS = 3
LOAD_TOKENS = 2000  # seconds of decode here; cancelled once the watch shows them
ALL_PROMPTS = LONG_PROMPTS + SHORT_PROMPTS + [FLIP_PROMPT] + KILL_PROMPTS + [LATE_PROMPT]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompt_lengths(tokenizer) -> dict[str, int]:
    lengths = {prompt: len(tokenizer(prompt).input_ids) for prompt in ALL_PROMPTS}
    assert all(lengths[p] <= MAX_LOCAL_PREFILL for p in SHORT_PROMPTS)
    assert all(lengths[p] > MAX_LOCAL_PREFILL for p in set(ALL_PROMPTS) - set(SHORT_PROMPTS))
    return lengths


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tokenizer, prompt_lengths, tmp_path_factory) -> dict[str, str]:
    """Prompt -> vLLM's own greedy completion, decoded as a client reads it."""
    prompt_ids = [list(tokenizer(prompt).input_ids) for prompt in ALL_PROMPTS]
    outputs = vllm_greedy(tiny_model, ENGINE_ARGS, prompt_ids, MAX_TOKENS, tmp_path_factory.mktemp("disagg-reference"))
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    # Else a request decoded from another prompt's KV could still show the right text.
    assert len(set(texts)) == len(texts), f"prompts with one reference output: {texts}"
    return dict(zip(ALL_PROMPTS, texts, strict=True))


class DisaggGraph(ServedGraph):
    decode_metrics_url: str


@pytest.fixture(scope="module")
async def graph(tiny_model, reference, nats_server, etcd_server, tmp_path_factory) -> AsyncIterator[DisaggGraph]:
    config = yaml.safe_load(CONFIG.read_text())
    config["Common"]["model"] = str(tiny_model)
    metrics_port = free_port()
    config["VllmWorker"].update(
        {
            "metrics-port": metrics_port,
            "remote-prefill-timeout-s": REMOTE_PREFILL_TIMEOUT_S,
            # vLLM's engine option (its xgrammar backend reads no request's): JSON without
            # free whitespace, which the random-weight model would fill max_tokens with.
            "structured-outputs-config": {"backend": "xgrammar", "disable_any_whitespace": True},
        }
    )
    config["PrefillWorker"]["ServiceArgs"]["workers"] = PREFILL_WORKERS
    workdir = tmp_path_factory.mktemp("disagg")
    served = DisaggGraph("graphs.disagg_router:Frontend", config, workdir, nats_server.url, etcd_server.url)
    served.decode_metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    served.start()
    try:
        await served.wait_ready(workers=1)
        async with await Runtime.connect(served.settings) as runtime:
            prefill = await runtime.discovery.watch_instances("PrefillWorker", "status")
            try:
                await prefill.wait_until(lambda items: len(items) >= PREFILL_WORKERS, 240)
            except TimeoutError:
                raise AssertionError(f"{PREFILL_WORKERS} PrefillWorkers not serving:\n{served.log_tail()}") from None
            finally:
                await prefill.close()
        yield served
    finally:
        served.stop()


async def _complete(graph: ServedGraph, prompt: str) -> tuple[str, httpx.Response]:
    """(request id, response) of a greedy completion that succeeded."""
    request_id = uuid.uuid4().hex
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        response = await http.post("/v1/completions", json=body, headers={"X-Request-Id": request_id})
    assert response.status_code == 200, response.text
    return request_id, response


def _text(response: httpx.Response) -> str:
    return response.json()["choices"][0]["text"]


async def _prefill_statuses(graph: ServedGraph, count: int = PREFILL_WORKERS) -> dict[str, dict[str, Any]]:
    """The status (pid, job counters) of `count` PrefillWorkers that answer, by instance id.

    A record can outlive its process by the lease TTL (a killed worker), and a worker
    frozen past the TTL re-registers a moment after it thaws: wait for `count` answers.
    """
    async with await Runtime.connect(graph.settings) as runtime:
        client = runtime.client("PrefillWorker", "status")
        async with asyncio.timeout(60):
            while True:
                statuses = {}
                for instance in await client.watch():
                    try:
                        statuses[instance] = await client.call({}, target=instance, timeout=2)
                    except Exception:
                        continue
                if len(statuses) >= count:
                    return statuses
                await asyncio.sleep(0.5)


async def _decode_counters(graph: DisaggGraph) -> dict[str, float]:
    """The decode worker's KV-transfer counters, scraped from its metrics port."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(graph.decode_metrics_url)).text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return {
        "external_tokens": samples["tandem_worker_external_kv_prompt_tokens_total"],
        "transfer_bytes": samples["tandem_worker_kv_transfer_bytes_total"],
    }


def _assert_kv_pulled(
    before: dict[str, float], after: dict[str, float], prompt_tokens: list[int], tiny_model: Path
) -> None:
    """Between two `_decode_counters`, the decode engine pulled the KV of prompts of these
    lengths whole, each once, and computed none of it.

    vLLM counts a pulled prompt's tokens as external (all but, at most, a partial last
    block); NIXL reads each prompt's blocks, the partial last one as a whole block, and
    counts the bytes of a transfer only once it is done: a failed pull (recomputed under
    `kv_load_failure_policy: recompute`) misses a whole prompt's blocks.
    """
    pulled = after["external_tokens"] - before["external_tokens"]
    assert sum(prompt_tokens) - len(prompt_tokens) * BLOCK_SIZE <= pulled <= sum(prompt_tokens), pulled
    config = json.loads((tiny_model / "config.json").read_text())
    # K and V, of every layer.
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * KV_DTYPE_BYTES
    block_bytes = BLOCK_SIZE * per_token
    full_blocks = sum(n // BLOCK_SIZE for n in prompt_tokens) * block_bytes
    all_blocks = sum(math.ceil(n / BLOCK_SIZE) for n in prompt_tokens) * block_bytes
    moved = after["transfer_bytes"] - before["transfer_bytes"]
    assert full_blocks <= moved <= all_blocks, (
        f"NIXL moved {moved} bytes for prompts of {prompt_tokens} tokens: {full_blocks} to {all_blocks} expected"
    )


def _done(status: dict[str, Any]) -> int:
    return status.get("done", 0)


async def test_long_prompts_prefill_remotely_on_both_workers_with_vllms_output(
    graph: DisaggGraph, reference, prompt_lengths, tiny_model: Path
) -> None:
    before, counters_before = await _prefill_statuses(graph), await _decode_counters(graph)
    assert len(before) == PREFILL_WORKERS
    # At once: each PrefillWorker takes one job at a time, so the queue spreads them.
    results = await asyncio.gather(*(_complete(graph, prompt) for prompt in LONG_PROMPTS))
    after, counters_after = await _prefill_statuses(graph), await _decode_counters(graph)

    served_by: dict[str, int] = {}
    for prompt, (request_id, response) in zip(LONG_PROMPTS, results, strict=True):
        assert _text(response) == reference[prompt]
        assert prefill_decision(graph, request_id) == "remote"
        # The response names the prefill worker that served it.
        worker = response.headers["x-tandem-prefill-worker"]
        served_by[worker] = served_by.get(worker, 0) + 1
    assert set(served_by) == set(before), "both PrefillWorkers should have taken jobs"
    for worker, jobs in served_by.items():
        assert _done(after[worker]) - _done(before[worker]) == jobs

    # The decode engine did not compute these prompts: it pulled their KV over NIXL.
    _assert_kv_pulled(counters_before, counters_after, [prompt_lengths[p] for p in LONG_PROMPTS], tiny_model)


def test_each_engine_keeps_to_the_core_its_config_binds(graph: DisaggGraph) -> None:
    """vLLM's NIXL connector on CPU pins each engine worker to the node's last core; the
    tandem_cpu_nixl plugin keeps it on the cores `cpu-omp-threads-bind` gave it. (On the
    last core together, a decode engine starved while a prefill engine busy-polled for its
    KV to be pulled, until that KV's 30 s lease ran out.)"""
    assert _engine_worker_cores(graph) == {
        "VllmWorker": _bound_cores("VllmWorker", 1),
        "PrefillWorker": _bound_cores("PrefillWorker", PREFILL_WORKERS),
    }


def _bound_cores(service: str, replicas: int) -> list[list[int]]:
    """The cores `cpu-omp-threads-bind` gives each replica of a service (replica i: entry i mod n)."""
    binds = SHIPPED[service]["cpu-omp-threads-bind"]
    return [[int(core) for core in binds[replica % len(binds)].split(",")] for replica in range(replicas)]


def _engine_worker_cores(graph: ServedGraph) -> dict[str, list[list[int]]]:
    """Service -> the CPU affinity of each of its vLLM engine worker processes (VLLM::Worker)."""
    assert graph.process is not None
    cores: dict[str, list[list[int]]] = {"VllmWorker": [], "PrefillWorker": []}
    for program in psutil.Process(graph.process.pid).children(recursive=True):
        service = next((name for name in cores if f":{name}" in " ".join(program.cmdline())), None)
        if service is None:
            continue
        for child in program.children(recursive=True):
            if " ".join(child.cmdline()).startswith("VLLM::Worker"):
                cores[service].append(sorted(child.cpu_affinity()))
    return cores


async def test_status_lists_the_disaggregated_fleet_and_doctor_passes_on_it(graph: DisaggGraph) -> None:
    """`tandem status` and `tandem doctor` as an operator runs them, on real vLLM engines: the
    doctor dials each PrefillWorker's NIXL side channel (what a decode engine dials)."""
    status = await tandem_status(graph)
    pids = graph.service_pids()
    assert {(i["service"], i["pid"]) for i in status["instances"]} == {
        (service, pid) for service, service_pids in pids.items() for pid in service_pids
    }
    roles = {(i["service"], i["role"]) for i in status["instances"]}
    # No Router process: the config's default layout routes inside the Frontend.
    assert roles == {
        ("Frontend", "frontend"),
        ("Processor", "processor"),
        ("VllmWorker", "decode"),
        ("PrefillWorker", "prefill"),
    }
    prefill = [i for i in status["instances"] if i["service"] == "PrefillWorker"]
    assert len(prefill) == PREFILL_WORKERS
    assert len(status["prefill_queue"]["consumers"]) >= 1, status["prefill_queue"]
    assert status["warnings"] == []

    done = await asyncio.to_thread(
        subprocess.run,
        [TANDEM, "doctor", "--json", "--listen", "2", "-f", str(graph.config_path)],
        env=graph.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(done.stdout)
    verdicts = {check["name"]: check["verdict"] for check in report["checks"]}
    assert done.returncode == 0 and report["ok"], json.dumps(report, indent=1)
    # What the mocker graphs cannot show: real side channels, reached, and the queue checked.
    assert verdicts["nixl-side-channels"] == "PASS" and verdicts["prefill-queue"] == "PASS", verdicts


async def test_status_shows_the_decode_engines_load_rise_and_fall_with_the_streams(graph: DisaggGraph) -> None:
    """The load a real vLLM engine reports (its scheduler's running requests, KV blocks in
    use) is what `tandem status` shows, while streams run and after they end."""
    streams = [Stream() for _ in range(LOAD_STREAMS)]
    bodies = [
        {"model": MODEL, "prompt": f"load {n}", "max_tokens": LOAD_TOKENS, "ignore_eos": True}
        for n in range(LOAD_STREAMS)
    ]
    async with StatusWatch(graph) as status, httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        idle = await status.until(lambda s: running(s) == 0, 30, "an idle decode engine")
        tasks = [asyncio.create_task(read_stream(http, b, s)) for b, s in zip(bodies, streams, strict=True)]
        try:
            busy = await status.until(lambda s: running(s) == LOAD_STREAMS, 30, f"{LOAD_STREAMS} running")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # The streams ended (done, or cancelled: vLLM aborts their requests): the load falls back.
        await status.until(lambda s: running(s) == 0, 30, "the load gone")
    (idle_load,) = [w["load"] for w in of_service(idle, names.VLLM_WORKER)]
    (busy_load,) = [w["load"] for w in of_service(busy, names.VLLM_WORKER)]
    assert busy_load["kv_used_blocks"] > idle_load["kv_used_blocks"], (idle_load, busy_load)
    assert 0 < busy_load["kv_usage"] <= 1, busy_load


async def test_short_prompts_stay_local_with_vllms_output(graph: DisaggGraph, reference) -> None:
    before, counters_before = await _prefill_statuses(graph), await _decode_counters(graph)
    for prompt in SHORT_PROMPTS:
        request_id, response = await _complete(graph, prompt)
        assert _text(response) == reference[prompt]
        assert prefill_decision(graph, request_id) == "local"
        assert "x-tandem-prefill-worker" not in response.headers
    after = await _prefill_statuses(graph)
    assert {w: _done(s) for w, s in after.items()} == {w: _done(s) for w, s in before.items()}
    assert (await _decode_counters(graph))["external_tokens"] == counters_before["external_tokens"]


# Constrained answers stay short on the random-weight model: each alternative ends the text.
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo"]}}}},
}
CONSTRAINED: dict[str, tuple[str, dict[str, Any]]] = {
    "choice": ("/v1/completions", {"structured_outputs": {"choice": ["yes", "no"]}}),
    "regex": ("/v1/completions", {"structured_outputs": {"regex": "[a-z]{3,8}"}}),
    "json_schema": (
        "/v1/chat/completions",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}},
    ),
    "required_tool": ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required"}),
}


def _constrained_answer(case: str, choice: dict[str, Any]) -> Any:
    if case == "required_tool":
        (call,) = choice["message"]["tool_calls"]
        return call["function"]["name"], json.loads(call["function"]["arguments"])
    return choice["message"]["content"] if "message" in choice else choice["text"]


@pytest.mark.parametrize("case", list(CONSTRAINED))
async def test_structured_outputs_hold_with_remote_prefill(graph: DisaggGraph, case: str) -> None:
    """The decode engine enforces the constraint from its first token on, over the prefill
    engine's KV (the PrefillWorker drops the grammar: its one token is thrown away)."""
    route, fields = CONSTRAINED[case]
    prompt = _long(f"constrained-{case}")
    body: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_tokens": 48, **fields}
    body.update({"messages": [{"role": "user", "content": prompt}]} if "chat" in route else {"prompt": prompt})
    request_id = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        response = await http.post(route, json=body, headers={"X-Request-Id": request_id})
    assert response.status_code == 200, response.text
    assert prefill_decision(graph, request_id) == "remote"
    choice = response.json()["choices"][0]
    answer = _constrained_answer(case, choice)
    if case == "choice":
        assert answer in ("yes", "no")
    elif case == "regex":
        assert re.fullmatch("[a-z]{3,8}", answer), answer
    elif case == "json_schema":
        assert json.loads(answer)["answer"] in ("yes", "no"), answer
    else:
        assert answer == ("get_weather", {"city": "Oslo"}) and choice["finish_reason"] == "tool_calls"


async def test_n_choices_share_one_remote_prefill(graph: DisaggGraph) -> None:
    request_id = uuid.uuid4().hex
    body = {"model": MODEL, "prompt": _long("choices"), "n": 3, "seed": 5, "temperature": 1.0, "max_tokens": 8}
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        response = await http.post("/v1/completions", json=body, headers={"X-Request-Id": request_id})
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and len({c["text"] for c in choices}) > 1
    assert response.json()["usage"]["completion_tokens"] == 3 * 8
    assert prefill_decision(graph, request_id) == "remote"
    # Choices 1 and 2 are requests of their own on the decode engine, and no further prefill job.
    log = graph.log_path.read_text(errors="replace")
    assert f"request 1_{request_id}: prefill" not in log and f"request 2_{request_id}: prefill" not in log


class _AppliedTunables:
    """Waits for the decode worker to log that it applied a live tunable (app/tunables/live.py
    logs each change it applies), counting from when it was made."""

    def __init__(self, graph: ServedGraph) -> None:
        self._graph = graph
        self._seen = self._lines()

    def _lines(self) -> list[str]:
        log = self._graph.log_path.read_text(errors="replace")
        return [line for line in log.splitlines() if "live tunable disagg/" in line]

    async def wait(self, *changes: str, timeout: float = 30.0) -> None:
        """Until each of `changes` ("KEY: VALUE") shows in a line logged since the last wait."""
        async with asyncio.timeout(timeout):
            while True:
                new = self._lines()[len(self._seen) :]
                if all(any(f"live tunable {change}" in line for line in new) for change in changes):
                    self._seen += new
                    return
                await asyncio.sleep(0.1)


async def test_disagg_set_flips_the_decision_live(graph: DisaggGraph, reference, monkeypatch) -> None:
    # One call of the operator's command (in-process: with three vLLM engines on two
    # cores, a fresh Python process can take minutes to import); the rest through the API.
    for name in ("NATS_SERVER", "ETCD_ENDPOINTS", "TANDEM_NAMESPACE"):
        monkeypatch.setenv(name, graph.env[name])
    applied = _AppliedTunables(graph)
    queue_size = SHIPPED["VllmWorker"]["max-prefill-queue-size"]
    assert await asyncio.to_thread(tandem_cli, ["disagg", "set", "--max-local-prefill-length", "100000"]) == 0
    async with await Runtime.connect(graph.settings) as runtime:
        try:
            assert await runtime.discovery.get_tunable(MAX_LOCAL_PREFILL_LENGTH.key) == 100000
            await applied.wait(f"{MAX_LOCAL_PREFILL_LENGTH.key}: 100000")
            request_id, response = await _complete(graph, FLIP_PROMPT)
            assert _text(response) == reference[FLIP_PROMPT]
            assert prefill_decision(graph, request_id) == "local"

            await runtime.discovery.put_tunable(MAX_LOCAL_PREFILL_LENGTH.key, MAX_LOCAL_PREFILL)
            await runtime.discovery.put_tunable(MAX_PREFILL_QUEUE_SIZE.key, 0)  # "queue full": local
            await applied.wait(
                f"{MAX_LOCAL_PREFILL_LENGTH.key}: {MAX_LOCAL_PREFILL}", f"{MAX_PREFILL_QUEUE_SIZE.key}: 0"
            )
            request_id, _ = await _complete(graph, FLIP_PROMPT)
            assert prefill_decision(graph, request_id) == "local"

            await runtime.discovery.delete_tunable(MAX_PREFILL_QUEUE_SIZE.key)  # back to the config's
            await applied.wait(f"{MAX_PREFILL_QUEUE_SIZE.key}: {queue_size} (as configured)")
            request_id, response = await _complete(graph, FLIP_PROMPT)
            assert _text(response) == reference[FLIP_PROMPT]
            assert prefill_decision(graph, request_id) == "remote"
        finally:
            for key in (MAX_LOCAL_PREFILL_LENGTH.key, MAX_PREFILL_QUEUE_SIZE.key):
                await runtime.discovery.delete_tunable(key)


def _process_group(graph: ServedGraph, pid: int) -> int:
    """A PrefillWorker's process group: the worker and its engine core, nothing else."""
    assert graph.process is not None
    group = os.getpgid(pid)
    assert group not in {os.getpgid(graph.process.pid), os.getpgrp()}
    assert any("prefill_worker:PrefillWorker" in part for part in psutil.Process(pid).cmdline())
    return group


async def test_a_late_answer_is_discarded_after_the_local_fallback(graph: DisaggGraph, reference) -> None:
    """No PrefillWorker answers within the deadline: the decode worker prefills itself and
    withdraws the job from the queue (one a worker had in hand is skipped as expired): used
    at most once."""
    before = await _prefill_statuses(graph)
    groups = [_process_group(graph, status["pid"]) for status in before.values()]
    for group in groups:
        os.killpg(group, signal.SIGSTOP)
    late = asyncio.create_task(_complete(graph, LATE_PROMPT))
    try:
        # Meanwhile its job waits in the queue, and `tandem status` shows it there.
        queued = await status_until(
            graph, lambda s: s["prefill_queue"]["depth"] >= 1, REMOTE_PREFILL_TIMEOUT_S / 2, "the late job queued"
        )
        assert queued["prefill_queue"]["messages"] >= 1, queued["prefill_queue"]
        request_id, response = await late
    finally:
        late.cancel()
        for group in groups:
            os.killpg(group, signal.SIGCONT)
    assert _text(response) == reference[LATE_PROMPT]
    assert prefill_decision(graph, request_id) == "fallback"
    assert "x-tandem-prefill-worker" not in response.headers
    # Its job leaves the queue: its decode worker withdrew it when it stopped waiting (a
    # worker that thawed with it in hand skips it as expired).
    await status_until(
        graph, lambda s: s["prefill_queue"]["depth"] == 0, 2 * PREFILL_ACK_WAIT_S, "the late job withdrawn"
    )
    await asyncio.sleep(1.0)  # a worker that thawed with it in hand has looked at it by now
    after = await _prefill_statuses(graph)
    assert set(after) == set(before)
    # No worker prefilled it.
    assert {w: _done(s) for w, s in after.items()} == {w: _done(s) for w, s in before.items()}


async def test_sigkill_of_a_prefill_worker_holding_a_job_loses_no_request(
    graph: DisaggGraph, reference, prompt_lengths, tiny_model: Path
) -> None:
    """Both PrefillWorkers' engines frozen, so that each worker holds the job it took (and
    marks it in progress) while the third waits in the queue; the victim is SIGKILLed with
    its job in hand. Its job is delivered again, to the survivor (or the victim's
    successor), and every request ends with vLLM's text, its KV pulled from a prefill engine."""
    assert SHIPPED["PrefillWorker"]["max-concurrent-jobs"] == 1  # what "one in each worker's hands" rests on
    before, counters_before = await _prefill_statuses(graph), await _decode_counters(graph)
    victim, survivor = sorted(before)
    engines = {}
    for worker, status in before.items():
        _process_group(graph, status["pid"])  # a PrefillWorker of this graph
        engine = engine_core_of(status["pid"])
        engines[worker] = [engine, *engine.children(recursive=True)]
    requests: list[asyncio.Task[tuple[str, httpx.Response]]] = []
    async with PrefillQueueSpy(graph.settings) as queue:
        try:
            for process in engines[victim] + engines[survivor]:
                process.suspend()
            requests = [asyncio.create_task(_complete(graph, prompt)) for prompt in KILL_PROMPTS]
            # Each PrefillWorker takes one job at a time: two held, one in each worker's hands.
            await queue.wait_for(held=PREFILL_WORKERS, waiting=len(KILL_PROMPTS) - PREFILL_WORKERS)
            at_kill = await queue.jobs()
        finally:
            # The worker alone (its engine stays frozen): the worker's guard must end the
            # engine (app.launch.leftovers), or it would keep its memory and cores for good.
            os.kill(before[victim]["pid"], signal.SIGKILL)
            for process in engines[survivor]:
                process.resume()
        _, outlived = await asyncio.to_thread(psutil.wait_procs, engines[victim], 5)
        assert outlived == [], f"the killed PrefillWorker's engine processes outlived it by 5 s: {outlived}"
        results = await asyncio.gather(*requests)
        await queue.wait_drained()
        await queue.wait_acked(at_kill)
    counters_after = await _decode_counters(graph)

    # The job in the victim's hands, and only that one, was delivered again: the survivor
    # went on marking its own in progress while its engine was frozen.
    assert len(at_kill) == len(KILL_PROMPTS), at_kill
    assert len(queue.redelivered()) == 1, f"not one job redelivered: {queue.acks}"
    ((seq, deliveries),) = queue.redelivered().items()
    assert deliveries == 2 and seq in at_kill
    request_ids = [request_id for request_id, _ in results]
    assert sorted(at_kill.values()) == sorted(request_ids)
    prefilled_by: dict[str, int] = {}
    for prompt, (request_id, response) in zip(KILL_PROMPTS, results, strict=True):
        assert _text(response) == reference[prompt]
        # Redelivered after the ack wait: still remote, no fallback.
        assert prefill_decision(graph, request_id) == "remote"
        worker = response.headers["x-tandem-prefill-worker"]
        prefilled_by[worker] = prefilled_by.get(worker, 0) + 1
    # The survivor's jobs, counted by the survivor; any other was the victim's successor
    # under supervisord (a new instance id).
    after = await _prefill_statuses(graph, count=1)
    assert _done(after[survivor]) - _done(before[survivor]) == prefilled_by.get(survivor, 0)
    for outcome in ("failed", "errors"):  # a nak, or a failed ack: redeliveries of the survivor's own
        assert after[survivor].get(outcome, 0) == before[survivor].get(outcome, 0), outcome
    assert not (set(prefilled_by) - {survivor}) & set(before), prefilled_by
    # Each prompt's KV was pulled, none recomputed (the one the victim held included).
    _assert_kv_pulled(counters_before, counters_after, [prompt_lengths[p] for p in KILL_PROMPTS], tiny_model)
    # `tandem status` lists the victim no more once its lease ran out (its successor under
    # supervisord registers with a new instance id).
    gone = await status_until(
        graph, lambda s: victim not in {i["instance_id"] for i in s["instances"]}, 30, "the killed PrefillWorker gone"
    )
    assert before[victim]["pid"] not in {i["pid"] for i in gone["instances"]}


async def test_with_its_only_decode_engine_dead_the_frontend_is_unhealthy_until_the_restart(
    graph: DisaggGraph, reference
) -> None:
    """SIGKILL of the decode worker's engine core: the worker leaves routing and exits, so the
    Frontend's /health turns 503 (no routable worker) and requests get 503, never a 500,
    until supervisord's fresh worker serves again. Last in the module."""
    async with await Runtime.connect(graph.settings) as runtime:
        workers = await runtime.discovery.watch_instances(names.VLLM_WORKER, names.GENERATE)
        try:
            ((victim_id, victim),) = workers.items.items()
            engine_core_of(victim.pid).kill()
            await workers.wait_until(lambda items: victim_id not in items, timeout=5)
            async with httpx.AsyncClient(base_url=graph.base_url, timeout=60) as http:
                async with asyncio.timeout(5):
                    while (await http.get("/health")).status_code != 503:
                        await asyncio.sleep(0.1)
                body = {"model": MODEL, "prompt": SHORT_PROMPTS[0], "max_tokens": 2}
                while not workers.items:
                    response = await http.post("/v1/completions", json=body)
                    assert response.status_code in (200, 503), response.text
                    if response.status_code == 503:
                        assert response.headers["retry-after"]
                    await asyncio.sleep(0.5)
                await workers.wait_until(bool, timeout=240)
                async with asyncio.timeout(30):
                    while (await http.get("/health")).status_code != 200:
                        await asyncio.sleep(0.2)
        finally:
            await workers.close()
    _, response = await _complete(graph, SHORT_PROMPTS[0])
    assert _text(response) == reference[SHORT_PROMPTS[0]]
