"""What the end-to-end tests read off a graph that testbed/graphs.py's ServedGraph serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from app.openai import WORKER_HEADER
from app.protocol import names
from testbed.graphs import TANDEM, ServedGraph


def mocker_agg_config(
    model: Path,
    served_model_name: str,
    max_model_len: int = 2048,
    frontend: Mapping[str, Any] | None = None,
    worker: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """graphs.agg's config on a mocker VllmWorker (the tiny model's tokenizer, 3000 tokens,
    blocks of 16), with `frontend` and `worker` keys added to those sections."""
    return {
        "Common": {"model": str(model), "served-model-name": served_model_name, "max-model-len": max_model_len},
        "Frontend": {"served-model-name": served_model_name, **(frontend or {})},
        "Processor": {"common-configs": ["model", "max-model-len"]},
        "VllmWorker": {
            "engine": "mocker",
            "vocab-size": 3000,
            "eos-token-id": 2,
            "block-size": 16,
            "common-configs": ["model", "served-model-name", "max-model-len"],
            **(worker or {}),
        },
    }


def engine_core_of(worker_pid: int) -> psutil.Process:
    """The `VLLM::EngineCore` process that a worker process started (vLLM names it so)."""
    for child in psutil.Process(worker_pid).children():
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    raise AssertionError(f"worker {worker_pid} has no EngineCore child")


def prefill_decision(graph: ServedGraph, request_id: str, timeout: float = 5.0) -> str:
    """The decode worker's logged decision for a request: local, remote or fallback (a
    DEBUG line, which ServedGraph's TANDEM_DEBUG_LOGGERS turns on).

    supervisord relays the worker's output into the log a moment later (it polls the
    pipes): a response can reach the client before its decision line reaches the file.
    """
    marker = f"request {request_id}: prefill "
    deadline = time.monotonic() + timeout
    while True:
        for line in graph.log_path.read_text(errors="replace").splitlines():
            if marker in line:
                return line.split(marker, 1)[1].split(" ", 1)[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no prefill decision logged for {request_id}:\n{graph.log_tail()}")
        time.sleep(0.2)


@contextlib.asynccontextmanager
async def thin_frontend(
    graph: str, config: Mapping[str, Any], workdir: Path, beside: ServedGraph
) -> AsyncIterator[ServedGraph]:
    """A second Frontend of `graph` with `embed-processor: false`, in the namespace of the graph
    served `beside` it (whose Processor service it asks over NATS), once healthy."""
    thin = ServedGraph(
        graph,
        config,
        workdir,
        beside.env["NATS_SERVER"],
        beside.env["ETCD_ENDPOINTS"],
        overrides=["--service-name", "Frontend", "--Frontend.embed-processor=false"],
        name="thin",
    )
    thin.settings, thin.env["TANDEM_NAMESPACE"] = beside.settings, beside.settings.namespace
    async with thin:
        await thin.wait_healthy(timeout=120)
        yield thin


@dataclass
class Stream:
    """A streamed completion as a client saw it: who served it, its text, any in-stream errors."""

    worker: str = ""
    text: str = ""
    errors: list[dict] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)  # set at its first text


async def read_stream(http: httpx.AsyncClient, body: dict, stream: Stream) -> None:
    """POST a streamed /v1/completions, filling `stream` as events come."""
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        stream.worker = response.headers[WORKER_HEADER]
        # SSE events by their blank-line separator (the text itself may hold any line break).
        buffer = b""
        async for chunk in response.aiter_bytes():
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                payload = json.loads(event.removeprefix(b"data: "))
                if "error" in payload:
                    stream.errors.append(payload["error"])
                    continue
                stream.text += "".join(choice["text"] for choice in payload["choices"])
                if stream.text:
                    stream.started.set()


async def migrations(http: httpx.AsyncClient) -> float:
    """Requests the Frontend's pipeline moved to another worker so far (its /metrics)."""
    text = (await http.get("/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "tandem_request_migrations"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


async def tandem_status(graph: ServedGraph, *args: str, listen_s: float = 1.5) -> dict[str, Any]:
    """`tandem status --json ARGS`, run as an operator runs it, with the graph's NATS_SERVER,
    ETCD_ENDPOINTS and namespace; `listen_s`: how long it waits for the fleet's reports."""
    done = await asyncio.to_thread(
        subprocess.run,
        [TANDEM, "status", "--json", "--listen", str(listen_s), *args],
        env=graph.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


async def status_until(
    graph: ServedGraph, holds: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = await tandem_status(graph)
        if holds(status):
            return status
        assert time.monotonic() < deadline, f"{what} not shown within {timeout:g}s:\n{json.dumps(status, indent=1)}"
        await asyncio.sleep(0.2)


def of_service(status: dict[str, Any], service: str) -> list[dict[str, Any]]:
    return [instance for instance in status["instances"] if instance["service"] == service]


def running(status: dict[str, Any]) -> int:
    return sum(w["load"]["running"] for w in of_service(status, names.VLLM_WORKER) if w["load"])


class StatusWatch:
    """`tandem status --json --watch INTERVAL` as an operator leaves it running: one status
    document a line, without a command start per look (what a short load needs)."""

    def __init__(self, graph: ServedGraph, interval_s: float = 0.3) -> None:
        self._argv = [TANDEM, "status", "--json", "--watch", str(interval_s), "--listen", "1"]
        self._env = graph.env
        self._process: asyncio.subprocess.Process | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __aexit__): what it says should it end

    async def __aenter__(self) -> StatusWatch:
        self._process = await asyncio.create_subprocess_exec(
            *self._argv, env=self._env, stdout=asyncio.subprocess.PIPE, stderr=self._stderr
        )
        return self

    def _said(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    async def __aexit__(self, *_: object) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGINT)  # Ctrl-C: the watch ends
        await asyncio.wait_for(self._process.wait(), 30)
        self._stderr.close()

    async def until(self, holds: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """The first document for which `holds` is true."""
        assert self._process is not None and self._process.stdout is not None
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                line = await asyncio.wait_for(self._process.stdout.readline(), max(deadline - time.monotonic(), 0.1))
            except TimeoutError:
                break
            assert line, f"tandem status --watch ended:\n{self._said()}"
            status = json.loads(line)
            if holds(status):
                return status
        raise AssertionError(f"{what} not shown within {timeout:g}s:\n{json.dumps(status, indent=1)}")
