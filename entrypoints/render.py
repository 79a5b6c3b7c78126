"""Container entrypoint logic: ROLE (and the environment) -> a supervisord config -> supervisord.

`ROLE` names what this node runs; several roles may be combined with commas
(`ROLE=head,ray-head`). Each role is a fixed set of programs:

| role       | programs                                                                  |
| ---------- | ------------------------------------------------------------------------- |
| nats       | nats-server with JetStream                                                |
| etcd       | etcd, listening on the node's address and on loopback                     |
| head       | nats + etcd + `tandem serve $GRAPH` (Frontend routing in process, Processor, VllmWorker) |
| frontend   | `tandem serve $GRAPH --service-name S` per S in FRONTEND_SERVICES (no worker; no idle Router) |
| decode     | `tandem serve components.worker:VllmWorker --service-name VllmWorker`     |
| prefill    | `tandem serve components.prefill_worker:PrefillWorker --service-name PrefillWorker` |
| ray-head   | `tandem ray head` (`ray start --head --block`), plus `tandem serve $GRAPH` when GRAPH is set |
| ray-worker | `tandem ray worker --address=$RAY_ADDRESS` (`ray start --address=... --block`) |
| all        | head + prefill: the whole deployment on one node                          |

Where TANDEM_SECRETS_DIR (default /run/secrets, a read-only mount of what `tandem infra
secrets` wrote) holds ca.pem, the fleet is secure: NATS runs from a config file written
here, owner-only (TLS required, the fleet user's password), etcd with TLS and signed
tokens, and a one-shot program, etcd-auth, turns etcd's authentication on once etcd answers;
every Tandem program connects with the folder's CA and password files. No password is on
a command line: the servers and etcd-auth read them from files (docs/security.md).

Each Tandem program is a `tandem serve` command, exactly what an operator would type on
the node; `tandem serve` runs its own supervisord for the graph's services, so the
supervisord started here is the outer of two. On SIGTERM it stops programs in reverse
priority order, waiting for each: Tandem programs first (they drain in-flight requests;
each gets TANDEM_STOP_WAIT_S for every service it runs, which its own supervisord stops
one after another), then Ray, then etcd and NATS, which the draining programs still need.

The NATS and etcd command lines, the supervisord config and the stop budgets are
app.launch's, the same `tandem infra` and `tandem serve` use; every variable is read
through app.env. This runs with the image's Python, in which the app package is installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import env
from app.infra import FLEET_USER, SecureFiles
from app.launch import restart_backoff, servers, supervisord
from app.launch.supervisord import Program
from app.node import configured_node_address

log = logging.getLogger("entrypoint")

DECODE_ADDRESS = "components.worker:VllmWorker"
PREFILL_ADDRESS = "components.prefill_worker:PrefillWorker"

# Stand-ins the env/*.env files ship with, where an operator must write an address.
PLACEHOLDERS = ("HEAD_NODE_IP", "THIS_NODE_IP", "RAY_HEAD_IP")

ROLES: dict[str, tuple[str, ...]] = {
    "nats": ("nats",),
    "etcd": ("etcd",),
    "head": ("nats", "etcd", "graph"),
    "frontend": ("frontend",),
    "decode": ("decode",),
    "prefill": ("prefill",),
    "ray-head": ("ray-head", "graph-if-set"),
    "ray-worker": ("ray-worker",),
    "all": ("nats", "etcd", "graph", "prefill"),
}

# Lower starts first and stops last (supervisord's priority).
INFRA_PRIORITY = 10
RAY_PRIORITY = 20
PREFILL_PRIORITY = 50
SERVING_PRIORITY = 60
INFRA_STOP_WAIT_S = 30
ETCD_AUTH_STOP_WAIT_S = 5
# What etcd-auth leaves in TANDEM_RUN_DIR once etcd's auth is on (healthcheck.sh looks).
ETCD_AUTH_DONE = "etcd-auth.done"
NATS_CONFIG = "nats.conf"
RAY_STOP_WAIT_S = 60


class EntrypointError(Exception):
    """A configuration the operator must fix; the message names the variable."""


@dataclass(frozen=True)
class Plan:
    roles: tuple[str, ...]
    programs: tuple[Program, ...]
    # The complete environment supervisord and every program get: the container's own
    # plus the defaults derived here (e.g. NATS_SERVER on a node that runs NATS itself).
    environment: dict[str, str]
    derived: dict[str, str]
    # Files written owner-only before supervisord starts (a secure NATS's config, which holds
    # its password): path -> text.
    private_files: dict[Path, str]


def parse_roles(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        raise EntrypointError(f"ROLE is not set; set it to one of: {', '.join(ROLES)} (comma-separated to combine)")
    roles = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    unknown = [role for role in roles if role not in ROLES]
    if unknown or not roles:
        raise EntrypointError(
            f"ROLE={raw!r}: unknown role {', '.join(unknown) or raw!r}; known roles: {', '.join(ROLES)}"
        )
    return roles


def _blocks(roles: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    blocks: list[str] = []
    for role in roles:
        for block in ROLES[role]:
            if block == "graph-if-set":
                if env.GRAPH.raw(environ) is None:
                    continue
                block = "graph"
            if block not in blocks:
                blocks.append(block)
    return blocks


def _required(blocks: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Variables these programs cannot start without, in a stable order."""
    tandem_blocks = {"graph", "frontend", "decode", "prefill"}
    needed: list[env.Variable[Any]] = []
    if tandem_blocks.intersection(blocks):
        needed.append(env.CONFIG)
        if "nats" not in blocks:
            needed.append(env.NATS_SERVER)
        if "etcd" not in blocks:
            needed.append(env.ETCD_ENDPOINTS)
    # Workers hand this address to vLLM for the NIXL KV hand-off and Ray/Gloo/NCCL; a
    # default (localhost) fails only later, at the first remote transfer.
    if {"graph", "decode", "prefill", "ray-head", "ray-worker"}.intersection(blocks):
        needed.append(env.VLLM_HOST_IP)
    if "ray-worker" in blocks:
        needed.append(env.RAY_ADDRESS)
    missing = [v.name for v in dict.fromkeys(needed) if v.raw(environ) is None]
    # etcd advertises the node's address to the other nodes; it is its only need.
    no_etcd_host = env.ETCD_ADVERTISE_HOST.raw(environ) is None and configured_node_address(environ) is None
    if "etcd" in blocks and no_etcd_host and env.VLLM_HOST_IP.name not in missing:
        missing.append("ETCD_ADVERTISE_HOST (or VLLM_HOST_IP)")
    return missing


