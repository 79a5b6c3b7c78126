"""The appliance's head node, secure, as an operator runs it (docs/appliance.md's
`appliance-cpu-secure` block, run as written): `make secrets HEAD_IP=127.0.0.1` (the fleet's
CA, certificates and passwords, written by the image's `tandem infra secrets`), env/common.env
switched to its secure block, `make head ENGINE=cpu SECURE=1` (compose with
compose/secure.yml: the head's bundle mounted read-only at /run/secrets), the block's curl,
and `make down ENGINE=cpu SECURE=1` at the end.

The head runs the shipped mocker config (`TANDEM_CPU_CONFIG=configs/mocker-8.yaml`, the
compose file's knob: NATS, etcd and `tandem serve` with 8 mocker VllmWorkers), so nothing
waits for an engine to load. From this machine, as any other host on the network would:
NATS on 4222 refuses a client without the password, one that does not trust the CA and one
in plain text; etcd on 2379 refuses one without credentials; the container is healthy by
its own HEALTHCHECK, and no password shows on a command line in it.

The image is the session's (tests/appliance/conftest.py builds it once per run); the
containers use the host network, so the block's fixed ports must be free.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import nats
import pytest

from app.model.tiny import make_tiny
from tests.appliance.conftest import REPO_ROOT, cache_dir
from tests.appliance.docker_engine import DockerEngine
from tests.docs.blocks import doc_block
from tests.docs.shell import DocShell, sse_data, user_environment

pytestmark = pytest.mark.appliance

MAKE_SECRETS, MAKE_HEAD, CURL, MAKE_DOWN = doc_block("appliance-cpu-secure").expect(
    "make secrets", "make head", "curl", "make down"
)
HEAD_CONTAINER = "tandem-head"
HEAD_IP = "127.0.0.1"  # the block's <head-ip>: this machine, whose network the containers share
CONFIG = "configs/mocker-8.yaml"
MODEL = "tiny-llama"
FRONTEND_PORT, NATS_PORT, ETCD_PORT = 8000, 4222, 2379
# What the head binds on this machine's network at their defaults (NATS's monitor, 8222, on loopback).
FIXED_PORTS = (FRONTEND_PORT, NATS_PORT, 8222, ETCD_PORT, 2380)
START_TIMEOUT_S = 300
ETCDCTL = [str(REPO_ROOT / ".venv" / "bin" / "etcdctl"), "--command-timeout=5s", "--dial-timeout=3s"]


@dataclass(frozen=True)
class SecureHead:
    shell: DocShell
    secrets: Path  # TANDEM_SECRETS: head/, node/, authority/
    exports: dict[str, str]  # what `make secrets` printed

    @property
    def ca(self) -> Path:
        return self.secrets / "node" / "ca.pem"

    def password(self, name: str) -> str:
        return (self.secrets / "head" / name).read_text().strip()


def _secure_common_env(text: str) -> str:
    """env/common.env with its secure block switched on, as docs/security.md tells: the two
    plain URLs replaced by the block's seven lines (uncommented), HEAD_NODE_IP filled in."""
    block = text.split("# A secure fleet", 1)[1].split("# EDIT", 1)[0]
    secure = dict(line.removeprefix("# ").split("=", 1) for line in block.splitlines() if re.match(r"# [A-Z_]+=", line))
    assert {"NATS_SERVER", "ETCD_ENDPOINTS"} <= set(secure), block
    for name in ("NATS_SERVER", "ETCD_ENDPOINTS"):
        text = re.sub(rf"^{name}=.*\n", "", text, flags=re.MULTILINE)
    lines = "".join(f"{name}={value}\n" for name, value in secure.items())
    return text.rstrip() + "\n" + lines.replace("HEAD_NODE_IP", HEAD_IP)


