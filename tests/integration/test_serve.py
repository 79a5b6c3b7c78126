"""`tandem serve` under supervisord: a two-service graph over real NATS and etcd."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from app.errors import InvalidRequestError
from app.runtime import NoInstancesError, Runtime
from app.sdk import load_config, run_service
from app.sdk.graph import resolve
from app.settings import RuntimeSettings

REPO = Path(__file__).resolve().parents[2]
TANDEM = str(Path(sys.executable).parent / "tandem")
GRAPH = "tests.integration.echo_graph:Greeter"
# Generous: on a loaded 2-core machine a fresh Python process takes many seconds to import.
STARTUP_TIMEOUT_S = 90
CONFIG = """
Greeter:
  greeting: hi
Echo:
  prefix: ">"
  ServiceArgs:
    workers: 2
    resources: {gpu: 1}
"""
# The node's devices, as far as `tandem serve` knows: each Echo replica gets one of its own.
NODE_DEVICES = "5,7"


class Served:
    """A running `tandem serve` (supervisord after its exec) and everything it started."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.service_pids: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def serve_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """More environment for `tandem serve`, where a test parametrizes it (indirect); `{tmp}`
    in a value is the test's tmp_path."""
    return {name: value.format(tmp=tmp_path) for name, value in getattr(request, "param", {}).items()}