def secrets_of(environ: Mapping[str, str]) -> SecureFiles | None:
    """The fleet's files where TANDEM_SECRETS_DIR holds its CA (a secure fleet), else None."""
    secure = SecureFiles(Path(env.TANDEM_SECRETS_DIR.get(environ)))
    return secure if secure.ca_cert.is_file() else None


def _check_secrets(blocks: Sequence[str], secure: SecureFiles) -> None:
    """Every file this node's programs read is there and readable, or the error naming them."""
    serves = {"nats", "etcd"}.intersection(blocks)
    needed = secure.head_files() if serves else secure.node_files()
    missing = [path.name for path in needed if not os.access(path, os.R_OK)]
    if missing:
        bundle = "head/" if serves else "node/"
        raise EntrypointError(
            f"TANDEM_SECRETS_DIR={secure.folder} holds ca.pem (a secure fleet) but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing or not readable by uid {os.getuid()}: mount the "
            f"{bundle} folder of `tandem infra secrets` there, owned by this uid (its --owner)"
        )


def _check_secure_urls(blocks: Sequence[str], environment: Mapping[str, str]) -> None:
    if not {"graph", "frontend", "decode", "prefill"}.intersection(blocks):
        return
    for variable, scheme, example in (
        (env.NATS_SERVER, "tls://", f"tls://{FLEET_USER}@HEAD_NODE_IP:4222"),
        (env.ETCD_ENDPOINTS, "https://", "https://HEAD_NODE_IP:2379"),
    ):
        value = variable.raw(environment) or ""
        if not value.startswith(scheme):
            raise EntrypointError(
                f"TANDEM_SECRETS_DIR holds ca.pem (a secure fleet): {variable.name} must use {scheme} "
                f"(e.g. {example}, as `tandem infra secrets` prints), not {value.partition('://')[0]}://"
            )


