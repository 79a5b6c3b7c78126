"""The appliance tier's shared pieces: a private Docker engine and the CPU image, built once
per test run.

Cold (a fresh machine) the tier installs docker.io, docker-compose and debootstrap, makes
the Debian base with debootstrap and builds the image from nothing. What is expensive is
kept in TANDEM_DOCKER_CACHE (default ~/.cache/tandem-docker): the base's root filesystem
tarball and the engine's data root, whose build cache and pip cache make the next run's
build a few seconds unless the lock or the code changed. Delete that folder to start cold.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.appliance.docker_engine import DockerEngine, DockerEngineError, install_missing_packages

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = "tandem:appliance-test"
BUILD_TIMEOUT_S = 3600


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem-docker"
    return Path(os.environ.get("TANDEM_DOCKER_CACHE") or default)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """This run's own dockerd, on the cached data root; stopped by PID at the end."""
    try:
        install_missing_packages()
    except DockerEngineError as exc:
        pytest.fail(str(exc))
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # One engine per data root: a second test run on this machine waits for the first.
    with (cache / "engine.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Short: the exec root holds containerd's unix sockets (108-byte path limit).
        run_dir = Path(tempfile.mkdtemp(prefix="tdk-", dir="/tmp"))
        engine = DockerEngine(cache / "data-root", run_dir)
        saved = {name: os.environ.get(name) for name in ("DOCKER_HOST", "TESTCONTAINERS_RYUK_DISABLED")}
        try:
            engine.start()
            # testcontainers and docker-py read these; Ryuk would need a bridge network.
            os.environ["DOCKER_HOST"] = engine.host
            os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
            _remove_all_containers(engine)  # a run killed before its teardown left them
            yield engine
        except DockerEngineError as exc:
            pytest.fail(str(exc))
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            engine.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


def _remove_all_containers(engine: DockerEngine) -> None:
    client = docker.DockerClient(base_url=engine.host)
    try:
        for container in client.containers.list(all=True):
            container.remove(force=True, v=True)
    finally:
        client.close()


@pytest.fixture(scope="session")
def tandem_image(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CPU image, built once per run by scripts/docker-build.sh (what `make build ENGINE=cpu` runs)."""
    log_path = tmp_path_factory.mktemp("image") / "build.log"
    env = {**docker_engine.env(), "TANDEM_DOCKER_CACHE": str(cache_dir())}
    with log_path.open("w") as log:
        result = subprocess.run(
            [str(REPO_ROOT / "scripts" / "docker-build.sh"), "cpu", IMAGE],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
        )
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
        pytest.fail(f"docker-build.sh cpu failed ({result.returncode}); last lines of {log_path}:\n{tail}")
    return IMAGE


@pytest.fixture(scope="session")
def docker_client(docker_engine: DockerEngine) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=docker_engine.host)
    try:
        yield client
    finally:
        client.close()