@pytest.fixture
def served(tmp_path: Path, runtime_settings: RuntimeSettings, serve_env: dict[str, str]) -> Iterator[Served]:
    config = tmp_path / "graph.yaml"
    config.write_text(CONFIG)
    env = {
        **os.environ,
        "NATS_SERVER": runtime_settings.nats_server,
        "ETCD_ENDPOINTS": runtime_settings.etcd_endpoints,
        "TANDEM_NAMESPACE": runtime_settings.namespace,
        "TANDEM_LEASE_TTL_S": "2",
        "CUDA_VISIBLE_DEVICES": NODE_DEVICES,
        **serve_env,
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [TANDEM, "serve", GRAPH, "-f", str(config)], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    served = Served(proc, log_path)
    try:
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # supervisord puts each program in its own process group: kill any it left behind.
        for pid in served.service_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def runtime(runtime_settings: RuntimeSettings) -> AsyncIterator[Runtime]:
    rt = await Runtime.connect(runtime_settings)
    try:
        yield rt
    finally:
        await rt.close()


async def live_pids(rt: Runtime, service: str, endpoint: str) -> set[int]:
    records = await rt.client(service, endpoint).wait_for_instances(timeout=STARTUP_TIMEOUT_S)
    return {r.pid for r in records}


async def test_graph_answers_through_the_runtime_and_a_killed_process_comes_back(
    served: Served, runtime: Runtime
) -> None:
    greeter = runtime.client("Greeter", "greet")
    try:
        await greeter.wait_for_instances(timeout=STARTUP_TIMEOUT_S)
    except NoInstancesError:
        raise AssertionError(f"Greeter never registered\n{served.log()}") from None
    await live_pids(runtime, "Echo", "echo")  # services start in any order
    replies = [item async for item in greeter.stream({"name": "ada"}, timeout=10)]
    assert [r["word"] for r in replies] == [">hi", ">ada"]

    deadline = time.monotonic() + 30
    while len(echo_pids := await live_pids(runtime, "Echo", "echo")) < 2:
        assert time.monotonic() < deadline, "the second Echo process never registered"
        await asyncio.sleep(0.2)
    served.service_pids |= echo_pids | await live_pids(runtime, "Greeter", "greet")
    echo = runtime.client("Echo", "echo")
    seen = {}
    for record in await echo.wait_for_instances(timeout=STARTUP_TIMEOUT_S):
        (reply,) = [item async for item in echo.stream({"text": "x"}, target=record.instance_id, timeout=10)]
        seen[reply["replica"]] = reply["devices"]
    assert seen == {0: "5", 1: "7"}
    victim = min(echo_pids)
    os.kill(victim, signal.SIGKILL)

    deadline = time.monotonic() + 30
    while not (new := await live_pids(runtime, "Echo", "echo") - echo_pids):
        assert time.monotonic() < deadline, f"no Echo came back after SIGKILL\n{served.log()}"
        await asyncio.sleep(0.2)
    served.service_pids |= new
    log = served.log()
    assert "terminated by SIGKILL" in log
    assert log.count("spawned: 'Echo_") == 3, log
    # Each line of a service process names its service and replica.
    assert "Greeter[0] tests.integration.echo_graph: greeting with 'hi'" in log


async def test_sigterm_stops_every_process_after_draining(served: Served, runtime: Runtime) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(pids := await live_pids(runtime, "Echo", "echo") | await live_pids(runtime, "Greeter", "greet")) < 3:
        assert time.monotonic() < deadline, f"the graph never came up\n{served.log()}"
        await asyncio.sleep(0.2)
    served.service_pids |= pids
    # A stream in flight on one Echo (5 s long) when SIGTERM comes: the drain lets it finish.
    tick = runtime.client("Echo", "tick")
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(records := await tick.wait_for_instances(timeout=STARTUP_TIMEOUT_S)) < 2:
        assert time.monotonic() < deadline, f"the second Echo never served tick\n{served.log()}"
        await asyncio.sleep(0.2)
    stopping = records[0].instance_id
    received: list[int] = []
    first = asyncio.Event()

    async def read() -> None:
        async for n in tick.stream({"times": 50, "every_s": 0.1}, target=stopping):
            received.append(n)
            first.set()

    reading = asyncio.create_task(read())
    await asyncio.wait([reading, asyncio.create_task(first.wait())], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert received and not reading.done(), reading

    served.proc.send_signal(signal.SIGTERM)
    # Draining: out of routing at once, its record kept, its stream with items still to go.
    deadline = time.monotonic() + 10
    while stopping in tick.instance_ids():
        assert time.monotonic() < deadline, f"the Echo with a stream in flight never began to drain\n{served.log()}"
        await asyncio.sleep(0.02)
    assert stopping in {r.instance_id for r in await tick.wait_for_instances(timeout=1)}
    assert len(received) < 50, "the stream had ended before the drain began"
    await asyncio.wait_for(reading, 30)
    assert received == list(range(50)), "the stream in flight did not finish whole"
    assert await asyncio.to_thread(served.proc.wait, 30) == 0
    assert [pid for pid in pids if alive(pid)] == []
    log = served.log()
    assert log.count("shutdown hook ran") == 2, log
    assert "exit status 1" not in log, log


async def test_run_service_in_process_serves_typed_requests_and_closes_abandoned_streams(
    runtime: Runtime, runtime_settings: RuntimeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    module, echo = resolve("tests.integration.echo_graph:Echo")
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(echo.cls, load_config(None), runtime_settings, replica=3, stop=stop))
    try:
        count = runtime.client("Echo", "count")
        await count.wait_for_instances(timeout=20)
        assert [n async for n in count.stream({"upto": 3})] == [0, 1, 2]
        with pytest.raises(InvalidRequestError):
            await count.call({"upto": "three"})  # decoded to CountRequest by the runtime: rejected
        stream = count.stream({"upto": 1_000_000})
        assert await anext(stream) == 0
        await stream.aclose()
        deadline = time.monotonic() + 10
        while len(module.FINISHED_COUNTS) < 2:  # the finished stream and the abandoned one
            assert time.monotonic() < deadline, "the abandoned endpoint generator was never closed"
            await asyncio.sleep(0.05)
        echo_client = runtime.client("Echo", "echo")
        assert [r["replica"] async for r in echo_client.stream({"text": "a b"})] == [3, 3]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert count.instance_ids() == []


@pytest.mark.parametrize("victim", ["tandem serve", "supervisord"])
async def test_no_process_outlives_a_sigkilled_serve_or_its_supervisord(
    served: Served, runtime: Runtime, victim: str
) -> None:
    """SIGKILL can't be handled: the kernel's parent-death signal stops what was below."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(await live_pids(runtime, "Echo", "echo") | await live_pids(runtime, "Greeter", "greet")) < 3:
        assert time.monotonic() < deadline, f"the graph never came up\n{served.log()}"
        await asyncio.sleep(0.2)
    tree = psutil.Process(served.proc.pid).children(recursive=True)
    (supervisord,) = [p for p in tree if p.ppid() == served.proc.pid]
    served.service_pids |= {p.pid for p in tree}
    assert len(tree) == 5, tree  # supervisord, its restart listener, two Echo replicas, a Greeter

    (served.proc if victim == "tandem serve" else supervisord).kill()
    _, left = await asyncio.to_thread(psutil.wait_procs, tree, 5)
    assert left == [], f"still running 5 s after the SIGKILL of {victim}: {left}\n{served.log()}"


def _is_echo_0(process: psutil.Process) -> bool:
    try:
        return "echo_graph:Echo" in " ".join(process.cmdline()) and process.environ().get("TANDEM_REPLICA") == "0"
    except psutil.Error:  # gone, or not yet exec'd
        return False


# A kill that a loaded machine delays past startsecs makes supervisord count a good start and
# the crash-loop count (5 exits by default) would end serve first, under its own reason: out
# of reach here, supervisord's own FATAL is the one this test sees.
@pytest.mark.parametrize("serve_env", [{"TANDEM_CRASH_LOOP_EXITS": "1000"}], indirect=True)
async def test_a_program_that_goes_fatal_ends_serve_non_zero_naming_it(served: Served) -> None:
    """Echo_0 dies at once at each start (killed here within its startsecs): supervisord
    gives up on it, FATAL, and the graph is not whole; `tandem serve` stops the rest and
    exits non-zero, for the layer above to start it again."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    killed = 0
    while served.proc.poll() is None:
        assert time.monotonic() < deadline, f"tandem serve still runs after {killed} kills of Echo_0\n{served.log()}"
        tree = psutil.Process(served.proc.pid).children(recursive=True)
        served.service_pids |= {p.pid for p in tree}
        for process in filter(_is_echo_0, tree):
            process.kill()
            killed += 1
        await asyncio.sleep(0.01)
    assert served.proc.returncode != 0
    log = served.log()
    assert "gave up: Echo_0 entered FATAL state" in log, log
    assert "tandem serve exits: Echo_0 went FATAL" in log, log
    assert [pid for pid in served.service_pids if alive(pid)] == [], log


def _echo_0_up_past_startsecs(process: psutil.Process) -> bool:
    try:
        return _is_echo_0(process) and time.time() - process.create_time() > 2  # startsecs=1
    except psutil.Error:
        return False


@pytest.mark.parametrize(
    "serve_env",
    [
        {
            "TANDEM_CRASH_LOOP_EXITS": "3",
            "TANDEM_CRASH_LOOP_WINDOW_S": "120",
            # As the container's supervisord runs `tandem serve`: its program `tandem-graph`,
            # in a run folder whose healthcheck cannot see `tandem serve`'s own programs.
            "TANDEM_RUN_DIR": "{tmp}/outer",
            "SUPERVISOR_PROCESS_NAME": "tandem-graph",
        }
    ],
    indirect=True,
)
async def test_a_program_that_keeps_dying_after_startsecs_ends_serve_non_zero_and_the_healthcheck_says_so(
    served: Served, tmp_path: Path
) -> None:
    """Echo_0 is killed each time it has run past startsecs (a worker that loads, then dies
    of CUDA OOM): supervisord would restart it for ever, never FATAL. Its third exit in a
    row, each within 120 s of its start, counts as FATAL: `tandem serve` stops the rest and
    exits non-zero naming it and the count, and the container's healthcheck says so."""
    outer_run_dir = tmp_path / "outer"
    outer_run_dir.mkdir()
    (outer_run_dir / "supervisord.conf").write_text("[program:tandem-graph]\nstartsecs=1\n")
    deadline = time.monotonic() + 3 * STARTUP_TIMEOUT_S
    killed = 0
    while served.proc.poll() is None:
        assert time.monotonic() < deadline, f"tandem serve runs on after {killed} kills of Echo_0\n{served.log()}"
        tree = psutil.Process(served.proc.pid).children(recursive=True)
        served.service_pids |= {p.pid for p in tree}
        for process in filter(_echo_0_up_past_startsecs, tree):
            process.kill()
            killed += 1
        await asyncio.sleep(0.1)
    assert served.proc.returncode != 0
    log = served.log()
    assert killed == 3, log
    assert "gave up" not in log, log  # supervisord itself never called it FATAL
    why = "Echo_0 went FATAL (3 exits in a row, each within 120 s of its start)"
    assert f"tandem serve exits: {why}; every other program was stopped" in log, log
    assert [pid for pid in served.service_pids if alive(pid)] == [], log
    health = await asyncio.to_thread(
        subprocess.run,
        [str(REPO / "entrypoints" / "healthcheck.sh")],
        env={**os.environ, "TANDEM_RUN_DIR": str(outer_run_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert health.returncode != 0, health.stdout + health.stderr
    assert f"unhealthy: tandem-graph: tandem serve exited: {why}" in health.stdout, health.stdout + health.stderr


async def test_sighup_restarts_nothing_and_fails_no_request(served: Served, runtime: Runtime) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while len(pids := await live_pids(runtime, "Echo", "echo") | await live_pids(runtime, "Greeter", "greet")) < 3:
        assert time.monotonic() < deadline, f"the graph never came up\n{served.log()}"
        await asyncio.sleep(0.2)
    served.service_pids |= pids
    greeter = runtime.client("Greeter", "greet")
    answered = failed = 0
    hup_at = time.monotonic() + 1.0
    end = hup_at + 8.0  # longer than a restart of the graph would take to begin
    sent_hup = False
    while time.monotonic() < end:
        if not sent_hup and time.monotonic() >= hup_at:
            served.proc.send_signal(signal.SIGHUP)
            sent_hup = True
        try:
            replies = [item async for item in greeter.stream({"name": "ada"}, timeout=5)]
            assert [r["word"] for r in replies] == [">hi", ">ada"]
            answered += 1
        except Exception:
            failed += 1
            await asyncio.sleep(0.05)
    log = served.log()
    assert (failed, served.proc.poll()) == (0, None), f"{failed} failed of {answered + failed}\n{log}"
    assert await live_pids(runtime, "Echo", "echo") | await live_pids(runtime, "Greeter", "greet") == pids, log
    assert "SIGHUP ignored" in log and "restart request" not in log, log