def _derive(blocks: Sequence[str], environ: Mapping[str, str], secure: SecureFiles | None) -> dict[str, str]:
    derived: dict[str, str] = {}
    nats_scheme, etcd_scheme = ("tls://" + FLEET_USER + "@", "https://") if secure else ("nats://", "http://")
    if "nats" in blocks and env.NATS_SERVER.raw(environ) is None:
        derived[env.NATS_SERVER.name] = f"{nats_scheme}127.0.0.1:{env.NATS_PORT.get(environ)}"
    if "etcd" in blocks and env.ETCD_ENDPOINTS.raw(environ) is None:
        derived[env.ETCD_ENDPOINTS.name] = f"{etcd_scheme}127.0.0.1:{env.ETCD_PORT.get(environ)}"
    if secure is not None:
        # The client side of a secure fleet, from the mounted folder, where not set otherwise.
        for variable, value in (
            (env.NATS_PASSWORD_FILE, str(secure.nats_password_file)),
            (env.NATS_TLS_CA, str(secure.ca_cert)),
            (env.ETCD_USER, FLEET_USER),
            (env.ETCD_PASSWORD_FILE, str(secure.etcd_password_file)),
            (env.ETCD_TLS_CA, str(secure.ca_cert)),
        ):
            if variable.raw(environ) is None:
                derived[variable.name] = value
    node = configured_node_address(environ)
    if node is not None and env.VLLM_NIXL_SIDE_CHANNEL_HOST.raw(environ) is None:
        # vLLM's NIXL side channel must listen on, and hand out, the node's routable
        # address, in every engine process of the node (Ray's workers too).
        derived[env.VLLM_NIXL_SIDE_CHANNEL_HOST.name] = node
    return derived


def _binary(name: str) -> str:
    # A dry run where the server is not installed still prints the plan; a real start
    # checks every program's binary first (_check_binaries).
    try:
        return servers.find_binary(name)
    except FileNotFoundError:
        return name


def _graph_services(address: str, config: str) -> tuple[list[str], frozenset[str]]:
    """The services of `tandem serve ADDRESS -f CONFIG`, and those of them it runs inside
    another (the Router where the config has the Frontend route in process, the default):
    the plan `tandem serve` itself makes (app.sdk.serve_plan)."""
    # Imported here: only nodes that serve a graph's services pay for importing it.
    from app.sdk.config import ConfigError
    from app.sdk.graph import GraphError
    from app.sdk.serve_plan import serve_plan

    try:
        plan = serve_plan(address, config or None)
    except (GraphError, ConfigError) as exc:
        raise EntrypointError(f"GRAPH={address!r} with CONFIG={config!r}: {exc}") from None
    return [spec.name for spec in plan.services], plan.embedded


def _tandem(address: str, config: str, *extra: str) -> list[str]:
    return ["tandem", "serve", address, "-f", config, *extra]


