"""Container entrypoint logic: ROLE (and the environment) -> a supervisord config -> supervisord.

`ROLE` names what this node runs; several roles may be combined with commas
(`ROLE=head,ray-head`). Each role is a fixed set of programs:

| role       | programs                                                                  |
| ---------- | ------------------------------------------------------------------------- |
| nats       | nats-server with JetStream                                                |
| etcd       | etcd, listening on the node's address and on loopback                     |
| head       | nats + etcd + `tandem serve $GRAPH` (Frontend, Processor, Router, VllmWorker) |
| frontend   | one `tandem serve $GRAPH --service-name S` per S in FRONTEND_SERVICES (no worker) |
| decode     | `tandem serve components.worker:VllmWorker --service-name VllmWorker`     |
| prefill    | `tandem serve components.prefill_worker:PrefillWorker`                    |
| ray-head   | `tandem ray head` (`ray start --head --block`), plus `tandem serve $GRAPH` when GRAPH is set |
| ray-worker | `tandem ray worker --address=$RAY_ADDRESS` (`ray start --address=... --block`) |
| all        | head + prefill: the whole deployment on one node                          |

Each Tandem program is a `tandem serve` command, exactly what an operator would type on
the node; `tandem serve` runs its own supervisord for the graph's services, so the
supervisord started here is the outer of two. On SIGTERM it stops programs in reverse
priority order, waiting for each: Tandem programs first (they drain in-flight requests),
then Ray, then etcd and NATS, which the draining programs still need.

Only the standard library is used: this runs before anything else in the container.
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

log = logging.getLogger("entrypoint")

DEFAULT_GRAPH = "graphs.agg_router:Frontend"
DEFAULT_FRONTEND_SERVICES = "Frontend,Processor,Router"
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
RAY_STOP_WAIT_S = 60
ETCD_MEMBER_NAME = "tandem"
# `tandem serve` stops its own services one after another, each allowed 60 s to drain.
DEFAULT_TANDEM_STOP_WAIT_S = 300


class EntrypointError(Exception):
    """A configuration the operator must fix; the message names the variable."""


@dataclass(frozen=True)
class Program:
    name: str
    command: tuple[str, ...]
    priority: int
    stop_wait_s: int
    # True where the program's children must all get SIGTERM (nats, etcd, Ray). A nested
    # supervisord gets it alone, so it can stop its services in order.
    stop_as_group: bool


@dataclass(frozen=True)
class Plan:
    roles: tuple[str, ...]
    programs: tuple[Program, ...]
    # The complete environment supervisord and every program get: the container's own
    # plus the defaults derived here (e.g. NATS_SERVER on a node that runs NATS itself).
    environment: dict[str, str]
    derived: dict[str, str]


def _get(env: Mapping[str, str], name: str) -> str | None:
    """An empty value counts as unset: compose env files make `X=` easy to write."""
    value = env.get(name, "").strip()
    return value or None


def _int(env: Mapping[str, str], name: str, default: int, upper: int = 2**31) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 < int(raw) < upper:
        raise EntrypointError(f"{name}={raw!r} is not a whole number between 1 and {upper - 1}")
    return int(raw)


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    return _int(env, name, default, upper=65536)


def parse_roles(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        raise EntrypointError(f"ROLE is not set; set it to one of: {', '.join(ROLES)} (comma-separated to combine)")
    roles = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    unknown = [role for role in roles if role not in ROLES]
    if unknown or not roles:
        raise EntrypointError(f"ROLE={raw!r}: unknown role {', '.join(unknown) or raw!r}; known roles: {', '.join(ROLES)}")
    return roles


def _blocks(roles: Sequence[str], env: Mapping[str, str]) -> list[str]:
    blocks: list[str] = []
    for role in roles:
        for block in ROLES[role]:
            if block == "graph-if-set":
                if _get(env, "GRAPH") is None:
                    continue
                block = "graph"
            if block not in blocks:
                blocks.append(block)
    return blocks


def _required(blocks: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Variables these programs cannot start without, in a stable order."""
    tandem_blocks = {"graph", "frontend", "decode", "prefill"}
    needed: list[str] = []
    if tandem_blocks.intersection(blocks):
        needed.append("CONFIG")
        if "nats" not in blocks:
            needed.append("NATS_SERVER")
        if "etcd" not in blocks:
            needed.append("ETCD_ENDPOINTS")
    # Workers advertise this address for the NIXL KV hand-off and Ray/Gloo/NCCL; a
    # default (localhost) fails only later, at the first remote transfer (FACTS.md).
    if {"graph", "decode", "prefill", "ray-head", "ray-worker"}.intersection(blocks):
        needed.append("VLLM_HOST_IP")
    if "ray-worker" in blocks:
        needed.append("RAY_ADDRESS")
    missing = [name for name in dict.fromkeys(needed) if _get(env, name) is None]
    # etcd advertises the node's address to the other nodes; it is its only need.
    no_etcd_host = _get(env, "ETCD_ADVERTISE_HOST") is None and _get(env, "VLLM_HOST_IP") is None
    if "etcd" in blocks and no_etcd_host and "VLLM_HOST_IP" not in missing:
        missing.append("ETCD_ADVERTISE_HOST (or VLLM_HOST_IP)")
    return missing


