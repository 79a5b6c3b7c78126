"""`tandem ray head` and `tandem ray worker`: this node joins the Ray cluster that serves a
model too large for one node (the seed's multi-node sized models).

Each is `ray start ... --block` with what vLLM needs from every node:
- the node's own address: `--node-ip-address` (default: VLLM_HOST_IP), also exported as
  VLLM_HOST_IP, because the vLLM workers Ray starts here read it to tell the other ranks
  where to reach them;
- the network interface variables (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, ...) passed on
  from the environment unchanged: Ray's worker processes inherit them;
- on a node with vLLM's CPU build, the Ray resource the `vllm_cpu_ray` plugin places
  workers by (`--cpu-workers` units); GPU nodes offer their GPUs as Ray detects them.

The command execs `ray` in the foreground: stopping it (SIGTERM) stops this node's Ray
processes, which is how supervisord and docker stop a node. Never `ray stop`: it kills
every Ray process of the machine by name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from app import env
from app.engines.vllm_cpu_ray import CPU_DEVICE_RESOURCE

log = logging.getLogger(__name__)

DEFAULT_GCS_PORT = env.RAY_PORT.default
# Ray's worker processes take ports from this range unless told otherwise; a GCS port
# inside it collides with them sooner or later.
RAY_WORKER_PORTS = range(10002, 20000)
# The variables that pick the network interface of the collective and transfer libraries.
INTERFACE_VARIABLES = (
    env.GLOO_SOCKET_IFNAME,
    env.NCCL_SOCKET_IFNAME,
    env.TP_SOCKET_IFNAME,
    env.NCCL_IB_HCA,
    env.UCX_NET_DEVICES,
)


class RayStartError(ValueError):
    """Bad `tandem ray` arguments, said in terms of what to change."""


def is_cpu_build() -> bool:
    """Whether this node's vLLM is the CPU build (the `vllm-cpu` distribution); no vLLM import."""
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def _resources(extra: Sequence[str], device: str, cpu_workers: int) -> tuple[list[str], str | None]:
    """`extra` without its --resources, and the JSON to pass instead (ours merged into theirs)."""
    rest: list[str] = []
    theirs: dict[str, float] = {}
    args = list(extra)
    while args:
        arg = args.pop(0)
        if arg == "--resources" or arg.startswith("--resources="):
            raw = arg.partition("=")[2] if "=" in arg else (args.pop(0) if args else "")
            try:
                theirs = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise RayStartError(f"--resources must be JSON, e.g. '{{\"x\": 1}}': {exc}") from None
        else:
            rest.append(arg)
    if device == "cpu":
        theirs.setdefault(CPU_DEVICE_RESOURCE, cpu_workers)
    return rest, json.dumps(theirs) if theirs else None