def _programs(
    blocks: Sequence[str], environ: Mapping[str, str], secure: SecureFiles | None, private_files: dict[Path, str]
) -> list[Program]:
    """The programs of `blocks`; a secure NATS's config file is added to `private_files`."""
    data_dir = Path(env.TANDEM_DATA_DIR.get(environ))
    run_dir = Path(env.TANDEM_RUN_DIR.get(environ))
    config = env.CONFIG.get(environ) or ""
    graph = env.GRAPH.get(environ)
    # A `tandem serve` of one service: that service's budget, and its supervisord's exit.
    one_service_s = supervisord.nested_stop_wait_s(1, env.TANDEM_STOP_WAIT_S.get(environ))
    ray_extra = tuple(shlex.split(env.RAY_START_ARGS.get(environ) or ""))
    node = configured_node_address(environ) or ""
    programs: list[Program] = []
    for block in blocks:
        if block == "nats":
            if secure is not None:
                # A config file, not flags: it holds the password (`ps` shows command lines).
                config_path = run_dir / NATS_CONFIG
                private_files[config_path] = servers.nats_secure_config(
                    data_dir / "nats",
                    "0.0.0.0",
                    env.NATS_PORT.get(environ),
                    env.NATS_MONITOR_PORT.get(environ),
                    *secure.cert("nats"),
                    FLEET_USER,
                    secure.password(secure.nats_password_file),
                )
                command = [_binary("nats-server"), "-c", str(config_path)]
            else:
                command = servers.nats_command(
                    _binary("nats-server"),
                    data_dir / "nats",
                    env.NATS_PORT.get(environ),
                    env.NATS_MONITOR_PORT.get(environ),
                )
            programs.append(Program("nats", command, INFRA_STOP_WAIT_S, priority=INFRA_PRIORITY))
        elif block == "etcd":
            # The seed's `etcd --advertise-client-urls http://<head-node-ip>:2379
            # --listen-client-urls http://<head-node-ip>:2379,http://127.0.0.1:2379`.
            host = env.ETCD_ADVERTISE_HOST.get(environ) or node
            tls_flags = None if secure is None else servers.etcd_tls_flags(*secure.cert("etcd"), *secure.token_keys())
            command = servers.etcd_command(
                _binary("etcd"),
                data_dir / "etcd",
                host,
                env.ETCD_PORT.get(environ),
                env.ETCD_PEER_PORT.get(environ),
                environ,
                tls_flags=tls_flags,
            )
            programs.append(Program("etcd", command, INFRA_STOP_WAIT_S, priority=INFRA_PRIORITY))
            if secure is not None:
                # etcd turns auth on only through its API, once it runs; until then Tandem's
                # programs retry their connection (etcd answers "authentication is not enabled").
                enable_auth = [
                    "tandem", "infra", "enable-auth",
                    "--secrets", str(secure.folder),
                    "--endpoint", f"127.0.0.1:{env.ETCD_PORT.get(environ)}",
                    "--done-file", str(run_dir / ETCD_AUTH_DONE),
                ]  # fmt: skip
                programs.append(
                    Program("etcd-auth", enable_auth, ETCD_AUTH_STOP_WAIT_S, priority=INFRA_PRIORITY + 1, one_shot=True)
                )
        elif block == "graph":
            services, embedded = _graph_services(graph, config)
            # Its own supervisord stops them one after another: this one waits for all.
            stop_wait_s = supervisord.nested_stop_wait_s(
                len(set(services) - embedded), env.TANDEM_STOP_WAIT_S.get(environ)
            )
            programs.append(
                Program(
                    "tandem-graph", _tandem(graph, config), stop_wait_s, priority=SERVING_PRIORITY, stop_as_group=False
                )
            )
        elif block == "frontend":
            listed = [s.strip() for s in env.FRONTEND_SERVICES.get(environ).split(",") if s.strip()]
            # An idle Router would still ingest every KV event of the fleet.
            _, embedded = _graph_services(graph, config)
            services = [s for s in listed if s not in embedded]
            # Listed front to back: the first (Frontend) starts last and stops first.
            for offset, service in enumerate(services):
                command = _tandem(graph, config, "--service-name", service)
                programs.append(
                    Program(
                        f"tandem-{service.lower()}",
                        command,
                        one_service_s,
                        priority=SERVING_PRIORITY - offset,
                        stop_as_group=False,
                    )
                )
        elif block == "decode":
            command = _tandem(DECODE_ADDRESS, config, "--service-name", "VllmWorker")
            programs.append(
                Program("tandem-decode", command, one_service_s, priority=SERVING_PRIORITY, stop_as_group=False)
            )
        elif block == "prefill":
            command = _tandem(PREFILL_ADDRESS, config, "--service-name", "PrefillWorker")
            programs.append(
                Program("tandem-prefill", command, one_service_s, priority=PREFILL_PRIORITY, stop_as_group=False)
            )
        elif block in ("ray-head", "ray-worker"):
            # `tandem ray` execs `ray start ... --block` with the node's resources (on the CPU
            # build, the Ray resource vLLM's CPU workers ask for); arguments after `--` go
            # to `ray start` unchanged.
            if block == "ray-head":
                command = ["tandem", "ray", "head", f"--port={env.RAY_PORT.get(environ)}"]
            else:
                command = ["tandem", "ray", "worker", f"--address={env.RAY_ADDRESS.get(environ)}"]
            # vLLM's own address variable, as `tandem ray` reads it (app/ray_cluster.py).
            command.append(f"--node-ip-address={env.VLLM_HOST_IP.get(environ)}")
            cpu_workers = env.RAY_CPU_WORKERS.get(environ)
            if cpu_workers is not None:
                command.append(f"--cpu-workers={cpu_workers}")
            if ray_extra:
                command += ["--", *ray_extra]
            programs.append(Program("ray", command, RAY_STOP_WAIT_S, priority=RAY_PRIORITY))
    return programs


