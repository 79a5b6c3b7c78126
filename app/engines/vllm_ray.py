"""A vLLM engine larger than its node: vLLM's Ray executor on a running Ray cluster.

An engine uses Ray when its section says `distributed-executor-backend: ray`, or, on a GPU
node, when its tensor x pipeline parallel size exceeds the node's GPUs (vLLM itself would
refuse that with its default executor). Before such an engine starts, its worker waits
until the cluster offers enough devices (other nodes may still be joining), saying so
periodically, and gives up after `ray-wait-timeout-s` naming what is missing.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from app import env

log = logging.getLogger(__name__)

RAY_BACKEND = "ray"
# How often the wait says what it waits for.
DEFAULT_LOG_INTERVAL_S = 10.0
# Between two looks at the cluster's resources (cheap: one GCS query).
_POLL_INTERVAL_S = 1.0


class RayClusterTimeoutError(RuntimeError):
    """The Ray cluster did not offer the engine's devices in time."""


@dataclass(frozen=True)
class RayDevices:
    """What an engine needs from the Ray cluster: `count` units of the resource `resource`."""

    resource: str
    count: int


def _arg(engine_args: dict[str, Any], name: str, default: Any) -> Any:
    for key in (name, name.replace("_", "-")):
        if engine_args.get(key) is not None:
            return engine_args[key]
    return default


def world_size(engine_args: dict[str, Any]) -> int:
    """vLLM workers of one engine: tensor x pipeline x prefill-context parallel sizes."""
    return (
        int(_arg(engine_args, "tensor_parallel_size", 1))
        * int(_arg(engine_args, "pipeline_parallel_size", 1))
        * int(_arg(engine_args, "prefill_context_parallel_size", 1))
    )


def ray_devices_needed(engine_args: dict[str, Any]) -> RayDevices | None:
    """The devices this engine needs from a Ray cluster; None where it runs without Ray."""
    from vllm.platforms import current_platform

    backend = _arg(engine_args, "distributed_executor_backend", None)
    size = world_size(engine_args)
    if backend is None and not current_platform.is_cpu() and size > current_platform.device_count():
        backend = RAY_BACKEND
    if backend != RAY_BACKEND:
        return None
    if current_platform.is_cpu():
        from app.engines.vllm_cpu_ray import CPU_DEVICE_RESOURCE

        return RayDevices(CPU_DEVICE_RESOURCE, size)
    return RayDevices(current_platform.ray_device_key or "GPU", size)


def with_ray_backend_if_needed(engine_args: dict[str, Any]) -> dict[str, Any]:
    """The engine arguments, with the Ray backend chosen where the engine needs Ray."""
    if ray_devices_needed(engine_args) is None:
        return engine_args
    args = {k: v for k, v in engine_args.items() if k.replace("-", "_") != "distributed_executor_backend"}
    args["distributed_executor_backend"] = RAY_BACKEND
    return args


def _address(configured: str | None) -> str:
    return configured or env.RAY_ADDRESS.get() or "auto"


def wait_for_ray_devices(
    need: RayDevices,
    address: str | None,
    timeout_s: float,
    log_interval_s: float = DEFAULT_LOG_INTERVAL_S,
) -> str:
    """Block until the Ray cluster at `address` offers `need` (in total); return its address.

    `address`: HOST:PORT of the Ray head; None: RAY_ADDRESS, else the cluster this node
    joined. The engine's preparation exports the address found as RAY_ADDRESS
    (app/engines/vllm_process.py).
    """
    import ray

    wanted = _address(address)
    started = time.monotonic()
    next_log = started
    have = 0.0
    nodes = 0
    connected_to: str | None = None
    last_error = ""
    try:
        while True:
            elapsed = time.monotonic() - started
            if connected_to is None and not _answers(wanted):
                last_error = "nothing answers there"
            elif connected_to is None:
                try:
                    ray.init(
                        address=wanted, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False
                    )
                    # Said as the operator gave it; "auto" as the address it found.
                    connected_to = wanted if wanted != "auto" else ray.get_runtime_context().gcs_address
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if connected_to is not None:
                have = ray.cluster_resources().get(need.resource, 0.0)
                nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
                if have >= need.count:
                    log.info(
                        "Ray cluster at %s offers %g %s on %d nodes (need %d): starting the engine",
                        connected_to,
                        have,
                        need.resource,
                        nodes,
                        need.count,
                    )
                    return connected_to
            if elapsed >= timeout_s:
                raise RayClusterTimeoutError(
                    _missing(need, connected_to or wanted, connected_to is not None, have, nodes, timeout_s, last_error)
                )
            if time.monotonic() >= next_log:
                if connected_to is None:
                    log.info(
                        "waiting for the Ray cluster at %s to answer (need %d %s), %.0f s of %.0f s: %s",
                        wanted,
                        need.count,
                        need.resource,
                        elapsed,
                        timeout_s,
                        last_error,
                    )
                else:
                    log.info(
                        "waiting for the Ray cluster at %s: need %d %s, have %g on %d nodes, %.0f s of %.0f s",
                        connected_to,
                        need.count,
                        need.resource,
                        have,
                        nodes,
                        elapsed,
                        timeout_s,
                    )
                next_log += log_interval_s
            time.sleep(_POLL_INTERVAL_S)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _answers(address: str) -> bool:
    """Whether the GCS port takes connections. ray.init on an address nobody answers hangs
    for minutes, far past any timeout of ours; "auto" (a local cluster) fails fast itself."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return True
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except OSError:
        return False
    return True


def _missing(
    need: RayDevices, address: str, reachable: bool, have: float, nodes: int, timeout_s: float, error: str
) -> str:
    if not reachable:
        return (
            f"need {need.count} {need.resource} in the Ray cluster at {address}, which did not answer "
            f"within {timeout_s:g} s ({error}); is `tandem ray head` running there?"
        )
    return (
        f"need {need.count} {need.resource} in the Ray cluster at {address}, have {have:g} on {nodes} "
        f"node(s) after {timeout_s:g} s; start `tandem ray worker --address {address}` on more nodes"
    )
