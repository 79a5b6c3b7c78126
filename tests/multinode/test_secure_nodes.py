"""A secure fleet on three "hosts" (network namespaces on one bridge), run from
docs/multinode.md's "Step 1, secure" blocks as an operator types them (tests/docs/shell.py).

- node 1, `multinode-secure-node1`: `tandem infra up --secure --host <node1-ip> --export`
  (NATS and etcd with TLS and passwords, on node 1's address), its exports `eval`ed, and
  `tandem serve graphs.agg_router:Frontend` (Frontend routing in process, Processor, a decode
  VllmWorker) on configs/mocker-disagg.yaml;
- node 2, `multinode-secure-join`: copies of node 1's `ca.pem` and two password files in a
  folder of its own (the operator's copy, done here by the test), the URLs and those
  files' paths exported, and `tandem serve components.prefill_worker:PrefillWorker`;
- node 3: joins wrongly (no CA, another fleet's CA, a wrong password) and reads in plain
  text, and is refused each time.

Mocker engines (the tokenizer only), so nothing here waits for an engine to load: what is
under test is the two planes across hosts over TLS with passwords, the prefill queue
(JetStream) and discovery (etcd) among them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from app.launch import pki
from app.protocol import InstanceRecord
from app.runtime import Runtime
from app.settings import RuntimeSettings
from tests.docs.blocks import REPO, doc_blocks
from tests.docs.shell import DocShell, sse_data, user_environment
from tests.netns import Fabric, Node
from tests.waiting import wait_healthy

# Root for the network namespaces: tests/multinode/conftest.py skips the tier without it, or fails it under CI.
pytestmark = pytest.mark.e2e

NODE1_BLOCK, JOIN_BLOCK = doc_blocks("multinode-secure-node1", "multinode-secure-join")
CONFIG = yaml.safe_load((REPO / "configs" / "mocker-disagg.yaml").read_text())  # the one the blocks serve
MODEL = CONFIG["Common"]["served-model-name"]
MAX_LOCAL_PREFILL = CONFIG["VllmWorker"]["max-local-prefill-length"]
FRONTEND_PORT = CONFIG["Frontend"]["port"]
NATS_MONITOR = "http://127.0.0.1:8222"  # node 1's NATS monitor: loopback only when secure
# The shipped config's replicas (4 decode, 2 routers, 4 prefill) cut to one each: their
# number proves nothing here, and each is a Python process on two shared cores.
HEAD_ONLY_ONE = ("--VllmWorker.ServiceArgs.workers=1", "--Router.ServiceArgs.workers=1")
PREFILL_ONLY_ONE = ("--PrefillWorker.ServiceArgs.workers=1",)
# What an operator copies from node 1's .state/secure/ to every other node (docs/security.md).
COPIED = ("ca.pem", "nats-password", "etcd-password")
# What `tandem infra up --secure --export` exports (docs/security.md, "The variables").
SECURE_VARIABLES = (
    "NATS_SERVER",
    "NATS_PASSWORD_FILE",
    "NATS_TLS_CA",
    "ETCD_ENDPOINTS",
    "ETCD_USER",
    "ETCD_PASSWORD_FILE",
    "ETCD_TLS_CA",
)
START_TIMEOUT_S = 120.0
# A refusal must come well before the default TANDEM_CONNECT_TIMEOUT_S (60 s) of retries.
REFUSED_WITHIN_S = 30.0
# Far over max-local-prefill-length (512) tokens of the tiny model's tokenizer (about 10 a word).
LONG_PROMPT = " ".join(f"ruin{i}-{uuid.uuid5(uuid.NAMESPACE_OID, str(i)).hex[:6]}" for i in range(150))


@dataclass
class SecureFleet:
    """Node 1 (NATS, etcd, the head's graph), node 2 (a PrefillWorker), node 3 (joins wrongly)."""

    fabric: Fabric
    workdir: Path

    def __post_init__(self) -> None:
        self.head, self.prefill_node, self.outsider = self.fabric.nodes
        self.shells = {node.name: self._shell(node) for node in self.fabric.nodes}
        self._infra_started = False

    def node_dir(self, node: Node) -> Path:
        return self.workdir / node.name

    def _shell(self, node: Node) -> DocShell:
        """A terminal on `node`, in a working directory of its own where `.venv`, `configs` and
        the tokenizer at the config's `models/tiny-llama` are the repository's (the session's)."""
        directory = self.node_dir(node)
        (directory / "models").mkdir(parents=True)
        for name in (".venv", "configs"):
            (directory / name).symlink_to(REPO / name)
        # docs/multinode.md runs `tandem` "with .venv/bin on PATH".
        env = user_environment(PATH=f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}")
        placeholders = {"node1-ip": self.head.ip, "this-node-ip": node.ip}
        return DocShell(
            self.workdir / f"{node.name}-logs", cwd=directory, env=env, placeholders=placeholders, node=node
        )

    def shell(self, node: Node) -> DocShell:
        return self.shells[node.name]

    @property
    def exports(self) -> dict[str, str]:
        """The seven variables node 1's shell holds after `eval "$(tandem infra up --secure ...)"`."""
        env = self.shell(self.head).env
        return {name: env[name] for name in SECURE_VARIABLES}

    @property
    def settings(self) -> RuntimeSettings:
        """How the test (on the host, through the bridge) reaches the fleet: as node 1 does."""
        e = self.exports
        return RuntimeSettings(
            nats_server=e["NATS_SERVER"],
            nats_password_file=e["NATS_PASSWORD_FILE"],
            nats_tls_ca=e["NATS_TLS_CA"],
            etcd_endpoints=e["ETCD_ENDPOINTS"],
            etcd_user=e["ETCD_USER"],
            etcd_password_file=e["ETCD_PASSWORD_FILE"],
            etcd_tls_ca=e["ETCD_TLS_CA"],
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.head.ip}:{FRONTEND_PORT}"

    def copy_secrets(self, node: Node) -> Path:
        """The operator's copy of node 1's three files into `node`'s `secrets/` (0700, files 0600)."""
        source = Path(self.exports["NATS_TLS_CA"]).parent
        target = self.node_dir(node) / "secrets"
        target.mkdir(mode=0o700)
        for name in COPIED:
            shutil.copyfile(source / name, target / name)
            (target / name).chmod(0o600)
        return target

    async def start(self) -> None:
        head = self.shell(self.head)
        export_address, infra_up, serve = NODE1_BLOCK.expect("export", "eval", "tandem serve")
        head.run(export_address)
        self._infra_started = True  # even if `up` fails half-way, `infra down` stops what it started
        head.run(infra_up, timeout=120)
        head.start(serve.with_arguments(*HEAD_ONLY_ONE))

        self.copy_secrets(self.prefill_node)
        *exports, join = JOIN_BLOCK.expect(*(["export"] * 8), "tandem serve")
        node2 = self.shell(self.prefill_node)
        for command in exports:
            node2.run(command)
        node2.start(join.with_arguments(*PREFILL_ONLY_ONE))

        await self.wait_serving("VllmWorker", "generate", self.head)
        await self.wait_serving("PrefillWorker", "status", self.prefill_node)
        await wait_healthy(f"{self.base_url}/health", START_TIMEOUT_S, self.assert_running, self.log_tails)

    def stop(self) -> None:
        with ThreadPoolExecutor(len(self.shells)) as pool:
            list(pool.map(DocShell.stop_all, self.shells.values()))
        if self._infra_started:
            self.shell(self.head).check("tandem infra down", timeout=120)

    async def instances(self, service: str, endpoint: str) -> dict[str, InstanceRecord]:
        async with await Runtime.connect(self.settings) as runtime:
            watch = await runtime.discovery.watch_instances(service, endpoint)
            try:
                return dict(watch.items)
            finally:
                await watch.close()

    async def wait_serving(self, service: str, endpoint: str, node: Node) -> None:
        """Until an instance of `service` records `node`'s address in etcd."""
        deadline = time.monotonic() + START_TIMEOUT_S
        async with await Runtime.connect(self.settings) as runtime:
            watch = await runtime.discovery.watch_instances(service, endpoint)
            try:
                while True:
                    self.assert_running()
                    try:
                        await watch.wait_until(lambda items: any(r.host == node.ip for r in items.values()), 2.0)
                        return
                    except TimeoutError:
                        assert time.monotonic() < deadline, f"no {service} on {node.name}\n{self.log_tails()}"
            finally:
                await watch.close()

    def nats_connections(self) -> list[dict]:
        """NATS's open client connections, from its monitor on node 1's loopback (with their users)."""
        result = self.head.run(["curl", "-sf", "--max-time", "5", f"{NATS_MONITOR}/connz?auth=true"], check=True)
        return json.loads(result.stdout).get("connections") or []

    def assert_running(self) -> None:
        for shell in self.shells.values():
            shell.assert_running()

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(shell.background_tails(lines) for shell in self.shells.values())


@pytest.fixture(scope="module")
async def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecureFleet]:
    with Fabric(3) as fabric:
        secure = SecureFleet(fabric, tmp_path_factory.mktemp("secure-fleet"))
        for node in fabric.nodes:
            (secure.node_dir(node) / "models" / "tiny-llama").symlink_to(tiny_model)
        try:
            await secure.start()
            yield secure
        finally:
            secure.stop()