@pytest.fixture(scope="module")
def operator_shell(
    docker_engine: DockerEngine, tandem_image: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DocShell, Path]:
    """The operator's terminal in the repository: env/ edited for a secure head on this
    machine, the mocker's tokenizer in the models folder, a secrets folder of the test's."""
    root = tmp_path_factory.mktemp("secure-appliance")
    env_dir = root / "env"
    shutil.copytree(REPO_ROOT / "env", env_dir)
    for path in env_dir.glob("*.env"):
        path.write_text(path.read_text().replace("HEAD_NODE_IP", HEAD_IP).replace("THIS_NODE_IP", HEAD_IP))
    common = env_dir / "common.env"
    common.write_text(_secure_common_env(common.read_text()))
    models = root / "models"
    make_tiny(models / MODEL, seed=0)
    # The containers run as the image's user (uid 10001): readable by all.
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    secrets = root / "secrets"
    engine = docker_engine.env()
    env = user_environment(
        DOCKER_HOST=engine["DOCKER_HOST"],
        DOCKER=engine["DOCKER"],
        IMAGE=tandem_image,
        TANDEM_DOCKER_CACHE=str(cache_dir()),
        TANDEM_ENV_DIR=str(env_dir),
        TANDEM_MODEL_CACHE=str(models),
        TANDEM_SECRETS=str(secrets),
        TANDEM_CPU_CONFIG=CONFIG,
    )
    return DocShell(root / "shell", env=env, placeholders={"head-ip": HEAD_IP}), secrets


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _logs(client: docker.DockerClient, lines: int = 80) -> str:
    try:
        return client.containers.get(HEAD_CONTAINER).logs(tail=lines).decode(errors="replace")
    except docker.errors.NotFound:
        return f"(no container {HEAD_CONTAINER})"


@pytest.fixture(scope="module")
def head(operator_shell: tuple[DocShell, Path], docker_client: docker.DockerClient) -> Iterator[SecureHead]:
    """The block's `make secrets` and `make head`, until the model is served; its `make down` at the end."""
    shell, secrets = operator_shell
    if in_use := [port for port in FIXED_PORTS if not _port_is_free(port)]:
        pytest.fail(f"the block's head binds these ports, in use on this machine now: {in_use}")
    printed = shell.run(MAKE_SECRETS, timeout=120)
    exports = dict(line.split("=", 1) for line in printed.splitlines() if re.match(r"^[A-Z_]+=", line))
    shell.run(MAKE_HEAD, timeout=300)
    try:
        _wait_for_model(docker_client)
        yield SecureHead(shell, secrets, exports)
    finally:
        # SIGTERM: supervisord drains the Tandem programs, then stops etcd and NATS.
        shell.run(MAKE_DOWN, timeout=900)
        assert not docker_client.containers.list(all=True), "make down left containers behind"
        # The head's NATS and etcd data (etcd with auth on): the next head starts from nothing.
        for volume in docker_client.volumes.list():
            volume.remove(force=True)


def _wait_for_model(client: docker.DockerClient) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        container = client.containers.get(HEAD_CONTAINER)
        if container.status == "exited" or container.attrs["RestartCount"] > 0:
            break  # the entrypoint refused, supervisord gave up, or the container restarts
        try:
            models = httpx.get(f"http://{HEAD_IP}:{FRONTEND_PORT}/v1/models", timeout=5).json()
            if any(model["id"] == MODEL for model in models.get("data", [])):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(2)
    raise AssertionError(f"the secure head did not serve {MODEL} within {START_TIMEOUT_S}s:\n{_logs(client)}")


# --- the tests ----------------------------------------------------------------------------


def test_make_secrets_prints_the_exports_of_a_secure_node(head: SecureHead) -> None:
    assert head.exports == {
        "NATS_SERVER": f"tls://tandem@{HEAD_IP}:{NATS_PORT}",
        "NATS_PASSWORD_FILE": "/run/secrets/nats-password",
        "NATS_TLS_CA": "/run/secrets/ca.pem",
        "ETCD_ENDPOINTS": f"https://{HEAD_IP}:{ETCD_PORT}",
        "ETCD_USER": "tandem",
        "ETCD_PASSWORD_FILE": "/run/secrets/etcd-password",
        "ETCD_TLS_CA": "/run/secrets/ca.pem",
    }


def test_the_blocks_curl_streams_a_chat_completion_on_port_8000(head: SecureHead) -> None:
    events = list(sse_data(head.shell.run(CURL)))
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(event) for event in events[:-1]]
    pieces = [chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]]
    assert sum(1 for piece in pieces if piece) > 1, chunks


