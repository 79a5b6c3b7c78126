"""SIGKILL of a container's main process (the entrypoint's supervisord, PID 1 inside): no Tandem or engine
process of that container is left on the host after 5 s (issue 15, "No orphans, ever", test (d)).

The container is a head node on the shipped mocker config (configs/mocker-8.yaml: NATS, etcd and
`tandem serve` with Frontend, Processor, 2 Routers and 8 mocker VllmWorkers; serving in about 20 s here), on a
network of its own (`--network none`), so that it binds nothing on this machine. Its processes are found on
the host twice over: by `docker top` (their host PIDs) and by their cgroup, which names the container; a
process started after the listing is in the cgroup too.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import psutil
import pytest
from docker.models.containers import Container

from app.model.tiny import make_tiny

pytestmark = pytest.mark.appliance

START_TIMEOUT_S = 300
GONE_WITHIN_S = 5.0
# What must run before the kill, by a word of its command line: both supervisords (the entrypoint's and
# `tandem serve`'s), the infrastructure, and every service of the graph (the mocker engine runs in-process).
EXPECTED = {
    "supervisord": 2,
    "nats-server": 1,
    "etcdbin/etcd ": 1,  # the binary: the restart listeners name the etcd program too
    "app.launch.restart_backoff": 2,  # one per supervisord
    "tandem serve": 1,
    "app.components.frontend:Frontend": 1,
    "app.components.processor:Processor": 1,
    "app.components.kv_router:Router": 2,
    "app.components.worker:VllmWorker": 8,
}


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """The tiny model's tokenizer for the mocker, readable by the image's user (uid 10001)."""
    models = tmp_path / "models"
    make_tiny(models / "tiny-llama", seed=0)
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return models


@pytest.fixture
def head_on_mockers(docker_client: docker.DockerClient, tandem_image: str, models_dir: Path) -> Iterator[Container]:
    """ROLE=head on configs/mocker-8.yaml, until its HEALTHCHECK's own probe passes; removed at the end."""
    container = docker_client.containers.run(
        tandem_image,
        name="tandem-kill-test",
        detach=True,
        network_mode="none",
        environment={
            "ROLE": "head",
            "GRAPH": "graphs.agg_router:Frontend",
            "CONFIG": "configs/mocker-8.yaml",
            "VLLM_HOST_IP": "127.0.0.1",
        },
        volumes={str(models_dir): {"bind": "/models", "mode": "ro"}},
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while container.exec_run(["/app/entrypoints/healthcheck.sh"]).exit_code != 0:
            container.reload()
            if container.status != "running" or time.monotonic() > deadline:
                logs = container.logs(tail=80).decode(errors="replace")
                raise AssertionError(f"the head did not come up ({container.status}):\n{logs}")
            time.sleep(2)
        yield container
    finally:
        container.remove(force=True, v=True)


def _in_cgroup_of(container_id: str) -> dict[int, psutil.Process]:
    """The host's live processes whose cgroup names the container (cgroupfs: /docker/ID; systemd:
    docker-ID.scope)."""
    found = {}
    for process in psutil.process_iter():
        try:
            if container_id in Path(f"/proc/{process.pid}/cgroup").read_text() and _alive(process):
                found[process.pid] = process
        except (OSError, psutil.Error):
            pass
    return found


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a zombie holds no memory and no device, only its exit status)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return "(gone since)"


def _left(seen: dict[int, psutil.Process], container_id: str) -> dict[int, psutil.Process]:
    """Of the processes seen before the kill, and of those in the container's cgroup now, the live ones."""
    return {**{pid: p for pid, p in seen.items() if _alive(p)}, **_in_cgroup_of(container_id)}


def test_no_process_of_a_container_outlives_its_main_process_killed(head_on_mockers: Container) -> None:
    container = head_on_mockers
    # Their PIDs on the host (docker top cuts the command lines short: psutil reads them whole).
    seen = {int(pid): psutil.Process(int(pid)) for pid, *_ in container.top(ps_args="-eo pid")["Processes"]}
    commands = [_command(process) for process in seen.values()]
    counts = {word: sum(word in command for command in commands) for word in EXPECTED}
    assert counts == EXPECTED, "\n".join(commands)
    in_cgroup = _in_cgroup_of(container.id)
    assert set(seen) <= set(in_cgroup), f"docker top lists {sorted(seen)}, the cgroup holds {sorted(in_cgroup)}"
    container.reload()
    main_pid = container.attrs["State"]["Pid"]
    assert "supervisord" in " ".join(seen[main_pid].cmdline())

    os.kill(main_pid, signal.SIGKILL)  # from the host, as the OOM killer or an operator would
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := _left({**seen, **in_cgroup}, container.id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"{GONE_WITHIN_S:g} s after the kill: " + "; ".join(
        f"{pid} {_command(p)}" for pid, p in left.items()
    )
    container.reload()
    assert container.status == "exited"