def _derive(blocks: Sequence[str], env: Mapping[str, str]) -> dict[str, str]:
    derived: dict[str, str] = {}
    if "nats" in blocks and _get(env, "NATS_SERVER") is None:
        derived["NATS_SERVER"] = f"nats://127.0.0.1:{_port(env, 'NATS_PORT', 4222)}"
    if "etcd" in blocks and _get(env, "ETCD_ENDPOINTS") is None:
        derived["ETCD_ENDPOINTS"] = f"http://127.0.0.1:{_port(env, 'ETCD_PORT', 2379)}"
    host_ip = _get(env, "VLLM_HOST_IP")
    if host_ip is not None:
        # The NIXL side channel must listen on, and hand out, the node's routable address.
        for name in ("TANDEM_ADVERTISE_HOST", "VLLM_NIXL_SIDE_CHANNEL_HOST"):
            if _get(env, name) is None:
                derived[name] = host_ip
    return derived


def _tandem(address: str, config: str, *extra: str) -> tuple[str, ...]:
    return ("tandem", "serve", address, "-f", config, *extra)


def _programs(blocks: Sequence[str], env: Mapping[str, str]) -> list[Program]:
    data_dir = Path(_get(env, "TANDEM_DATA_DIR") or "/data")
    config = _get(env, "CONFIG") or ""
    graph = _get(env, "GRAPH") or DEFAULT_GRAPH
    stop_wait = _int(env, "TANDEM_STOP_WAIT_S", DEFAULT_TANDEM_STOP_WAIT_S)
    ray_extra = tuple(shlex.split(_get(env, "RAY_START_ARGS") or ""))
    host_ip = _get(env, "VLLM_HOST_IP") or ""
    programs: list[Program] = []
    for block in blocks:
        if block == "nats":
            command = (
                "nats-server", "-js", "-sd", str(data_dir / "nats"),
                "-p", str(_port(env, "NATS_PORT", 4222)), "-m", str(_port(env, "NATS_MONITOR_PORT", 8222)),
            )
            programs.append(Program("nats", command, INFRA_PRIORITY, INFRA_STOP_WAIT_S, True))
        elif block == "etcd":
            programs.append(Program("etcd", _etcd_command(env, data_dir), INFRA_PRIORITY, INFRA_STOP_WAIT_S, True))
        elif block == "graph":
            programs.append(Program("tandem-graph", _tandem(graph, config), SERVING_PRIORITY, stop_wait, False))
        elif block == "frontend":
            services = [s.strip() for s in (_get(env, "FRONTEND_SERVICES") or DEFAULT_FRONTEND_SERVICES).split(",")]
            # Listed front to back: the first (Frontend) starts last and stops first.
            for offset, service in enumerate(s for s in services if s):
                command = _tandem(graph, config, "--service-name", service)
                programs.append(Program(f"tandem-{service.lower()}", command, SERVING_PRIORITY - offset, stop_wait, False))
        elif block == "decode":
            command = _tandem(DECODE_ADDRESS, config, "--service-name", "VllmWorker")
            programs.append(Program("tandem-decode", command, SERVING_PRIORITY, stop_wait, False))
        elif block == "prefill":
            command = _tandem(PREFILL_ADDRESS, config)
            programs.append(Program("tandem-prefill", command, PREFILL_PRIORITY, stop_wait, False))
        elif block in ("ray-head", "ray-worker"):
            # `tandem ray` execs `ray start ... --block` with the node's resources (on the CPU
            # build, the Ray resource vLLM's CPU workers ask for); arguments after `--` go
            # to `ray start` unchanged.
            if block == "ray-head":
                command = ("tandem", "ray", "head", f"--port={_port(env, 'RAY_PORT', 6379)}")
            else:
                command = ("tandem", "ray", "worker", f"--address={_get(env, 'RAY_ADDRESS')}")
            command += (f"--node-ip-address={host_ip}",)
            if _get(env, "RAY_CPU_WORKERS") is not None:
                command += (f"--cpu-workers={_int(env, 'RAY_CPU_WORKERS', 1)}",)
            if ray_extra:
                command += ("--", *ray_extra)
            programs.append(Program("ray", command, RAY_PRIORITY, RAY_STOP_WAIT_S, True))
    return programs


