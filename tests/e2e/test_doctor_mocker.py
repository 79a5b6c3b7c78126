"""`tandem doctor` end to end, run as an operator runs it: the binary, `--json` and its exit
status, against a served mocker graph (`graphs.agg_router:Frontend`: 2 mocker VllmWorkers,
2 Routers, blocks of 16), then with one more VllmWorker started with blocks of 32.

Real NATS and etcd, one graph start-up for the module, every `tandem serve` stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.infra import EtcdServer, NatsServer
from app.protocol import KV_HASH_SCHEME, names
from app.versions import tandem_version, vllm_version
from testbed.graphs import TANDEM, ServedGraph

pytestmark = pytest.mark.e2e

WORKERS = 2
ROUTERS = 2
MODEL = "tiny-llama"


def config(model: Path) -> dict[str, Any]:
    return {
        "Common": {"model": str(model), "served-model-name": MODEL, "block-size": 16, "max-model-len": 2048},
        "Frontend": {"served-model-name": MODEL},
        "Processor": {"common-configs": ["model", "max-model-len"]},
        "Router": {
            "policy": "kv",
            "report-interval-s": 0.5,
            "ServiceArgs": {"workers": ROUTERS},
            "common-configs": ["model", "block-size"],
        },
        "VllmWorker": {
            "engine": "mocker",
            "vocab-size": 3000,
            "eos-token-id": 2,
            "load-report-interval-s": 0.5,
            "ServiceArgs": {"workers": WORKERS},
            "common-configs": ["model", "served-model-name", "block-size", "max-model-len"],
        },
    }


@pytest.fixture(scope="module")
async def graph(
    tiny_model: Path, nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServedGraph]:
    served = ServedGraph(
        "graphs.agg_router:Frontend",
        config(tiny_model),
        tmp_path_factory.mktemp("doctor"),
        nats_server.url,
        etcd_server.url,
        lease_ttl_s=3,
    )
    async with served:
        await served.wait_ready(WORKERS, routers=ROUTERS, processors=1, timeout=120)
        yield served


async def tandem_doctor(graph: ServedGraph, *args: str) -> tuple[int, dict[str, Any]]:
    """`tandem doctor --json ARGS` with the graph's NATS_SERVER, ETCD_ENDPOINTS and namespace:
    its exit status and its checks by name."""
    done = await asyncio.to_thread(
        subprocess.run,
        [TANDEM, "doctor", "--json", "--listen", "1.5", *args],
        env=graph.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["ok"] == (done.returncode == 0), report
    return done.returncode, {check["name"]: check for check in report["checks"]}


async def test_doctor_passes_on_a_healthy_graph_and_checks_its_config(graph: ServedGraph) -> None:
    status, checks = await tandem_doctor(graph, "-f", str(graph.config_path))
    assert status == 0, json.dumps(checks, indent=1)
    assert {name for name, check in checks.items() if check["verdict"] == "PASS"} >= {
        "config",
        "kv-layout",
        "kv-events",
        "versions",
        "nats-max-payload",
    }, checks
    layout = checks["kv-layout"]["message"]
    agreed = f"{WORKERS} worker(s) and {ROUTERS} router replica(s) agree: block size 16, hash scheme {KV_HASH_SCHEME}"
    assert agreed in layout, layout
    # Every process wrote its versions in its record.
    assert f"Tandem {tandem_version()} and vLLM {vllm_version()} on all" in checks["versions"]["message"]
    # No PrefillWorker in this graph, and one node: said, not failed.
    for name in ("prefill-queue", "nixl-side-channels", "clocks"):
        assert checks[name]["verdict"] == "SKIP" and checks[name]["message"].startswith("not applicable"), checks[name]

    text = await asyncio.to_thread(
        subprocess.run, [TANDEM, "doctor", "--listen", "1"], env=graph.env, capture_output=True, text=True, timeout=120
    )
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.splitlines()[-1] == "all checks passed"
    assert any(line.startswith("PASS  kv-layout") for line in text.stdout.splitlines()), text.stdout


async def test_doctor_fails_naming_a_worker_started_with_another_block_size_and_the_fix(
    graph: ServedGraph, tmp_path: Path
) -> None:
    before = set(await graph.instances(names.VLLM_WORKER))
    odd = ServedGraph(
        "graphs.agg_router:Frontend",
        graph.config_path,
        tmp_path,
        graph.env["NATS_SERVER"],
        graph.env["ETCD_ENDPOINTS"],
        overrides=[
            "--service-name",
            names.VLLM_WORKER,
            "--VllmWorker.block-size=32",
            "--VllmWorker.ServiceArgs.workers=1",
        ],
        name="odd-worker",
        lease_ttl_s=3,
    )
    odd.settings, odd.env["TANDEM_NAMESPACE"] = graph.settings, graph.settings.namespace
    async with odd:
        deadline = time.monotonic() + 120
        while not (joined := set(await graph.instances(names.VLLM_WORKER)) - before):
            assert time.monotonic() < deadline, odd.log_tail()
            await asyncio.sleep(0.5)
        (worker,) = joined
        status, checks = await tandem_doctor(graph)
        assert status == 1
        layout = checks["kv-layout"]
        assert layout["verdict"] == "FAIL", layout
        assert f"worker {worker} on " in layout["message"] and "has block size 32" in layout["message"], layout
        assert "use 16: start it with the routers' block-size" in layout["message"], layout
        for fine in before:
            assert fine not in layout["message"]
        # Only what is wrong fails.
        assert {name for name, check in checks.items() if not check["ok"]} == {"kv-layout"}, checks
        text = await asyncio.to_thread(
            subprocess.run,
            [TANDEM, "doctor", "--listen", "1"],
            env=graph.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert text.returncode == 1 and text.stdout.splitlines()[-1] == "1 check(s) failed", text.stdout
        (line,) = [line for line in text.stdout.splitlines() if line.startswith("FAIL")]
        assert line.startswith("FAIL  kv-layout") and worker in line, text.stdout
    # Gone with its lease, the graph is healthy again.
    deadline = time.monotonic() + 60
    while (await tandem_doctor(graph))[0] != 0:
        assert time.monotonic() < deadline, "doctor still fails after the odd worker left"
        await asyncio.sleep(1)


async def test_doctor_checks_the_prefill_queue_of_a_disaggregated_graph(
    tiny_model: Path, nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    mocker = {"engine": "mocker", "vocab-size": 3000, "eos-token-id": 2}
    disagg = {
        "Common": {"model": str(tiny_model), "served-model-name": MODEL, "block-size": 16},
        "Frontend": {"served-model-name": MODEL},
        "Processor": {"common-configs": ["model"]},
        "Router": {"policy": "kv", "report-interval-s": 0.5, "common-configs": ["model", "block-size"]},
        "VllmWorker": {
            **mocker,
            "remote-prefill": True,
            "load-report-interval-s": 0.5,
            "common-configs": ["model", "served-model-name", "block-size"],
        },
        "PrefillWorker": {**mocker, "common-configs": ["model", "served-model-name", "block-size"]},
    }
    served = ServedGraph(
        "graphs.disagg_router:Frontend", disagg, tmp_path, nats_server.url, etcd_server.url, lease_ttl_s=3
    )
    async with served:
        # The default layout: the router inside the Frontend, no Router process.
        await served.wait_ready(1, routers=0, processors=1, prefill_workers=1, timeout=120)
        status, checks = await tandem_doctor(served, "-f", str(served.config_path))
    assert status == 0, json.dumps(checks, indent=1)
    queue = checks["prefill-queue"]
    assert queue["verdict"] == "PASS", queue
    assert f"stream {served.settings.namespace}_prefill_queue (workqueue) with consumer 'workers'" in queue["message"]
    # The mocker needs no KV connector: nothing to dial, and said so.
    reach = checks["nixl-side-channels"]
    assert reach["verdict"] == "SKIP" and "no PrefillWorker advertises a NIXL side channel" in reach["message"], reach
