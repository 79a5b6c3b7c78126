"""The container entrypoint: ROLE -> exactly that role's supervisord programs, fail fast otherwise."""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import etcd3aio
import grpc.aio
import nats
import psutil
import pytest
import yaml

from app.infra import write_appliance_secrets
from app.launch.ports import free_port
from app.protocol.names import ETCD_ROOT
from app.runtime.connect import check_reachable
from app.settings import RuntimeSettings
from tests.waiting import answers_200

REPO_ROOT = Path(__file__).resolve().parents[3]
ENTRYPOINT = REPO_ROOT / "entrypoints" / "entrypoint.sh"
CONFIG = str(REPO_ROOT / "configs" / "cpu-tiny.yaml")
# Variables the entrypoint reads; the test controls each of them.
ENTRYPOINT_VARS = (
    "ROLE",
    "CONFIG",
    "GRAPH",
    "NATS_SERVER",
    "ETCD_ENDPOINTS",
    "RAY_ADDRESS",
    "VLLM_HOST_IP",
    "ETCD_ADVERTISE_HOST",
    "NATS_PORT",
    "ETCD_PORT",
    "FRONTEND_SERVICES",
    "TANDEM_RUN_DIR",
    "TANDEM_DATA_DIR",
    "RAY_START_ARGS",
    "RAY_CPU_WORKERS",
    "TANDEM_ADVERTISE_HOST",
    "VLLM_NIXL_SIDE_CHANNEL_HOST",
    "TANDEM_SECRETS_DIR",
    "NATS_PASSWORD_FILE",
    "NATS_TOKEN_FILE",
    "NATS_CREDS_FILE",
    "NATS_TLS_CA",
    "NATS_TLS_CERT",
    "NATS_TLS_KEY",
    "ETCD_USER",
    "ETCD_PASSWORD_FILE",
    "ETCD_TLS_CA",
    "ETCD_TLS_CERT",
    "ETCD_TLS_KEY",
)
# Where no secrets are mounted (the plain fleet): not the default /run/secrets, which a test
# machine might have.
NO_SECRETS = "/nonexistent/tandem-secrets"
REMOTE = {
    "CONFIG": CONFIG,
    "NATS_SERVER": "nats://10.0.0.1:4222",
    "ETCD_ENDPOINTS": "http://10.0.0.1:2379",
    "VLLM_HOST_IP": "10.0.0.2",
}
HEAD = {"CONFIG": CONFIG, "VLLM_HOST_IP": "10.0.0.1"}


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENTRYPOINT_VARS}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TANDEM_PYTHON"] = sys.executable
    env["TANDEM_SECRETS_DIR"] = NO_SECRETS
    env.update(values)
    return env


def _entrypoint(*args: str, **values: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args],
        env=_env(**values),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _programs(**values: str) -> dict[str, dict[str, str]]:
    result = _entrypoint("--dry-run", **values)
    assert result.returncode == 0, result.stderr
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=(";",))
    parser.read_string(result.stdout)
    assert parser.has_section("supervisord") and parser["supervisord"]["nodaemon"] == "true"
    return {
        section.removeprefix("program:"): dict(parser[section])
        for section in parser.sections()
        if section.startswith("program:")
    }