def _etcd_command(env: Mapping[str, str], data_dir: Path) -> tuple[str, ...]:
    """The seed's `etcd --advertise-client-urls http://<head-node-ip>:2379
    --listen-client-urls http://<head-node-ip>:2379,http://127.0.0.1:2379`, single member."""
    port = _port(env, "ETCD_PORT", 2379)
    host = _get(env, "ETCD_ADVERTISE_HOST") or _get(env, "VLLM_HOST_IP") or ""
    listen = dict.fromkeys([f"http://{host}:{port}", f"http://127.0.0.1:{port}"])
    # One member: no peer ever connects, so the peer URL stays on loopback.
    peer_url = f"http://127.0.0.1:{_port(env, 'ETCD_PEER_PORT', 2380)}"
    return (
        "etcd",
        "--name", ETCD_MEMBER_NAME,
        "--data-dir", str(data_dir / "etcd"),
        "--advertise-client-urls", f"http://{host}:{port}",
        "--listen-client-urls", ",".join(listen),
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{ETCD_MEMBER_NAME}={peer_url}",
    )


def make_plan(env: Mapping[str, str]) -> Plan:
    """What this node runs, or EntrypointError naming the first thing to fix."""
    roles = parse_roles(_get(env, "ROLE"))
    blocks = _blocks(roles, env)
    missing = _required(blocks, env)
    if missing:
        raise EntrypointError(
            f"ROLE={','.join(roles)} needs {', '.join(missing)}: set "
            f"{'it' if len(missing) == 1 else 'them'} in the role's env file (env/*.env)"
        )
    unedited = sorted(name for name, value in env.items() if any(p in value for p in PLACEHOLDERS))
    if unedited:
        raise EntrypointError(
            f"{', '.join(unedited)} still hold{'s' if len(unedited) == 1 else ''} a placeholder "
            f"({', '.join(PLACEHOLDERS)}): edit env/*.env"
        )
    config = _get(env, "CONFIG")
    if config is not None and not Path(config).is_file():
        raise EntrypointError(f"CONFIG={config!r} is not a file (relative paths start at {Path.cwd()})")
    derived = _derive(blocks, env)
    environment = {**env, **derived}
    return Plan(roles, tuple(_programs(blocks, environment)), environment, derived)


