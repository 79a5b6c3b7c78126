"""A worker stopped gracefully under load: `tandem serve` on 2 mocker workers under
supervisord, real NATS and etcd, a steady loop of clients; one worker gets SIGTERM.

On SIGTERM a worker first leaves routing (its instance record says `draining`, so every
caller's watch drops it from the instances it picks), then drains what it runs, and only
then closes its NATS subscription and deletes its record (app/sdk/runner.py,
`ServedEndpoint.drain` and `stop` in app/runtime/requests.py). A request that still
reaches it meanwhile, from a caller whose watch is behind, is answered by it while it
drains, or re-routed once its subscription is gone (no-responders, before the first token:
app/serving/pipeline.py). No client sees an error.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from app.infra import EtcdServer, NatsServer
from app.openai import WORKER_HEADER
from app.protocol import InstanceRecord
from testbed.graphs import ServedGraph

pytestmark = pytest.mark.e2e

WORKERS = 2
# Clients, each sending its next request as soon as the last is answered.
CLIENTS = 8
MODEL = "tiny-llama"
# ~0.5 s a request (decode-base-ms below): calls are in flight on the worker at the SIGTERM.
MAX_TOKENS = 50
LEASE_TTL_S = 3
# How often the NATS monitor is asked whether the worker still subscribes.
POLL_S = 0.02

CONFIG = """
Common:
  model: {model}
  served-model-name: {name}
  block-size: 16
  max-model-len: 2048
Frontend:
  served-model-name: {name}
Processor:
  common-configs: [model, max-model-len]
Router:
  common-configs: [model, block-size]
VllmWorker:
  engine: mocker
  vocab-size: 3000
  eos-token-id: 2
  decode-base-ms: 10
  ServiceArgs:
    workers: {workers}
  common-configs: [model, served-model-name, block-size, max-model-len]
"""


@dataclass(frozen=True)
class Answer:
    at: float  # monotonic, when the client had the whole answer
    worker: str
    failure: str  # "" for a whole answer


async def _client(http: httpx.AsyncClient, index: int, answers: list[Answer], stop: asyncio.Event) -> None:
    sent = 0
    while not stop.is_set():
        # Prompts unlike each other: the router spreads them by load, not by a shared prefix.
        prompt = f"Client {index} request {sent}: " + " ".join(
            f"w{(index * 13 + sent * 7 + j) % 101}" for j in range(20)
        )
        body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}
        sent += 1
        try:
            response = await http.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            answers.append(Answer(time.monotonic(), "", repr(exc)))
            continue
        whole = response.status_code == 200 and response.json()["usage"]["completion_tokens"] == MAX_TOKENS
        failure = "" if whole else f"{response.status_code}: {response.text[:300]}"
        answers.append(Answer(time.monotonic(), response.headers.get(WORKER_HEADER, ""), failure))


async def _subscribed(monitor: httpx.AsyncClient, subject: str) -> bool:
    """Whether some connection to NATS subscribes to `subject` (the monitor's /connz)."""
    connz = (await monitor.get("/connz", params={"subs": 1, "limit": 4096})).json()
    return any(subject in (connection.get("subscriptions_list") or []) for connection in connz["connections"])


async def test_a_sigtermed_worker_leaves_routing_before_its_subscription_closes_and_no_request_fails(
    tiny_model: Path, tmp_path: Path, nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    config = yaml.safe_load(CONFIG.format(model=tiny_model, name=MODEL, workers=WORKERS))
    async with ServedGraph(
        "graphs.agg_router:Frontend", config, tmp_path, nats_server.url, etcd_server.url, lease_ttl_s=LEASE_TTL_S
    ) as served:
        await served.wait_ready(WORKERS, processors=1, timeout=120)
        assert served.runtime is not None
        victim_id, victim = sorted((await served.instances("VllmWorker", "generate")).items())[0]
        # The victim's record as a caller's watch sees it change: (when, draining), None once deleted.
        seen: list[tuple[float, bool | None]] = []

        def on_change(instance_id: str, record: InstanceRecord | None) -> None:
            if instance_id == victim_id:
                seen.append((time.monotonic(), None if record is None else record.draining))

        watch = await served.runtime.discovery.watch_instances("VllmWorker", "generate")
        watch.add_listener(on_change)
        answers: list[Answer] = []
        stop = asyncio.Event()
        monitor = httpx.AsyncClient(base_url=f"http://127.0.0.1:{nats_server.monitor_port}", timeout=10)
        async with httpx.AsyncClient(base_url=served.base_url, timeout=120) as http, monitor:
            clients = [asyncio.create_task(_client(http, i, answers, stop)) for i in range(CLIENTS)]
            try:
                assert await _subscribed(monitor, victim.subject)
                await asyncio.sleep(3)  # the steady state: both workers serve
                assert victim_id in {a.worker for a in answers}, answers
                sigterm_at = time.monotonic()
                os.kill(victim.pid, signal.SIGTERM)
                deadline = sigterm_at + 60
                while await _subscribed(monitor, victim.subject):
                    assert time.monotonic() < deadline, (
                        f"the worker still subscribes 60 s after SIGTERM\n{served.log_tail()}"
                    )
                    await asyncio.sleep(POLL_S)
                unsubscribed_at = time.monotonic()
                while not seen or seen[-1][1] is not None:
                    assert time.monotonic() < deadline, f"the worker's record outlived it: {seen}\n{served.log_tail()}"
                    await asyncio.sleep(POLL_S)
                await asyncio.sleep(2)  # requests go on: none of them may fail either
            finally:
                stop.set()
                await asyncio.gather(*clients)
        await watch.close()
        log = served.log_path.read_text(errors="replace")

    failures = [a for a in answers if a.failure]
    assert failures == [], f"{len(failures)} of {len(answers)} requests failed: {failures[:5]}"
    after_sigterm = [a for a in answers if a.at > sigterm_at]
    assert len(after_sigterm) >= CLIENTS, answers
    # Out of routing first: the record said `draining` while the worker still subscribed...
    (draining_at, draining), *_ = seen
    assert draining is True, seen
    assert sigterm_at < draining_at < unsubscribed_at, (sigterm_at, seen, unsubscribed_at)
    # ...and it drained: what was in flight on it at the SIGTERM finished there, whole.
    assert "VllmWorker/generate draining" in log, log[-5000:]
    assert any(a.worker == victim_id and a.at > sigterm_at for a in answers), answers
    # Its record went once nothing more could reach it through it.
    assert seen[-1][1] is None and seen[-1][0] >= draining_at, seen