@pytest.mark.parametrize(
    ("role", "values", "expected"),
    [
        ("nats", {}, {"nats": "nats-server -js -sd /data/nats -p 4222 -m 8222"}),
        ("etcd", {"VLLM_HOST_IP": "10.0.0.1"}, {"etcd": "etcd --name tandem"}),
        (
            "head",
            HEAD,
            {
                "nats": "nats-server",
                "etcd": "etcd",
                "tandem-graph": f"tandem serve graphs.agg_router:Frontend -f {CONFIG}",
            },
        ),
        (
            "frontend",
            REMOTE,
            {
                "tandem-frontend": f"tandem serve graphs.agg_router:Frontend -f {CONFIG} --service-name Frontend",
                "tandem-processor": "--service-name Processor",
            },
        ),
        (
            "decode",
            REMOTE,
            {"tandem-decode": f"tandem serve components.worker:VllmWorker -f {CONFIG} --service-name VllmWorker"},
        ),
        ("prefill", REMOTE, {"tandem-prefill": f"tandem serve components.prefill_worker:PrefillWorker -f {CONFIG}"}),
        ("ray-head", {"VLLM_HOST_IP": "10.0.0.1"}, {"ray": "tandem ray head --port=6379 --node-ip-address=10.0.0.1"}),
        (
            "ray-head",
            {**REMOTE, "GRAPH": "graphs.agg:Frontend"},
            {"ray": "tandem ray head", "tandem-graph": "tandem serve graphs.agg:Frontend"},
        ),
        (
            "ray-worker",
            {"VLLM_HOST_IP": "10.0.0.2", "RAY_ADDRESS": "10.0.0.1:6379"},
            {"ray": "tandem ray worker --address=10.0.0.1:6379 --node-ip-address=10.0.0.2"},
        ),
        (
            "ray-worker",
            {
                "VLLM_HOST_IP": "10.0.0.2",
                "RAY_ADDRESS": "10.0.0.1:6379",
                "RAY_CPU_WORKERS": "2",
                "RAY_START_ARGS": "--num-cpus=1",
            },
            {
                "ray": "tandem ray worker --address=10.0.0.1:6379 --node-ip-address=10.0.0.2 "
                "--cpu-workers=2 -- --num-cpus=1"
            },
        ),
        (
            "all",
            HEAD,
            {
                "nats": "nats-server",
                "etcd": "etcd",
                "tandem-graph": "tandem serve graphs.agg_router:Frontend",
                "tandem-prefill": "tandem serve components.prefill_worker:PrefillWorker",
            },
        ),
        (
            "head,ray-head",
            HEAD,
            {"nats": "nats-server", "etcd": "etcd", "tandem-graph": "tandem serve", "ray": "tandem ray head"},
        ),
    ],
)
def test_each_role_runs_exactly_its_programs(role: str, values: dict[str, str], expected: dict[str, str]) -> None:
    programs = _programs(ROLE=role, **values)
    assert set(programs) == set(expected)
    for name, fragment in expected.items():
        assert fragment in programs[name]["command"], programs[name]["command"]


def test_tandem_programs_stop_before_the_infrastructure_they_need() -> None:
    programs = _programs(ROLE="all,ray-head", **HEAD)
    priority = {name: int(p["priority"]) for name, p in programs.items()}
    # supervisord stops the highest priority first and waits for it before the next.
    assert priority["tandem-graph"] > priority["tandem-prefill"] > priority["ray"] > priority["etcd"]
    assert priority["etcd"] == priority["nats"]
    assert all(p["stopsignal"] == "TERM" for p in programs.values())
    assert int(programs["tandem-graph"]["stopwaitsecs"]) >= 120
    # A nested `tandem serve` supervisord must get SIGTERM alone to drain its services in order.
    assert programs["tandem-graph"]["stopasgroup"] == "false"


def test_a_frontend_node_runs_router_processes_only_where_the_config_names_them() -> None:
    """By default the Frontend routes in process, and an idle Router would still ingest
    every KV event of the fleet; a config with Router replicas (ServiceArgs.workers) gets
    them, stopped after the Processor, which stops after the Frontend."""
    assert "tandem-router" not in _programs(ROLE="frontend", **REMOTE)
    named = str(REPO_ROOT / "configs" / "mocker-8.yaml")
    programs = _programs(ROLE="frontend", **{**REMOTE, "CONFIG": named})
    assert "--service-name Router" in programs["tandem-router"]["command"]
    assert (
        int(programs["tandem-frontend"]["priority"])
        > int(programs["tandem-processor"]["priority"])
        > int(programs["tandem-router"]["priority"])
    )