def make_plan(environ: Mapping[str, str]) -> Plan:
    """What this node runs, or EntrypointError naming the first thing to fix."""
    try:
        roles = parse_roles(env.ROLE.get(environ))
        blocks = _blocks(roles, environ)
        missing = _required(blocks, environ)
        if missing:
            raise EntrypointError(
                f"ROLE={','.join(roles)} needs {', '.join(missing)}: set "
                f"{'it' if len(missing) == 1 else 'them'} in the role's env file (env/*.env)"
            )
        unedited = sorted(name for name, value in environ.items() if any(p in value for p in PLACEHOLDERS))
        if unedited:
            raise EntrypointError(
                f"{', '.join(unedited)} still hold{'s' if len(unedited) == 1 else ''} a placeholder "
                f"({', '.join(PLACEHOLDERS)}): edit env/*.env"
            )
        config = env.CONFIG.get(environ)
        if config is not None and not Path(config).is_file():
            raise EntrypointError(f"CONFIG={config!r} is not a file (relative paths start at {Path.cwd()})")
        secure = secrets_of(environ)
        if secure is not None:
            _check_secrets(blocks, secure)
        derived = _derive(blocks, environ, secure)
        environment = {**environ, **derived}
        if secure is not None:
            _check_secure_urls(blocks, environment)
        private_files: dict[Path, str] = {}
        programs = tuple(_programs(blocks, environment, secure, private_files))
        return Plan(roles, programs, environment, derived, private_files)
    except env.EnvError as exc:
        raise EntrypointError(str(exc)) from None


def render_config(plan: Plan, run_dir: Path, workdir: Path) -> str:
    comments = [
        f"Generated by entrypoints/render.py for ROLE={','.join(plan.roles)}",
        *(f"derived: {name}={value}" for name, value in sorted(plan.derived.items())),
    ]
    return supervisord.config_text(plan.programs, run_dir, workdir, comments)


def write_private_files(plan: Plan) -> None:
    """Write the plan's private files, readable by this user only."""
    for path, text in plan.private_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        path.chmod(0o600)  # an existing file keeps its mode through O_CREAT


def _binary_of(command: Sequence[str]) -> str:
    words = list(command)
    if words[0] == "env":  # `env -u NAME ... BINARY ...` (etcd's command)
        words = words[1:]
        while words[0] == "-u":
            words = words[2:]
    return words[0]


def _check_binaries(plan: Plan) -> str:
    """supervisord's path, once every program's binary is known to exist."""
    path = plan.environment.get("PATH")
    for program in plan.programs:
        binary = _binary_of(program.command)
        if shutil.which(binary, path=path) is None:
            raise EntrypointError(f"program {program.name}: {binary!r} is not on PATH")
    try:
        return supervisord.supervisord_binary()
    except FileNotFoundError as exc:
        raise EntrypointError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="entrypoint.sh", description="Run this node's ROLE under supervisord.")
    parser.add_argument("--dry-run", action="store_true", help="print the supervisord config and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s entrypoint: %(message)s")
    environ = dict(os.environ)
    run_dir = Path(env.TANDEM_RUN_DIR.get(environ))
    try:
        plan = make_plan(environ)
        text = render_config(plan, run_dir, Path.cwd())
        if args.dry_run:
            sys.stdout.write(text)
            return 0
        supervisord_path = _check_binaries(plan)
    except EntrypointError as exc:
        sys.stderr.write(f"entrypoint: error: {exc}\n")
        return 2
    data_dir = Path(env.TANDEM_DATA_DIR.get(environ))
    for block in ("nats", "etcd"):
        if any(p.name == block for p in plan.programs):
            (data_dir / block).mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A container restart keeps its files: etcd-auth's mark of the last start is not this
    # one's, nor are the restart listener's marks of programs in a loop.
    (run_dir / ETCD_AUTH_DONE).unlink(missing_ok=True)
    shutil.rmtree(run_dir / restart_backoff.CRASH_LOOP_DIR, ignore_errors=True)
    write_private_files(plan)
    conf = run_dir / "supervisord.conf"
    conf.write_text(text)
    log.info("ROLE=%s: %s", ",".join(plan.roles), ", ".join(p.name for p in plan.programs))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(supervisord_path, [supervisord_path, "-n", "-c", str(conf)], plan.environment)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