def ray_start_command(
    role: str,
    *,
    address: str | None = None,
    port: int = DEFAULT_GCS_PORT,
    node_ip: str | None = None,
    device: str = "auto",
    cpu_workers: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `ray start` command line for this node (head or worker)."""
    if device == "auto":
        device = "cpu" if is_cpu_build() else "gpu"
    if cpu_workers < 1:
        raise RayStartError("--cpu-workers must be at least 1")
    ray = str(Path(sys.executable).with_name("ray"))
    if role == "head":
        if port in RAY_WORKER_PORTS:
            raise RayStartError(
                f"--port {port} lies in Ray's worker port range {RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}; "
                f"pick one outside it (default {DEFAULT_GCS_PORT})"
            )
        command = [ray, "start", "--head", f"--port={port}"]
    else:
        if not address or ":" not in address:
            raise RayStartError(
                f"--address must be the Ray head as HOST:PORT (e.g. 10.0.0.1:{DEFAULT_GCS_PORT}), got {address!r}"
            )
        command = [ray, "start", f"--address={address}"]
    if node_ip:
        command.append(f"--node-ip-address={node_ip}")
    rest, resources = _resources(extra, device, cpu_workers)
    if resources:
        command.append(f"--resources={resources}")
    return [*command, "--block", *rest]


def ray_start_env(node_ip: str | None) -> dict[str, str]:
    environment = dict(os.environ)
    if node_ip:
        environment[env.VLLM_HOST_IP.name] = node_ip
    # Usage statistics would phone home from every node.
    environment.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return environment


def _run(args: argparse.Namespace) -> int:
    # vLLM's own variable, not this node's Tandem address (app.node): on a node with
    # several networks vLLM's ranks may use another one than Tandem's records.
    node_ip = args.node_ip_address or env.VLLM_HOST_IP.get()
    extra = list(args.ray_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    try:
        command = ray_start_command(
            args.ray_command,
            address=args.address,
            port=args.port,
            node_ip=node_ip,
            device=args.device,
            cpu_workers=args.cpu_workers,
            extra=extra,
        )
    except RayStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not node_ip:
        log.warning("no --node-ip-address or VLLM_HOST_IP: Ray picks this node's address itself")
    interfaces = {variable.name: variable.get() for variable in INTERFACE_VARIABLES if variable.get()}
    log.info(
        "Ray %s on %s; interfaces %s: %s",
        args.ray_command,
        node_ip or "(Ray's choice)",
        interfaces or "(library defaults)",
        " ".join(command),
    )
    os.execve(command[0], command, ray_start_env(node_ip))


_EPILOG = f"""\
Every node of a Ray cluster runs one of these, in the foreground (stop it with SIGTERM or
Ctrl-C; never `ray stop`, which kills every Ray process on the machine by name):

  head node:   VLLM_HOST_IP=10.0.0.1 tandem ray head
  other nodes: VLLM_HOST_IP=10.0.0.2 tandem ray worker --address 10.0.0.1:{DEFAULT_GCS_PORT}

then `ray status` on any node shows the cluster's devices. Arguments after `--` go to
`ray start` unchanged (e.g. -- --num-gpus=8 --object-store-memory=2000000000).

Environment: VLLM_HOST_IP (this node's address, if --node-ip-address is not given);
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (the interface carrying that address) and the
other interface variables are passed to Ray's workers as they are.
On vLLM's CPU build the node offers `--cpu-workers` units of the Ray resource
"{CPU_DEVICE_RESOURCE}" (one per tensor-parallel rank it hosts).
Ports: the head's GCS port (--port), and on every node Ray's node manager, object manager
and worker ports (10002-19999 unless --min-worker-port/--max-worker-port say otherwise).
"""


def add_cli(commands: argparse._SubParsersAction) -> None:
    ray = commands.add_parser(
        "ray",
        help="join this node to a Ray cluster (models larger than one node)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    roles = ray.add_subparsers(dest="ray_command", required=True)
    head = roles.add_parser(
        "head",
        help="start the Ray head on this node (ray start --head --block)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    head.add_argument(
        "--port",
        type=int,
        default=DEFAULT_GCS_PORT,
        help=f"GCS port other nodes join at (default {DEFAULT_GCS_PORT}; not within 10002-19999)",
    )
    head.set_defaults(address=None)
    worker = roles.add_parser(
        "worker",
        help="join the Ray head at --address (ray start --address=... --block)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    worker.add_argument("--address", required=True, help=f"the Ray head as HOST:PORT, e.g. 10.0.0.1:{DEFAULT_GCS_PORT}")
    worker.set_defaults(port=DEFAULT_GCS_PORT)
    for parser in (head, worker):
        parser.add_argument(
            "--node-ip-address", help="this node's address as the others reach it (default: VLLM_HOST_IP)"
        )
        parser.add_argument(
            "--device",
            choices=["auto", "gpu", "cpu"],
            default="auto",
            help="what the node's vLLM workers run on; auto: cpu where vLLM's CPU build is installed",
        )
        parser.add_argument(
            "--cpu-workers",
            type=int,
            default=1,
            help="CPU nodes: vLLM workers (tensor-parallel ranks) this node hosts "
            f"(the {CPU_DEVICE_RESOURCE} resource)",
        )
        parser.add_argument("ray_args", nargs=argparse.REMAINDER, help="-- then arguments for `ray start`")
        parser.set_defaults(func=_run)