def _plain_text_nats_answer() -> bytes:
    """What NATS answers a client that writes CONNECT and SUB > in plain text after its INFO."""
    with socket.create_connection((HEAD_IP, NATS_PORT), timeout=5) as plain:
        info = plain.recv(4096)
        assert b'"tls_required":true' in info, info
        plain.sendall(b'CONNECT {"verbose":false}\r\nSUB > 1\r\nPING\r\n')
        answer = b""
        try:
            while chunk := plain.recv(4096):
                answer += chunk
        except OSError as exc:
            answer += repr(exc).encode()
        return answer


async def test_nats_refuses_clients_without_the_password_the_ca_or_tls(head: SecureHead) -> None:
    trusting = ssl.create_default_context(cafile=str(head.ca))
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(f"tls://{HEAD_IP}:{NATS_PORT}", tls=trusting, allow_reconnect=False, connect_timeout=5)
    password = head.password("nats-password")
    with pytest.raises(ssl.SSLCertVerificationError):
        await nats.connect(f"tls://tandem:{password}@{HEAD_IP}:{NATS_PORT}", allow_reconnect=False, connect_timeout=5)
    answer = await asyncio.to_thread(_plain_text_nats_answer)
    assert b"PONG" not in answer and b"MSG" not in answer, answer
    # The fleet's user, with the CA: let in (what every node of the fleet does).
    fleet = await nats.connect(
        f"tls://tandem:{password}@{HEAD_IP}:{NATS_PORT}", tls=trusting, allow_reconnect=False, connect_timeout=5
    )
    await fleet.close()


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env or user_environment(), capture_output=True, text=True, timeout=60)


def test_etcd_refuses_clients_without_credentials(head: SecureHead) -> None:
    secure_get = [*ETCDCTL, f"--endpoints=https://{HEAD_IP}:{ETCD_PORT}", f"--cacert={head.ca}", "get", "--prefix"]
    # The fleet's user reads the head's records under /tandem/: the refusals below are about the client.
    fleet_user = user_environment(ETCDCTL_USER=f"tandem:{head.password('etcd-password')}")
    records = _run([*secure_get, "--keys-only", "/tandem/"], fleet_user)
    assert records.returncode == 0 and "/tandem/" in records.stdout, records
    anonymous = _run([*secure_get, "/tandem/"], user_environment())
    assert anonymous.returncode != 0 and "user name is empty" in anonymous.stderr, anonymous
    plain = _run([*ETCDCTL, f"--endpoints=http://{HEAD_IP}:{ETCD_PORT}", "get", "--prefix", "/tandem/"])
    assert plain.returncode != 0 and "/tandem/" not in plain.stdout, plain
    # The fleet's user is confined to Tandem's prefix.
    elsewhere = _run([*secure_get, "/"], fleet_user)
    assert elsewhere.returncode != 0 and "permission denied" in elsewhere.stderr, elsewhere


async def test_the_secure_head_is_healthy_and_shows_no_password_on_a_command_line(
    head: SecureHead, docker_client: docker.DockerClient
) -> None:
    container = docker_client.containers.get(HEAD_CONTAINER)
    # The image's HEALTHCHECK (every program RUNNING; NATS, etcd over TLS and the Frontend
    # answering); compose's interval is 10 s.
    deadline = time.monotonic() + 90
    while container.attrs["State"]["Health"]["Status"] != "healthy" and time.monotonic() < deadline:
        await asyncio.sleep(2)
        container.reload()
    health = container.attrs["State"]["Health"]
    assert health["Status"] == "healthy", health["Log"][-3:]
    status = container.exec_run(["supervisorctl", "-c", "/tmp/tandem-supervisor/supervisord.conf", "status"])
    programs = {line.split()[0]: line.split()[1] for line in status.output.decode().splitlines() if line.strip()}
    # etcd-auth turned etcd's authentication on, once, and exited.
    expected = {"nats": "RUNNING", "etcd": "RUNNING", "etcd-auth": "EXITED", "tandem-graph": "RUNNING"}
    assert {name: programs.get(name) for name in expected} == expected, programs

    passwords = [head.password(name) for name in ("nats-password", "etcd-password", "etcd-root-password")]
    top = container.top()  # `ps -ef` on the host, of the container's processes: CMD is the whole command line
    command_lines = [process[top["Titles"].index("CMD")] for process in top["Processes"]]
    assert len(command_lines) > 10, top  # the servers, supervisord, every service's process
    assert not [line for line in command_lines if any(password in line for password in passwords)]