def _supervisor_command(program: Program, environment: Mapping[str, str]) -> str:
    command = list(program.command)
    if program.name == "etcd":
        # etcd reads every ETCD_* variable as a flag; ours (ETCD_ENDPOINTS, ETCD_PORT...)
        # are not its flags and must not reach it.
        unset = [arg for name in sorted(environment) if name.startswith("ETCD_") for arg in ("-u", name)]
        if unset:
            command = ["env", *unset, *command]
    # supervisord expands %(name)s in `command`, so a literal % must be doubled.
    return shlex.join(command).replace("%", "%%")


def render_config(plan: Plan, run_dir: Path, workdir: Path) -> str:
    lines = [
        f"; Generated by entrypoints/render.py for ROLE={','.join(plan.roles)}",
        *(f"; derived: {name}={value}" for name, value in sorted(plan.derived.items())),
        "[supervisord]",
        "nodaemon=true",
        # In the foreground supervisord logs to stdout by itself; no second copy in a file.
        "logfile=/dev/null",
        "logfile_maxbytes=0",
        f"pidfile={run_dir / 'supervisord.pid'}",
        f"childlogdir={run_dir}",
        "",
        "[unix_http_server]",
        f"file={run_dir / 'supervisor.sock'}",
        "chmod=0700",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{run_dir / 'supervisor.sock'}",
    ]
    for program in plan.programs:
        stop_as_group = "true" if program.stop_as_group else "false"
        lines += [
            "",
            f"[program:{program.name}]",
            f"command={_supervisor_command(program, plan.environment)}",
            f"directory={workdir}",
            f"priority={program.priority}",
            "autostart=true",
            "autorestart=true",
            "startsecs=2",
            "stopsignal=TERM",
            f"stopwaitsecs={program.stop_wait_s}",
            f"stopasgroup={stop_as_group}",
            # Whatever still runs when the wait is over dies with its group.
            "killasgroup=true",
            "stdout_logfile=/dev/stdout",
            "stdout_logfile_maxbytes=0",
            "redirect_stderr=true",
        ]
    return "\n".join(lines) + "\n"


def run_dir_from(env: Mapping[str, str]) -> Path:
    return Path(_get(env, "TANDEM_RUN_DIR") or "/tmp/tandem-supervisor")


def _check_binaries(plan: Plan) -> None:
    path = plan.environment.get("PATH")
    for program in plan.programs:
        if shutil.which(program.command[0], path=path) is None:
            raise EntrypointError(f"program {program.name}: {program.command[0]!r} is not on PATH")
    if shutil.which("supervisord", path=path) is None:
        raise EntrypointError("supervisord is not on PATH")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="entrypoint.sh", description="Run this node's ROLE under supervisord.")
    parser.add_argument("--dry-run", action="store_true", help="print the supervisord config and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s entrypoint: %(message)s")
    env = dict(os.environ)
    run_dir = run_dir_from(env)
    try:
        plan = make_plan(env)
        text = render_config(plan, run_dir, Path.cwd())
        if args.dry_run:
            sys.stdout.write(text)
            return 0
        _check_binaries(plan)
    except EntrypointError as exc:
        sys.stderr.write(f"entrypoint: error: {exc}\n")
        return 2
    data_dir = Path(_get(env, "TANDEM_DATA_DIR") or "/data")
    for block in ("nats", "etcd"):
        if any(p.name == block for p in plan.programs):
            (data_dir / block).mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    conf = run_dir / "supervisord.conf"
    conf.write_text(text)
    log.info("ROLE=%s: %s", ",".join(plan.roles), ", ".join(p.name for p in plan.programs))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe("supervisord", ["supervisord", "-n", "-c", str(conf)], plan.environment)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