# --- the tests ----------------------------------------------------------------------------


def test_node_1_exports_tls_urls_on_its_own_address_and_its_own_files(fleet: SecureFleet) -> None:
    secure_dir = fleet.node_dir(fleet.head) / ".state" / "secure"
    assert fleet.exports == {
        "NATS_SERVER": f"tls://tandem@{fleet.head.ip}:4222",
        "NATS_PASSWORD_FILE": str(secure_dir / "nats-password"),
        "NATS_TLS_CA": str(secure_dir / "ca.pem"),
        "ETCD_ENDPOINTS": f"https://{fleet.head.ip}:2379",
        "ETCD_USER": "tandem",
        "ETCD_PASSWORD_FILE": str(secure_dir / "etcd-password"),
        "ETCD_TLS_CA": str(secure_dir / "ca.pem"),
    }
    # Node 2 runs on its copies, not on node 1's files.
    node2 = fleet.shell(fleet.prefill_node).env
    assert Path(node2["NATS_TLS_CA"]) == fleet.node_dir(fleet.prefill_node) / "secrets" / "ca.pem"
    assert Path(node2["ETCD_PASSWORD_FILE"]).read_bytes() == (secure_dir / "etcd-password").read_bytes()


async def test_a_long_prompt_sent_to_node_1_is_prefilled_on_node_2_over_tls(fleet: SecureFleet) -> None:
    prefill_workers = await fleet.instances("PrefillWorker", "status")
    on_node_2 = {instance for instance, record in prefill_workers.items() if record.host == fleet.prefill_node.ip}
    assert on_node_2, prefill_workers

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "stream": True,
        "max_tokens": 8,
        "ignore_eos": True,
    }
    async with (
        httpx.AsyncClient(base_url=fleet.base_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        text = (await response.aread()).decode()
    assert response.status_code == 200, text
    assert response.headers["content-type"].startswith("text/event-stream")
    # The decode worker on node 1 sent the prompt through the JetStream prefill queue to
    # node 2's PrefillWorker, which it found in etcd (docs/multinode-quickstart.md: the header).
    assert response.headers.get("x-tandem-prefill-worker") in on_node_2, dict(response.headers)
    events = list(sse_data(text))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    tokens = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"] and c["choices"][0]["delta"]]
    assert len([t for t in tokens if t]) >= 1, chunks

    # Every process on nodes 1 and 2 holds a TLS connection to NATS as the fleet's user.
    connections = [c for c in fleet.nats_connections() if c["ip"] in (fleet.head.ip, fleet.prefill_node.ip)]
    assert {c["ip"] for c in connections} == {fleet.head.ip, fleet.prefill_node.ip}, connections
    assert all(c.get("tls_version") and c.get("authorized_user") == "tandem" for c in connections), connections


@dataclass(frozen=True)
class WrongJoin:
    what: str
    changes: dict[str, str | None]  # variable -> value (None: unset)
    error: str  # how the message begins, after "error: "


def _wrong_joins(fleet: SecureFleet, secrets: Path, other_ca: Path) -> list[WrongJoin]:
    nats, etcd = fleet.exports["NATS_SERVER"], fleet.exports["ETCD_ENDPOINTS"]
    wrong_password = secrets / "wrong-password"
    return [
        WrongJoin(
            "no CA for NATS (the system's CAs)",
            {"NATS_TLS_CA": None},
            f"NATS at {nats} presented a certificate this process does not trust",
        ),
        WrongJoin(
            "another fleet's CA for etcd",
            {"ETCD_TLS_CA": str(other_ca)},
            f"etcd at {etcd} presented a certificate this process does not trust",
        ),
        WrongJoin(
            "a wrong NATS password",
            {"NATS_PASSWORD_FILE": str(wrong_password)},
            f"NATS at {nats} rejected the credentials",
        ),
        WrongJoin(
            "a wrong etcd password",
            {"ETCD_PASSWORD_FILE": str(wrong_password)},
            f"etcd at {etcd} rejected the credentials",
        ),
    ]


async def test_a_node_without_the_ca_or_with_a_wrong_password_is_refused_at_once(fleet: SecureFleet) -> None:
    node3, shell = fleet.outsider, fleet.shell(fleet.outsider)
    secrets = fleet.copy_secrets(node3)
    pki.write_private(secrets / "wrong-password", b"not-the-password\n")
    other_ca = fleet.workdir / "another-fleet" / "ca.pem"
    pki.ensure_ca(other_ca, other_ca.with_name("ca-key.pem"))
    *exports, join = JOIN_BLOCK.commands
    for command in exports:
        shell.run(command)
    serve = join.substituted(shell.placeholders)  # as written: it must stop before it starts anything

    def attempt(wrong: WrongJoin) -> tuple[subprocess.CompletedProcess[str], float]:
        env = {**shell.env, **{k: v for k, v in wrong.changes.items() if v is not None}}
        for name in (k for k, v in wrong.changes.items() if v is None):
            env.pop(name)
        started = time.monotonic()
        done = node3.run(["bash", "-c", serve.text], env=env, cwd=fleet.node_dir(node3), timeout=120)
        return done, time.monotonic() - started

    wrong_joins = _wrong_joins(fleet, secrets, other_ca)
    with ThreadPoolExecutor(len(wrong_joins)) as pool:
        results = list(pool.map(attempt, wrong_joins))

    for wrong, (done, took) in zip(wrong_joins, results, strict=True):
        output = done.stdout + done.stderr
        assert done.returncode == 1, f"{wrong.what}: exit {done.returncode}\n{output}"
        assert f"error: {wrong.error}" in done.stderr, f"{wrong.what}:\n{output}"
        assert "nothing started" in done.stderr, f"{wrong.what}:\n{output}"
        assert took < REFUSED_WITHIN_S, f"{wrong.what}: refused after {took:.0f} s"
    # Nothing of node 3's was registered, nor is still connected.
    records = await fleet.instances("PrefillWorker", "status")
    assert not [record for record in records.values() if record.host == node3.ip], records
    assert not [c for c in fleet.nats_connections() if c["ip"] == node3.ip]


# Run on node 3: a NATS client in plain text (CONNECT and SUB > written before any TLS
# handshake), and one with the CA but no password; what each got, as JSON.
PLAIN_NATS_PROBE = """
import asyncio, json, socket, ssl, sys
import nats
host, ca = sys.argv[1], sys.argv[2]
plain = socket.create_connection((host, 4222), timeout=5)
info = plain.recv(4096)
plain.sendall(b'CONNECT {"verbose":false,"pedantic":false}\\r\\nSUB > 1\\r\\nPING\\r\\n')
answer = b""
try:
    while chunk := plain.recv(4096):
        answer += chunk
except OSError as exc:
    answer += repr(exc).encode()
async def without_password():
    try:
        await nats.connect(f"tls://{host}:4222", tls=ssl.create_default_context(cafile=ca),
                           allow_reconnect=False, connect_timeout=5)
        return "connected"
    except Exception as exc:
        return repr(exc)
print(json.dumps({"info": info.decode(errors="replace"), "answer": answer.decode(errors="replace"),
                  "without_password": asyncio.run(without_password())}))
"""


def test_plain_text_clients_on_node_3_can_neither_read_nor_subscribe(fleet: SecureFleet) -> None:
    node3, head_ip = fleet.outsider, fleet.head.ip
    ca = fleet.exports["NATS_TLS_CA"]

    probe = node3.run([sys.executable, "-c", PLAIN_NATS_PROBE, head_ip, ca], timeout=60, check=True)
    got = json.loads(probe.stdout)
    assert '"tls_required":true' in got["info"] and '"auth_required":true' in got["info"], got
    # No PONG, no MSG: the server closed the connection on the first plain-text byte.
    assert "PONG" not in got["answer"] and "MSG" not in got["answer"], got
    assert "Authorization Violation" in got["without_password"], got

    etcdctl = [str(REPO / ".venv" / "bin" / "etcdctl"), "--command-timeout=5s", "--dial-timeout=3s"]
    secure_get = [*etcdctl, f"--endpoints=https://{head_ip}:2379", f"--cacert={ca}", "get", "--prefix", "/tandem/"]
    # With the CA and the fleet's password, node 3 reads the fleet's records: the refusals
    # below are about what the client lacks, not an empty store or an unreachable one.
    password = Path(fleet.exports["ETCD_PASSWORD_FILE"]).read_text().strip()
    fleet_user = node3.run([*secure_get, "--keys-only"], env=user_environment(ETCDCTL_USER=f"tandem:{password}"))
    assert fleet_user.returncode == 0 and "/tandem/" in fleet_user.stdout, fleet_user
    plain = node3.run([*etcdctl, f"--endpoints=http://{head_ip}:2379", "get", "--prefix", "/tandem/"], timeout=60)
    assert plain.returncode != 0 and "/tandem/" not in plain.stdout, plain
    no_user = node3.run(secure_get, env=user_environment(), timeout=60)
    assert no_user.returncode != 0 and "user name is empty" in no_user.stderr, no_user
