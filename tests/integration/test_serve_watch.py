"""`tandem serve`'s start-up report over real etcd: "waiting for" while a service has not
registered, "graph up" once it has; and nothing but a warning where etcd cannot be reached."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

import pytest

from app.launch.ports import free_port
from app.protocol import ProcessRecord
from app.runtime import Runtime
from app.sdk.graph_watch import ExpectedService, GraphWatch
from app.settings import RuntimeSettings

WATCH_LOG = "app.sdk.graph_watch"


def watch_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WATCH_LOG]


async def test_it_waits_for_the_children_of_supervisord_then_says_graph_up_once(
    runtime_settings: RuntimeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=WATCH_LOG)
    # This test's process plays supervisord, a sleeping child the Echo service it started.
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
    watch = GraphWatch([ExpectedService("Echo", 1)], runtime_settings, report_interval_s=0.3)
    try:
        async with await Runtime.connect(runtime_settings) as runtime:
            record = ProcessRecord(
                instance_id=runtime.instance_id,
                service="Echo",
                replica=0,
                host=runtime.host,
                pid=child.pid,
                started_at=time.time(),
            )
            # Another Echo of the namespace, not this serve's child: it does not count.
            await runtime.discovery.register_process(
                ProcessRecord(
                    instance_id="other", service="Echo", replica=0, host=runtime.host, pid=1, started_at=time.time()
                )
            )
            watch.start(supervisord_pid=os.getpid())
            deadline = time.monotonic() + 20
            while not any(line.startswith("waiting for: Echo 0/1 (after ") for line in watch_lines(caplog)):
                assert time.monotonic() < deadline, watch_lines(caplog)
                await asyncio.sleep(0.1)
            await runtime.discovery.register_process(record)
            while not any(line.startswith("graph up: ") for line in watch_lines(caplog)):
                assert time.monotonic() < deadline, watch_lines(caplog)
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # the watch has ended: said once
    finally:
        await asyncio.to_thread(watch.stop)
        child.kill()
        await child.wait()
    ups = [line for line in watch_lines(caplog) if line.startswith("graph up: ")]
    assert len(ups) == 1 and ups[0].startswith("graph up: 1 Echo (after "), ups


async def test_a_watch_that_cannot_reach_etcd_only_says_so(
    runtime_settings: RuntimeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=WATCH_LOG)
    down = runtime_settings.model_copy(
        update={"etcd_endpoints": f"http://127.0.0.1:{free_port()}", "connect_timeout_s": 1.0}
    )
    watch = GraphWatch([ExpectedService("Echo", 1)], down)
    watch.start(supervisord_pid=1)
    deadline = time.monotonic() + 30
    while not any("cannot reach etcd" in line for line in watch_lines(caplog)):
        assert time.monotonic() < deadline, watch_lines(caplog)
        await asyncio.sleep(0.1)
    started = time.monotonic()
    await asyncio.to_thread(watch.stop)  # returns at once: the watch has ended
    assert time.monotonic() - started < 1
    (line,) = watch_lines(caplog)
    assert line.endswith("; the start-up of the graph is not reported"), line
    assert [r.levelname for r in caplog.records if r.name == WATCH_LOG] == ["WARNING"]