def test_a_config_the_entrypoint_cannot_read_is_said_before_anything_starts(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    result = _entrypoint("--dry-run", ROLE="frontend", **{**REMOTE, "CONFIG": str(missing)})
    assert result.returncode != 0
    assert "nowhere.yaml" in result.stderr, result.stderr


def test_etcd_gets_no_etcd_variables_and_listens_on_the_node_and_loopback() -> None:
    command = _programs(ROLE="head", ETCD_ENDPOINTS="http://10.0.0.1:2379", ETCD_PORT="2479", **HEAD)["etcd"]["command"]
    assert re.match(r"env -u ETCD_ENDPOINTS -u ETCD_PORT \S*etcd --name tandem ", command), command
    assert "--advertise-client-urls http://10.0.0.1:2479" in command
    assert "--listen-client-urls http://10.0.0.1:2479,http://127.0.0.1:2479" in command


def test_head_defaults_its_own_nats_and_etcd_and_advertises_the_node_address() -> None:
    result = _entrypoint("--dry-run", ROLE="head", NATS_PORT="4333", **HEAD)
    assert "; derived: NATS_SERVER=nats://127.0.0.1:4333" in result.stdout
    assert "; derived: ETCD_ENDPOINTS=http://127.0.0.1:2379" in result.stdout
    assert "; derived: VLLM_NIXL_SIDE_CHANNEL_HOST=10.0.0.1" in result.stdout


@pytest.mark.parametrize("role", ["", "bogus", "head,bogus"])
def test_unknown_or_missing_role_fails_fast(role: str) -> None:
    result = _entrypoint("--dry-run", ROLE=role, **HEAD)
    assert result.returncode != 0
    assert "ROLE" in result.stderr and result.stdout == ""
    if role:
        assert "bogus" in result.stderr


@pytest.mark.parametrize(
    ("role", "values", "missing"),
    [
        ("decode", {**REMOTE, "CONFIG": ""}, "CONFIG"),
        ("prefill", {k: v for k, v in REMOTE.items() if k != "NATS_SERVER"}, "NATS_SERVER"),
        ("frontend", {k: v for k, v in REMOTE.items() if k != "ETCD_ENDPOINTS"}, "ETCD_ENDPOINTS"),
        ("head", {"CONFIG": CONFIG}, "VLLM_HOST_IP"),
        ("ray-worker", {"VLLM_HOST_IP": "10.0.0.2"}, "RAY_ADDRESS"),
        ("etcd", {}, "ETCD_ADVERTISE_HOST"),
        ("decode", {**REMOTE, "CONFIG": "/nonexistent/graph.yaml"}, "CONFIG='/nonexistent/graph.yaml'"),
        ("head", {**HEAD, "NATS_PORT": "42x"}, "NATS_PORT"),
        ("prefill", {**REMOTE, "VLLM_HOST_IP": "THIS_NODE_IP"}, "VLLM_HOST_IP"),
    ],
)
def test_missing_or_bad_variable_fails_fast_naming_it(role: str, values: dict[str, str], missing: str) -> None:
    started = time.monotonic()
    result = _entrypoint("--dry-run", ROLE=role, **values)
    assert result.returncode != 0
    assert missing in result.stderr
    assert time.monotonic() - started < 10


def test_shipped_env_files_work_once_the_operator_edits_them() -> None:
    env_dir = REPO_ROOT / "env"
    for role in ("head", "decode", "prefill", "ray-head", "ray-worker"):
        values = {}
        for env_file in (env_dir / "common.env", env_dir / f"{role}.env"):
            for line in env_file.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    name, _, value = line.partition("=")
                    values[name.strip()] = value.strip()
        values["CONFIG"] = CONFIG
        assert values["ROLE"] == role
        result = _entrypoint("--dry-run", **values)
        assert result.returncode != 0 and "placeholder" in result.stderr, (role, result.stderr)
        assert "VLLM_HOST_IP" in result.stderr
        edited = {
            k: v.replace("HEAD_NODE_IP", "10.0.0.1")
            .replace("RAY_HEAD_IP", "10.0.0.1")
            .replace("THIS_NODE_IP", "10.0.0.2")
            for k, v in values.items()
        }
        result = _entrypoint("--dry-run", **edited)
        assert result.returncode == 0, (role, result.stderr)


def test_other_arguments_run_as_a_command() -> None:
    result = _entrypoint("echo", "hello", ROLE="bogus")
    assert (result.returncode, result.stdout) == (0, "hello\n")


def test_nats_and_etcd_run_under_supervisord_and_stop_on_sigterm(tmp_path: Path) -> None:
    nats_monitor, etcd_port = free_port(), free_port()
    env = _env(
        ROLE="nats,etcd",
        ETCD_ADVERTISE_HOST="127.0.0.1",
        NATS_PORT=str(free_port()),
        NATS_MONITOR_PORT=str(nats_monitor),
        ETCD_PORT=str(etcd_port),
        ETCD_PEER_PORT=str(free_port()),
        ETCD_ENDPOINTS=f"http://127.0.0.1:{etcd_port}",  # must not reach etcd as a flag
        TANDEM_DATA_DIR=str(tmp_path / "data"),
        TANDEM_RUN_DIR=str(tmp_path / "run"),
    )
    proc = subprocess.Popen([str(ENTRYPOINT)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (
            answers_200(f"http://127.0.0.1:{nats_monitor}/healthz")
            and answers_200(f"http://127.0.0.1:{etcd_port}/health")
        ):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "nats and etcd not healthy under supervisord"
            time.sleep(0.1)
        assert (tmp_path / "data" / "etcd" / "member").is_dir()
        health = subprocess.run(
            [str(REPO_ROOT / "entrypoints" / "healthcheck.sh")], env=env, capture_output=True, timeout=30
        )
        assert health.returncode == 0, health.stdout + health.stderr
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    text = output.decode()
    assert "stopped: etcd" in text and "stopped: nats" in text
    assert '"name":"tandem"' in text.replace(" ", "")  # etcd's own log reached the container's stdout
    assert "unrecognized environment variable" not in text
    assert not answers_200(f"http://127.0.0.1:{etcd_port}/health")


def test_compose_files_give_each_profile_its_env_files_and_gpus_only_on_gpu_nodes() -> None:
    compose_dir = REPO_ROOT / "compose"
    roles = ("infra", "head", "frontend", "decode", "prefill", "ray-head", "ray-worker")
    gpu = yaml.safe_load((compose_dir / "docker-compose.yml").read_text())
    cpu = yaml.safe_load((compose_dir / "docker-compose.cpu.yml").read_text())
    assert gpu["version"] == cpu["version"]
    for name in roles:
        for services in (gpu["services"], cpu["services"]):
            service = services[name]
            assert service["profiles"] == [name]
            assert service["extends"] == {"file": "base.yml", "service": "tandem"}
            # The same name under docker-compose 1.29 and Compose v2 (`make logs`, `make down`).
            assert service["container_name"] == f"tandem-{name}"
            # ${TANDEM_ENV_DIR:-../env}: an edited copy of env/ or env/ itself.
            env_files = [re.sub(r"\$\{TANDEM_ENV_DIR:-([^}]*)\}", r"\1", path) for path in service["env_file"]]
            assert env_files == ["../env/common.env", f"../env/{'head' if name == 'infra' else name}.env"]
            assert all((compose_dir / path).is_file() for path in env_files)
        on_gpu = name not in ("infra", "frontend")
        assert ("deploy" in gpu["services"][name]) == on_gpu
        assert ("/dev/infiniband:/dev/infiniband" in gpu["services"][name].get("devices", [])) == on_gpu
        assert "deploy" not in cpu["services"][name] and "devices" not in cpu["services"][name]
    assert {s for s, spec in gpu["services"].items() if "metrics" in spec.get("profiles", [])} == {
        "prometheus",
        "grafana",
    }
    base = yaml.safe_load((compose_dir / "base.yml").read_text())["services"]["tandem"]
    assert base["network_mode"] == "host"
    # Unlimited memlock (RDMA) on GPU nodes only: a host without CAP_SYS_RESOURCE refuses it.
    assert all(gpu["services"][name]["ulimits"]["memlock"] == -1 for name in roles if name not in ("infra", "frontend"))
    assert all("ulimits" not in cpu["services"][name] for name in roles)


# --- the secure fleet: a secrets folder mounted at TANDEM_SECRETS_DIR ------------------------


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `tandem infra secrets DIR --host 10.0.0.1` writes (head/, node/, authority/)."""
    folder = tmp_path_factory.mktemp("secrets")
    write_appliance_secrets(folder, "10.0.0.1")
    return folder


def _passwords(folder: Path) -> list[str]:
    names = ("nats-password", "etcd-password", "etcd-root-password")
    return [(folder / name).read_text().strip() for name in names]


def test_tandem_infra_secrets_writes_owner_only_bundles_and_prints_the_exports(tmp_path: Path) -> None:
    owner = 10001 if os.getuid() == 0 else os.getuid()  # the image's user, where we may chown
    tandem = str(Path(sys.executable).parent / "tandem")
    result = subprocess.run(
        [tandem, "infra", "secrets", str(tmp_path / "s"), "--host", "10.0.0.1", "--owner", str(owner)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert dict(line.split("=", 1) for line in result.stdout.splitlines()) == {
        "NATS_SERVER": "tls://tandem@10.0.0.1:4222",
        "NATS_PASSWORD_FILE": "/run/secrets/nats-password",
        "NATS_TLS_CA": "/run/secrets/ca.pem",
        "ETCD_ENDPOINTS": "https://10.0.0.1:2379",
        "ETCD_USER": "tandem",
        "ETCD_PASSWORD_FILE": "/run/secrets/etcd-password",
        "ETCD_TLS_CA": "/run/secrets/ca.pem",
    }
    head, node = tmp_path / "s" / "head", tmp_path / "s" / "node"
    # The CA's key signs whatever the fleet trusts: it stays in authority/, mounted nowhere.
    assert (tmp_path / "s" / "authority" / "ca-key.pem").is_file()
    assert not (head / "ca-key.pem").exists()
    assert {p.name for p in node.iterdir()} == {"ca.pem", "nats-password", "etcd-password"}
    assert {"nats.pem", "etcd.pem", "etcd-token-key.pem", "etcd-root-password"} <= {p.name for p in head.iterdir()}
    for path in (head, node, *head.iterdir(), *node.iterdir()):
        assert (path.stat().st_mode & 0o777, path.stat().st_uid) == (0o700 if path.is_dir() else 0o600, owner), path
    assert _passwords(head)[:2] == [(node / n).read_text().strip() for n in ("nats-password", "etcd-password")]


def test_secure_head_runs_nats_from_a_file_etcd_over_tls_and_turns_auth_on_once(secrets: Path, tmp_path: Path) -> None:
    head, run = secrets / "head", tmp_path / "run"
    result = _entrypoint("--dry-run", ROLE="head", TANDEM_SECRETS_DIR=str(head), TANDEM_RUN_DIR=str(run), **HEAD)
    assert result.returncode == 0, result.stderr
    programs = _programs(ROLE="head", TANDEM_SECRETS_DIR=str(head), TANDEM_RUN_DIR=str(run), **HEAD)
    assert set(programs) == {"nats", "etcd", "etcd-auth", "tandem-graph"}
    assert programs["nats"]["command"].endswith(f"nats-server -c {run}/nats.conf")
    etcd = programs["etcd"]["command"]
    assert "--listen-client-urls https://10.0.0.1:2379,https://127.0.0.1:2379" in etcd
    assert f"--cert-file {head}/etcd.pem --key-file {head}/etcd-key.pem --auth-token jwt," in etcd
    auth = programs["etcd-auth"]
    assert auth["command"] == (
        f"tandem infra enable-auth --secrets {head} --endpoint 127.0.0.1:2379 --done-file {run}/etcd-auth.done"
    )
    # Runs once, after etcd starts and before the graph (which retries until auth is on).
    assert (auth["autorestart"], auth["startsecs"]) == ("false", "0")
    assert int(programs["etcd"]["priority"]) < int(auth["priority"]) < int(programs["tandem-graph"]["priority"])
    # The head's own programs dial it on loopback (in its certificate) with the folder's files.
    for line in (
        "NATS_SERVER=tls://tandem@127.0.0.1:4222",
        f"NATS_PASSWORD_FILE={head}/nats-password",
        f"NATS_TLS_CA={head}/ca.pem",
        "ETCD_ENDPOINTS=https://127.0.0.1:2379",
        "ETCD_USER=tandem",
        f"ETCD_PASSWORD_FILE={head}/etcd-password",
        f"ETCD_TLS_CA={head}/ca.pem",
    ):
        assert f"; derived: {line}\n" in result.stdout
    assert not any(password in result.stdout for password in _passwords(head))
    assert not run.exists()  # a dry run writes nothing, the NATS config included


def test_secure_nodes_join_with_the_node_bundle_and_tls_urls_only(secrets: Path) -> None:
    node = secrets / "node"
    secure_remote = {
        **REMOTE,
        "NATS_SERVER": "tls://tandem@10.0.0.1:4222",
        "ETCD_ENDPOINTS": "https://10.0.0.1:2379",
        "TANDEM_SECRETS_DIR": str(node),
    }
    result = _entrypoint("--dry-run", ROLE="prefill", **secure_remote)
    assert result.returncode == 0, result.stderr
    assert f"; derived: NATS_PASSWORD_FILE={node}/nats-password\n" in result.stdout
    assert f"; derived: ETCD_TLS_CA={node}/ca.pem\n" in result.stdout

    # Plain URLs in a secure fleet: named before any connection is tried.
    result = _entrypoint("--dry-run", ROLE="prefill", **{**secure_remote, "NATS_SERVER": "nats://10.0.0.1:4222"})
    assert result.returncode == 2
    assert "NATS_SERVER must use tls:// (e.g. tls://tandem@HEAD_NODE_IP:4222" in result.stderr
    result = _entrypoint("--dry-run", ROLE="prefill", **{**secure_remote, "ETCD_ENDPOINTS": "http://10.0.0.1:2379"})
    assert result.returncode == 2 and "ETCD_ENDPOINTS must use https://" in result.stderr
    # The node bundle cannot run the head: its server certificates and keys are not there.
    result = _entrypoint("--dry-run", ROLE="head", TANDEM_SECRETS_DIR=str(node), **HEAD)
    assert result.returncode == 2
    assert "nats.pem, nats-key.pem, etcd.pem, etcd-key.pem" in result.stderr and "head/" in result.stderr


def test_secure_nats_and_etcd_refuse_clients_without_credentials_and_serve_the_fleet(tmp_path: Path) -> None:
    """ROLE=nats,etcd with a secrets folder, under supervisord as in the container: healthy by
    healthcheck.sh, no password on any command line, anonymous clients refused, the fleet's
    exports connect."""
    secrets = tmp_path / "secrets"
    write_appliance_secrets(secrets, "127.0.0.1")
    head, run = secrets / "head", tmp_path / "run"
    nats_port, etcd_port = free_port(), free_port()
    env = _env(
        ROLE="nats,etcd",
        ETCD_ADVERTISE_HOST="127.0.0.1",
        NATS_PORT=str(nats_port),
        NATS_MONITOR_PORT=str(free_port()),
        ETCD_PORT=str(etcd_port),
        ETCD_PEER_PORT=str(free_port()),
        TANDEM_DATA_DIR=str(tmp_path / "data"),
        TANDEM_RUN_DIR=str(run),
        TANDEM_SECRETS_DIR=str(head),
    )
    proc = subprocess.Popen([str(ENTRYPOINT)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        healthcheck = [str(REPO_ROOT / "entrypoints" / "healthcheck.sh")]
        while (health := subprocess.run(healthcheck, env=env, capture_output=True, timeout=30)).returncode != 0:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, health.stdout + health.stderr
            time.sleep(0.3)
        assert (run / "nats.conf").stat().st_mode & 0o777 == 0o600
        command_lines = [_command_line(child) for child in psutil.Process(proc.pid).children(recursive=True)]
        assert any("nats-server -c" in line for line in command_lines), command_lines
        assert not any(password in line for password in _passwords(head) for line in command_lines)
        asyncio.run(_anonymous_clients_are_refused(head, nats_port, etcd_port))
        exports = {
            "NATS_SERVER": f"tls://tandem@127.0.0.1:{nats_port}",
            "NATS_PASSWORD_FILE": str(head / "nats-password"),
            "NATS_TLS_CA": str(head / "ca.pem"),
            "ETCD_ENDPOINTS": f"https://127.0.0.1:{etcd_port}",
            "ETCD_USER": "tandem",
            "ETCD_PASSWORD_FILE": str(head / "etcd-password"),
            "ETCD_TLS_CA": str(head / "ca.pem"),
            "TANDEM_CONNECT_TIMEOUT_S": "10",
        }
        with pytest.MonkeyPatch.context() as patch:
            for name, value in exports.items():
                patch.setenv(name, value)
            asyncio.run(check_reachable(RuntimeSettings()))
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    # Its exit only: supervisord logs "entered RUNNING state" for a one-shot (startsecs=0)
    # only when its main loop looks before the process ended, which a loaded machine skips.
    assert "exited: etcd-auth (exit status 0; expected)" in output.decode(), output.decode()


async def _anonymous_clients_are_refused(head: Path, nats_port: int, etcd_port: int) -> None:
    ca = ssl.create_default_context(cafile=str(head / "ca.pem"))
    try:
        await nats.connect(f"tls://127.0.0.1:{nats_port}", tls=ca, allow_reconnect=False, connect_timeout=5)
    except nats.errors.Error as exc:
        assert "Authorization Violation" in str(exc)
    else:
        raise AssertionError("NATS let a client without credentials in")
    client = etcd3aio.Etcd3Client(
        [f"127.0.0.1:{etcd_port}"], ca_cert=(head / "ca.pem").read_bytes(), tls_server_name="127.0.0.1"
    )
    await client.connect()
    try:
        assert client.kv is not None
        with pytest.raises(grpc.aio.AioRpcError, match="user name is empty"):
            await client.kv.get(ETCD_ROOT, etcd3aio.prefix_range_end(ETCD_ROOT.encode()), timeout=5)
    finally:
        await client.close()


def test_secure_compose_override_mounts_head_or_node_secrets_read_only_on_every_profile() -> None:
    compose_dir = REPO_ROOT / "compose"
    secure = yaml.safe_load((compose_dir / "secure.yml").read_text())["services"]
    # An override of either top-level file: the same services.
    for top in ("docker-compose.yml", "docker-compose.cpu.yml"):
        services = yaml.safe_load((compose_dir / top).read_text())["services"]
        assert set(secure) == {name for name, spec in services.items() if "extends" in spec}
    for name, spec in secure.items():
        bundle = "head" if name in ("head", "infra") else "node"
        assert spec == {"volumes": [f"${{TANDEM_SECRETS:-/etc/tandem/secrets}}/{bundle}:/run/secrets:ro"]}, name


def test_common_env_secure_block_joins_a_secure_fleet(secrets: Path) -> None:
    lines = (
        (REPO_ROOT / "env" / "common.env")
        .read_text()
        .split("# A secure fleet", 1)[1]
        .split("# EDIT", 1)[0]
        .splitlines()
    )
    secure = dict(line.removeprefix("# ").split("=", 1) for line in lines if re.match(r"# [A-Z_]+=", line))
    assert set(secure) == {
        "NATS_SERVER",
        "ETCD_ENDPOINTS",
        "NATS_PASSWORD_FILE",
        "NATS_TLS_CA",
        "ETCD_USER",
        "ETCD_PASSWORD_FILE",
        "ETCD_TLS_CA",
    }
    node = str(secrets / "node")
    edited = {k: v.replace("HEAD_NODE_IP", "10.0.0.1").replace("/run/secrets", node) for k, v in secure.items()}
    assert all(Path(edited[name]).is_file() for name in ("NATS_PASSWORD_FILE", "NATS_TLS_CA", "ETCD_PASSWORD_FILE"))
    result = _entrypoint("--dry-run", ROLE="prefill", **{**REMOTE, **edited, "TANDEM_SECRETS_DIR": node})
    assert result.returncode == 0, result.stderr
    assert "; derived: NATS" not in result.stdout and "; derived: ETCD" not in result.stdout


def _command_line(process: psutil.Process) -> str:
    """A child's command line; "" for one that ended meanwhile (a one-shot step, a zombie)."""
    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return ""
